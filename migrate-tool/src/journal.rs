//! The journal of a migration: one marker file per finished step under
//! `<data-root>/migrate-overlay2.tmp/journal/`, written durably after the step, so a rerun after a
//! kill skips what is done and redoes the step in flight.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{io, MigrateError};

/// The migration's work directory under the data root.
pub const TMP: &str = "migrate-overlay2.tmp";

/// Where the journal keeps dockerd's config as it was before the switch (for rollback).
pub fn daemon_json_backup(tmp: &Path) -> PathBuf {
    tmp.join("journal/daemon.json.orig")
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

    /// Whether `step` is done in the journal of work directory `tmp`.
    pub fn done_in(tmp: &Path, step: &str) -> bool {
        tmp.join("journal").join(format!("{step}.done")).exists()
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
