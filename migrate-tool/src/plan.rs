//! `migrate-tool plan`: what a data root holds, what a migration would do and need, and what stands
//! in its way. Read-only.

use std::path::Path;

use serde::Serialize;

use crate::dataroot::{DataRoot, Driver, Layer};
use strata_image::oci;

/// How much a problem stands in the way.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// `migrate` refuses until it is fixed.
    Blocker,
    /// `migrate` goes ahead, with the limit named.
    Warning,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Blocker => "BLOCKER",
            Severity::Warning => "WARNING",
        })
    }
}

/// Something that stops or limits a migration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    pub severity: Severity,
    pub what: String,
    pub fix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub data_root: String,
    pub driver: Driver,
    pub images: usize,
    pub tags: usize,
    pub layers: usize,
    pub layer_bytes: u64,
    pub containers: usize,
    pub running_containers: Vec<String>,
    /// Bytes the migration writes (hard links for aufs and overlay; copies for devicemapper).
    pub bytes_to_write: u64,
    pub problems: Vec<Problem>,
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else {
            total += m.len();
        }
    }
    total
}

/// The processes of a dockerd that uses `data_root`.
fn dockerd_pids(data_root: &Path) -> Vec<u32> {
    let canon = data_root
        .canonicalize()
        .unwrap_or_else(|_| data_root.to_path_buf());
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("dockerd")) {
            continue;
        }
        let root = args
            .iter()
            .position(|a| a == "--data-root" || a == "-g")
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| {
                args.iter()
                    .find_map(|a| a.strip_prefix("--data-root=").map(str::to_string))
            })
            .unwrap_or_else(|| "/var/lib/docker".into());
        if Path::new(&root)
            .canonicalize()
            .unwrap_or_else(|_| root.clone().into())
            == canon
        {
            out.push(pid);
        }
    }
    out
}

impl Problem {
    fn blocker(what: String, fix: &str) -> Problem {
        Problem {
            severity: Severity::Blocker,
            what,
            fix: fix.to_string(),
        }
    }

    fn warning(what: String, fix: &str) -> Problem {
        Problem {
            severity: Severity::Warning,
            what,
            fix: fix.to_string(),
        }
    }
}

/// What migrating `root` would do, and every problem in its way.
pub fn plan(root: &DataRoot) -> Plan {
    let mut problems = Vec::new();
    if root.driver == Driver::Overlay2 {
        problems.push(Problem::warning(
            format!("{} already uses overlay2", root.path.display()),
            "nothing to migrate",
        ));
    }
    problems.extend(daemons(root));
    problems.extend(root.layers.iter().flat_map(|l| layer_problems(root, l)));
    problems.extend(image_problems(root));
    problems.extend(running(root).into_iter().map(|name| {
        Problem::blocker(
            format!("container {name} is running"),
            "stop it (docker stop) before migrating",
        )
    }));
    let layer_bytes: u64 = root.layers.iter().map(|l| l.size).sum();
    // Metadata (the image and layer store is copied) plus, for devicemapper, every layer's files.
    let copied = if root.driver == Driver::Devicemapper {
        layer_bytes
    } else {
        0
    };
    let bytes_to_write = dir_bytes(&root.store()) + copied;
    problems.extend(space_problem(root, bytes_to_write));
    Plan {
        data_root: root.path.display().to_string(),
        driver: root.driver,
        images: root.images.len(),
        tags: root.images.iter().map(|i| i.tags.len()).sum(),
        layers: root.layers.len(),
        layer_bytes,
        containers: root.containers.len(),
        running_containers: running(root),
        bytes_to_write,
        problems,
    }
}

fn running(root: &DataRoot) -> Vec<String> {
    let running = root.containers.iter().filter(|c| c.running);
    running.map(|c| c.name.clone()).collect()
}

/// A dockerd using the data root.
fn daemons(root: &DataRoot) -> Vec<Problem> {
    let pids = dockerd_pids(&root.path).into_iter();
    pids.map(|pid| {
        Problem::blocker(
            format!("dockerd (pid {pid}) is using this data root"),
            "stop it (systemctl stop docker) before migrating",
        )
    })
    .collect()
}

