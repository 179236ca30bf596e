//! Test images built offline: a busybox root filesystem (from Debian's busybox-static) written as
//! an OCI image layout tar that `ctr images import` takes. The diffID of each layer is the sha256
//! of its uncompressed tar, which is also its blob digest.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

const MTIME: u64 = 1_700_000_000;
const BUSYBOX: &str = "/usr/bin/busybox";

/// Builds a layer tar entry by entry.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }
}

impl LayerBuilder {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !self.dirs.contains(&acc) {
                self.dir(&acc.clone(), 0o755);
            }
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.parents(path);
        self.dirs.insert(path.to_string());
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.parents(path);
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.parents(path);
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// An OCI whiteout: `name` is deleted from the layers below.
    pub fn whiteout(&mut self, dir: &str, name: &str) -> &mut Self {
        let path = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&path, 0o644, b"")
    }

    /// An OCI opaque marker: `dir` hides everything the layers below put in it.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// A busybox root filesystem: `/bin/busybox` with every applet linked to it.
pub fn busybox_layer() -> LayerBuilder {
    let list = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .unwrap_or_else(|e| {
            panic!("{BUSYBOX}: {e}; install Debian's busybox-static (scripts/test does)")
        });
    let mut b = LayerBuilder::default();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "var", "run",
    ] {
        b.dir(d, 0o755);
    }
    b.dir("tmp", 0o1777);
    b.file("bin/busybox", 0o755, &std::fs::read(BUSYBOX).unwrap());
    b.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    );
    b.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if !applet.is_empty() && applet != "bin/busybox" {
            b.symlink(applet, "/bin/busybox");
        }
    }
    b
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI image layout tar at `out` holding image `name` (e.g. `docker.io/strata/busybox:1`)
/// with `layers` (uncompressed tars, lowest first) and `cmd`.
pub fn write_oci_archive(out: &Path, name: &str, layers: &[Vec<u8>], cmd: &[&str]) {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let digest = sha256(layer);
        diff_ids.push(digest.clone());
        layer_descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": layer.len(),
        }));
        blobs.push((digest, layer.clone()));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_digest = sha256(&config);
    blobs.push((config_digest.clone(), config.clone()));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    blobs.push((manifest_digest.clone(), manifest.clone()));
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .unwrap();

    let mut tar = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (digest, data) in &blobs {
        add(
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            data,
        );
    }
    tar.finish().unwrap();
}
