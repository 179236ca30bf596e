//! Disk usage of a directory tree, counted as containerd counts it: allocated blocks (so sparse files
//! cost what they use) and distinct inodes (so hard links count once).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::Usage;

/// Measures the tree at `root`, without following symlinks or crossing into other filesystems.
pub fn measure(root: &Path) -> Result<Usage> {
    let top = fs::symlink_metadata(root).map_err(Error::io(format!("stat {}", root.display())))?;
    let root_dev = top.dev();
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    let mut first = Some(top);
    while let Some(path) = stack.pop() {
        let meta = match first.take() {
            Some(m) => m,
            None => match fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Gone while we walked: a running container deleted it; it uses nothing now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("stat {}", path.display()))(e)),
            },
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += meta.blocks() as i64 * 512;
        if meta.is_dir() && meta.dev() == root_dev {
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("read {}", path.display()))(e)),
            };
            for entry in entries {
                let entry = entry.map_err(Error::io(format!("read {}", path.display())))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 8192]).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let u = measure(dir.path()).unwrap();
        assert_eq!(u.inodes, 3);
        assert!(u.size >= 8192, "{u:?}");
    }
}
