//! The cluster authority store: etcd v3, through transactions.
//!
//! Each volume is one key, `/ferrodisk/volumes/<volume>`, holding the JSON of its
//! [`VolumeRecord`]. The compare-and-set token is the key's `mod_revision`: a write is a
//! transaction that compares it (or, for a new volume, that `create_revision == 0`, i.e. the
//! key is absent) and puts the new JSON only if the comparison holds. etcd orders all
//! transactions, so two writers holding the same revision can never both win.
//!
//! The rest of the daemon is synchronous threads, so the store owns a current-thread tokio
//! runtime and blocks on each call. A thread of the store's own drives that runtime all the
//! time, so connections are serviced between calls too: a member that goes away is noticed
//! when its connection closes, not by the next request failing on it, and HTTP/2 keepalives
//! find a member that went silent. Any number of threads may call at once; their requests
//! share one HTTP/2 connection per endpoint.
//!
//! Endpoints: the store keeps one client per endpoint and sends each call to the last one
//! that answered. A read that fails there is tried on the others in turn. A compare-and-set
//! moves on only when the connection could not even be made, because a transaction that was
//! sent and then timed out may have been applied: that outcome is reported as an error, and
//! the caller re-reads. (`etcd-client`'s own balanced channel fails calls routed to a dead
//! endpoint instead of skipping it, etcdv3/etcd-client#39, hence one client per endpoint.)
//!
//! Every call is bounded: connect and request timeouts per endpoint, and a deadline on the
//! whole call, so an unreachable or silent etcd turns into [`AuthorityError::Backend`] instead
//! of a hang.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, PutOptions, Txn, TxnOp,
};

use super::authority::{check_volume_name, AuthorityError, Store, Versioned, VolumeRecord};

/// Where volume records live in the etcd key space.
const KEY_PREFIX: &str = "/ferrodisk/volumes/";
/// Bound on establishing a TCP connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one gRPC request to one endpoint once a connection is up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a whole call, across endpoints.
const CALL_DEADLINE: Duration = Duration::from_secs(8);
/// HTTP/2 keepalive on each connection: ping interval, and how long a ping may go unanswered.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(3));

/// A [`Store`] in etcd: key `/ferrodisk/volumes/<volume>`, JSON value; compare-and-set is a
/// transaction on the key's `mod_revision`.
pub struct EtcdStore {
    endpoints: Vec<String>,
    /// One client per endpoint, in the same order. Declared before `driver` so that they are
    /// dropped first: their background tasks live in its runtime.
    clients: Vec<Client>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    driver: Driver,
}

