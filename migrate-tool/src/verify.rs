//! `migrate-tool verify`: rebuilds every migrated layer's original tar from its overlay2 diff with
//! its tar-split data and checks it against the diffID; checks each entry's type, mode, owner,
//! times, link target and whiteouts separately (a diffID match does not cover them); and compares
//! every container's files with the source driver's.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::dataroot::{DataRoot, Driver};
use crate::journal::TMP;
use crate::tarsplit;

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub layers: usize,
    pub entries: usize,
    pub containers: usize,
    pub problems: Vec<String>,
}

/// Marks a passing verify, which `cleanup` requires.
pub const VERIFIED: &str = "journal/verified.ok";

fn check_layer(
    root: &DataRoot,
    chain: &str,
    diff_id: &str,
    diff: &Path,
    report: &mut VerifyReport,
) {
    let split = root.tar_split(chain);
    let entries = match tarsplit::read(&split) {
        Ok(e) => e,
        Err(e) => return report.problems.push(format!("layer {chain}: {e}")),
    };
    let Ok((reader, rebuild)) = tarsplit::rebuild(entries, diff) else {
        return report.problems.push("pipe".into());
    };
    let mut archive = tar::Archive::new(reader);
    if let Ok(iter) = archive.entries() {
        for e in iter {
            let Ok(e) = e else { break };
            report.entries += 1;
            let Ok(path) = e.path().map(|p| p.into_owned()) else {
                continue;
            };
            let name = path
                .to_string_lossy()
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if file == ".wh..wh..opq" {
                let dir = diff.join(path.parent().unwrap_or(Path::new("")));
                if xattr::get(&dir, "trusted.overlay.opaque")
                    .ok()
                    .flatten()
                    .as_deref()
                    != Some(b"y")
                {
                    report.problems.push(format!(
                        "layer {chain}: {} is not an opaque directory",
                        dir.display()
                    ));
                }
                continue;
            }
            if let Some(hidden) = file.strip_prefix(".wh.") {
                let target = diff
                    .join(path.parent().unwrap_or(Path::new("")))
                    .join(hidden);
                let ok = fs::symlink_metadata(&target)
                    .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0);
                if !ok {
                    report.problems.push(format!(
                        "layer {chain}: whiteout {name} is not a 0/0 device at {}",
                        target.display()
                    ));
                }
                continue;
            }
            if name.is_empty() {
                continue;
            }
            let on_disk = diff.join(&name);
            let Ok(m) = fs::symlink_metadata(&on_disk) else {
                report
                    .problems
                    .push(format!("layer {chain}: {name} is missing"));
                continue;
            };
            for field in differences(e, &on_disk, &m, diff) {
                report
                    .problems
                    .push(format!("layer {chain}: {name}: {field}"));
            }
        }
    }
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).ok();
    match rebuild.digest() {
        Ok(digest) if digest.as_str() == diff_id => {}
        Ok(digest) => report.problems.push(format!(
            "layer {chain}: rebuilds to {digest}, not its diffID {diff_id}"
        )),
        Err(e) => report.problems.push(format!("layer {chain}: {e}")),
    }
}

