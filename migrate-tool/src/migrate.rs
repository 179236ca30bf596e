//! `migrate-tool migrate`: builds the overlay2 tree beside the source in `<data-root>/migrate-overlay2.tmp`
//! through a journal of steps, each done once and marked done (`journal/<step>.done`), then switches
//! dockerd over. Killed at any point, a rerun skips what is done and redoes the step in flight;
//! the source driver's files are never modified (image layer files are hard-linked, not copied).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use strata_image::layer;

use crate::dataroot::{DataRoot, Driver};
use crate::tarsplit;
use crate::{changes, devicemapper, overlay2};

pub const TMP: &str = "migrate-overlay2.tmp";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {chain}: {reason}")]
    Layer { chain: String, reason: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}

/// The journal: one marker file per finished step.
pub struct Journal<'a> {
    dir: PathBuf,
    progress: &'a dyn Fn(usize, usize, &str),
    /// Steps seen so far and in all, for progress.
    seen: usize,
    pub total: usize,
    /// Test hook: SIGKILL ourselves after this many steps (STRATA_MIGRATE_KILL_AFTER).
    kill_after: Option<usize>,
    done_now: usize,
}

impl<'a> Journal<'a> {
    pub fn open(
        tmp: &Path,
        progress: &'a dyn Fn(usize, usize, &str),
    ) -> Result<Journal<'a>, MigrateError> {
        let dir = tmp.join("journal");
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let kill_after = std::env::var("STRATA_MIGRATE_KILL_AFTER")
            .ok()
            .and_then(|v| v.parse().ok());
        Ok(Journal {
            dir,
            kill_after,
            done_now: 0,
            progress,
            seen: 0,
            total: 0,
        })
    }

    pub fn is_done(&self, step: &str) -> bool {
        self.dir.join(format!("{step}.done")).exists()
    }

    /// Runs `f` unless `step` is done, then marks it done (durably).
    pub fn step(
        &mut self,
        step: &str,
        f: impl FnOnce() -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        self.step_labeled(step, step, f)
    }

    /// Like [`Journal::step`], shown to the user as `label` (the marker keeps the step's name).
    pub fn step_labeled(
        &mut self,
        step: &str,
        label: &str,
        f: impl FnOnce() -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError> {
        (self.progress)(self.seen, self.total, label);
        self.seen += 1;
        if self.is_done(step) {
            return Ok(());
        }
        f()?;
        let marker = self.dir.join(format!("{step}.done"));
        let file = fs::File::create(&marker).map_err(io(format!("write {}", marker.display())))?;
        file.sync_all().map_err(io("sync journal"))?;
        self.done_now += 1;
        if self.kill_after == Some(self.done_now) {
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }
}

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

/// Writes `content` to `path` through a temp file and a rename.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<(), MigrateError> {
    let tmp = path.with_extension("migrate-tmp");
    let mut f = fs::File::create(&tmp).map_err(io(format!("write {}", tmp.display())))?;
    f.write_all(content)
        .map_err(io(format!("write {}", tmp.display())))?;
    f.sync_all()
        .map_err(io(format!("sync {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!(
        "rename {} to {}",
        tmp.display(),
        path.display()
    )))
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

/// Builds the overlay2 diff of image layer `chain` from the overlay v1 full tree `src_root`,
/// replaying the layer's original tar (rebuilt from tar-split and checked against its diffID).
fn image_layer(
    root: &DataRoot,
    chain: &str,
    diff_id: &str,
    src_root: &Path,
    dest: &Path,
    link: bool,
) -> Result<u64, MigrateError> {
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
    let digest = rebuild.digest().map_err(layer_err)?;
    let stats = applied.map_err(|e| layer_err(e.to_string()))?;
    if digest.as_str() != diff_id {
        return Err(layer_err(format!("its files rebuild to {digest}, not its diffID {diff_id}: the layer was altered on disk; nothing was switched")));
    }
    Ok(stats.entries)
}

/// Migrates the overlay (v1) data root `root` to overlay2.
pub fn migrate(root: &DataRoot, opts: &Options) -> Result<Report, MigrateError> {
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
    let plan = crate::plan::plan(root);
    let blockers: Vec<String> = plan
        .problems
        .iter()
        .filter(|p| p.severity == "blocker")
        .map(|p| format!("{} (fix: {})", p.what, p.fix))
        .collect();
    if !blockers.is_empty() {
        return Err(MigrateError::Refused(format!(
            "refusing to migrate:\n  {}",
            blockers.join("\n  ")
        )));
    }
    let tmp = root.path.join(TMP);
    let mut journal = Journal::open(&tmp, opts.progress)?;
    let container_layers: usize = root
        .containers
        .iter()
        .filter(|c| c.mount_id.is_some())
        .map(|c| 1 + usize::from(c.init_id.is_some()))
        .sum();
    journal.total = root.layers.len() + container_layers + 5;
    let mut report = Report::default();
    let out = tmp.join("overlay2");
    fs::create_dir_all(out.join("l")).map_err(io(format!("create {}", out.display())))?;
    let switched = journal.is_done("switch-overlay2");
    let legacy = root.path.join(root.driver.dir_name());
    let pool = if root.driver == Driver::Devicemapper {
        Some(devicemapper::Pool::open(&root.path)?)
    } else {
        None
    };
    let aufs = root.driver == Driver::Aufs;
    // Where a layer's files are: overlay keeps a full tree per image layer and an upper per
    // container layer; aufs keeps every layer's own files under diff/.
    let image_files = |id: &str| {
        if aufs {
            legacy.join("diff").join(id)
        } else {
            legacy.join(id).join("root")
        }
    };
    let rw_files = |id: &str| {
        if aufs {
            legacy.join("diff").join(id)
        } else {
            legacy.join(id).join("upper")
        }
    };

    // Image layers, parents first. A layer's link name is chosen once and kept in its dir.
    let mut links: HashMap<String, String> = HashMap::new();
    for l in root.layers_parents_first() {
        let step = format!("layer-{}", l.cache_id);
        let final_dir = if switched {
            root.path.join("overlay2").join(&l.cache_id)
        } else {
            out.join(&l.cache_id)
        };
        let parents: Vec<String> = ancestors(root, l.parent.as_deref())
            .iter()
            .map(|c| links[c].clone())
            .collect();
        let label = format!(
            "layer {} ({:.1} MB)",
            &l.chain_id[..19.min(l.chain_id.len())],
            l.size as f64 / 1e6
        );
        journal.step_labeled(&step, &label, || {
            let partial = out.join(format!("{}.partial", l.cache_id));
            let _ = fs::remove_dir_all(&partial);
            fs::create_dir_all(partial.join("diff"))
                .map_err(io(format!("create {}", partial.display())))?;
            let built = match &pool {
                Some(pool) => {
                    let dev = devicemapper::mount_device(
                        &root.path,
                        pool,
                        &l.cache_id,
                        &tmp.join("devices"),
                    )?;
                    image_layer(
                        root,
                        &l.chain_id,
                        &l.diff_id,
                        &dev.rootfs(),
                        &partial.join("diff"),
                        false,
                    )
                }
                None => image_layer(
                    root,
                    &l.chain_id,
                    &l.diff_id,
                    &image_files(&l.cache_id),
                    &partial.join("diff"),
                    true,
                ),
            };
            // A refused layer leaves nothing behind, least of all links to what it named.
            report.entries += built.inspect_err(|_| {
                let _ = fs::remove_dir_all(&partial);
            })?;
            let link = overlay2::link_name();
            overlay2::finish_layer(&partial, &link, &parents, true)
                .map_err(io(format!("write {}", partial.display())))?;
            let _ = fs::remove_dir_all(out.join(&l.cache_id));
            fs::rename(&partial, out.join(&l.cache_id)).map_err(io("rename layer into place"))?;
            let _ = fs::remove_file(out.join("l").join(&link));
            std::os::unix::fs::symlink(
                format!("../{}/diff", l.cache_id),
                out.join("l").join(&link),
            )
            .map_err(io("create link"))?;
            report.layers += 1;
            Ok(())
        })?;
        let link = fs::read_to_string(final_dir.join("link"))
            .map_err(io(format!("read {}", final_dir.join("link").display())))?;
        links.insert(l.chain_id.clone(), link.trim().to_string());
    }

    // Containers: the init layer and the read-write layer, whose overlay v1 uppers already are in
    // overlay2's diff format.
    for c in &root.containers {
        let (Some(mount), Some(parent)) = (&c.mount_id, &c.parent) else {
            continue;
        };
        let image_links: Vec<String> = ancestors(root, Some(parent))
            .iter()
            .map(|ch| links[ch].clone())
            .collect();
        let mut lower = image_links.clone();
        for (id, is_init) in [(c.init_id.clone(), true), (Some(mount.clone()), false)] {
            let Some(id) = id else { continue };
            let final_dir = if switched {
                root.path.join("overlay2").join(&id)
            } else {
                out.join(&id)
            };
            let parents = lower.clone();
            journal.step(&format!("container-{id}"), || {
                let partial = out.join(format!("{id}.partial"));
                let _ = fs::remove_dir_all(&partial);
                fs::create_dir_all(&partial)
                    .map_err(io(format!("create {}", partial.display())))?;
                match &pool {
                    Some(pool) => {
                        // Full filesystems: the layer is what it changed from the one below.
                        let below = if is_init {
                            root.layer(parent)
                                .map(|l| l.cache_id.clone())
                                .unwrap_or_default()
                        } else {
                            c.init_id.clone().unwrap_or_default()
                        };
                        let work = tmp.join("devices");
                        let new = devicemapper::mount_device(&root.path, pool, &id, &work)?;
                        let old = devicemapper::mount_device(&root.path, pool, &below, &work)?;
                        fs::create_dir_all(partial.join("diff")).map_err(io("create diff"))?;
                        report.bytes_written +=
                            changes::diff(&new.rootfs(), &old.rootfs(), &partial.join("diff"))
                                .map_err(io(format!("diff device {id}")))?;
                    }
                    None => {
                        let upper = rw_files(&id);
                        report.entries += overlay2::link_tree(&upper, &partial.join("diff"), aufs)
                            .map_err(io(format!("link {}", upper.display())))?;
                    }
                }
                let link = overlay2::link_name();
                overlay2::finish_layer(&partial, &link, &parents, false)
                    .map_err(io(format!("write {}", partial.display())))?;
                let _ = fs::remove_dir_all(out.join(&id));
                fs::rename(&partial, out.join(&id))
                    .map_err(io("rename container layer into place"))?;
                let _ = fs::remove_file(out.join("l").join(&link));
                std::os::unix::fs::symlink(format!("../{id}/diff"), out.join("l").join(&link))
                    .map_err(io("create link"))?;
                Ok(())
            })?;
            if is_init {
                let link =
                    fs::read_to_string(final_dir.join("link")).map_err(io("read init link"))?;
                lower.insert(0, link.trim().to_string());
            }
        }
        report.containers += 1;
    }

    // The image and layer store, carried over with cache ids kept.
    journal.step("image-store", || {
        let dst = tmp.join("image/overlay2");
        let _ = fs::remove_dir_all(&dst);
        report.bytes_written += copy_dir(&root.store(), &dst)?;
        Ok(())
    })?;

    // The switch: every sub-step is idempotent, so a rerun after a kill finishes it.
    journal.step("switch-overlay2", || {
        if out.exists() {
            fs::rename(&out, root.path.join("overlay2"))
                .map_err(io("move overlay2 into the data root"))?;
        }
        Ok(())
    })?;
    journal.step("switch-image", || {
        let src = tmp.join("image/overlay2");
        if src.exists() {
            fs::rename(&src, root.path.join("image/overlay2"))
                .map_err(io("move image/overlay2 into the data root"))?;
        }
        Ok(())
    })?;
    journal.step("switch-containers", || {
        for c in &root.containers {
            set_driver(
                &root
                    .path
                    .join("containers")
                    .join(&c.id)
                    .join("config.v2.json"),
                "overlay2",
            )?;
        }
        Ok(())
    })?;
    journal.step("switch-daemon-json", || {
        let orig = journal_copy(&tmp);
        let current = fs::read(&opts.daemon_json).unwrap_or_else(|_| b"{}".to_vec());
        if !orig.exists() {
            write_atomic(&orig, &current)?;
        }
        let mut v: serde_json::Value = serde_json::from_slice(&current).map_err(|e| {
            MigrateError::Refused(format!(
                "{}: {e}; fix the JSON and rerun",
                opts.daemon_json.display()
            ))
        })?;
        v["storage-driver"] = serde_json::json!("overlay2");
        if let Some(dir) = opts.daemon_json.parent() {
            fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        write_atomic(
            &opts.daemon_json,
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )
    })?;
    Ok(report)
}

fn journal_copy(tmp: &Path) -> PathBuf {
    tmp.join("journal/daemon.json.orig")
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

/// Undoes a migration: removes what it added and points containers and dockerd back to overlay.
pub fn rollback(data_root: &Path, daemon_json: &Path) -> Result<(), MigrateError> {
    let tmp = data_root.join(TMP);
    if !tmp.exists() {
        return Err(MigrateError::Refused(format!(
            "{}: no migration to roll back",
            data_root.display()
        )));
    }
    let legacy = [Driver::Aufs, Driver::Overlay, Driver::Devicemapper]
        .into_iter()
        .find_map(|d| DataRoot::open_driver(data_root, d).ok())
        .ok_or_else(|| MigrateError::Refused("the old driver's store is gone: cleanup already ran; rollback is no longer possible".into()))?;
    for c in &legacy.containers {
        set_driver(
            &data_root
                .join("containers")
                .join(&c.id)
                .join("config.v2.json"),
            legacy.driver.dir_name(),
        )?;
    }
    let orig = journal_copy(&tmp);
    if let Ok(bytes) = fs::read(&orig) {
        write_atomic(daemon_json, &bytes)?;
    }
    for d in [
        data_root.join("image/overlay2"),
        data_root.join("overlay2"),
        tmp,
    ] {
        if d.exists() {
            fs::remove_dir_all(&d).map_err(io(format!("remove {}", d.display())))?;
        }
    }
    Ok(())
}
