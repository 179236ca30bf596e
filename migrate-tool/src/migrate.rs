//! `migrate-tool migrate`: builds the overlay2 tree of an overlay (v1), aufs or devicemapper data
//! root beside it, in `<data-root>/migrate-overlay2.tmp`, through a [`Journal`] of steps, then
//! switches dockerd over. Killed at any point, a rerun skips what is done and redoes the step in
//! flight; the source driver's files are never modified (overlay and aufs image layer files are
//! hard-linked, devicemapper's are copied out of their mounted devices).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use strata_image::layer;

use crate::dataroot::{DataRoot, Driver, Layer};
use crate::error::{io, MigrateError};
use crate::journal::{daemon_json_backup, write_atomic, Journal, TMP};
use crate::{changes, devicemapper, overlay2, tarsplit};

/// Settings of a migration.
pub struct Options<'a> {
    /// dockerd's config, where `storage-driver` is set to overlay2.
    pub daemon_json: PathBuf,
    /// Told about each step as it starts: (steps done, steps in all, step name).
    pub progress: &'a dyn Fn(usize, usize, &str),
}

/// What a migration did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub layers: usize,
    pub containers: usize,
    pub entries: u64,
    pub bytes_written: u64,
}

/// Migrates the overlay (v1), aufs or devicemapper data root `root` to overlay2.
pub fn migrate(root: &DataRoot, opts: &Options) -> Result<Report, MigrateError> {
    check_source(root)?;
    let tmp = root.path.join(TMP);
    let mut journal = Journal::open(&tmp, opts.progress)?;
    journal.total = steps(root);
    let pool = match root.driver {
        Driver::Devicemapper => Some(devicemapper::Pool::open(&root.path)?),
        _ => None,
    };
    let mut m = Migration::start(root, tmp, pool.as_ref())?;
    let layers = root.layers_parents_first();
    let todo: Vec<&Layer> = layers
        .iter()
        .copied()
        .filter(|l| !journal.is_done(&layer_step(l)))
        .collect();
    let source = m.src.clone();
    std::thread::scope(|scope| {
        let mut ahead = Ahead::start(scope, source, todo);
        for l in &layers {
            m.image_layer(&mut journal, l, &mut ahead)?;
        }
        Ok::<(), MigrateError>(())
    })?;
    for c in &root.containers {
        m.container(&mut journal, c)?;
    }
    m.switch(&mut journal, &opts.daemon_json)?;
    Ok(m.report)
}

/// Refuses a source that is not a legacy driver, or that the plan finds a blocker in.
fn check_source(root: &DataRoot) -> Result<(), MigrateError> {
    if !matches!(
        root.driver,
        Driver::Overlay | Driver::Aufs | Driver::Devicemapper
    ) {
        return Err(MigrateError::Refused(format!(
            "{}: there is nothing to migrate from {} (overlay, aufs and devicemapper are)",
            root.path.display(),
            root.driver.dir_name()
        )));
    }
    let blockers: Vec<String> = crate::plan::plan(root)
        .problems
        .iter()
        .filter(|p| p.severity == crate::plan::Severity::Blocker)
        .map(|p| format!("{} (fix: {})", p.what, p.fix))
        .collect();
    if blockers.is_empty() {
        return Ok(());
    }
    Err(MigrateError::Refused(format!(
        "refusing to migrate:\n  {}",
        blockers.join("\n  ")
    )))
}

/// How many journal steps the migration of `root` has: one per layer, five to switch.
fn steps(root: &DataRoot) -> usize {
    let container_layers: usize = root
        .containers
        .iter()
        .filter(|c| c.mount_id.is_some())
        .map(|c| 1 + usize::from(c.init_id.is_some()))
        .sum();
    root.layers.len() + container_layers + 5
}

/// The journal step of image layer `l`.
fn layer_step(l: &Layer) -> String {
    format!("layer-{}", l.cache_id)
}

/// Where image layers are replayed from and built into; shared by the replay workers.
#[derive(Clone)]
struct Source<'a> {
    root: &'a DataRoot,
    /// devicemapper's thin pool, when that is the source.
    pool: Option<&'a devicemapper::Pool>,
    tmp: PathBuf,
    /// The overlay2 tree being built (`<tmp>/overlay2`) until the switch moves it.
    out: PathBuf,
}

