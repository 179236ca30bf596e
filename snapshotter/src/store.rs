//! Snapshot metadata in RocksDB.
//!
//! Every state change is one atomic, synced `WriteBatch`, so a crash leaves either the old or the new
//! state. Key space (one column family, prefixed):
//!
//! - `s/<key>`                 -> [`Record`] (JSON)
//! - `i/<id:016x>`             -> key, so a directory id can be traced to its snapshot
//! - `c/<parent:016x>/<child:016x>` -> empty, the parent -> children index
//! - `m/next-id`               -> the next snapshot id (u64 BE); ids are never reused

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use parking_lot::Mutex;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const RECORD: &str = "s/";
const ID: &str = "i/";
const CHILD: &str = "c/";
const NEXT_ID: &[u8] = b"m/next-id";

/// What a snapshot is: an active (writable) or view (read-only) transaction, or a committed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    /// The name containerd's filters and `ctr` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// Disk resources used by one snapshot, excluding its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// The stored state of one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent snapshot, empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Recorded at commit; `None` while active (measured on demand).
    pub usage: Option<Usage>,
}

/// Deletes between compactions. Each delete leaves a tombstone that every scan over its range (a
/// Walk, the has-children check of a Remove) steps over until a compaction drops it: without
/// compactions a Remove slows down with every snapshot ever removed under the same parent.
const COMPACT_AFTER: usize = 256;

/// The metadata database.
pub struct Store {
    db: Arc<DB>,
    tombstones: AtomicUsize,
    compacting: Arc<AtomicBool>,
    compaction: Mutex<Option<JoinHandle<()>>>,
}

fn record_key(key: &str) -> Vec<u8> {
    [RECORD.as_bytes(), key.as_bytes()].concat()
}

fn id_key(id: u64) -> Vec<u8> {
    format!("{ID}{id:016x}").into_bytes()
}

fn child_prefix(parent: u64) -> Vec<u8> {
    format!("{CHILD}{parent:016x}/").into_bytes()
}

