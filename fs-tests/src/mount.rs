//! Mounting what the snapshotter returns, on a temp dir, undone on drop.

use std::path::{Path, PathBuf};

use strata_snapshotter::api::types::Mount;
use strata_snapshotter::mounts;
use tempfile::TempDir;

/// Snapshot mounts mounted on a temp dir.
pub struct Mounted {
    dir: TempDir,
    active: bool,
}

impl Mounted {
    pub fn new(m: &[Mount]) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("strata-mnt-")
            .tempdir()
            .unwrap();
        mounts::mount_all(m, dir.path()).unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
        Mounted { dir, active: true }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    pub fn unmount(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.active {
            self.active = false;
            mounts::unmount(self.dir.path()).unwrap();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.release();
    }
}
