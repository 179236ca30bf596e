//! The builder's copy of a client's build context, brought up to date with what the client's
//! walk saw: unchanged entries stay, changed files are asked for and written as they arrive,
//! entries the client no longer has are removed.
//!
//! An entry is unchanged when its size, mtime and ctime (ns), inode, mode, owner, link target and
//! xattrs all equal what the copy recorded, and it was not modified at or after the previous
//! walk began (git's "racy" rule: a file edited again within the same timestamp tick as the walk
//! would otherwise look unchanged). ctime closes BuildKit's hole of a file edited with its size
//! and mtime kept (`touch -d` cannot set ctime).
//!
//! Paths from the client are checked: relative, no `.`/`..`/empty component, and every parent a
//! directory the client listed, so nothing is written outside the copy or through a symlink.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use strata_image::content::Hashing;

use super::proto::{FileChunk, Stat};

/// Why a context could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("build context entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("build context {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the client stopped sending the build context: {0}")]
    Client(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SyncError {
    let what = what.into();
    move |source| SyncError::Io { what, source }
}

/// What the copy recorded of one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    link: String,
    xattrs: String,
}

impl Seen {
    fn of(s: &Stat) -> Seen {
        let mut h = Sha256::new();
        for x in &s.xattrs {
            h.update(x.name.as_bytes());
            h.update([0]);
            h.update(&x.value);
            h.update([0]);
        }
        Seen {
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
            link: s.link.clone(),
            xattrs: hex::encode(h.finalize()),
        }
    }
}

/// The copy's record: what each entry was when last brought up to date, and when that walk began.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    walk_started_ns: i64,
    entries: BTreeMap<String, Seen>,
    /// Regular files' content sha256 (hex), hashed as they arrived.
    #[serde(default)]
    digests: BTreeMap<String, String>,
}

/// One client context's copy on the builder: `<dir>/tree` and `<dir>/index.json`.
pub struct Copy {
    dir: PathBuf,
}

/// What a sync did, for progress, and the copy's content digests.
#[derive(Debug, Default, Clone)]
pub struct Synced {
    pub entries: usize,
    pub files_sent: usize,
    pub bytes_sent: u64,
    pub removed: usize,
    /// Every regular file's content sha256 (hex), by path.
    pub digests: BTreeMap<String, String>,
}

