//! devicemapper stores without device-mapper: the thin-pool metadata is read with
//! `thin_dump` (thin-provisioning-tools), each device is served as one FUSE file read straight
//! from the pool's data file at its mapped blocks ([`thin_device`]; without FUSE it is copied out
//! as a sparse image instead), and its filesystem (ext4 or xfs, files under `rootfs/`) is mounted
//! read-only from a loop device over it.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::MigrateError;
use crate::thin_device::{self, Run};

/// The thin pool: its data file and every device's mappings.
pub struct Pool {
    data: PathBuf,
    block_bytes: u64,
    devices: HashMap<u32, Vec<Run>>,
}

fn attr(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!(" {key}=\""))? + key.len() + 3;
    let end = line[start..].find('"')? + start;
    line[start..end].parse().ok()
}

fn name_attr(line: &str) -> Option<String> {
    let start = line.find(" name=\"")? + 7;
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// Parses thin_dump's XML (expanding shared `<def>`/`<ref>` blocks).
fn parse(xml: &str) -> Result<(u64, HashMap<u32, Vec<Run>>), String> {
    let mut block_sectors = None;
    let mut devices: HashMap<u32, Vec<Run>> = HashMap::new();
    let mut defs: HashMap<String, Vec<Run>> = HashMap::new();
    let mut current: Option<Vec<Run>> = None;
    let mut current_dev: Option<u32> = None;
    let mut current_def: Option<String> = None;
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<superblock") {
            block_sectors = attr(line, "data_block_size");
        } else if line.starts_with("<device") {
            current_dev = Some(
                attr(line, "dev_id").ok_or_else(|| format!("device without dev_id: {line}"))?
                    as u32,
            );
            current = Some(Vec::new());
        } else if line.starts_with("<def") {
            current_def = name_attr(line);
            current = Some(Vec::new());
        } else if line.starts_with("<ref") {
            let name = name_attr(line).ok_or_else(|| format!("ref without name: {line}"))?;
            let shared = defs
                .get(&name)
                .ok_or_else(|| format!("ref to unknown def {name}"))?
                .clone();
            current.get_or_insert_with(Vec::new).extend(shared);
        } else if line.starts_with("<range_mapping") {
            let m = Run {
                origin: attr(line, "origin_begin").ok_or(line)?,
                data: attr(line, "data_begin").ok_or(line)?,
                len: attr(line, "length").ok_or(line)?,
            };
            current.get_or_insert_with(Vec::new).push(m);
        } else if line.starts_with("<single_mapping") {
            let m = Run {
                origin: attr(line, "origin_block").ok_or(line)?,
                data: attr(line, "data_block").ok_or(line)?,
                len: 1,
            };
            current.get_or_insert_with(Vec::new).push(m);
        } else if line.starts_with("</device") {
            if let (Some(d), Some(m)) = (current_dev.take(), current.take()) {
                devices.insert(d, m);
            }
        } else if line.starts_with("</def") {
            if let (Some(n), Some(m)) = (current_def.take(), current.take()) {
                defs.insert(n, m);
            }
        }
    }
    let sectors = block_sectors.ok_or("no superblock data_block_size")?;
    Ok((sectors * 512, devices))
}

fn refused(msg: String) -> MigrateError {
    MigrateError::Refused(msg)
}

