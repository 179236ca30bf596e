//! The worker: snapshots from the snapshotter library, the local image store, and the execution
//! of ops (unpacking base images, running commands with an OCI runtime, file ops).
//!
//! Everything here is blocking; the solver calls it on tokio's blocking pool.

pub mod agent;
pub mod exec;
pub mod file;
pub mod images;
pub mod mounts;
pub mod rootfs;
pub mod tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_image::content::{ContentError, ContentStore};
use strata_image::layer::LayerError;
use strata_image::nonce;
use strata_image::oci::OciError;
use strata_snapshotter::mounts as snapshot_mounts;
use strata_snapshotter::{Options, Snapshots};
use tracing::warn;

use crate::db::{Db, DbError};
use crate::llb;
use crate::pattern::Ignore;
use tree::Source;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Exec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process \"{command}\" did not complete successfully: exit code: {code}{}", if tail.is_empty() { String::new() } else { format!("\nlast lines of its output:\n{tail}") })]
    ExitCode {
        command: String,
        code: i32,
        tail: String,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Copy(String),
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Snapshot(#[from] strata_snapshotter::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Registry(#[from] strata_image::registry::RegistryError),
}

impl WorkerError {
    /// Wraps an I/O error with what was being done to what.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let context = context.into();
        move |source| WorkerError::Io { context, source }
    }
}

/// The result of a vertex.
#[derive(Debug, Clone, PartialEq)]
pub enum Ref {
    /// An empty tree (`FROM scratch`).
    Scratch,
    /// A committed snapshot.
    Snapshot(String),
    /// The build context, restricted to what a copy selects.
    Context,
    /// A downloaded file (ADD URL) in the content store, with the name its URL gives it.
    Http { digest: String, name: String },
}

/// The build context of one build.
#[derive(Debug, Clone)]
pub struct Context {
    pub dir: PathBuf,
    pub ignore: Ignore,
    /// The sha256 (hex) of regular files' contents by relative path, as hashed when they arrived:
    /// cache keys use them instead of reading the files again.
    pub digests: Arc<BTreeMap<String, String>>,
}

/// The builder's store under `<root>/build` and the OCI runtime to run steps with.
pub struct Worker {
    dir: PathBuf,
    pub snapshots: Snapshots,
    pub content: ContentStore,
    pub db: Db,
    pub runtime: String,
    pub registry: strata_image::registry::Client,
    pub volumes: std::sync::Arc<crate::volumes::Volumes>,
    /// Cache keys being solved by some build of this builder.
    pub steps: std::sync::Arc<crate::keylock::KeyLocks>,
}

/// The first component of `dest` missing under `root` (what a mount point creation would add).
fn first_missing(root: &Path, dest: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in Path::new(dest)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
    {
        p.push(c);
        if std::fs::symlink_metadata(&p).is_err() {
            return Some(p);
        }
    }
    None
}

impl Worker {
    /// Opens the store under `root` (`<root>/build`), removing what an interrupted build left.
    pub fn open(
        root: &Path,
        runtime: &str,
        registry: strata_image::registry::Options,
    ) -> Result<Worker, WorkerError> {
        let dir = root.join("build");
        std::fs::create_dir_all(&dir)
            .map_err(WorkerError::io(format!("create {}", dir.display())))?;
        // The build database is opened first: its lock makes this process the store's only user.
        let db = Db::open(&dir.join("db"))?;
        let snapshots = Snapshots::open(&dir, Options::default())?;
        let content = ContentStore::open(&dir.join("content"))?;
        let registry = strata_image::registry::Client::new(registry);
        let volumes = crate::volumes::Volumes::open(&dir.join("volumes"))?;
        let w = Worker {
            dir,
            snapshots,
            content,
            db,
            runtime: runtime.to_string(),
            registry,
            volumes,
            steps: Default::default(),
        };
        w.remove_leftovers();
        Ok(w)
    }

