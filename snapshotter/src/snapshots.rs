//! The snapshotter itself: containerd's snapshot semantics over [`Store`] and [`Layout`].
//!
//! Each method is one metadata transaction taken under a single lock, so that checks and writes
//! are atomic with respect to each other. Directories are made before the metadata that owns them
//! is written, and removed after the metadata that owned them is gone; either way a crash leaves
//! only directories no record owns, which [`Snapshots::cleanup`] (run at every start) removes.
//! Slow work (measuring usage, deleting trees) happens outside the lock; deleting a removed
//! snapshot's tree happens after `Remove` has answered ([`Reaper`]).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::layout::{remove_tree, Entry, Layout};
use crate::mounts;
use crate::reaper::Reaper;
use crate::store::{Batch, Kind, Record, Store, Usage};
use crate::usage;

/// Behaviour switches, from the config file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Remove only metadata in `Remove`; directories go at the next `Cleanup` (containerd's
    /// `async_remove`): fast removes, deferred disk reclaim.
    pub async_remove: bool,
}

/// Layers served from elsewhere (lazy layers, mounted over FUSE by their own processes), as the
/// snapshotter core sees them. The lazy module implements it; the core never imports FUSE code.
pub trait RemoteLayers: Send + Sync {
    /// Whether a Prepare with these labels asks for a remote layer.
    fn wants(&self, labels: &BTreeMap<String, String>) -> bool;
    /// Mounts the layer and commits it as the labelled target (answering AlreadyExists, as
    /// containerd expects of a remote snapshot), or prepares `key` normally when it cannot.
    fn prepare(
        &self,
        s: &Snapshots,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>>;
    /// Mounts again, at start, every remote layer whose mount is gone; returns how many.
    fn check(&self, s: &Snapshots) -> Result<usize>;
    /// Unmounts the layer served in snapshot directory `dir`, if any: removal must never walk
    /// into a mount.
    fn unmount(&self, dir: &Path);
    /// Whether some layer's mount is still being started (then [`RemoteLayers::ready`] may wait).
    fn settling(&self) -> bool;
    /// Waits until the remote layers among snapshot directories `dirs` are mounted: a Prepare
    /// returns before its layer's server has mounted it, and mounts on top must not see an
    /// empty directory in its place.
    fn ready(&self, dirs: &[PathBuf]) -> Result<()>;
}

/// A snapshot as callers see it: its key and its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub key: String,
    pub record: Record,
}

/// What a cleanup found and did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Paths removed because no record owned them.
    pub removed: Vec<PathBuf>,
    /// Keys whose directory is missing (reported, never silently dropped: the data is gone).
    pub missing: Vec<String>,
}

struct State {
    next_id: u64,
}

/// An open snapshotter root.
pub struct Snapshots {
    store: Store,
    layout: Layout,
    options: Options,
    index_off: bool,
    state: Mutex<State>,
    remote: Option<Arc<dyn RemoteLayers>>,
    reaper: Reaper,
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?}: not found"))
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(
            "snapshot key must not be empty".into(),
        ));
    }
    if key.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "snapshot key {key:?} contains a NUL byte"
        )));
    }
    Ok(())
}

impl Snapshots {
    /// Opens the snapshotter at `root`, repairing what a crash left behind.
    pub fn open(root: &Path, options: Options) -> Result<Snapshots> {
        Snapshots::open_with(root, options, None)
    }

