//! Paths inside a container root: resolving them as the container would (symlinks relative to the
//! root, `..` never above it), and users/groups from the root's own `/etc/passwd` and `/etc/group`.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// Resolves `path` inside `root` like a chroot would; the last component is followed only when
/// `follow_last`. The result is always under `root`.
pub fn resolve(root: &Path, path: &str, follow_last: bool) -> std::io::Result<PathBuf> {
    let mut parts: Vec<String> = Vec::new();
    let mut pending: Vec<String> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let candidate = root.join(parts.iter().collect::<PathBuf>()).join(&part);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) => {
                hops += 1;
                if hops > 40 {
                    return Err(std::io::Error::other(format!(
                        "too many levels of symlinks resolving {path}"
                    )));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_string_lossy().into_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => parts.push(part),
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
}

/// `user[:group]` (names or numbers) as uid, gid, looked up in the root's files.
pub fn user(root: &Path, spec: &str) -> Result<(u32, u32), String> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = fs::read_to_string(resolve(root, "/etc/passwd", true).map_err(|e| e.to_string())?)
        .unwrap_or_default();
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        file.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name)
                .then(|| {
                    (
                        f[2].parse().ok(),
                        f.get(3).and_then(|g| g.parse().ok()).or(Some(0)),
                    )
                })
                .and_then(|(a, b)| Some((a?, b?)))
        })
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (
            uid,
            lookup(&passwd, u)
                .map(|(_, g)| g)
                .or_else(|| {
                    passwd.lines().find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 4 && f[2] == u)
                            .then(|| f[3].parse().ok())
                            .flatten()
                    })
                })
                .unwrap_or(0),
        ),
        Err(_) => lookup(&passwd, u).ok_or_else(|| {
            format!("unable to find user {u}: no matching entries in /etc/passwd of the image")
        })?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => {
            match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    let group = fs::read_to_string(
                        resolve(root, "/etc/group", true).map_err(|e| e.to_string())?,
                    )
                    .unwrap_or_default();
                    lookup(&group, g).map(|(gid, _)| gid).ok_or_else(|| format!("unable to find group {g}: no matching entries in /etc/group of the image"))?
                }
            }
        }
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        symlink("/../../../etc", r.join("escape")).unwrap();
        symlink("../../..", r.join("usr/up")).unwrap();
        assert_eq!(resolve(r, "/bin/sh", true).unwrap(), r.join("usr/bin/sh"));
        assert_eq!(
            resolve(r, "/escape/passwd", true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(resolve(r, "/usr/up/x", true).unwrap(), r.join("x"));
        assert_eq!(resolve(r, "/bin", false).unwrap(), r.join("bin"));
        assert_eq!(resolve(r, "/../../x", true).unwrap(), r.join("x"));
    }

    #[test]
    fn users_and_groups() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(user(root.path(), "").unwrap(), (0, 0));
        assert_eq!(user(root.path(), "app").unwrap(), (1001, 1002));
        assert_eq!(user(root.path(), "app:staff").unwrap(), (1001, 50));
        assert_eq!(user(root.path(), "1001").unwrap(), (1001, 1002));
        assert_eq!(user(root.path(), "5:6").unwrap(), (5, 6));
        assert!(user(root.path(), "nobody")
            .unwrap_err()
            .contains("unable to find user nobody"));
    }
}