impl Source<'_> {
    /// Where a layer's own files are in the source: overlay keeps a full tree per image layer
    /// and an upper per container layer; aufs keeps every layer's own files under `diff/`.
    fn files(&self, id: &str, container: bool) -> PathBuf {
        let legacy = self.root.path.join(self.root.driver.dir_name());
        match (self.root.driver, container) {
            (Driver::Aufs, _) => legacy.join("diff").join(id),
            (_, false) => legacy.join(id).join("root"),
            (_, true) => legacy.join(id).join("upper"),
        }
    }

    /// Where layer `id` is built before it is installed.
    fn partial_path(&self, id: &str) -> PathBuf {
        self.out.join(format!("{id}.partial"))
    }

    /// A fresh `<id>.partial` directory to build layer `id` in.
    fn partial(&self, id: &str) -> Result<PathBuf, MigrateError> {
        let partial = self.partial_path(id);
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(partial.join("diff"))
            .map_err(io(format!("create {}", partial.display())))?;
        Ok(partial)
    }

    /// Builds image layer `l`'s diff in its `<id>.partial`; returns how many entries it has.
    /// A refused layer leaves nothing behind, least of all links to what it named.
    fn build(&self, l: &Layer) -> Result<u64, MigrateError> {
        let partial = self.partial(&l.cache_id)?;
        self.replay(l, &partial.join("diff")).inspect_err(|_| {
            let _ = fs::remove_dir_all(&partial);
        })
    }

    /// Replays image layer `l` into `diff`, from its mounted device or its source tree.
    fn replay(&self, l: &Layer, diff: &Path) -> Result<u64, MigrateError> {
        match self.pool {
            Some(pool) => {
                let devices = self.tmp.join("devices");
                let dev = devicemapper::mount_device(&self.root.path, pool, &l.cache_id, &devices)?;
                image_layer(self.root, l, &dev.rootfs(), diff, false)
            }
            None => image_layer(self.root, l, &self.files(&l.cache_id, false), diff, true),
        }
    }
}

/// Image layers built ahead of the journal by a worker per CPU: a layer's replay needs only its
/// own tar-split and files (or device), while installing it needs its parents' link names, so
/// the journal installs them one by one in parent-first order as their builds arrive.
struct Ahead {
    built: mpsc::Receiver<(String, Result<u64, MigrateError>)>,
    arrived: HashMap<String, Result<u64, MigrateError>>,
    /// Set when the migration stops early: workers take no further layer.
    stop: Arc<AtomicBool>,
}