    /// [`Snapshots::open`], with remote layers served by `remote`.
    pub fn open_with(
        root: &Path,
        options: Options,
        remote: Option<Arc<dyn RemoteLayers>>,
    ) -> Result<Snapshots> {
        let layout = Layout::create(root)?;
        let store = Store::open(&layout.metadata_dir())?;
        // Ids are never reused, even those of directories a crash left without a record.
        let mut next_id = store.next_id()?;
        for (_, entry) in layout.entries()? {
            if let Entry::Snapshot(id) | Entry::Link(id) = entry {
                next_id = next_id.max(id + 1);
            }
        }
        let snapshots = Snapshots {
            store,
            layout,
            options,
            index_off: mounts::overlay_supports_index(),
            state: Mutex::new(State { next_id }),
            remote,
            reaper: Reaper::start(),
        };
        let report = snapshots.cleanup()?;
        info!(
            root = %root.display(),
            removed = report.removed.len(),
            missing = report.missing.len(),
            "snapshotter opened"
        );
        Ok(snapshots)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// What serves remote layers, if anything does.
    pub fn remote(&self) -> Option<&Arc<dyn RemoteLayers>> {
        self.remote.as_ref()
    }

    /// Removes the directories of snapshot `id`, unmounting a remote layer first.
    fn remove_dirs(&self, id: u64) -> Result<()> {
        if let Some(remote) = &self.remote {
            remote.unmount(&self.layout.snapshot_dir(id));
        }
        self.layout.remove_snapshot(id)
    }

    /// Detaches snapshot `id`'s directories now and deletes them in the background.
    fn retire_dirs(&self, id: u64) -> Result<()> {
        if let Some(remote) = &self.remote {
            remote.unmount(&self.layout.snapshot_dir(id));
        }
        if let Some(doomed) = self.layout.retire(id)? {
            self.reaper.delete(doomed);
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Record> {
        check_key(key)?;
        self.store.get(key)?.ok_or_else(|| not_found(key))
    }

    /// Ids of `parent` and its ancestors, nearest first.
    fn chain(&self, parent: &str) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            let record = self.store.get(&next)?.ok_or_else(|| Error::Corrupt {
                key: next.clone(),
                reason: "a snapshot names it as parent but it has no record".into(),
            })?;
            ids.push(record.id);
            next = record.parent;
        }
        Ok(ids)
    }

    fn parent_id(&self, record: &Record) -> Result<Option<u64>> {
        if record.parent.is_empty() {
            return Ok(None);
        }
        match self.store.get(&record.parent)? {
            Some(parent) => Ok(Some(parent.id)),
            None => Err(Error::Corrupt {
                key: record.parent.clone(),
                reason: "a snapshot names it as parent but it has no record".into(),
            }),
        }
    }

    fn mounts_of(&self, record: &Record) -> Result<Vec<Mount>> {
        let parents = self.chain(&record.parent)?;
        if let Some(remote) = self.remote.as_ref().filter(|r| r.settling()) {
            let dirs: Vec<PathBuf> = parents
                .iter()
                .map(|id| self.layout.snapshot_dir(*id))
                .collect();
            remote.ready(&dirs)?;
        }
        Ok(mounts::for_snapshot(
            &self.layout,
            record.kind,
            record.id,
            &parents,
            self.index_off,
        ))
    }

    /// Creates an active snapshot `key` on top of committed `parent` ("" for none) and returns
    /// the mounts that show the parent's files with writes going to the new snapshot.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let record = self.create(Kind::Active, key, parent, labels)?;
        self.mounts_of(&record)
    }

    /// Like [`Snapshots::prepare`], for a caller that fills the snapshot's directory itself (a
    /// remote layer): no mounts, so nothing waits for remote layers below it to be served.
    pub fn prepare_unmounted(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.create(Kind::Active, key, parent, labels).map(drop)
    }