impl Pool {
    /// Reads the pool of the data root at `root` (`devicemapper/devicemapper/{data,metadata}`).
    pub fn open(root: &Path) -> Result<Pool, MigrateError> {
        let dir = root.join("devicemapper/devicemapper");
        let out = Command::new("thin_dump")
            .arg(dir.join("metadata"))
            .output()
            .map_err(|e| {
                refused(format!(
                    "cannot run thin_dump ({e}): install thin-provisioning-tools"
                ))
            })?;
        if !out.status.success() {
            return Err(refused(format!(
                "thin_dump {}: {}",
                dir.join("metadata").display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let (block_bytes, devices) = parse(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| refused(format!("thin pool metadata: {e}")))?;
        Ok(Pool {
            data: dir.join("data"),
            block_bytes,
            devices,
        })
    }

    /// Device `id`'s runs, sorted, checked to fit in 64-bit offsets and not to overlap.
    fn runs(&self, id: u32) -> Result<Vec<Run>, MigrateError> {
        let mut runs = self
            .devices
            .get(&id)
            .ok_or_else(|| refused(format!("thin device {id} is not in the pool metadata")))?
            .clone();
        runs.sort_by_key(|r| r.origin);
        let mut end = 0;
        for r in &runs {
            let fits = |b: u64| b.checked_add(r.len)?.checked_mul(self.block_bytes);
            if fits(r.origin).is_none() || fits(r.data).is_none() || r.origin < end {
                return Err(refused(format!(
                    "thin pool metadata: device {id} maps blocks {}+{} to {} (overlapping or out of range): the pool metadata is damaged; repair it with thin_check --repair or restore it",
                    r.origin, r.len, r.data
                )));
            }
            end = r.origin + r.len;
        }
        Ok(runs)
    }

    /// Serves device `id` (`size` bytes) as a FUSE file at `at` (an existing regular file).
    fn serve(
        &self,
        id: u32,
        size: u64,
        at: &Path,
    ) -> Result<fuser::BackgroundSession, MigrateError> {
        let runs = self.runs(id)?;
        thin_device::serve(&self.data, self.block_bytes, size, runs, at).map_err(|e| {
            MigrateError::Io {
                what: format!("serve thin device {id} over FUSE at {}", at.display()),
                source: e,
            }
        })
    }

    /// Writes device `id` (`size` bytes) as a sparse image at `out`.
    pub fn materialize(&self, id: u32, size: u64, out: &Path) -> Result<(), MigrateError> {
        let maps = self.runs(id)?;
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| MigrateError::Io { what, source: e }
        };
        let mut data = fs::File::open(&self.data).map_err(io("open pool data"))?;
        let mut img = fs::File::create(out).map_err(io("create device image"))?;
        img.set_len(size).map_err(io("size device image"))?;
        let mut buf = vec![0u8; self.block_bytes as usize];
        for m in &maps {
            for b in 0..m.len {
                data.seek(SeekFrom::Start((m.data + b) * self.block_bytes))
                    .map_err(io("seek pool data"))?;
                data.read_exact(&mut buf).map_err(io("read pool data"))?;
                if buf.iter().all(|x| *x == 0) {
                    continue; // keep the image sparse
                }
                img.seek(SeekFrom::Start((m.origin + b) * self.block_bytes))
                    .map_err(io("seek device image"))?;
                img.write_all(&buf).map_err(io("write device image"))?;
            }
        }
        img.sync_all().map_err(io("sync device image"))
    }
}

/// dockerd's record of one device (`devicemapper/metadata/<id>`).
#[derive(Debug, serde::Deserialize)]
pub struct DeviceInfo {
    pub device_id: u32,
    pub size: u64,
    #[serde(default)]
    pub deleted: bool,
}

pub fn device_info(root: &Path, id: &str) -> Result<DeviceInfo, MigrateError> {
    let p = root.join("devicemapper/metadata").join(id);
    let text = fs::read(&p).map_err(|e| MigrateError::Io {
        what: format!("read {}", p.display()),
        source: e,
    })?;
    let info: DeviceInfo =
        serde_json::from_slice(&text).map_err(|e| refused(format!("{}: {e}", p.display())))?;
    if info.deleted {
        return Err(refused(format!(
            "devicemapper device {id} is marked deleted: remove the images that use it first"
        )));
    }
    Ok(info)
}

/// A device image mounted read-only; unmounted and deleted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    image: PathBuf,
    /// The FUSE session serving `image` (none when it was copied out).
    served: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// The device's files (dockerd keeps them under `rootfs/`).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount_stale(&self.dir);
        let _ = fs::remove_dir(&self.dir);
        if let Some(session) = self.served.take() {
            let _ = session.umount_and_join();
        }
        let _ = fs::remove_file(&self.image);
    }
}

/// Leaves nothing mounted at `path` (ours, or one a killed previous run left).
fn unmount_stale(path: &Path) {
    let _ = Command::new("umount")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Device `id` as a file at `image`: served from the pool over FUSE, or, where FUSE is missing,
/// copied out as a sparse image.
fn device_file(
    pool: &Pool,
    id: u32,
    size: u64,
    image: &Path,
) -> Result<Option<fuser::BackgroundSession>, MigrateError> {
    unmount_stale(image);
    fs::write(image, b"").map_err(|e| MigrateError::Io {
        what: format!("create {}", image.display()),
        source: e,
    })?;
    match pool.serve(id, size, image) {
        Ok(session) => Ok(Some(session)),
        Err(MigrateError::Io { what, source }) => {
            eprintln!("migrate-tool: {what}: {source}; copying the device out instead (slower)");
            pool.materialize(id, size, image).map(|()| None)
        }
        Err(e) => Err(e),
    }
}

/// Mounts device `id` of the data root read-only, its files in `work`.
pub fn mount_device(
    root: &Path,
    pool: &Pool,
    id: &str,
    work: &Path,
) -> Result<Mounted, MigrateError> {
    let info = device_info(root, id)?;
    fs::create_dir_all(work).map_err(|e| MigrateError::Io {
        what: format!("create {}", work.display()),
        source: e,
    })?;
    let dir = work.join(format!("{id}.mnt"));
    unmount_stale(&dir);
    let image = work.join(format!("{id}.img"));
    let served = device_file(pool, info.device_id, info.size, &image)?;
    let mounted = Mounted {
        dir: dir.clone(),
        image: image.clone(),
        served,
    };
    fs::create_dir_all(&dir).map_err(|e| MigrateError::Io {
        what: format!("create {}", dir.display()),
        source: e,
    })?;
    let fstype = crate::devicemapper::fs_type(root);
    let opts = if fstype == "xfs" {
        "ro,loop,nouuid"
    } else {
        "ro,loop"
    };
    let out = Command::new("mount")
        .args(["-t", fstype, "-o", opts])
        .arg(&image)
        .arg(&dir)
        .output()
        .map_err(|e| refused(format!("mount: {e}")))?;
    if !out.status.success() {
        return Err(refused(format!(
            "mount device {id} ({fstype}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(mounted)
}

/// The filesystem dockerd made its devices with (`deviceset-metadata`), ext4 unless it says xfs.
pub fn fs_type(root: &Path) -> &'static str {
    let text = fs::read_to_string(root.join("devicemapper/metadata/deviceset-metadata"))
        .unwrap_or_default();
    if text.contains("\"xfs\"") {
        "xfs"
    } else {
        "ext4"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_dump_xml_with_shared_blocks() {
        let xml = r#"<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="100">
  <def name="s1">
    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>
  </def>
  <device dev_id="1" mapped_blocks="3">
    <ref name="s1"/>
    <single_mapping origin_block="5" data_block="40" time="0"/>
  </device>
</superblock>"#;
        let (bs, devs) = parse(xml).unwrap();
        assert_eq!(bs, 65536);
        assert_eq!(
            devs[&1],
            vec![
                Run {
                    origin: 0,
                    data: 10,
                    len: 2
                },
                Run {
                    origin: 5,
                    data: 40,
                    len: 1
                }
            ]
        );
    }
}
