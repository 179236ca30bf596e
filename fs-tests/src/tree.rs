//! A filesystem tree as data, to compare a mounted snapshot with a reference directory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// One entry: its type and content, mode and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Every entry under `root` (excluding `root` itself), by relative path.
pub fn read(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link:{}", fs::read_link(&path).unwrap().display())
        } else if ft.is_file() {
            format!(
                "file:{}",
                hex::encode(Sha256::digest(fs::read(&path).unwrap()))
            )
        } else if ft.is_char_device() {
            format!("char:{}", meta.rdev())
        } else {
            "other".to_string()
        };
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            Node {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            },
        );
        if ft.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Panics with the first differences when the trees differ.
pub fn assert_same(actual: &Path, expected: &Path) {
    let a = read(actual);
    let e = read(expected);
    if a != e {
        let mut diffs = Vec::new();
        for (k, v) in &e {
            match a.get(k) {
                None => diffs.push(format!("missing {k}")),
                Some(x) if x != v => diffs.push(format!("differs {k}: {x:?} != {v:?}")),
                _ => {}
            }
        }
        for k in a.keys().filter(|k| !e.contains_key(*k)) {
            diffs.push(format!("extra {k}"));
        }
        diffs.truncate(20);
        panic!(
            "{} differs from {}:\n{}",
            actual.display(),
            expected.display(),
            diffs.join("\n")
        );
    }
}
