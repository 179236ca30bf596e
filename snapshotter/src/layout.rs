//! The on-disk layout under the root directory:
//!
//! ```text
//! <root>/metadata/            RocksDB
//! <root>/snapshots/<id>/fs    the snapshot's files (upperdir of active snapshots)
//! <root>/snapshots/<id>/work  overlay workdir (active snapshots only)
//! <root>/l/<name>             -> ../snapshots/<id>/fs, <name> = id in base 36
//! ```
//!
//! Short link names keep a mount of hundreds of lowers within the one-page mount-option limit once
//! containerd strips their common directory: each lower then costs `len("<name>:")`, a few bytes.
//! A snapshot's directories are made before the record that owns them is written, under a fresh
//! id, so a crash midway leaves a `snapshots/<id>` no record owns (start-up cleanup removes it).
//! Removed ones are renamed to `snapshots/rm-<id>` before deletion, so a crash leaves only names
//! no record owns.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use strata_image::fsutil;

/// Paths of one snapshotter root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    /// The process umask: a mkdir's mode needs a chmod after it only when this strips bits.
    umask: u32,
}

/// What a directory entry under `snapshots/` or `l/` is.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// `snapshots/<id>`
    Snapshot(u64),
    /// `l/<name>` pointing at snapshot `id`
    Link(u64),
    /// Anything else (`new-*`, `rm-*`, stray files): never owned by a record.
    Stray,
}

/// The short link name of snapshot `id`: the id in base 36.
pub fn link_name(id: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = id;
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

fn parse_link_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name, 36)
        .ok()
        .filter(|id| link_name(*id) == name)
}

impl Layout {
    /// Creates the root's directories if missing.
    pub fn create(root: &Path) -> Result<Layout> {
        let layout = Layout {
            root: root.to_path_buf(),
            umask: umask(),
        };
        for dir in [
            root.to_path_buf(),
            layout.snapshots_dir(),
            layout.links_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(Error::io(format!("chmod {}", dir.display())))?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.root.join("metadata")
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("l")
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The snapshot's files: its upperdir when active, a lower when committed.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// The short path of the snapshot's files, used as an overlay lowerdir.
    pub fn link(&self, id: u64) -> PathBuf {
        self.links_dir().join(link_name(id))
    }

    /// Makes `snapshots/<id>/{fs,work}` and `l/<name>`. `id` is fresh: nothing is in the way.
    pub fn create_snapshot(&self, id: u64, with_work: bool) -> Result<()> {
        let dir = self.snapshot_dir(id);
        self.mkdir(&dir, 0o700)?;
        self.mkdir(&dir.join("fs"), 0o755)?;
        if with_work {
            self.mkdir(&dir.join("work"), 0o711)?;
        }
        self.create_link(id)
    }

    /// mkdir with exactly `mode`: the process umask must not decide a rootfs's permissions.
    fn mkdir(&self, path: &Path, mode: u32) -> Result<()> {
        fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(Error::io(format!("create {}", path.display())))?;
        if mode & self.umask == 0 {
            return Ok(());
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(Error::io(format!("chmod {}", path.display())))
    }

    /// (Re)creates `l/<name>` -> `../snapshots/<id>/fs`.
    pub fn create_link(&self, id: u64) -> Result<()> {
        let link = self.link(id);
        let target = Path::new("../snapshots").join(id.to_string()).join("fs");
        let made = match symlink(&target, &link) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(&link).and_then(|()| symlink(&target, &link))
            }
            other => other,
        };
        made.map_err(Error::io(format!("create link {}", link.display())))
    }

    /// Removes a snapshot's link and directories (see [`Layout::retire`]).
    pub fn remove_snapshot(&self, id: u64) -> Result<()> {
        match self.retire(id)? {
            Some(doomed) => remove_tree(&doomed),
            None => Ok(()),
        }
    }

    /// Removes a snapshot's link and renames its directory to `rm-<id>`, returning that path for
    /// the caller to delete (`None`: there was no directory). A crash before the deletion leaves
    /// an `rm-*` name that start-up cleanup finishes.
    pub fn retire(&self, id: u64) -> Result<Option<PathBuf>> {
        let link = self.link(id);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", link.display()))(e)),
        }
        let dir = self.snapshot_dir(id);
        let doomed = self.snapshots_dir().join(format!("rm-{id}"));
        match fs::rename(&dir, &doomed) {
            Ok(()) => Ok(Some(doomed)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("rename {}", dir.display()))(e)),
        }
    }

    /// Every entry under `snapshots/` and `l/`, classified, with its path.
    pub fn entries(&self) -> Result<Vec<(PathBuf, Entry)>> {
        let mut out = Vec::new();
        for (dir, is_link) in [(self.snapshots_dir(), false), (self.links_dir(), true)] {
            let read = fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))?;
            for item in read {
                let item = item.map_err(Error::io(format!("read {}", dir.display())))?;
                let name = item.file_name().to_string_lossy().into_owned();
                let entry = if is_link {
                    match parse_link_name(&name) {
                        Some(id) => Entry::Link(id),
                        None => Entry::Stray,
                    }
                } else {
                    match name.parse::<u64>() {
                        Ok(id) if id.to_string() == name => Entry::Snapshot(id),
                        _ => Entry::Stray,
                    }
                };
                out.push((item.path(), entry));
            }
        }
        Ok(out)
    }
}

/// The process umask, read without changing it (`umask(2)` can only set it); all bits when
/// unreadable, so every mkdir is followed by a chmod.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o777)
}

/// Removes a file, link or directory tree at `path`; absent is fine.
pub fn remove_tree(path: &Path) -> Result<()> {
    fsutil::remove_tree(path).map_err(Error::io(format!("remove {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_short_and_round_trip() {
        assert_eq!(link_name(0), "0");
        assert_eq!(link_name(35), "z");
        assert_eq!(link_name(36), "10");
        assert_eq!(link_name(46655), "zzz");
        for id in [1u64, 500, 99_999, u64::MAX] {
            assert_eq!(parse_link_name(&link_name(id)), Some(id));
        }
        assert_eq!(parse_link_name("01"), None);
        assert_eq!(parse_link_name("new-1"), None);
    }

    #[test]
    fn create_and_remove_leave_no_trace() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::create(root.path()).unwrap();
        layout.create_snapshot(7, true).unwrap();
        assert!(layout.fs_dir(7).is_dir());
        assert!(layout.work_dir(7).is_dir());
        assert_eq!(
            fs::canonicalize(layout.link(7)).unwrap(),
            fs::canonicalize(layout.fs_dir(7)).unwrap()
        );
        let mode = fs::metadata(layout.fs_dir(7)).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        let kinds: Vec<Entry> = layout.entries().unwrap().into_iter().map(|e| e.1).collect();
        assert!(kinds.contains(&Entry::Snapshot(7)) && kinds.contains(&Entry::Link(7)));
        layout.remove_snapshot(7).unwrap();
        assert!(layout.entries().unwrap().is_empty());
    }
}