    /// Like [`Snapshots::prepare`], but read-only; it can never be committed.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let record = self.create(Kind::View, key, parent, labels)?;
        self.mounts_of(&record)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record> {
        check_key(key)?;
        let mut state = self.state.lock();
        let parent_id = if parent.is_empty() {
            None
        } else {
            let p = self.store.get(parent)?.ok_or_else(|| {
                Error::NotFound(format!("parent snapshot {parent:?} of {key:?}: not found"))
            })?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} of {key:?} is an {} snapshot, not a committed one: commit it first",
                    p.kind.as_str()
                )));
            }
            Some(p.id)
        };
        if self.store.get(key)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {key:?}: already exists"
            )));
        }
        let id = state.next_id;
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            usage: None,
        };
        self.layout.create_snapshot(id, kind == Kind::Active)?;
        let mut batch = Batch::default();
        batch.put(key, &record, parent_id);
        batch.set_next_id(id + 1);
        if let Err(e) = self.store.write(batch) {
            let _ = self.remove_dirs(id);
            return Err(e);
        }
        state.next_id = id + 1;
        Ok(record)
    }

    /// The directory holding `key`'s own files: the upperdir of an active snapshot, the layer of a
    /// committed one. For library users that write or diff a snapshot without mounting it.
    pub fn dir(&self, key: &str) -> Result<PathBuf> {
        Ok(self.layout.fs_dir(self.get(key)?.id))
    }

    /// Keys of `key`'s ancestors, nearest first.
    pub fn parents(&self, key: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut next = self.get(key)?.parent;
        while !next.is_empty() {
            out.push(next.clone());
            next = self.get(&next)?.parent;
        }
        Ok(out)
    }

    /// The mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let record = self.get(key)?;
        if record.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: only active and view snapshots have mounts; create a view of it"
            )));
        }
        self.mounts_of(&record)
    }

    /// Turns active snapshot `key` into committed snapshot `name` with `labels`, recording its
    /// disk usage. `key` is gone afterwards.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        self.commit_with(name, key, labels, None)
    }

    /// [`Snapshots::commit`] with the usage already known (`None`: measured by walking the
    /// snapshot's files). A lazy layer knows its usage from its TOC: a walk of its FUSE mount
    /// would look up every file through the server.
    pub fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Option<Usage>,
    ) -> Result<()> {
        check_key(name)?;
        let before = self.get(key)?;
        // Measure outside the lock: a large layer takes a while and blocks nobody this way.
        let usage = match usage {
            Some(known) => known,
            None if before.kind == Kind::Active => usage::measure(&self.layout.fs_dir(before.id))?,
            None => Usage::default(),
        };
        let _state = self.state.lock();
        if self.store.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?}: already exists"
            )));
        }
        let active = self.get(key)?;
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is a {} snapshot, not active: only active snapshots can be committed",
                active.kind.as_str()
            )));
        }
        if active.id != before.id {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} was replaced during commit; retry"
            )));
        }
        let now = SystemTime::now();
        let committed = Record {
            kind: Kind::Committed,
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            ..active
        };
        let mut batch = Batch::default();
        batch.delete_key(key);
        batch.put(name, &committed, None);
        self.store.write(batch)
    }

    /// Removes snapshot `key`; refused while other snapshots name it as parent.
    pub fn remove(&self, key: &str) -> Result<()> {
        let state = self.state.lock();
        let record = self.get(key)?;
        if self.store.has_children(record.id)? {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: other snapshots use it as parent; remove them first"
            )));
        }
        let parent_id = self.parent_id(&record)?;
        let mut batch = Batch::default();
        batch.delete(key, &record, parent_id);
        self.store.write(batch)?;
        drop(state);
        if !self.options.async_remove {
            // The record is gone: a failure here leaves an orphan for Cleanup, not an error.
            if let Err(e) = self.retire_dirs(record.id) {
                warn!(key, id = record.id, error = %e, "removing snapshot directory failed; cleanup will retry");
            }
        }
        Ok(())
    }

    /// The snapshot stored under `key`.
    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        let record = self.get(key)?;
        Ok(Snapshot {
            key: key.to_string(),
            record,
        })
    }

    /// Updates the labels of `key`. `fieldpaths` selects what to change: `labels` replaces all
    /// labels, `labels.<k>` sets one (or deletes it when absent or empty in `labels`); no
    /// fieldpaths replaces all labels. Any other field is immutable.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Snapshot> {
        let _state = self.state.lock();
        let mut record = self.get(key)?;
        if fieldpaths.is_empty() {
            record.labels = labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match labels.get(label).filter(|v| !v.is_empty()) {
                        Some(v) => record.labels.insert(label.to_string(), v.clone()),
                        None => record.labels.remove(label),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {key:?}: only \"labels\" and \"labels.<key>\" are mutable"
                    )));
                }
            }
        }
        record.updated = SystemTime::now();
        let parent_id = self.parent_id(&record)?;
        let mut batch = Batch::default();
        batch.put(key, &record, parent_id);
        self.store.write(batch)?;
        Ok(Snapshot {
            key: key.to_string(),
            record,
        })
    }

    /// Disk usage of `key` alone: recorded at commit for committed snapshots, measured now for
    /// active ones (proportional to the size of their upper directory), zero for views.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.get(key)?;
        match record.kind {
            Kind::Active => usage::measure(&self.layout.fs_dir(record.id)),
            Kind::Committed => match record.usage {
                Some(u) => Ok(u),
                None => usage::measure(&self.layout.fs_dir(record.id)),
            },
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Every snapshot matching any of `filters` (containerd filter syntax), ordered by key.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>> {
        let filter = Filter::parse_all(filters)?;
        let all = self.store.all()?;
        Ok(all
            .into_iter()
            .filter(|(key, r)| {
                filter.matches(|path| match path.first().map(String::as_str) {
                    Some("kind") => Some(r.kind.as_str().to_string()),
                    Some("name") => Some(key.clone()),
                    Some("parent") => Some(r.parent.clone()),
                    Some("labels") if path.len() > 1 => r.labels.get(&path[1..].join(".")).cloned(),
                    _ => None,
                })
            })
            .map(|(key, record)| Snapshot { key, record })
            .collect())
    }

    /// Removes directories and links that no record owns, restores missing links, and reports
    /// records whose directory is gone.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        let mut report = CleanupReport::default();
        let mut doomed = Vec::new();
        {
            // Under the lock: a create in flight has a directory but no record yet.
            let _state = self.state.lock();
            let records = self.store.all()?;
            let owned: HashSet<u64> = records.iter().map(|(_, r)| r.id).collect();
            for (path, entry) in self.layout.entries()? {
                match entry {
                    Entry::Snapshot(id) | Entry::Link(id) if owned.contains(&id) => {}
                    _ => doomed.push(path),
                }
            }
            for (key, record) in &records {
                if !self.layout.fs_dir(record.id).is_dir() {
                    warn!(
                        key,
                        id = record.id,
                        "snapshot directory is missing; its files are lost"
                    );
                    report.missing.push(key.clone());
                } else if std::fs::symlink_metadata(self.layout.link(record.id)).is_err() {
                    self.layout.create_link(record.id)?;
                }
            }
            // Rename under the lock so no new snapshot can reuse what is being deleted.
            for path in &mut doomed {
                if path.is_dir() && !path.is_symlink() {
                    // An async Remove of a lazy layer leaves its mount for cleanup to detach.
                    if let Some(remote) = &self.remote {
                        remote.unmount(path);
                    }
                    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                        if !name.starts_with("rm-") {
                            let to = path.with_file_name(format!("rm-{name}"));
                            if std::fs::rename(&*path, &to).is_ok() {
                                *path = to;
                            }
                        }
                    }
                }
            }
        }
        for path in doomed {
            match remove_tree(&path) {
                Ok(()) => report.removed.push(path),
                Err(e) => warn!(path = %path.display(), error = %e, "cleanup could not remove"),
            }
        }
        if !report.removed.is_empty() {
            info!(
                count = report.removed.len(),
                "cleanup removed unowned directories"
            );
        }
        Ok(report)
    }
}
