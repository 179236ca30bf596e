//! Source trees for copies: selecting what a `COPY src` names (wildcards, `.dockerignore`), its
//! content checksum (the cache key of a context copy), and copying it into a container root.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use strata_image::content::Digest;
use strata_image::fsutil;

use super::rootfs;
use crate::pattern::{self, Ignore};

/// Where copies read from: a build context (ignore rules apply, ownership reset to root) or a
/// mounted stage or image.
pub struct Source<'a> {
    pub root: &'a Path,
    pub ignore: Option<&'a Ignore>,
}

impl Source<'_> {
    fn ignored(&self, rel: &str) -> bool {
        self.ignore
            .is_some_and(|i| !rel.is_empty() && i.excludes(rel))
    }

    /// The relative paths `pattern` names (wildcards expanded, ignored paths left out), sorted.
    pub fn select(&self, pattern: &str) -> io::Result<Vec<String>> {
        let clean = pattern::clean(pattern);
        if clean.is_empty() {
            return Ok(vec![String::new()]);
        }
        let mut current = vec![String::new()];
        for seg in clean.split('/') {
            let mut next = Vec::new();
            for base in &current {
                let dir = rootfs::resolve(self.root, base, true)?;
                if pattern::has_wildcard(seg) {
                    let Ok(rd) = fs::read_dir(&dir) else { continue };
                    let mut names: Vec<String> = rd
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    for n in names {
                        if pattern::matches(seg, &n) {
                            next.push(join(base, &n));
                        }
                    }
                } else if fs::symlink_metadata(dir.join(seg)).is_ok() {
                    next.push(join(base, seg));
                }
            }
            current = next;
        }
        current.retain(|p| !self.ignored(p));
        Ok(current)
    }

    /// Checksum of everything `patterns` select: paths, types, modes and contents (not times or
    /// owners), so an unrelated change keeps it and a renamed or edited file changes it. `known`:
    /// files' content digests (hex) by relative path, hashed when they arrived; others are read.
    pub fn checksum(
        &self,
        patterns: &[String],
        known: &BTreeMap<String, String>,
    ) -> io::Result<String> {
        let mut h = Sha256::new();
        for p in patterns {
            h.update(format!("pattern {p}\n"));
            for rel in self.select(p)? {
                let path = rootfs::resolve(self.root, &rel, true)?;
                self.hash_tree(&path, &rel, known, &mut h)?;
            }
        }
        Ok(Digest::from_hasher(h).to_string())
    }

    fn hash_tree(
        &self,
        path: &Path,
        rel: &str,
        known: &BTreeMap<String, String>,
        h: &mut Sha256,
    ) -> io::Result<()> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            // A dangling name: the copy reports it; the checksum just records it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                h.update(format!("{rel}\0missing\n"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        h.update(format!("{rel}\0{:o}\0", meta.mode() & 0o7777));
        if ft.is_dir() {
            h.update(b"d\n");
            let mut names: Vec<String> = fs::read_dir(path)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                let child = join(rel, &n);
                if !self.ignored(&child) {
                    self.hash_tree(&path.join(&n), &child, known, h)?;
                }
            }
        } else if ft.is_symlink() {
            h.update(format!("l{}\n", fs::read_link(path)?.display()));
        } else if let (true, Some(d)) = (ft.is_file(), known.get(rel)) {
            h.update(format!("f{d}\n"));
        } else if ft.is_file() {
            let mut f = fs::File::open(path)?;
            let mut fh = Sha256::new();
            io::copy(&mut f, &mut fh)?;
            h.update(format!("f{}\n", hex::encode(fh.finalize())));
        } else {
            h.update(format!("s{}\n", meta.rdev()));
        }
        Ok(())
    }
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

/// How copied entries are owned and moded.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    /// `None`: keep the source's owner.
    pub owner: Option<(u32, u32)>,
    /// `None`: keep the source's mode.
    pub mode: Option<u32>,
}

