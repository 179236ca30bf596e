//! `migrate-tool verify`: rebuilds every migrated layer's original tar from its overlay2 diff with
//! its tar-split data and checks it against the diffID; checks each entry's type, mode, owner,
//! times, link target and whiteouts separately (a diffID match does not cover them); and compares
//! every container's files with the source driver's.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::dataroot::{DataRoot, Driver};
use crate::migrate::TMP;
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
    let split = root
        .store()
        .join("layerdb/sha256")
        .join(chain.trim_start_matches("sha256:"))
        .join("tar-split.json.gz");
    let entries = match tarsplit::read(&split) {
        Ok(e) => e,
        Err(e) => return report.problems.push(format!("layer {chain}: {e}")),
    };
    let Ok((reader, mut writer)) = std::io::pipe() else {
        return report.problems.push("pipe".into());
    };
    let d = diff.to_path_buf();
    let assemble = std::thread::spawn(move || -> Result<String, String> {
        let mut h = Sha256::new();
        let mut tee = Tee {
            a: &mut writer,
            h: &mut h,
        };
        tarsplit::assemble(&entries, &d, &mut tee).map_err(|e| e.to_string())?;
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    });
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
            let h = e.header().clone();
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
            let Ok(m) = fs::symlink_metadata(diff.join(&name)) else {
                report
                    .problems
                    .push(format!("layer {chain}: {name} is missing"));
                continue;
            };
            let want_mode = h.mode().unwrap_or(0) & 0o7777;
            let kind_ok = match h.entry_type() {
                tar::EntryType::Directory => m.is_dir(),
                tar::EntryType::Symlink => {
                    m.file_type().is_symlink()
                        && e.link_name().ok().flatten().map(|l| l.into_owned())
                            == fs::read_link(diff.join(&name)).ok()
                }
                tar::EntryType::Link | tar::EntryType::Regular | tar::EntryType::Continuous => {
                    m.is_file()
                }
                tar::EntryType::Char => m.file_type().is_char_device(),
                tar::EntryType::Block => m.file_type().is_block_device(),
                tar::EntryType::Fifo => m.file_type().is_fifo(),
                _ => true,
            };
            if !kind_ok {
                report
                    .problems
                    .push(format!("layer {chain}: {name} has the wrong type"));
                continue;
            }
            if h.entry_type() == tar::EntryType::Link {
                continue; // shares its target's metadata
            }
            let symlink = m.file_type().is_symlink();
            let mismatch = (!symlink && m.mode() & 0o7777 != want_mode)
                || u64::from(m.uid()) != h.uid().unwrap_or(0)
                || u64::from(m.gid()) != h.gid().unwrap_or(0)
                || (!m.is_dir() && m.mtime() as u64 != h.mtime().unwrap_or(0));
            if mismatch {
                report.problems.push(format!(
                    "layer {chain}: {name}: mode/owner/time {:o} {}:{} {} on disk, {:o} {}:{} {} in the layer",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.mtime(),
                    want_mode,
                    h.uid().unwrap_or(0),
                    h.gid().unwrap_or(0),
                    h.mtime().unwrap_or(0)
                ));
            }
        }
    }
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).ok();
    match assemble.join() {
        Ok(Ok(digest)) if digest == diff_id => {}
        Ok(Ok(digest)) => report.problems.push(format!(
            "layer {chain}: rebuilds to {digest}, not its diffID {diff_id}"
        )),
        Ok(Err(e)) => report.problems.push(format!("layer {chain}: {e}")),
        Err(_) => report
            .problems
            .push(format!("layer {chain}: rebuild thread panicked")),
    }
}

struct Tee<'a, W: std::io::Write> {
    a: &'a mut W,
    h: &'a mut Sha256,
}

impl<W: std::io::Write> std::io::Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.a.write(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.a.flush()
    }
}

/// Type, mode, owner, size, mtime and link target of every entry under `root`.
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
        let mtime = if m.is_dir() { 0 } else { m.mtime() };
        out.insert(
            rel,
            format!(
                "{:o} {}:{} {} {} {} {}",
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.len() },
                mtime,
                m.rdev(),
                link
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