/// How the entry at `path` (metadata `m`) under the layer directory `diff` differs from its tar
/// header: one line per field (type, link target, size, device, mode, owner, mtime to the
/// nanosecond, each xattr), each naming the field and both values.
fn differences<R: std::io::Read>(
    mut e: tar::Entry<'_, R>,
    path: &Path,
    m: &fs::Metadata,
    diff: &Path,
) -> Vec<String> {
    let kind = e.header().entry_type();
    let ft = m.file_type();
    let kind_ok = match kind {
        tar::EntryType::Directory => m.is_dir(),
        tar::EntryType::Symlink => ft.is_symlink(),
        tar::EntryType::Link | tar::EntryType::Regular | tar::EntryType::Continuous => m.is_file(),
        tar::EntryType::Char => ft.is_char_device(),
        tar::EntryType::Block => ft.is_block_device(),
        tar::EntryType::Fifo => ft.is_fifo(),
        _ => true,
    };
    if !kind_ok {
        return vec![format!("type: {ft:?} on disk, {kind:?} in the layer")];
    }
    let link = e.link_name().ok().flatten().map(|l| l.into_owned());
    if kind == tar::EntryType::Link {
        let target = link.map(|l| diff.join(l.to_string_lossy().trim_start_matches("./")));
        let same = target
            .and_then(|t| fs::symlink_metadata(t).ok())
            .is_some_and(|t| (t.dev(), t.ino()) == (m.dev(), m.ino()));
        return if same {
            Vec::new()
        } else {
            vec!["hard link: not the same file as its target".into()]
        };
    }
    let mut out = Vec::new();
    if kind == tar::EntryType::Symlink && link != fs::read_link(path).ok() {
        out.push(format!(
            "symlink target: {:?} on disk, {link:?} in the layer",
            fs::read_link(path).ok()
        ));
    }
    let size = e.header().size().unwrap_or(0);
    if m.is_file() && m.len() != size {
        out.push(format!("size: {} on disk, {size} in the layer", m.len()));
    }
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        let h = e.header();
        let want = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        let got = (
            nix::sys::stat::major(m.rdev()) as u32,
            nix::sys::stat::minor(m.rdev()) as u32,
        );
        if got != want {
            out.push(format!("device: {got:?} on disk, {want:?} in the layer"));
        }
    }
    let want = match strata_image::layer::entry_attrs(&mut e) {
        Ok(a) => a,
        Err(err) => return vec![format!("unreadable header: {err}")],
    };
    if !ft.is_symlink() && m.mode() & 0o7777 != want.mode & 0o7777 {
        out.push(format!(
            "mode: {:o} on disk, {:o} in the layer",
            m.mode() & 0o7777,
            want.mode & 0o7777
        ));
    }
    if (m.uid(), m.gid()) != (want.uid, want.gid) {
        out.push(format!(
            "owner: {}:{} on disk, {}:{} in the layer",
            m.uid(),
            m.gid(),
            want.uid,
            want.gid
        ));
    }
    let mtime = (m.mtime(), m.mtime_nsec());
    if mtime != want.mtime {
        out.push(format!(
            "mtime: {}.{:09} on disk, {}.{:09} in the layer",
            mtime.0, mtime.1, want.mtime.0, want.mtime.1
        ));
    }
    let disk: Vec<_> = strata_image::fsutil::xattrs(path)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !k.to_string_lossy().starts_with("trusted.overlay."))
        .collect();
    if disk != want.xattrs {
        let names = |v: &[(std::ffi::OsString, Vec<u8>)]| {
            v.iter()
                .map(|(k, _)| k.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        out.push(format!(
            "xattrs: [{}] on disk, [{}] in the layer (names; values compared too)",
            names(&disk),
            names(&want.xattrs)
        ));
    }
    out
}

/// Type, mode, owner, size, mtime (ns), device, link target and xattrs of every entry under `root`.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
        let link = fs::read_link(&p)
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        let xattrs = strata_image::fsutil::xattrs(&p).unwrap_or_default();
        out.insert(
            rel,
            format!(
                "{:o} {}:{} {} {}.{:09} {} {} {:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.len() },
                m.mtime(),
                m.mtime_nsec(),
                m.rdev(),
                link,
                xattrs
            ),
        );
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

pub fn verify(data_root: &Path) -> Result<VerifyReport, crate::dataroot::DataRootError> {
    let root = DataRoot::open_driver(data_root, Driver::Overlay2)?;
    // An earlier pass no longer counts: only this run's result may let cleanup go ahead.
    let _ = fs::remove_file(data_root.join(TMP).join(VERIFIED));
    let mut report = VerifyReport::default();
    for l in &root.layers {
        let diff = data_root.join("overlay2").join(&l.cache_id).join("diff");
        if !diff.is_dir() {
            report.problems.push(format!(
                "layer {}: {} is missing",
                l.chain_id,
                diff.display()
            ));
            continue;
        }
        check_layer(&root, &l.chain_id, &l.diff_id, &diff, &mut report);
        report.layers += 1;
    }
    // Container layers are compared with the source when it is overlay (same format); aufs
    // branches differ in whiteout form and are checked through dockerd instead.
    let v1 = data_root.join("overlay");
    for c in &root.containers {
        for id in [c.init_id.clone(), c.mount_id.clone()]
            .into_iter()
            .flatten()
        {
            let new = data_root.join("overlay2").join(&id).join("diff");
            if !new.is_dir() {
                report.problems.push(format!(
                    "container {}: layer {id} is missing from overlay2",
                    c.name
                ));
                continue;
            }
            let old = v1.join(&id).join("upper");
            if old.is_dir() && listing(&old) != listing(&new) {
                report.problems.push(format!(
                    "container {}: layer {id} differs from the source's upper directory",
                    c.name
                ));
            }
        }
        report.containers += 1;
    }
    if report.problems.is_empty() {
        let marker = data_root.join(TMP).join(VERIFIED);
        if let Some(dir) = marker.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = fs::write(marker, "");
    }
    Ok(report)
}