/// Whether layer `l`'s files are where its driver keeps them.
fn layer_present(root: &DataRoot, l: &Layer) -> bool {
    let dir = root.path.join(root.driver.dir_name());
    match root.driver {
        Driver::Overlay => dir.join(&l.cache_id).join("root").is_dir(),
        Driver::Aufs => dir.join("diff").join(&l.cache_id).is_dir(),
        Driver::Devicemapper => dir.join("metadata").join(&l.cache_id).is_file(),
        Driver::Overlay2 => dir.join(&l.cache_id).join("diff").is_dir(),
    }
}

fn layer_problems(root: &DataRoot, l: &Layer) -> Vec<Problem> {
    let mut out = Vec::new();
    if !layer_present(root, l) {
        out.push(Problem::blocker(
            format!(
                "layer {} ({}): its {} directory {} is missing",
                l.chain_id,
                l.diff_id,
                root.driver.dir_name(),
                l.cache_id
            ),
            "restore it from a backup, or remove the images that use it (docker rmi) first",
        ));
    }
    if let Some(p) = l.parent.as_ref().filter(|p| root.layer(p).is_none()) {
        out.push(Problem::blocker(
            format!(
                "layer {} names parent {p}, which is not in the layer store",
                l.chain_id
            ),
            "the layer store is damaged: restore it from a backup",
        ));
    }
    if !l.has_tar_split {
        out.push(Problem::warning(format!("layer {} has no tar-split data: its migrated files can be checked, but not its exact original tar", l.chain_id), "none needed; verify reports it"));
    }
    if root.driver == Driver::Devicemapper && device_deleted(root, l) {
        out.push(Problem::blocker(
            format!(
                "devicemapper device of layer {} is marked deleted",
                l.chain_id
            ),
            "remove the images that use it (docker rmi) first",
        ));
    }
    out
}

fn device_deleted(root: &DataRoot, l: &Layer) -> bool {
    let meta = root.path.join("devicemapper/metadata").join(&l.cache_id);
    std::fs::read_to_string(meta).is_ok_and(|text| text.contains("\"deleted\":true"))
}

/// Images whose layer chain is broken.
fn image_problems(root: &DataRoot) -> Vec<Problem> {
    let mut out = Vec::new();
    for img in &root.images {
        let mut chain = String::new();
        for d in &img.diff_ids {
            chain = oci::chain_id(&chain, d);
            if root.layer(&chain).is_none() {
                out.push(Problem::blocker(
                    format!(
                        "image {} ({}) needs layer {chain}, which is missing",
                        img.id,
                        img.tags.join(", ")
                    ),
                    "remove the image (docker rmi) or restore its layers",
                ));
                break;
            }
        }
    }
    out
}

/// Too little free space for `bytes_to_write` (plus a margin).
fn space_problem(root: &DataRoot, bytes_to_write: u64) -> Option<Problem> {
    let fs = nix::sys::statvfs::statvfs(&root.path).ok()?;
    let free = fs.blocks_available() * fs.fragment_size();
    let needed = bytes_to_write + bytes_to_write / 10 + (64 << 20);
    (free < needed).then(|| {
        Problem::blocker(
            format!(
                "{} has {free} bytes free; the migration needs about {needed}",
                root.path.display()
            ),
            "free space on that filesystem (docker system prune, or move other data away)",
        )
    })
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "data root   {} (storage driver: {})",
            self.data_root,
            self.driver.dir_name()
        )?;
        writeln!(f, "images      {} ({} tags)", self.images, self.tags)?;
        writeln!(
            f,
            "layers      {} ({} bytes)",
            self.layers, self.layer_bytes
        )?;
        writeln!(
            f,
            "containers  {} ({} running)",
            self.containers,
            self.running_containers.len()
        )?;
        let how = if self.driver == Driver::Devicemapper {
            "copied out of the thin devices"
        } else {
            "hard-linked: only the layer store's metadata is written"
        };
        writeln!(
            f,
            "to write    {} bytes (image layers are {how})",
            self.bytes_to_write
        )?;
        if self.problems.is_empty() {
            writeln!(f, "problems    none: ready to migrate")?;
        }
        for p in &self.problems {
            writeln!(
                f,
                "{:<11} {}\n            fix: {}",
                p.severity.to_string(),
                p.what,
                p.fix
            )?;
        }
        Ok(())
    }
}