/// Copies `src` (already resolved) to `dst`: directories recursively (entries ignored by
/// `source` left out), symlinks as links, devices as devices; sockets are skipped.
pub fn copy(source: &Source, src: &Path, rel: &str, dst: &Path, attrs: Attrs) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_socket() {
        return Ok(());
    }
    if ft.is_dir() {
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(dst)?;
                fs::create_dir(dst)?;
            }
            Err(_) => fs::create_dir(dst)?,
        }
        let mut names: Vec<_> = fs::read_dir(src)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            let child_rel = join(rel, &n.to_string_lossy());
            if !source.ignored(&child_rel) {
                copy(source, &src.join(&n), &child_rel, &dst.join(&n), attrs)?;
            }
        }
    } else {
        if let Ok(m) = fs::symlink_metadata(dst) {
            if m.is_dir() {
                return Err(io::Error::other(format!(
                    "cannot replace directory {} with a non-directory",
                    dst.display()
                )));
            }
            fs::remove_file(dst)?;
        }
        if ft.is_symlink() {
            symlink(fs::read_link(src)?, dst)?;
        } else if ft.is_file() {
            fs::copy(src, dst)?;
        } else {
            fsutil::mknod_like(dst, &meta)?;
        }
    }
    finish(dst, &meta, attrs)
}

/// Owner, mode and times of a copied entry (after its contents, so a directory keeps its mtime).
pub fn finish(dst: &Path, meta: &fs::Metadata, attrs: Attrs) -> io::Result<()> {
    let (uid, gid) = attrs.owner.unwrap_or((meta.uid(), meta.gid()));
    let mode = attrs.mode.unwrap_or(meta.mode());
    let a = fsutil::Attrs {
        uid,
        gid,
        mode,
        mtime: (meta.mtime(), meta.mtime_nsec()),
        atime: None,
        xattrs: Vec::new(),
    };
    fsutil::restore(dst, &a, meta.file_type().is_symlink())
}

/// Creates `path` and missing parents (mode 0755, owned by `owner`), returning it.
pub fn mkdir_all(path: &Path, owner: (u32, u32)) -> io::Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Some(parent) = path.parent() {
        mkdir_all(parent, owner)?;
    }
    fs::create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    lchown(path, Some(owner.0), Some(owner.1))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in [
            ("foo1", "1"),
            ("foo2", "2"),
            ("bar", "b"),
            ("dir/a", "a"),
            ("dir/sub/b", "b"),
            ("ignored.log", "x"),
        ] {
            let path = d.path().join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, c).unwrap();
        }
        d
    }

    #[test]
    fn select_and_checksum_follow_the_copy_selection() {
        let d = context();
        let ignore = Ignore::parse("*.log\n");
        let src = Source {
            root: d.path(),
            ignore: Some(&ignore),
        };
        assert_eq!(src.select("foo*").unwrap(), ["foo1", "foo2"]);
        assert_eq!(src.select("/dir").unwrap(), ["dir"]);
        assert_eq!(src.select("*.log").unwrap(), Vec::<String>::new());
        assert_eq!(src.select("nope").unwrap(), Vec::<String>::new());
        let pat = vec!["foo*".to_string()];
        let none = BTreeMap::new();
        let before = src.checksum(&pat, &none).unwrap();
        // Digests known from arrival stand in for reading the files, with the same result.
        let known: BTreeMap<String, String> = ["foo1", "foo2"]
            .iter()
            .map(|f| {
                let bytes = fs::read(d.path().join(f)).unwrap();
                (f.to_string(), Digest::of(&bytes).hex().to_string())
            })
            .collect();
        assert_eq!(src.checksum(&pat, &known).unwrap(), before);
        fs::write(d.path().join("bar"), "changed").unwrap();
        assert_eq!(
            src.checksum(&pat, &none).unwrap(),
            before,
            "an unrelated file keeps the checksum"
        );
        fs::write(d.path().join("foo2"), "changed").unwrap();
        let edited = src.checksum(&pat, &none).unwrap();
        assert_ne!(edited, before);
        fs::rename(d.path().join("foo2"), d.path().join("foo3")).unwrap();
        assert_ne!(
            src.checksum(&pat, &none).unwrap(),
            edited,
            "a renamed match changes it"
        );
    }

    #[test]
    fn copy_keeps_links_and_skips_ignored() {
        let d = context();
        symlink("a", d.path().join("dir/link")).unwrap();
        fs::write(d.path().join("dir/skip.log"), "x").unwrap();
        let ignore = Ignore::parse("**/*.log\n");
        let src = Source {
            root: d.path(),
            ignore: Some(&ignore),
        };
        let out = tempfile::tempdir().unwrap();
        copy(
            &src,
            &d.path().join("dir"),
            "dir",
            &out.path().join("dir"),
            Attrs {
                owner: Some((0, 0)),
                mode: None,
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_link(out.path().join("dir/link")).unwrap(),
            Path::new("a")
        );
        assert_eq!(
            fs::read_to_string(out.path().join("dir/sub/b")).unwrap(),
            "b"
        );
        assert!(!out.path().join("dir/skip.log").exists());
    }
}