impl Ahead {
    fn start<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        source: Source<'s>,
        layers: Vec<&'s Layer>,
    ) -> Ahead {
        let (tx, built) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        for _ in 0..workers.min(layers.len()) {
            let (tx, stop, next) = (tx.clone(), stop.clone(), next.clone());
            let (source, layers) = (source.clone(), layers.clone());
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Some(l) = layers.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        return;
                    };
                    if tx.send((l.cache_id.clone(), source.build(l))).is_err() {
                        return;
                    }
                }
            });
        }
        Ahead {
            built,
            arrived: HashMap::new(),
            stop,
        }
    }

    /// Waits for layer `id`'s build; `None` if no worker builds it.
    fn take(&mut self, id: &str) -> Option<Result<u64, MigrateError>> {
        loop {
            if let Some(r) = self.arrived.remove(id) {
                return Some(r);
            }
            let (built, r) = self.built.recv().ok()?;
            self.arrived.insert(built, r);
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A migration in progress: where it builds, what it built.
struct Migration<'a> {
    src: Source<'a>,
    /// The switch has moved the tree into the data root already (a rerun after it).
    switched: bool,
    /// Each image layer's overlay2 link name, by chain ID.
    links: HashMap<String, String>,
    report: Report,
}

impl<'a> Migration<'a> {
    fn start(
        root: &'a DataRoot,
        tmp: PathBuf,
        pool: Option<&'a devicemapper::Pool>,
    ) -> Result<Migration<'a>, MigrateError> {
        let out = tmp.join("overlay2");
        fs::create_dir_all(out.join("l")).map_err(io(format!("create {}", out.display())))?;
        Ok(Migration {
            switched: Journal::done_in(&tmp, "switch-overlay2"),
            src: Source {
                root,
                pool,
                tmp,
                out,
            },
            links: HashMap::new(),
            report: Report::default(),
        })
    }

    /// Where layer `id` is once built: in the work tree, or in the data root after the switch.
    fn final_dir(&self, id: &str) -> PathBuf {
        if self.switched {
            self.src.root.path.join("overlay2").join(id)
        } else {
            self.src.out.join(id)
        }
    }

    /// The link name a built layer chose.
    fn link_of(&self, id: &str) -> Result<String, MigrateError> {
        let path = self.final_dir(id).join("link");
        let link = fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
        Ok(link.trim().to_string())
    }

    /// The link names of `chain` and its ancestors, nearest first.
    fn lower_links(&self, chain: Option<&str>) -> Vec<String> {
        ancestors(self.src.root, chain)
            .iter()
            .map(|c| self.links[c].clone())
            .collect()
    }

    /// Finishes a built layer (link, lower, committed marker) and moves it into place.
    fn install(
        &self,
        partial: &Path,
        id: &str,
        lowers: &[String],
        image: bool,
    ) -> Result<(), MigrateError> {
        let link = overlay2::link_name();
        overlay2::finish_layer(partial, &link, lowers, image)
            .map_err(io(format!("write {}", partial.display())))?;
        let _ = fs::remove_dir_all(self.src.out.join(id));
        fs::rename(partial, self.src.out.join(id))
            .map_err(io(format!("move layer {id} into place")))?;
        let _ = fs::remove_file(self.src.out.join("l").join(&link));
        std::os::unix::fs::symlink(format!("../{id}/diff"), self.src.out.join("l").join(&link))
            .map_err(io("create link"))
    }

    /// Image layer `l` (its parents are done): its original tar replayed into an overlay2 diff,
    /// built by `ahead` (or here, when no worker built it), then installed.
    fn image_layer(
        &mut self,
        journal: &mut Journal,
        l: &Layer,
        ahead: &mut Ahead,
    ) -> Result<(), MigrateError> {
        let lowers = self.lower_links(l.parent.as_deref());
        let label = format!(
            "layer {} ({:.1} MB)",
            &l.chain_id[..19.min(l.chain_id.len())],
            l.size as f64 / 1e6
        );
        journal.step_labeled(&layer_step(l), &label, || {
            let built = match ahead.take(&l.cache_id) {
                Some(r) => r?,
                None => self.src.build(l)?,
            };
            self.report.entries += built;
            let partial = self.src.partial_path(&l.cache_id);
            self.install(&partial, &l.cache_id, &lowers, true)?;
            self.report.layers += 1;
            Ok(())
        })?;
        let link = self.link_of(&l.cache_id)?;
        self.links.insert(l.chain_id.clone(), link);
        Ok(())
    }

    /// Container `c`'s init and read-write layers, over its image's layers.
    fn container(
        &mut self,
        journal: &mut Journal,
        c: &crate::dataroot::Container,
    ) -> Result<(), MigrateError> {
        let (Some(mount), Some(parent)) = (&c.mount_id, &c.parent) else {
            return Ok(());
        };
        let mut lowers = self.lower_links(Some(parent));
        if let Some(init) = &c.init_id {
            let below = self
                .src
                .root
                .layer(parent)
                .map(|l| l.cache_id.clone())
                .unwrap_or_default();
            self.container_layer(journal, init, &below, &lowers)?;
            lowers.insert(0, self.link_of(init)?);
        }
        let below = c.init_id.clone().unwrap_or_default();
        self.container_layer(journal, mount, &below, &lowers)?;
        self.report.containers += 1;
        Ok(())
    }

    /// Container layer `id`, whose layer below is `below` (for devicemapper's full filesystems).
    fn container_layer(
        &mut self,
        journal: &mut Journal,
        id: &str,
        below: &str,
        lowers: &[String],
    ) -> Result<(), MigrateError> {
        journal.step(&format!("container-{id}"), || {
            let partial = self.src.partial(id)?;
            self.container_diff(id, below, &partial.join("diff"))?;
            self.install(&partial, id, lowers, false)
        })
    }

    /// Writes container layer `id`'s changes into `diff`: overlay and aufs uppers already are in
    /// overlay2's diff format (linked); a device is compared with the device below it.
    fn container_diff(&mut self, id: &str, below: &str, diff: &Path) -> Result<(), MigrateError> {
        let Some(pool) = self.src.pool else {
            let upper = self.src.files(id, true);
            let aufs = self.src.root.driver == Driver::Aufs;
            self.report.entries += overlay2::link_tree(&upper, diff, aufs)
                .map_err(io(format!("link {}", upper.display())))?;
            return Ok(());
        };
        let work = self.src.tmp.join("devices");
        let new = devicemapper::mount_device(&self.src.root.path, pool, id, &work)?;
        let old = devicemapper::mount_device(&self.src.root.path, pool, below, &work)?;
        self.report.bytes_written += changes::diff(&new.rootfs(), &old.rootfs(), diff)
            .map_err(io(format!("diff device {id}")))?;
        Ok(())
    }

    /// Carries the image store over and switches dockerd to overlay2. Every step is
    /// idempotent, so a rerun after a kill finishes it.
    fn switch(&mut self, journal: &mut Journal, daemon_json: &Path) -> Result<(), MigrateError> {
        let (root, tmp) = (self.src.root, &self.src.tmp);
        journal.step("image-store", || {
            let dst = tmp.join("image/overlay2");
            let _ = fs::remove_dir_all(&dst);
            self.report.bytes_written += copy_dir(&root.store(), &dst)?;
            Ok(())
        })?;
        journal.step("switch-overlay2", || {
            move_into(&self.src.out, &root.path.join("overlay2"))
        })?;
        journal.step("switch-image", || {
            move_into(
                &tmp.join("image/overlay2"),
                &root.path.join("image/overlay2"),
            )
        })?;
        journal.step("switch-containers", || {
            for c in &root.containers {
                set_driver(&container_config(&root.path, &c.id), "overlay2")?;
            }
            Ok(())
        })?;
        journal.step("switch-daemon-json", || {
            switch_daemon_json(tmp, daemon_json)
        })
    }
}

