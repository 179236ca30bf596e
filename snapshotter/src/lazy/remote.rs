//! The daemon's side of lazy layers: answering a remote-snapshot Prepare (see the module docs
//! of [`super`]), and remounting lazy layers at start.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_snapshots::api::types::Mount;
use tracing::{info, warn};

use super::{is_mounted, LayerSpec};
use crate::config::LazyConfig;
use crate::error::{Error, Result};
use crate::snapshots::{RemoteLayers, Snapshots};
use crate::store::Usage;
use strata_image::chunked::lazy::{is_lazy, read_toc};
use strata_image::chunked::toc::Toc;
use strata_image::labels;
use strata_image::oci::{Descriptor, Manifest};
use strata_image::registry::{Client, Reference};

/// How long a new mount may take to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(20);

/// Manifests kept by reference: a pull prepares every layer of one image in turn, and each
/// Prepare needs the same manifest (immutable: it is named by digest).
const MANIFESTS_KEPT: usize = 8;

pub struct Lazy {
    root: PathBuf,
    cfg: LazyConfig,
    exe: PathBuf,
    client: Client,
    /// Recently fetched manifests by `registry/repository@digest`, newest last.
    manifests: parking_lot::Mutex<Vec<(String, Manifest)>>,
    /// Layers whose server is still starting (or failed to).
    starting: Arc<Starting>,
    /// Held while a failed server is started again.
    retrying: parking_lot::Mutex<()>,
    /// Layers that were not zstd:chunked and went to a normal pull.
    pub fell_back: AtomicU64,
}

fn refused(what: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!("lazy layer: {what}"))
}

impl Lazy {
    pub fn new(root: &Path, cfg: LazyConfig) -> Result<Lazy> {
        let exe =
            std::env::current_exe().map_err(Error::io("find the strata-snapshotter executable"))?;
        let client = Client::new(strata_image::registry::Options {
            insecure: cfg.insecure_registries.clone(),
            timeout: Duration::from_secs(cfg.fetch_timeout_secs.max(1)),
            retries: cfg.fetch_retries,
        });
        Ok(Lazy {
            root: root.to_path_buf(),
            cfg,
            exe,
            client,
            manifests: parking_lot::Mutex::new(Vec::new()),
            starting: Arc::default(),
            retrying: parking_lot::Mutex::new(()),
            fell_back: AtomicU64::new(0),
        })
    }

    /// The layer's descriptor, from the image's manifest in the registry.
    fn descriptor(&self, labels: &BTreeMap<String, String>) -> Result<(Reference, Descriptor)> {
        let image = Reference::parse(&labels[labels::IMAGE_REF]).map_err(refused)?;
        let manifest_ref = image.with_digest(&labels[labels::MANIFEST]);
        let manifest = self.manifest(&manifest_ref)?;
        let layer = manifest
            .layers
            .into_iter()
            .find(|l| l.digest == labels[labels::LAYER])
            .ok_or_else(|| {
                refused(format!(
                    "manifest {manifest_ref} has no layer {}",
                    labels[labels::LAYER]
                ))
            })?;
        Ok((image, layer))
    }

