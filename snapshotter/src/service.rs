//! The gRPC face: containerd's Snapshots API (via `containerd-snapshots`) onto [`Snapshots`].
//!
//! Every call runs on tokio's blocking pool, since each one touches RocksDB or the filesystem and
//! must never stall the gRPC runtime.

// The trait's error type is `tonic::Status`, a large value; boxing it is not ours to choose.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind as ApiKind, Snapshotter, Usage as ApiUsage};
use futures::stream;
use tonic::Status;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::snapshots::{Snapshot, Snapshots};
use crate::store::Kind;

/// The gRPC service over one snapshotter root.
pub struct Service {
    snapshots: Arc<Snapshots>,
}

impl Service {
    pub fn new(snapshots: Arc<Snapshots>) -> Service {
        Service { snapshots }
    }

    /// Runs a call that writes or walks the disk on the blocking pool, off the runtime thread.
    async fn run<T: Send + 'static>(
        &self,
        method: &'static str,
        key: &str,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let snapshots = self.snapshots.clone();
        let span = tracing::debug_span!("snapshots", method, key);
        let result = tokio::task::spawn_blocking(move || span.in_scope(|| f(&snapshots)))
            .await
            .map_err(|e| Status::internal(format!("{method} {key:?}: worker failed: {e}")))?;
        finish(method, key, result)
    }

    /// Runs a metadata-only call (RocksDB reads, microseconds) on the runtime thread: a hop to
    /// the blocking pool and back would cost more than the call itself.
    fn read<T>(
        &self,
        method: &'static str,
        key: &str,
        f: impl FnOnce(&Snapshots) -> Result<T>,
    ) -> Result<T, Status> {
        let result = tracing::debug_span!("snapshots", method, key).in_scope(|| f(&self.snapshots));
        finish(method, key, result)
    }
}

/// Logs a call's outcome: failures of the store or the disk as warnings, refusals at debug.
fn finish<T>(method: &str, key: &str, result: Result<T>) -> Result<T, Status> {
    match result {
        Ok(v) => {
            debug!(method, key, "ok");
            Ok(v)
        }
        Err(e) => {
            match &e {
                Error::Store(_) | Error::Io { .. } | Error::Corrupt { .. } => {
                    warn!(method, key, error = %e, "failed")
                }
                _ => debug!(method, key, error = %e, "refused"),
            }
            Err(e.into())
        }
    }
}

fn to_info(s: Snapshot) -> Info {
    Info {
        kind: match s.record.kind {
            Kind::Active => ApiKind::Active,
            Kind::View => ApiKind::View,
            Kind::Committed => ApiKind::Committed,
        },
        name: s.key,
        parent: s.record.parent,
        labels: s.record.labels.into_iter().collect(),
        created_at: s.record.created,
        updated_at: s.record.updated,
    }
}

fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;
    type InfoStream = stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        self.read("stat", &key, |s| s.stat(&key)).map(to_info)
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let key = info.name.clone();
        let labels = labels(info.labels);
        let paths = fieldpaths.unwrap_or_default();
        self.run("update", &key.clone(), move |s| {
            s.update(&key, labels, &paths)
        })
        .await
        .map(to_info)
    }

    async fn usage(&self, key: String) -> Result<ApiUsage, Status> {
        let k = key.clone();
        let u = self.run("usage", &key, move |s| s.usage(&k)).await?;
        Ok(ApiUsage {
            size: u.size,
            inodes: u.inodes,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        // Right after a lazy pull the answer may wait for a layer's server: not on this thread.
        if self.snapshots.remote().is_some_and(|r| r.settling()) {
            let k = key.clone();
            return self.run("mounts", &key, move |s| s.mounts(&k)).await;
        }
        self.read("mounts", &key, |s| s.mounts(&key))
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels_: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let k = key.clone();
        let labels = labels(labels_);
        if let Some(remote) = self
            .snapshots
            .remote()
            .filter(|r| r.wants(&labels))
            .cloned()
        {
            return self
                .run("prepare (lazy)", &key, move |s| {
                    remote.prepare(s, &k, &parent, labels)
                })
                .await;
        }
        self.run("prepare", &key, move |s| s.prepare(&k, &parent, labels))
            .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels_: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let k = key.clone();
        let labels = labels(labels_);
        self.run("view", &key, move |s| s.view(&k, &parent, labels))
            .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels_: HashMap<String, String>,
    ) -> Result<(), Status> {
        let k = key.clone();
        let labels = labels(labels_);
        self.run("commit", &key, move |s| s.commit(&name, &k, labels))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        let k = key.clone();
        self.run("remove", &key, move |s| s.remove(&k)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.run("cleanup", "", |s| s.cleanup().map(drop)).await
    }

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Status> {
        let all = self.read("list", "", |s| s.list(&filters))?;
        let infos: Vec<Result<Info, Status>> = all.into_iter().map(|s| Ok(to_info(s))).collect();
        Ok(stream::iter(infos))
    }
}
