//! A `ferrodisk serve --api` daemon for tests, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrodisk::api::client::request;
use serde_json::Value;

use super::{signal, BIN};

pub struct ApiDaemon {
    child: Option<Child>,
    pub api: PathBuf,
    log: PathBuf,
}

impl ApiDaemon {
    pub fn start(dir: &Path, extra: &[&str]) -> ApiDaemon {
        ApiDaemon::start_with_env(dir, extra, &[])
    }

    /// As [`ApiDaemon::start`], with environment variables for the daemon.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> ApiDaemon {
        let api = dir.join("api.sock");
        let log = dir.join("daemon.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--api"])
            .arg(&api)
            .arg("--state")
            .arg(dir.join("state"))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        let d = ApiDaemon {
            child: Some(child),
            api,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while request(&d.api, "GET", "/v1/volumes", None).is_err() {
            assert!(Instant::now() < deadline, "API never came up:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = request(&self.api, method, path, body.as_ref()).expect("request");
        (r.status, r.json())
    }

    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("FERRODISK_API", &self.api)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGTERM);
            let s = c.wait().unwrap();
            assert!(s.success(), "exit {s}:\n{}", self.log());
        }
    }
}

impl Drop for ApiDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
