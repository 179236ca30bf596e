//! The client's side of a context transfer: the stats of what the builder asked for (the paths
//! its COPY and ADD sources select, with their parents; `.dockerignore` applied), then the
//! content of the files it found changed.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::pattern::Ignore;
use crate::service::context::sendable;
use crate::service::proto::{FileChunk, Stat, Xattr};
use crate::worker::{rootfs, tree::Source};

/// Bytes of a file in one message.
pub const CHUNK: usize = 256 << 10;

/// What the walk found: each entry's stat, and where it is on this machine.
#[derive(Default)]
pub struct Walked {
    pub stats: Vec<Stat>,
    pub paths: Vec<PathBuf>,
}

/// Walks `root`, leaving out what `ignore` excludes and, with `include`, what none of its
/// patterns select (their parents stay, as directories the selection lives in).
pub fn walk(root: &Path, ignore: &Ignore, include: Option<&[String]>) -> io::Result<Walked> {
    let roots = match include {
        Some(patterns) => Some(selected(root, ignore, patterns)?),
        None => None,
    };
    let mut out = Walked::default();
    visit(root, "", ignore, roots.as_ref(), &mut out)?;
    Ok(out)
}

/// The relative paths the patterns select, and where symlinks on the way lead.
fn selected(root: &Path, ignore: &Ignore, patterns: &[String]) -> io::Result<BTreeSet<String>> {
    let src = Source {
        root,
        ignore: Some(ignore),
    };
    let mut out = BTreeSet::new();
    for p in patterns {
        for rel in src.select(p)? {
            if let Ok(real) = rootfs::resolve(root, &rel, true) {
                if let Ok(r) = real.strip_prefix(root) {
                    out.insert(r.to_string_lossy().into_owned());
                }
            }
            out.insert(rel);
        }
    }
    Ok(out)
}

fn wanted(rel: &str, roots: Option<&BTreeSet<String>>) -> bool {
    let Some(roots) = roots else { return true };
    roots.iter().any(|r| {
        r.is_empty()
            || r == rel
            || rel
                .strip_prefix(r.as_str())
                .is_some_and(|t| t.starts_with('/'))
            || r.strip_prefix(rel).is_some_and(|t| t.starts_with('/'))
    })
}

fn visit(
    dir: &Path,
    rel: &str,
    ignore: &Ignore,
    roots: Option<&BTreeSet<String>>,
    out: &mut Walked,
) -> io::Result<()> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if ignore.excludes(&child) || !wanted(&child, roots) {
            continue;
        }
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        if !sendable(&meta) {
            continue;
        }
        out.stats.push(stat(&path, &child, &meta)?);
        out.paths.push(path.clone());
        if meta.is_dir() {
            visit(&path, &child, ignore, roots, out)?;
        }
    }
    Ok(())
}

fn stat(path: &Path, rel: &str, m: &fs::Metadata) -> io::Result<Stat> {
    let is_link = m.file_type().is_symlink();
    let link = if is_link {
        fs::read_link(path)?.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let mut xattrs = Vec::new();
    if !is_link {
        for name in xattr::list(path)? {
            if let Some(value) = xattr::get(path, &name)? {
                xattrs.push(Xattr {
                    name: name.to_string_lossy().into_owned(),
                    value,
                });
            }
        }
    }
    Ok(Stat {
        path: rel.to_string(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: if m.is_file() { m.len() } else { 0 },
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
        link,
        xattrs,
        rdev: m.rdev(),
    })
}

/// The content of file `id` at `path`, in chunks; a read error becomes the chunk's error.
pub fn chunks(id: u32, path: &Path, mut send: impl FnMut(FileChunk) -> bool) {
    let fail = |e: io::Error| FileChunk {
        id,
        error: format!("read {}: {e}", path.display()),
        ..Default::default()
    };
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            send(fail(e));
            return;
        }
    };
    let mut buf = vec![0; CHUNK];
    loop {
        let n = match read_full(&mut f, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                send(fail(e));
                return;
            }
        };
        let eof = n < CHUNK;
        let data = buf[..n].to_vec();
        if !send(FileChunk {
            id,
            data,
            eof,
            error: String::new(),
        }) || eof
        {
            return;
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_keeps_what_the_patterns_select_and_their_parents() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("src/app")).unwrap();
        fs::create_dir_all(r.join("big")).unwrap();
        fs::write(r.join("src/app/main.py"), "print(1)").unwrap();
        fs::write(r.join("src/notes.txt"), "x").unwrap();
        fs::write(r.join("big/blob"), "x").unwrap();
        fs::write(r.join("README"), "x").unwrap();
        std::os::unix::fs::symlink("src/app", r.join("app")).unwrap();
        let paths = |w: Walked| -> Vec<String> { w.stats.into_iter().map(|s| s.path).collect() };
        let ignore = Ignore::parse("big\n");
        let all = paths(walk(r, &ignore, None).unwrap());
        assert_eq!(
            all,
            [
                "README",
                "app",
                "src",
                "src/app",
                "src/app/main.py",
                "src/notes.txt"
            ]
        );
        let some = paths(walk(r, &ignore, Some(&["app".to_string()])).unwrap());
        assert_eq!(some, ["app", "src", "src/app", "src/app/main.py"]);
        let glob = paths(walk(r, &ignore, Some(&["src/*.txt".to_string()])).unwrap());
        assert_eq!(glob, ["src", "src/notes.txt"]);
    }
}
