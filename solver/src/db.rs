//! The builder's records in RocksDB, beside its snapshot store: cache records (cache key →
//! committed snapshot), named images, and the layer blob of each snapshot.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{Direction, IteratorMode, Options, WriteOptions, DB};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use strata_image::oci::Descriptor;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("build database: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("build database {0} is locked: another strata build is using this --root; wait for it or use another --root")]
    Locked(String),
    #[error("build database record {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A cached result: the committed snapshot a cache key resolved to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    pub snapshot: String,
    pub created: u64,
    pub last_used: u64,
    pub description: String,
}

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub manifest: Descriptor,
    pub created: u64,
}

/// The layer blob of a committed snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub diff_id: String,
    pub blob: Descriptor,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Db {
    db: DB,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(4);
        let db = DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                DbError::Locked(path.display().to_string())
            } else {
                DbError::Rocks(e)
            }
        })?;
        Ok(Db { db })
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DbError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| DbError::Corrupt {
                    key: key.into(),
                    reason: e.to_string(),
                }),
        }
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), DbError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.put_opt(
            key,
            serde_json::to_vec(value).expect("records serialize"),
            &opts,
        )?;
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), DbError> {
        self.db.delete(key)?;
        Ok(())
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, DbError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix.as_bytes(), Direction::Forward))
        {
            let (k, v) = item?;
            let Some(rest) = k.strip_prefix(prefix.as_bytes()) else {
                break;
            };
            let key = String::from_utf8_lossy(rest).into_owned();
            let value = serde_json::from_slice(&v).map_err(|e| DbError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    pub fn cache(&self, key: &str) -> Result<Option<CacheRecord>, DbError> {
        self.get(&format!("c/{key}"))
    }

    pub fn put_cache(&self, key: &str, r: &CacheRecord) -> Result<(), DbError> {
        self.put(&format!("c/{key}"), r)
    }

    pub fn delete_cache(&self, key: &str) -> Result<(), DbError> {
        self.delete(&format!("c/{key}"))
    }

    pub fn caches(&self) -> Result<Vec<(String, CacheRecord)>, DbError> {
        self.scan("c/")
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, DbError> {
        self.get(&format!("i/{name}"))
    }

    pub fn put_image(&self, r: &ImageRecord) -> Result<(), DbError> {
        self.put(&format!("i/{}", r.name), r)
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, DbError> {
        Ok(self.scan("i/")?.into_iter().map(|(_, v)| v).collect())
    }

    pub fn delete_image(&self, name: &str) -> Result<(), DbError> {
        self.delete(&format!("i/{name}"))
    }

    pub fn layer(&self, snapshot: &str) -> Result<Option<LayerRecord>, DbError> {
        self.get(&format!("l/{snapshot}"))
    }

    pub fn put_layer(&self, snapshot: &str, r: &LayerRecord) -> Result<(), DbError> {
        self.put(&format!("l/{snapshot}"), r)
    }

    pub fn delete_layer(&self, snapshot: &str) -> Result<(), DbError> {
        self.delete(&format!("l/{snapshot}"))
    }
}