    /// The manifest `reference` (by digest) names: kept from an earlier Prepare or fetched.
    fn manifest(&self, reference: &Reference) -> Result<Manifest> {
        let key = reference.to_string();
        if let Some((_, m)) = self.manifests.lock().iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let (bytes, _, _) = self.client.manifest(reference).map_err(refused)?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| refused(format!("manifest {reference}: {e}")))?;
        let mut kept = self.manifests.lock();
        if kept.len() == MANIFESTS_KEPT {
            kept.remove(0);
        }
        kept.push((key, manifest.clone()));
        Ok(manifest)
    }

    /// Starts the serving process for `state` at `mountpoint`.
    fn spawn(&self, state: &Path) -> Result<Child> {
        let log = std::fs::File::create(state.join("serve.log"))
            .map_err(Error::io("create serve.log"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve-layer")
            .arg(state)
            .arg(mountpoint_of(state))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(Error::io("serve.log"))?)
            .stderr(log);
        // Its own session: it outlives this daemon (and its signals).
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::io("start serve-layer"))?;
        std::fs::write(state.join("pid"), child.id().to_string())
            .map_err(Error::io("write pid"))?;
        Ok(child)
    }

    /// Starts serving `state` and returns at once: whatever mounts the layer waits for it in
    /// [`RemoteLayers::ready`]. A pull prepares its layers one after another; starting each
    /// server (exec, index build, FUSE mount: ~0.1 s) overlaps the next layers' Prepares.
    fn start(&self, state: &Path) -> Result<()> {
        let child = self.spawn(state)?;
        let mountpoint = mountpoint_of(state);
        self.starting.begin(&mountpoint);
        let (starting, state) = (self.starting.clone(), state.to_path_buf());
        std::thread::spawn(move || {
            let outcome = await_mount(child, &state);
            starting.finish(&mountpoint, outcome);
        });
        Ok(())
    }

    /// Starts serving `state` and waits for its mount.
    fn start_and_wait(&self, state: &Path) -> Result<()> {
        let child = self.spawn(state)?;
        await_mount(child, state).map_err(refused)
    }
}

/// Where the layer whose state is in `state` (`snapshots/<id>/lazy`) is mounted.
fn mountpoint_of(state: &Path) -> PathBuf {
    state.with_file_name("fs")
}