    /// What a killed builder left: its steps' containers (still running), their mounts, and
    /// temporary snapshots. Safe here: the database lock makes this process the store's only user.
    fn remove_leftovers(&self) {
        exec::remove_containers(&self.runtime, &self.dir);
        let mnt = self.dir.join("mnt");
        // Every mount detached first, so that removing the directories never reaches into one.
        if let Err(e) = snapshot_mounts::unmount_all_under(&mnt) {
            warn!(error = %e, "could not detach what an interrupted build left mounted");
            return;
        }
        if let Ok(rd) = std::fs::read_dir(&mnt) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if let Ok(all) = self.snapshots.list(&["name~=^tmp/".to_string()]) {
            for s in all {
                if let Err(e) = self.snapshots.remove(&s.key) {
                    warn!(key = s.key, error = %e, "could not remove a leftover temporary snapshot");
                }
            }
        }
    }

    /// Snapshot `top` and those below it, lowest first: an image's layers in order.
    pub fn chain(&self, top: &str) -> Result<Vec<String>, WorkerError> {
        let mut chain = self.snapshots.parents(top)?;
        chain.reverse();
        chain.push(top.to_string());
        Ok(chain)
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on a new active snapshot on `parent`, mounted; commits it as `result` when `f`
    /// succeeds, removes it otherwise. `result` already existing (a concurrent equal step) is fine.
    pub fn with_active(
        &self,
        parent: Option<&str>,
        result: &str,
        f: impl FnOnce(&Path) -> Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        let key = format!("tmp/{}", nonce());
        let m = self
            .snapshots
            .prepare(&key, parent.unwrap_or(""), BTreeMap::new())?;
        let outcome = self.with_mounted(&m, f);
        match outcome {
            Ok(()) => match self.snapshots.commit(result, &key, BTreeMap::new()) {
                Ok(()) => Ok(()),
                Err(strata_snapshotter::Error::AlreadyExists(_)) => {
                    let _ = self.snapshots.remove(&key);
                    Ok(())
                }
                Err(e) => {
                    let _ = self.snapshots.remove(&key);
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.snapshots.remove(&key);
                Err(e)
            }
        }
    }

    /// Runs `f` on a throwaway active snapshot on `parent`, mounted; removes it afterwards.
    pub fn with_scratch<T>(
        &self,
        parent: Option<&str>,
        f: impl FnOnce(&Path) -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let key = format!("tmp/{}", nonce());
        let m = self
            .snapshots
            .prepare(&key, parent.unwrap_or(""), BTreeMap::new())?;
        self.with_temporary(&key, &m, f)
    }

    /// Runs `f` with snapshot `key` mounted read-only.
    pub fn with_view<T>(
        &self,
        key: &str,
        f: impl FnOnce(&Path) -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let view = format!("tmp/{}", nonce());
        let m = self.snapshots.view(&view, key, BTreeMap::new())?;
        self.with_temporary(&view, &m, f)
    }

    /// Runs `f` on the snapshot `key` mounted from `m`, then removes the snapshot.
    fn with_temporary<T>(
        &self,
        key: &str,
        m: &[strata_snapshotter::api::types::Mount],
        f: impl FnOnce(&Path) -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let mut out = None;
        let r = self.with_mounted(m, |p| {
            out = Some(f(p)?);
            Ok(())
        });
        let _ = self.snapshots.remove(key);
        r.map(|()| out.expect("set on success"))
    }

    fn with_mounted(
        &self,
        m: &[strata_snapshotter::api::types::Mount],
        f: impl FnOnce(&Path) -> Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        let target = self.dir.join("mnt").join(nonce());
        std::fs::create_dir_all(&target)
            .map_err(WorkerError::io(format!("create {}", target.display())))?;
        snapshot_mounts::mount_all(m, &target)?;
        let r = f(&target);
        if let Err(e) = snapshot_mounts::unmount(&target) {
            warn!(target = %target.display(), error = %e, "unmount failed");
        }
        let _ = std::fs::remove_dir(&target);
        r
    }

    fn parent_of(r: &Ref) -> Result<Option<&str>, WorkerError> {
        match r {
            Ref::Scratch => Ok(None),
            Ref::Snapshot(s) => Ok(Some(s.as_str())),
            Ref::Context | Ref::Http { .. } => Err(WorkerError::Exec(
                "the build context cannot be a container root".into(),
            )),
        }
    }

    /// Downloads `url` into the content store (checked against `checksum` when given).
    pub fn fetch_url(&self, url: &str, checksum: Option<&str>) -> Result<String, WorkerError> {
        let expected = checksum
            .map(strata_image::content::Digest::parse)
            .transpose()
            .map_err(|e| WorkerError::Copy(format!("ADD --checksum: {e}")))?;
        if let Some(d) = &expected {
            if self.content.has(d) {
                return Ok(d.to_string());
            }
        }
        let body = self
            .registry
            .get(url)
            .map_err(|e| WorkerError::Copy(format!("ADD {url}: {e}")))?;
        let (d, _) = self
            .content
            .put_reader(body, expected.as_ref())
            .map_err(|e| WorkerError::Copy(format!("ADD {url}: {e}")))?;
        Ok(d.to_string())
    }

    /// Runs an exec op whose mount inputs are `inputs`, committing the root as `result`.
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &self,
        inputs: &[Ref],
        op: &llb::ExecOp,
        result: &str,
        context: Option<&Context>,
        session: &mounts::Session,
        reset_caches: bool,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<(), WorkerError> {
        let meta = op
            .meta
            .as_ref()
            .ok_or_else(|| WorkerError::Exec("exec op without a command".into()))?;
        let network = llb::NetMode::from_i32(op.network).unwrap_or(llb::NetMode::None);
        let root_input = op
            .mounts
            .first()
            .and_then(|m| usize::try_from(m.input).ok())
            .and_then(|i| inputs.get(i))
            .cloned()
            .unwrap_or(Ref::Scratch);
        let id = format!("strata-{}", nonce());
        let prepared = self.prepare_mounts(
            &op.mounts,
            &op.secretenv,
            inputs,
            context,
            session,
            reset_caches,
        )?;
        let needles = session.secrets.needles();
        let masked = |line: &str| log(&crate::secrets::mask(&needles, line));
        let mut extra = prepared.spec.clone();
        if network != llb::NetMode::None {
            extra.extend(mounts::name_resolution());
        }
        let outcome = self.with_active(Self::parent_of(&root_input)?, result, |root| {
            // Mount points runc creates for extra mounts are not part of the result.
            let stubs: Vec<std::path::PathBuf> = extra
                .iter()
                .filter_map(|m| first_missing(root, &m.dest))
                .collect();
            let spec = exec::ExecSpec {
                meta,
                extra: &extra,
                extra_env: &prepared.env,
                network,
                runtime: &self.runtime,
                state_dir: &self.dir,
                id: &id,
                sandbox: false,
                cancel: &session.cancel,
            };
            let r = exec::run(root, &spec, &masked).map_err(|e| session.mask_error(e));
            for s in stubs.iter().rev() {
                let _ = strata_snapshotter::layout::remove_tree(s);
            }
            r
        });
        self.release_mounts(prepared);
        outcome
    }

    /// Runs a file op's actions on `base`, in order; `secondary[i]` is action i's source.
    pub fn file(
        &self,
        base: &Ref,
        actions: &[(llb::FileAction, Option<Ref>)],
        context: Option<&Context>,
        result: &str,
    ) -> Result<(), WorkerError> {
        self.with_active(Self::parent_of(base)?, result, |root| {
            for (action, secondary) in actions {
                match &action.action {
                    Some(llb::file_action::Action::Mkdir(a)) => file::mkdir(root, a)?,
                    Some(llb::file_action::Action::Mkfile(a)) => file::mkfile(root, a)?,
                    Some(llb::file_action::Action::Copy(a)) => match secondary {
                        Some(Ref::Context) => {
                            let ctx = context.ok_or_else(|| {
                                WorkerError::Copy(
                                    "COPY from the build context, but this build has none".into(),
                                )
                            })?;
                            let source = Source {
                                root: &ctx.dir,
                                ignore: Some(&ctx.ignore),
                            };
                            file::copy(root, &source, true, a)?;
                        }
                        Some(Ref::Snapshot(s)) => self.with_view(s, |src| {
                            file::copy(
                                root,
                                &Source {
                                    root: src,
                                    ignore: None,
                                },
                                false,
                                a,
                            )
                        })?,
                        Some(Ref::Http { digest, name }) => {
                            let d = strata_image::content::Digest::parse(digest)
                                .map_err(|e| WorkerError::Image(e.to_string()))?;
                            file::add_remote(root, &self.content.path(&d), name, a)?;
                        }
                        Some(Ref::Scratch) | None => {
                            return Err(WorkerError::Copy(format!(
                                "COPY {}: the source stage is empty",
                                a.src
                            )))
                        }
                    },
                    None => {}
                }
            }
            Ok(())
        })
    }
}