fn child_key(parent: u64, child: u64) -> Vec<u8> {
    format!("{CHILD}{parent:016x}/{child:016x}").into_bytes()
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Metadata is tiny; keep RocksDB's footprint small.
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(4 << 20);
        let db = DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                Error::FailedPrecondition(format!(
                    "metadata database {} is locked: another strata-snapshotter is using this root; stop it or pass another --root",
                    path.display()
                ))
            } else {
                Error::Store(e)
            }
        })?;
        Ok(Store {
            db: Arc::new(db),
            tombstones: AtomicUsize::new(0),
            compacting: Arc::new(AtomicBool::new(false)),
            compaction: Mutex::new(None),
        })
    }

    /// The record stored under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        match self.db.get(record_key(key))? {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes).map(Some),
        }
    }

    /// The key of the snapshot with directory id `id`.
    pub fn key_of(&self, id: u64) -> Result<Option<String>> {
        Ok(self
            .db
            .get(id_key(id))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Whether any snapshot names `id` as its parent.
    pub fn has_children(&self, id: u64) -> Result<bool> {
        let prefix = child_prefix(id);
        let mut iter = self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward));
        match iter.next() {
            Some(item) => Ok(item?.0.starts_with(&prefix)),
            None => Ok(false),
        }
    }

    /// Every snapshot, ordered by key.
    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator(IteratorMode::From(RECORD.as_bytes(), Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            let Some(key) = k.strip_prefix(RECORD.as_bytes()) else {
                break;
            };
            let key = String::from_utf8_lossy(key).into_owned();
            let record = decode(&key, &v)?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// The next unallocated snapshot id.
    pub fn next_id(&self) -> Result<u64> {
        match self.db.get(NEXT_ID)? {
            None => Ok(1),
            Some(b) => {
                let bytes: [u8; 8] = b.as_slice().try_into().map_err(|_| Error::Corrupt {
                    key: "m/next-id".into(),
                    reason: format!("{} bytes, expected 8", b.len()),
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Applies `batch` atomically and durably.
    pub fn write(&self, batch: Batch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch.inner, &opts)?;
        let before = self.tombstones.fetch_add(batch.deletes, Ordering::Relaxed);
        if before + batch.deletes >= COMPACT_AFTER {
            self.compact_in_background();
        }
        Ok(())
    }

    /// Flushes and compacts the (small) database on a thread of its own, dropping tombstones;
    /// one at a time.
    fn compact_in_background(&self) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.tombstones.store(0, Ordering::Relaxed);
        let (db, flag) = (self.db.clone(), self.compacting.clone());
        let mut slot = self.compaction.lock();
        if let Some(done) = slot.take() {
            let _ = done.join();
        }
        let spawned = std::thread::Builder::new()
            .name("compact".into())
            .spawn(move || {
                db.compact_range::<&[u8], &[u8]>(None, None);
                flag.store(false, Ordering::Release);
            });
        match spawned {
            Ok(handle) => *slot = Some(handle),
            Err(_) => self.compacting.store(false, Ordering::Release),
        }
    }
}

impl Drop for Store {
    /// The compaction thread holds the database open: a successor must find it closed.
    fn drop(&mut self) {
        if let Some(handle) = self.compaction.lock().take() {
            let _ = handle.join();
        }
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// One atomic state change, built up and then handed to [`Store::write`].
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
    deletes: usize,
}

impl Batch {
    /// Stores `record` under `key` with its id and parent indexes.
    pub fn put(&mut self, key: &str, record: &Record, parent_id: Option<u64>) {
        let bytes = serde_json::to_vec(record).expect("a Record always serializes");
        self.inner.put(record_key(key), bytes);
        self.inner.put(id_key(record.id), key.as_bytes());
        if let Some(parent) = parent_id {
            self.inner.put(child_key(parent, record.id), b"");
        }
    }

    /// Deletes the record under `key` and its indexes.
    pub fn delete(&mut self, key: &str, record: &Record, parent_id: Option<u64>) {
        self.inner.delete(record_key(key));
        self.inner.delete(id_key(record.id));
        self.deletes += 2;
        if let Some(parent) = parent_id {
            self.inner.delete(child_key(parent, record.id));
            self.deletes += 1;
        }
    }

    /// Deletes only the record under `key` (its id keeps its indexes, as on commit).
    pub fn delete_key(&mut self, key: &str) {
        self.inner.delete(record_key(key));
        self.deletes += 1;
    }

    pub fn set_next_id(&mut self, next: u64) {
        self.inner.put(NEXT_ID, next.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: &str) -> Record {
        let now = SystemTime::now();
        Record {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: now,
            updated: now,
            usage: None,
        }
    }

    #[test]
    fn batch_is_atomic_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_id().unwrap(), 1);
        let mut b = Batch::default();
        b.put("base", &record(1, Kind::Committed, ""), None);
        b.put("child", &record(2, Kind::Active, "base"), Some(1));
        b.set_next_id(3);
        store.write(b).unwrap();
        assert_eq!(store.next_id().unwrap(), 3);
        assert!(store.has_children(1).unwrap());
        assert!(!store.has_children(2).unwrap());
        assert_eq!(store.key_of(2).unwrap().as_deref(), Some("child"));
        assert_eq!(store.all().unwrap().len(), 2);

        let mut b = Batch::default();
        b.delete("child", &record(2, Kind::Active, "base"), Some(1));
        store.write(b).unwrap();
        assert!(!store.has_children(1).unwrap());
        assert!(store.get("child").unwrap().is_none());
        assert!(store.key_of(2).unwrap().is_none());
    }

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(
            err.to_string().contains("another strata-snapshotter"),
            "{err}"
        );
    }

    #[test]
    fn compactions_keep_every_record_and_release_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::default();
        b.put("base", &record(1, Kind::Committed, ""), None);
        store.write(b).unwrap();
        // Enough removes under one parent to start compactions (each remove: 3 tombstones).
        for id in 2..(2 + COMPACT_AFTER as u64) {
            let child = record(id, Kind::Committed, "base");
            let mut b = Batch::default();
            b.put(&format!("c{id}"), &child, Some(1));
            store.write(b).unwrap();
            let mut b = Batch::default();
            b.delete(&format!("c{id}"), &child, Some(1));
            store.write(b).unwrap();
        }
        assert!(!store.has_children(1).unwrap());
        let keys: Vec<String> = store.all().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["base"]);
        // Dropped with a compaction perhaps running: a successor opens the database at once.
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        assert!(again.get("base").unwrap().is_some());
    }
}
