//! Mounts: turning a snapshot chain into containerd mount specs, and performing them.
//!
//! The specs follow containerd's overlayfs snapshotter so that containerd, its shims and `ctr`
//! mount them unchanged: a snapshot without parents is a `bind` of its own directory; a view of
//! one committed parent is a read-only `bind` of that parent; anything else is an `overlay` with
//! `lowerdir` nearest parent first, plus `upperdir`/`workdir` when active.

use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_snapshots::api::types::Mount;
use nix::mount::{mount as sys_mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::store::Kind;

/// The mount option page: the kernel copies at most this many bytes of mount data.
const PAGE_SIZE: usize = 4096;

/// Whether the running kernel's overlay module has the `index` feature, which must then be off so
/// that the same lower can be combined into different stacks.
pub fn overlay_supports_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

/// The mounts of snapshot `id` of `kind` whose parents (nearest first) are `parents`.
pub fn for_snapshot(
    layout: &Layout,
    kind: Kind,
    id: u64,
    parents: &[u64],
    index_off: bool,
) -> Vec<Mount> {
    let bind = |source: PathBuf, ro: bool| {
        vec![Mount {
            r#type: "bind".into(),
            source: source.to_string_lossy().into_owned(),
            target: String::new(),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        }]
    };
    if parents.is_empty() {
        return bind(layout.fs_dir(id), kind == Kind::View);
    }
    if kind == Kind::View && parents.len() == 1 {
        return bind(layout.fs_dir(parents[0]), true);
    }
    let mut options = Vec::new();
    if index_off {
        options.push("index=off".to_string());
    }
    if kind == Kind::Active {
        options.push(format!("workdir={}", layout.work_dir(id).display()));
        options.push(format!("upperdir={}", layout.fs_dir(id).display()));
    }
    let lowers: Vec<String> = parents
        .iter()
        .map(|p| layout.link(*p).to_string_lossy().into_owned())
        .collect();
    options.push(format!("lowerdir={}", lowers.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

/// Mounts `mounts` on `target`, in order, the way containerd does (including its compaction of a
/// long `lowerdir` by its common directory when the options exceed a page).
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for m in mounts {
        mount_one(m, target)?;
    }
    Ok(())
}

fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let what = || format!("mount {} {} on {}", m.r#type, m.source, target.display());
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in &m.options {
        match opt.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other.to_string()),
        }
    }
    if m.r#type == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    let data = data.join(",");
    if data.len() >= PAGE_SIZE {
        return mount_compacted(m, &data, flags, target);
    }
    // A bind mount ignores MS_RDONLY on creation: read-only takes a remount afterwards.
    let is_bind = flags.contains(MsFlags::MS_BIND);
    let readonly_bind = is_bind && flags.contains(MsFlags::MS_RDONLY);
    let first_flags = if is_bind {
        flags - MsFlags::MS_RDONLY
    } else {
        flags
    };
    let fstype = (!is_bind).then_some(m.r#type.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    sys_mount(Some(m.source.as_str()), target, fstype, first_flags, data)
        .map_err(|e| Error::io(what())(e.into()))?;
    if readonly_bind {
        let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        sys_mount(None::<&str>, target, None::<&str>, remount, None::<&str>)
            .map_err(|e| Error::io(format!("remount {} read-only", target.display()))(e.into()))?;
    }
    Ok(())
}

/// containerd's answer to the page limit: strip the lowerdirs' common directory and mount from a
/// child process whose working directory is that directory (a chdir is process-wide, so never here).
fn mount_compacted(m: &Mount, data: &str, flags: MsFlags, target: &Path) -> Result<()> {
    let too_long = || {
        Error::InvalidArgument(format!(
            "mount options of {} bytes exceed the {PAGE_SIZE}-byte page even after compaction: too many layers",
            data.len()
        ))
    };
    let mut opts: Vec<String> = data.split(',').map(str::to_string).collect();
    let idx = opts
        .iter()
        .position(|o| o.starts_with("lowerdir="))
        .ok_or_else(too_long)?;
    let dirs: Vec<&str> = opts[idx]["lowerdir=".len()..].split(':').collect();
    let common = common_dir(&dirs).ok_or_else(too_long)?;
    let rel: Vec<&str> = dirs.iter().map(|d| &d[common.len() + 1..]).collect();
    opts[idx] = format!("lowerdir={}", rel.join(":"));
    let data = opts.join(",");
    if data.len() >= PAGE_SIZE {
        return Err(too_long());
    }
    let mut cmd = Command::new("mount");
    cmd.current_dir(&common).arg("-t").arg(&m.r#type);
    if flags.contains(MsFlags::MS_RDONLY) {
        cmd.arg("-r");
    }
    let out = cmd
        .arg("-o")
        .arg(&data)
        .arg(&m.source)
        .arg(target)
        .output()
        .map_err(Error::io("run mount(8)"))?;
    if !out.status.success() {
        return Err(Error::Io {
            context: format!("mount overlay on {}", target.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// The longest directory that contains every path in `dirs`.
fn common_dir(dirs: &[&str]) -> Option<String> {
    let first = dirs.first()?;
    let mut len = first.len();
    for d in &dirs[1..] {
        len = len.min(
            first
                .bytes()
                .zip(d.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let dir = &first[..first[..len].rfind('/')?];
    (!dir.is_empty()).then(|| dir.to_string())
}

/// Unmounts `target` (lazily detaching if busy, as containerd's `UnmountAll` does at the end).
pub fn unmount(target: &Path) -> Result<()> {
    umount2(target, MntFlags::empty())
        .or_else(|_| umount2(target, MntFlags::MNT_DETACH))
        .map_err(|e| Error::io(format!("unmount {}", target.display()))(e.into()))
}

/// Detaches every mount at or below `dir`, deepest first: what a killed process left mounted.
/// Returns how many there were.
pub fn unmount_all_under(dir: &Path) -> Result<usize> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read /proc/self/mountinfo"))?;
    let mut points: Vec<std::path::PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| std::path::PathBuf::from(unescape_octal(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in &points {
        // Already gone (a parent's detach took it) is fine.
        let _ = umount2(p, MntFlags::MNT_DETACH);
    }
    Ok(points.len())
}

/// A mountinfo path: spaces, tabs, newlines and backslashes come as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_octal("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_octal("/plain\\"), "/plain\\");
    }

    #[test]
    fn common_dir_is_a_whole_directory() {
        assert_eq!(common_dir(&["/r/l/ab", "/r/l/ac"]).as_deref(), Some("/r/l"));
        assert_eq!(common_dir(&["/r/l/a", "/r/l/b"]).as_deref(), Some("/r/l"));
        assert_eq!(common_dir(&["/a/x", "/b/y"]), None);
    }

    #[test]
    fn specs_follow_containerd() {
        let layout = Layout::create(tempfile::tempdir().unwrap().path()).unwrap();
        let m = for_snapshot(&layout, Kind::Active, 3, &[], true);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].options[0].as_str()),
            ("bind", "rw")
        );
        let m = for_snapshot(&layout, Kind::View, 3, &[2], true);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].options[0], "ro");
        assert!(m[0].source.ends_with("snapshots/2/fs"));
        let m = for_snapshot(&layout, Kind::Active, 3, &[2, 1], true);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].options[0], "index=off");
        let lower = format!(
            "lowerdir={}:{}",
            layout.link(2).display(),
            layout.link(1).display()
        );
        assert_eq!(m[0].options.last().unwrap(), &lower);
        let m = for_snapshot(&layout, Kind::View, 3, &[2, 1], false);
        assert_eq!(m[0].options.len(), 1);
        assert!(m[0].options[0].starts_with("lowerdir="));
    }
}