/// Moves `src` to `dst` unless an earlier run already did.
fn move_into(src: &Path, dst: &Path) -> Result<(), MigrateError> {
    if !src.exists() {
        return Ok(());
    }
    fs::rename(src, dst).map_err(io(format!("move {} to {}", src.display(), dst.display())))
}

/// The config of container `id`.
pub fn container_config(data_root: &Path, id: &str) -> PathBuf {
    data_root.join("containers").join(id).join("config.v2.json")
}

/// Sets `storage-driver` to overlay2 in dockerd's config, keeping the original for rollback.
fn switch_daemon_json(tmp: &Path, daemon_json: &Path) -> Result<(), MigrateError> {
    let orig = daemon_json_backup(tmp);
    let current = fs::read(daemon_json).unwrap_or_else(|_| b"{}".to_vec());
    if !orig.exists() {
        write_atomic(&orig, &current)?;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&current).map_err(|e| {
        MigrateError::Refused(format!(
            "{}: {e}; fix the JSON and rerun",
            daemon_json.display()
        ))
    })?;
    v["storage-driver"] = serde_json::json!("overlay2");
    if let Some(dir) = daemon_json.parent() {
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    write_atomic(
        daemon_json,
        serde_json::to_string_pretty(&v).expect("json").as_bytes(),
    )
}

fn copy_dir(src: &Path, dst: &Path) -> Result<u64, MigrateError> {
    fs::create_dir_all(dst).map_err(io(format!("create {}", dst.display())))?;
    let mut bytes = 0;
    for e in fs::read_dir(src).map_err(io(format!("read {}", src.display())))? {
        let e = e.map_err(io(format!("read {}", src.display())))?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().map_err(io("stat"))?.is_dir() {
            bytes += copy_dir(&s, &d)?;
        } else {
            bytes += fs::copy(&s, &d).map_err(io(format!("copy {}", s.display())))?;
        }
    }
    Ok(bytes)
}

/// Builds the overlay2 diff of image layer `l` from the files under `src_root`,
/// replaying the layer's original tar (rebuilt from tar-split and checked against its diffID).
fn image_layer(
    root: &DataRoot,
    l: &Layer,
    src_root: &Path,
    dest: &Path,
    link: bool,
) -> Result<u64, MigrateError> {
    let (chain, diff_id) = (l.chain_id.as_str(), l.diff_id.as_str());
    let layer_err = |reason: String| MigrateError::Layer {
        chain: chain.to_string(),
        reason,
    };
    let split = root.tar_split(chain);
    let entries = tarsplit::read(&split).map_err(|e| layer_err(e.to_string()))?;
    let (reader, rebuild) = tarsplit::rebuild(entries, src_root).map_err(io("pipe"))?;
    // Same filesystem: hard links. From a device image: copies.
    let applied = if link {
        layer::apply_linked(reader, dest, src_root)
    } else {
        layer::apply(reader, dest)
    };
    // When both halves fail, one caused the other: a rebuild that stopped (a file changed)
    // truncates the tar the apply reads; an apply that stopped breaks the rebuild's pipe.
    let (digest, stats) = match (rebuild.digest(), applied) {
        (Ok(digest), Ok(stats)) => (digest, stats),
        (Err(e), Err(applying)) if e.is_broken_pipe() => {
            return Err(layer_err(applying.to_string()))
        }
        (Err(e), _) => return Err(layer_err(e.to_string())),
        (Ok(_), Err(e)) => return Err(layer_err(e.to_string())),
    };
    if digest.as_str() != diff_id {
        return Err(layer_err(format!("its files rebuild to {digest}, not its diffID {diff_id}: the layer was altered on disk; nothing was switched")));
    }
    Ok(stats.entries)
}

/// Rewrites a container's `Driver` (temp file + rename).
pub fn set_driver(config: &Path, driver: &str) -> Result<(), MigrateError> {
    let text = fs::read(config).map_err(io(format!("read {}", config.display())))?;
    let mut v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| MigrateError::Refused(format!("{}: {e}", config.display())))?;
    if v["Driver"] == driver {
        return Ok(());
    }
    v["Driver"] = serde_json::json!(driver);
    write_atomic(config, &serde_json::to_vec(&v).expect("json"))
}

/// `chain` and its ancestors, nearest first.
fn ancestors(root: &DataRoot, chain: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = chain.map(str::to_string);
    while let Some(c) = next {
        next = root.layer(&c).and_then(|l| l.parent.clone());
        out.push(c);
    }
    out
}
