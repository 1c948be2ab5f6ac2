//! The cluster authority store: etcd v3, through transactions.

use super::authority::{AuthorityError, Store, Versioned, VolumeRecord};

/// A [`Store`] in etcd: key `/ferrodisk/volumes/<volume>`, JSON value; compare-and-set is a
/// transaction on the key's `mod_revision`.
pub struct EtcdStore {
    endpoints: Vec<String>,
}

impl EtcdStore {
    /// Connects to comma-separated endpoints (`http://127.0.0.1:2379,...`).
    pub fn connect(endpoints: &str) -> Result<EtcdStore, AuthorityError> {
        Err(AuthorityError::Backend(format!(
            "etcd support is not built yet ({endpoints})"
        )))
    }
}

impl Store for EtcdStore {
    fn load(&self, _volume: &str) -> Result<Option<Versioned>, AuthorityError> {
        unimplemented!()
    }

    fn compare_and_set(
        &self,
        _expected: Option<u64>,
        _record: &VolumeRecord,
    ) -> Result<Option<u64>, AuthorityError> {
        unimplemented!()
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }
}