/// A current-thread tokio runtime and the thread that drives it until the store is dropped.
/// Callers' `block_on` runs their request on their own thread while the driver thread runs
/// the I/O and the clients' background tasks.
struct Driver {
    runtime: Arc<tokio::runtime::Runtime>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Driver {
    fn start() -> io::Result<Driver> {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        );
        let stop = Arc::new(Stop::default());
        let thread = std::thread::Builder::new()
            .name("etcd-client".into())
            .spawn({
                let (runtime, stop) = (runtime.clone(), stop.clone());
                move || runtime.block_on(stop.wait())
            })?;
        Ok(Driver {
            runtime,
            stop,
            thread: Some(thread),
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.signal();
        if let Some(thread) = self.thread.take() {
            // A panic there has been reported already; there is nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// A one-shot stop signal that a future can wait for (tokio's `sync` feature is not enabled).
#[derive(Default)]
struct Stop {
    stopped: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Stop {
    fn signal(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            // Register first, then check, so a signal in between is not lost.
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if self.stopped.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Whether a failed call may be sent to the next endpoint.
#[derive(Clone, Copy)]
enum Retry {
    /// Reads: always.
    Anywhere,
    /// Writes: only if the request cannot have reached etcd.
    IfNeverSent,
}

impl EtcdStore {
    /// Connects to comma-separated endpoints (`http://127.0.0.1:2379,...`) and checks that
    /// one of them answers a read, so a wrong or unreachable address fails here.
    pub fn connect(endpoints: &str) -> Result<EtcdStore, AuthorityError> {
        let list: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if list.is_empty() {
            return Err(AuthorityError::Backend(format!(
                "no etcd endpoint in `{endpoints}`: expected http://HOST:PORT[,http://HOST:PORT...]"
            )));
        }
        let driver = Driver::start().map_err(|e| {
            AuthorityError::Backend(format!("cannot start the etcd client runtime: {e}"))
        })?;
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            .with_keep_alive_while_idle(true);
        // Connecting only builds a lazy channel: no I/O happens until the first request.
        let clients = list
            .iter()
            .map(|endpoint| {
                driver
                    .block_on(Client::connect([endpoint], Some(options.clone())))
                    .map_err(|e| {
                        AuthorityError::Backend(format!(
                            "etcd endpoint {endpoint}: {}",
                            describe_error(&e)
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let store = EtcdStore {
            endpoints: list,
            clients,
            preferred: AtomicUsize::new(0),
            driver,
        };
        store.call("first read", Retry::Anywhere, |mut kv| async move {
            kv.get(KEY_PREFIX, Some(GetOptions::new().with_count_only()))
                .await
        })?;
        Ok(store)
    }

    /// Runs `request` from a synchronous thread, on the preferred endpoint first and then,
    /// as `retry` allows, on the others, all within [`CALL_DEADLINE`].
    fn call<T, F, Fut>(&self, what: &str, retry: Retry, request: F) -> Result<T, AuthorityError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        self.driver.block_on(async {
            let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
            for at in (first..n).chain(0..first) {
                let endpoint = &self.endpoints[at];
                let attempt = request(self.clients[at].kv_client());
                match tokio::time::timeout_at(deadline, attempt).await {
                    Ok(Ok(v)) => {
                        self.preferred.store(at, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(e)) if matches!(retry, Retry::IfNeverSent) && !never_sent(&e) => {
                        failures.push(format!(
                            "{endpoint}: {} (whether it was applied is unknown)",
                            describe_error(&e)
                        ));
                        break;
                    }
                    Ok(Err(e)) => {
                        failures.push(format!("{endpoint}: {}", describe_error(&e)));
                    }
                    Err(_) => {
                        failures.push(format!(
                            "{endpoint}: no answer within the call's {} s deadline",
                            CALL_DEADLINE.as_secs()
                        ));
                        break;
                    }
                }
            }
            Err(AuthorityError::Backend(format!(
                "etcd {what} failed: {}",
                failures.join("; ")
            )))
        })
    }
}

/// Whether `e` says the connection could not be made, so the request never left.
///
/// tonic turns any failure of its connector into `Unavailable` with the connector's message,
/// and hyper-util's messages for those failures are `dns error` and `tcp ... error` (connect,
/// open, bind...; a connect timeout is a `tcp connect error` too). Nothing that happens on an
/// established connection is reported that way. Matching on text is the price of not naming
/// tonic's types; should the text change, writes merely stop moving on to the next endpoint.
fn never_sent(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    let message = status.message();
    format!("{:?}", status.code()) == "Unavailable"
        && (message.starts_with("dns error")
            || (message.starts_with("tcp ") && message.ends_with(" error")))
}

/// One line for an etcd client error, with its causes: the client's error type has no
/// `source`, and tonic keeps the useful part ("Connection refused") in its own chain.
fn describe_error(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (format!("{:?}: {}", s.code(), s.message()), s.source())
        }
        etcd_client::Error::TransportError(t) => (e.to_string(), t.source()),
        etcd_client::Error::IoError(io) => (e.to_string(), io.source()),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn key(volume: &str) -> String {
    format!("{KEY_PREFIX}{volume}")
}

/// Converts an etcd revision (never negative) to the [`Versioned`] token.
fn revision(volume: &str, rev: i64) -> Result<u64, AuthorityError> {
    u64::try_from(rev).map_err(|_| {
        AuthorityError::Corrupt(volume.to_string(), format!("negative etcd revision {rev}"))
    })
}

impl Store for EtcdStore {
    fn load(&self, volume: &str) -> Result<Option<Versioned>, AuthorityError> {
        check_volume_name(volume).map_err(AuthorityError::Refused)?;
        let key = key(volume);
        let response = self.call(&format!("get {key}"), Retry::Anywhere, |mut kv| {
            let key = key.clone();
            async move { kv.get(key, None).await }
        })?;
        let Some(found) = response.kvs().first() else {
            return Ok(None);
        };
        let record: VolumeRecord = serde_json::from_slice(found.value())
            .map_err(|e| AuthorityError::Corrupt(volume.to_string(), e.to_string()))?;
        if record.volume != volume {
            return Err(AuthorityError::Corrupt(
                volume.to_string(),
                format!("the record names volume `{}`", record.volume),
            ));
        }
        Ok(Some(Versioned {
            record,
            revision: revision(volume, found.mod_revision())?,
        }))
    }

    fn compare_and_set(
        &self,
        expected: Option<u64>,
        record: &VolumeRecord,
    ) -> Result<Option<u64>, AuthorityError> {
        let volume = &record.volume;
        check_volume_name(volume).map_err(AuthorityError::Refused)?;
        let key = key(volume);
        let compare = match expected.map(i64::try_from) {
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            // Revision 0 is what etcd compares an absent key against, and no record read
            // from etcd has it (nor one above i64::MAX): such a token can only be stale.
            Some(Ok(0) | Err(_)) => return Ok(None),
            Some(Ok(rev)) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
        };
        let value = serde_json::to_vec(record)
            .map_err(|e| AuthorityError::Corrupt(volume.clone(), e.to_string()))?;
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(
            key.as_str(),
            value,
            None::<PutOptions>,
        )]);
        let what = format!("compare-and-set {key}");
        let response = self.call(&what, Retry::IfNeverSent, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })?;
        if !response.succeeded() {
            return Ok(None);
        }
        // The header revision of a successful transaction that put one key is that key's new
        // `mod_revision`.
        let header = response.header().ok_or_else(|| {
            AuthorityError::Backend(format!(
                "etcd {what} failed: the answer carries no revision"
            ))
        })?;
        revision(volume, header.revision()).map(Some)
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }
}