/// How much more than their stat sizes the files of one sync may turn out to hold.
const GROWTH: u64 = 64 << 20;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Copy {
    /// The copy of the context at `context_path` of client `client_id`, under `root`.
    pub fn new(root: &Path, client_id: &str, context_path: &str) -> Copy {
        let mut h = Sha256::new();
        h.update(client_id.as_bytes());
        h.update([0]);
        h.update(context_path.as_bytes());
        Copy {
            dir: root.join(&hex::encode(h.finalize())[..32]),
        }
    }

    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// Brings the copy up to `stats` (the client's walk, begun at `walk_started_ns`): `fetch`
    /// asks the client for the files at the indexes given, whose chunks then come from `chunks`.
    pub fn sync(
        &self,
        mut stats: Vec<Stat>,
        walk_started_ns: i64,
        fetch: &mut dyn FnMut(Vec<u32>) -> Result<(), SyncError>,
        chunks: &mut dyn Iterator<Item = FileChunk>,
    ) -> Result<Synced, SyncError> {
        check(&mut stats)?;
        let tree = self.tree();
        fs::create_dir_all(&tree).map_err(io_err("create the copy"))?;
        let index_path = self.dir.join("index.json");
        let old: Index = fs::read(&index_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // Until the new index is written, the tree may be ahead of any index: a crash in between
        // makes the next sync send everything.
        let _ = fs::remove_file(&index_path);
        let mut done = Synced {
            entries: stats.len(),
            removed: remove_others(&tree, &stats)?,
            ..Default::default()
        };
        let mut wanted = Vec::new();
        for (i, s) in stats.iter().enumerate() {
            let unchanged = old.entries.get(&s.path).is_some_and(|seen| {
                *seen == Seen::of(s)
                    && s.mtime_ns < old.walk_started_ns
                    && s.ctime_ns < old.walk_started_ns
            }) && fs::symlink_metadata(tree.join(&s.path)).is_ok();
            if !unchanged {
                place(&tree, s)?;
                if s.mode & S_IFMT == S_IFREG {
                    wanted.push(i as u32);
                }
            }
        }
        let mut arrived = BTreeMap::new();
        if !wanted.is_empty() {
            fetch(wanted.clone())?;
            let bytes = receive(&tree, &stats, &wanted, chunks, &mut arrived)?;
            done.files_sent = arrived.len();
            done.bytes_sent = bytes;
        }
        // Directories last, deepest first: their times change as their children are written.
        for s in stats.iter().rev().filter(|s| s.mode & S_IFMT == S_IFDIR) {
            finish(&tree.join(&s.path), s)?;
        }
        let regular = stats.iter().filter(|s| s.mode & S_IFMT == S_IFREG);
        done.digests = regular
            .filter_map(|s| {
                let d = arrived
                    .remove(&s.path)
                    .or_else(|| old.digests.get(&s.path).cloned());
                d.map(|d| (s.path.clone(), d))
            })
            .collect();
        let index = Index {
            walk_started_ns,
            entries: stats
                .iter()
                .map(|s| (s.path.clone(), Seen::of(s)))
                .collect(),
            digests: done.digests.clone(),
        };
        let tmp = self.dir.join("index.json.tmp");
        fs::write(&tmp, serde_json::to_vec(&index).expect("json"))
            .map_err(io_err("write the index"))?;
        fs::rename(&tmp, &index_path).map_err(io_err("write the index"))?;
        Ok(done)
    }
}

/// Removes the context copies under `root` not synced within `keep` (all of them with None):
/// `strata prune`. Returns how many went.
pub fn prune(root: &Path, keep: Option<std::time::Duration>) -> io::Result<usize> {
    let Ok(rd) = fs::read_dir(root) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let synced = fs::metadata(e.path().join("index.json")).and_then(|m| m.modified());
        let fresh = match (keep, synced) {
            (Some(keep), Ok(t)) => t.elapsed().is_ok_and(|age| age < keep),
            _ => false,
        };
        if !fresh {
            strata_image::fsutil::remove_tree(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sorts the entries (parents first) and refuses paths that could leave the copy.
fn check(stats: &mut [Stat]) -> Result<(), SyncError> {
    stats.sort_by(|a, b| a.path.cmp(&b.path));
    let mut dirs: HashSet<&str> = HashSet::new();
    for (i, s) in stats.iter().enumerate() {
        let bad = |reason: &str| SyncError::Entry {
            path: s.path.clone(),
            reason: reason.into(),
        };
        if s.path.is_empty()
            || s.path.contains('\0')
            || s.path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("not a clean relative path"));
        }
        if i > 0 && stats[i - 1].path == s.path {
            return Err(bad("listed twice"));
        }
        if let Some((parent, _)) = s.path.rsplit_once('/') {
            if !dirs.contains(parent) {
                return Err(bad("its parent is not a directory of the context"));
            }
        }
        if s.mode & S_IFMT == S_IFDIR {
            dirs.insert(&s.path);
        }
    }
    Ok(())
}

/// Removes what the copy has and the client did not list; returns how many entries went.
fn remove_others(tree: &Path, stats: &[Stat]) -> Result<usize, SyncError> {
    let listed: HashSet<&str> = stats.iter().map(|s| s.path.as_str()).collect();
    let mut removed = 0;
    let mut stack = vec![(tree.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(io_err(format!("read {}", dir.display())))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if !listed.contains(child.as_str()) {
                strata_image::fsutil::remove_tree(&e.path())
                    .map_err(io_err(format!("remove {child}")))?;
                removed += 1;
            } else if is_dir {
                stack.push((e.path(), child));
            }
        }
    }
    Ok(removed)
}

/// Makes the entry's kind right at its path (a directory, a symlink, a device; a file's content
/// comes later), replacing whatever of another kind is there.
fn place(tree: &Path, s: &Stat) -> Result<(), SyncError> {
    let path = tree.join(&s.path);
    let parent = path.parent().expect("under the tree");
    let parent_ok = fs::symlink_metadata(parent).is_ok_and(|m| m.file_type().is_dir());
    if !parent_ok {
        return Err(SyncError::Entry {
            path: s.path.clone(),
            reason: "its parent in the copy is not a directory".into(),
        });
    }
    let kind = s.mode & S_IFMT;
    let existing = fs::symlink_metadata(&path).ok();
    let same_kind = existing
        .as_ref()
        .is_some_and(|m| m.mode() & S_IFMT == kind && kind == S_IFDIR);
    if existing.is_some() && !same_kind {
        strata_image::fsutil::remove_tree(&path).map_err(io_err(format!("replace {}", s.path)))?;
    }
    let what = format!("create {}", s.path);
    match kind {
        S_IFDIR if !same_kind => fs::create_dir(&path).map_err(io_err(what))?,
        S_IFDIR | S_IFREG => {}
        S_IFLNK => {
            symlink(&s.link, &path).map_err(io_err(what))?;
            finish(&path, s)?;
        }
        _ => {
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::from_bits_truncate(kind),
                nix::sys::stat::Mode::from_bits_truncate(s.mode & 0o7777),
                s.rdev,
            )
            .map_err(|e| SyncError::Io {
                what,
                source: e.into(),
            })?;
            finish(&path, s)?;
        }
    }
    Ok(())
}

/// Writes the files the client sends, each to a temporary name renamed into place when complete,
/// hashing each as it arrives (into `digests`, by path); returns the bytes received.
fn receive(
    tree: &Path,
    stats: &[Stat],
    wanted: &[u32],
    chunks: &mut dyn Iterator<Item = FileChunk>,
    digests: &mut BTreeMap<String, String>,
) -> Result<u64, SyncError> {
    let wanted: HashSet<u32> = wanted.iter().copied().collect();
    // Files may grow between the client's stat and its read, but not without bound.
    let budget = GROWTH + wanted.iter().map(|i| stats[*i as usize].size).sum::<u64>();
    let mut open: Option<(u32, Hashing<fs::File>, PathBuf)> = None;
    let mut done = HashSet::new();
    let mut bytes = 0u64;
    while done.len() < wanted.len() {
        let Some(c) = chunks.next() else { break };
        let s = stats
            .get(c.id as usize)
            .filter(|_| wanted.contains(&c.id) && !done.contains(&c.id))
            .ok_or_else(|| SyncError::Client(format!("it sent file {} unasked", c.id)))?;
        if !c.error.is_empty() {
            return Err(SyncError::Client(format!("{}: {}", s.path, c.error)));
        }
        if open.as_ref().map(|o| o.0) != Some(c.id) {
            let tmp = tree.join(format!("{}.strata-incoming", s.path));
            let f = fs::File::create(&tmp).map_err(io_err(format!("write {}", s.path)))?;
            open = Some((c.id, Hashing::new(f), tmp));
        }
        let (_, f, tmp) = open.as_mut().expect("opened above");
        f.write_all(&c.data)
            .map_err(io_err(format!("write {}", s.path)))?;
        bytes += c.data.len() as u64;
        if bytes > budget {
            return Err(SyncError::Client(format!(
                "it sent more than {budget} bytes for files of {} bytes",
                budget - GROWTH
            )));
        }
        if c.eof {
            let path = tree.join(&s.path);
            fs::rename(&*tmp, &path).map_err(io_err(format!("write {}", s.path)))?;
            finish(&path, s)?;
            done.insert(c.id);
            digests.insert(s.path.clone(), f.digest().hex().to_string());
            open = None;
        }
    }
    if done.len() != wanted.len() {
        return Err(SyncError::Client(format!(
            "{} of {} files arrived",
            done.len(),
            wanted.len()
        )));
    }
    Ok(bytes)
}

/// Owner, mode, xattrs and times as the client has them (symlinks: owner and times only).
fn finish(path: &Path, s: &Stat) -> Result<(), SyncError> {
    let what = || format!("set attributes of {}", s.path);
    lchown(path, Some(s.uid), Some(s.gid)).map_err(io_err(what()))?;
    let is_link = s.mode & S_IFMT == S_IFLNK;
    if !is_link {
        fs::set_permissions(path, fs::Permissions::from_mode(s.mode & 0o7777))
            .map_err(io_err(what()))?;
        for x in &s.xattrs {
            xattr::set(path, &x.name, &x.value).map_err(io_err(what()))?;
        }
    }
    let t = nix::sys::time::TimeSpec::new(
        s.mtime_ns.div_euclid(1_000_000_000),
        s.mtime_ns.rem_euclid(1_000_000_000),
    );
    nix::sys::stat::utimensat(
        None,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| SyncError::Io {
        what: what(),
        source: e.into(),
    })
}

/// Whether `m` is a kind of entry a context sends (sockets are not).
pub fn sendable(m: &fs::Metadata) -> bool {
    !m.file_type().is_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(path: &str, mode: u32) -> Stat {
        Stat {
            path: path.into(),
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn paths_that_leave_the_copy_are_refused() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", ""] {
            let mut s = vec![stat(bad, S_IFREG | 0o644)];
            assert!(check(&mut s).is_err(), "{bad:?} accepted");
        }
        // A child of a symlink: writing it would follow the link.
        let mut s = vec![
            stat("l", S_IFLNK | 0o777),
            stat("l/passwd", S_IFREG | 0o644),
        ];
        assert!(check(&mut s).is_err());
        let mut s = vec![stat("d/f", S_IFREG | 0o644), stat("d", S_IFDIR | 0o755)];
        check(&mut s).unwrap();
        let mut twice = vec![stat("a", S_IFREG), stat("a", S_IFREG)];
        assert!(check(&mut twice).is_err());
    }

    #[test]
    fn a_changed_ctime_or_a_racy_mtime_is_sent_again() {
        let root = tempfile::tempdir().unwrap();
        let copy = Copy::new(root.path(), "client", "/ctx");
        let mut f = stat("f", S_IFREG | 0o644);
        f.size = 3;
        f.mtime_ns = 1_000;
        f.ctime_ns = 1_000;
        let sync = |s: &Stat, started| {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut fetch = |ids: Vec<u32>| {
                for id in ids {
                    let data = b"abc".to_vec();
                    let eof = true;
                    tx.send(FileChunk {
                        id,
                        data,
                        eof,
                        ..Default::default()
                    })
                    .unwrap();
                }
                Ok(())
            };
            copy.sync(vec![s.clone()], started, &mut fetch, &mut rx.try_iter())
                .unwrap()
        };
        assert_eq!(sync(&f, 500).files_sent, 1);
        // Modified at or after the previous walk began: racy, sent again.
        assert_eq!(sync(&f, 5_000).files_sent, 1);
        let kept = sync(&f, 6_000);
        assert_eq!(kept.files_sent, 0);
        // Its content digest, hashed when it arrived, is kept for the cache keys.
        let abc = strata_image::content::Digest::of(b"abc");
        assert_eq!(kept.digests["f"], abc.hex());
        f.ctime_ns = 2_000;
        assert_eq!(sync(&f, 7_000).files_sent, 1);
        assert_eq!(fs::read(copy.tree().join("f")).unwrap(), b"abc");
        assert_eq!(sync(&stat("g", S_IFDIR | 0o755), 8_000).removed, 1);
        // A client that sends far more than it listed, or a file twice, is refused.
        let mut huge = stat("h", S_IFREG | 0o644);
        huge.size = 1;
        let flood = std::iter::repeat_with(|| FileChunk {
            id: 0,
            data: vec![0; 1 << 20],
            ..Default::default()
        });
        let mut fetch = |_: Vec<u32>| Ok(());
        let e = copy.sync(vec![huge], 9_000, &mut fetch, &mut flood.take(100));
        assert!(matches!(e, Err(SyncError::Client(_))), "{e:?}");
        assert!(!copy.tree().join("f").exists());
    }
}