/// Waits for `child` to mount the layer of `state`; the error says why it did not.
fn await_mount(mut child: Child, state: &Path) -> std::result::Result<(), String> {
    let mountpoint = mountpoint_of(state);
    let deadline = Instant::now() + MOUNT_WAIT;
    loop {
        if is_mounted(&mountpoint) {
            // Reaped by a thread so it never lingers as a zombie of the daemon.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(state.join("serve.log")).unwrap_or_default();
            let last = log.lines().last().unwrap_or("");
            return Err(format!("the FUSE server exited ({status}): {last}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let secs = MOUNT_WAIT.as_secs();
            return Err(format!(
                "no FUSE mount at {} after {secs}s",
                mountpoint.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mounts being started, by mountpoint, and the outcome of those that failed (kept until the
/// layer is served again or removed, so that nothing mounts an empty lower in its place).
#[derive(Default)]
struct Starting {
    /// `None` while starting, the error once it failed.
    mounts: parking_lot::Mutex<HashMap<PathBuf, Option<String>>>,
    changed: parking_lot::Condvar,
    /// How many entries `mounts` has: the common case (nothing starting) takes no lock.
    count: AtomicUsize,
}

impl Starting {
    /// Changes the entries under the lock, then wakes the waiters.
    fn change(&self, f: impl FnOnce(&mut HashMap<PathBuf, Option<String>>)) {
        let mut m = self.mounts.lock();
        f(&mut m);
        self.count.store(m.len(), Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn begin(&self, mountpoint: &Path) {
        self.change(|m| drop(m.insert(mountpoint.to_path_buf(), None)));
    }

    /// Records how starting `mountpoint` ended: a mounted layer is forgotten, a failure kept.
    fn finish(&self, mountpoint: &Path, outcome: std::result::Result<(), String>) {
        self.change(|m| match outcome {
            Ok(()) => drop(m.remove(mountpoint)),
            Err(e) => {
                if let Some(slot) = m.get_mut(mountpoint) {
                    *slot = Some(e);
                }
            }
        });
    }

    fn forget(&self, mountpoint: &Path) {
        self.change(|m| drop(m.remove(mountpoint)));
    }

    fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Waits until `mountpoint` is no longer starting: Ok once it is served (or was never
    /// started here), the error if its start failed.
    fn wait(&self, mountpoint: &Path) -> std::result::Result<(), String> {
        let mut m = self.mounts.lock();
        loop {
            match m.get(mountpoint) {
                None => return Ok(()),
                Some(Some(e)) => return Err(e.clone()),
                Some(None) => self.changed.wait(&mut m),
            }
        }
    }
}

/// A lazy layer's usage as its TOC describes it: the bytes of its files and one inode per entry
/// (a big file's further chunks are not entries of their own).
fn toc_usage(toc: &Toc) -> Usage {
    let files = toc.entries.iter().filter(|e| e.kind != "chunk");
    Usage {
        size: files
            .clone()
            .filter(|e| e.kind == "reg")
            .map(|e| e.size as i64)
            .sum(),
        inodes: files.count() as i64,
    }
}

impl RemoteLayers for Lazy {
    /// Whether a Prepare asks for a remote snapshot.
    fn wants(&self, labels: &BTreeMap<String, String>) -> bool {
        self.cfg.enabled
            && [
                labels::TARGET,
                labels::IMAGE_REF,
                labels::MANIFEST,
                labels::LAYER,
            ]
            .iter()
            .all(|l| labels.contains_key(*l))
    }

    /// Prepares `key` as a lazy layer and commits it as the target: answers AlreadyExists (what
    /// containerd expects of a remote snapshot). A layer that is not zstd:chunked is prepared
    /// as an ordinary active snapshot for containerd to pull into, and said so.
    fn prepare(
        &self,
        s: &Snapshots,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let target = labels[labels::TARGET].clone();
        if s.stat(&target).is_ok() {
            return Err(Error::AlreadyExists(format!("target snapshot {target:?}")));
        }
        let started = Instant::now();
        let (image, layer) = self.descriptor(&labels)?;
        if !is_lazy(&layer.annotations) {
            self.fell_back.fetch_add(1, Ordering::Relaxed);
            info!(layer = %layer.digest, media_type = %layer.media_type, "neither zstd:chunked nor eStargz: falling back to a full pull");
            return s.prepare(key, parent, labels);
        }
        let fetch = |start: u64, end: u64| -> std::io::Result<Vec<u8>> {
            self.client
                .blob_range(&image, &layer.digest, start, end)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let toc = read_toc(
            &layer.annotations,
            layer.size,
            &fetch,
            self.cfg.allow_unverified,
        )
        .map_err(|e| refused(format!("{}: {e}", layer.digest)))?;
        let toc_ms = started.elapsed().as_millis();
        s.prepare_unmounted(key, parent, labels.clone())?;
        let snapshot_dir =
            |k: &str| -> Result<PathBuf> { Ok(s.layout().snapshot_dir(s.stat(k)?.record.id)) };
        let result = (|| -> Result<()> {
            let dir = snapshot_dir(key)?;
            let state = dir.join("lazy");
            std::fs::create_dir_all(&state).map_err(Error::io("create lazy state"))?;
            let spec = LayerSpec {
                reference: format!("{}/{}", image.registry, image.repository),
                digest: layer.digest.clone(),
                size: layer.size,
                annotations: layer.annotations.clone(),
                insecure: self.cfg.insecure_registries.clone(),
                timeout_secs: self.cfg.fetch_timeout_secs,
                retries: self.cfg.fetch_retries,
                cache_dir: self.root.join("lazy").join("chunks"),
                cache_max_bytes: self.cfg.cache_max_bytes,
                access_dir: super::access_dir(&self.root),
                background_fetch: self.cfg.background_fetch,
                fetch_concurrency: self.cfg.fetch_concurrency,
                passthrough: self.cfg.passthrough,
            };
            std::fs::create_dir_all(&spec.access_dir).map_err(Error::io("create access dir"))?;
            write_json(&state.join("layer.json"), &spec)?;
            write_json(&state.join("toc.json"), &toc)?;
            // The counters exist from the start: `status` reads them while the server starts.
            let stats = super::Stats::default();
            stats.total_bytes.store(layer.size, Ordering::Relaxed);
            stats.write(&state);
            self.start(&state)?;
            s.commit_with(&target, key, labels, Some(toc_usage(&toc)))
        })();
        if let Err(e) = result {
            if let Ok(dir) = snapshot_dir(key) {
                unmount(&dir);
            }
            let _ = s.remove(key);
            return Err(e);
        }
        let files = toc.entries.len();
        let ms = started.elapsed().as_millis();
        info!(layer = %layer.digest, target, files, toc_ms, ms, "lazy layer committed; its server is starting");
        Err(Error::AlreadyExists(format!(
            "target snapshot {target:?} (lazy)"
        )))
    }

    /// Remounts every lazy layer whose mount is gone (a reboot, a killed server); live mounts
    /// are left to their processes.
    fn check(&self, s: &Snapshots) -> Result<usize> {
        let mut remounted = 0;
        for snap in s.list(&[])? {
            let dir = s.layout().snapshot_dir(snap.record.id);
            let state = dir.join("lazy");
            if !state.join("layer.json").is_file() {
                continue;
            }
            let fs = dir.join("fs");
            if is_mounted(&fs) {
                tracing::debug!(key = %snap.key, "lazy layer still served");
                continue;
            }
            unmount(&dir);
            match self.start_and_wait(&state) {
                Ok(()) => remounted += 1,
                Err(e) => warn!(key = %snap.key, error = %e, "lazy layer could not be remounted"),
            }
        }
        Ok(remounted)
    }

    fn unmount(&self, dir: &Path) {
        self.starting.forget(&dir.join("fs"));
        unmount(dir);
    }

    fn settling(&self) -> bool {
        self.starting.any()
    }

    /// Waits for the servers of the lazy layers among `dirs` that are still starting. One that
    /// failed is started once more; if that fails too, the error names the layer and why.
    fn ready(&self, dirs: &[PathBuf]) -> Result<()> {
        if !self.starting.any() {
            return Ok(());
        }
        for dir in dirs {
            let fs = dir.join("fs");
            if self.starting.wait(&fs).is_ok() {
                continue;
            }
            // One retry at a time: a caller that waited here finds it served by the one before.
            let _retrying = self.retrying.lock();
            let Err(first) = self.starting.wait(&fs) else {
                continue;
            };
            warn!(dir = %dir.display(), error = %first, "lazy layer server failed to start; starting it again");
            unmount(dir);
            match self.start_and_wait(&dir.join("lazy")) {
                Ok(()) => self.starting.forget(&fs),
                Err(e) => {
                    return Err(refused(format!(
                        "{} is not served: {e}; its server's log is {}",
                        dir.display(),
                        dir.join("lazy/serve.log").display()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Stops serving the lazy layer of snapshot directory `dir` (if it is one): detaches its mount
/// and ends its process.
fn unmount(dir: &Path) {
    let state = dir.join("lazy");
    if !state.is_dir() {
        return;
    }
    let fs = dir.join("fs");
    if let Ok(c) = std::ffi::CString::new(fs.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if let Some(pid) = std::fs::read_to_string(state.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        if pid > 1 {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(v).expect("serializes"))
        .map_err(Error::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("rename {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_image::chunked::toc::Entry;

    #[test]
    fn mounts_on_top_wait_for_a_starting_layer_and_see_its_failure() {
        let starting = Arc::new(Starting::default());
        let (a, b) = (Path::new("/s/1/fs"), Path::new("/s/2/fs"));
        assert!(!starting.any());
        assert_eq!(
            starting.wait(a),
            Ok(()),
            "never started here: nothing to wait for"
        );
        starting.begin(a);
        starting.begin(b);
        assert!(starting.any());
        let waiter = {
            let s = starting.clone();
            std::thread::spawn(move || s.wait(Path::new("/s/1/fs")))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "returned before the layer was mounted"
        );
        starting.finish(a, Ok(()));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        starting.finish(b, Err("the FUSE server exited".into()));
        // A failure stays until the layer is served again or removed.
        assert_eq!(starting.wait(b), Err("the FUSE server exited".into()));
        assert!(starting.any());
        starting.forget(b);
        assert_eq!(starting.wait(b), Ok(()));
        assert!(!starting.any());
    }

    #[test]
    fn usage_counts_files_once_and_their_bytes() {
        let e = |kind: &str, name: &str, size: u64| Entry {
            kind: kind.into(),
            name: name.into(),
            size,
            ..Default::default()
        };
        let toc = Toc {
            version: 1,
            prefetch_end: None,
            entries: vec![
                e("dir", "d/", 0),
                e("reg", "d/small", 10),
                e("reg", "d/big", 9 << 20),
                e("chunk", "d/big", 0),
                e("symlink", "l", 0),
            ],
        };
        assert_eq!(
            toc_usage(&toc),
            Usage {
                size: 10 + (9 << 20),
                inodes: 4
            }
        );
    }
}
