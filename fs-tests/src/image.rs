//! Test images built offline: a busybox root filesystem (from Debian's busybox-static) written as
//! an OCI image layout tar that `ctr images import` takes. The diffID of each layer is the sha256
//! of its uncompressed tar, which is also its blob digest.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use strata_image::content::ContentStore;
use strata_image::oci::{self, Descriptor, ImageConfig, Manifest, RootFs, RunConfig};

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

/// Writes an OCI image layout tar at `out` holding image `name` (e.g. `docker.io/strata/busybox:1`)
/// with `layers` (uncompressed tars, lowest first) and `cmd`.
pub fn write_oci_archive(out: &Path, name: &str, layers: &[Vec<u8>], cmd: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let digest = store.put(layer).unwrap();
        diff_ids.push(digest.to_string());
        layer_descs.push(Descriptor {
            media_type: oci::MEDIA_LAYER.into(),
            digest: digest.to_string(),
            size: layer.len() as u64,
            annotations: Default::default(),
            platform: None,
        });
    }
    let config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        config: RunConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        },
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids,
        },
        ..Default::default()
    };
    let config = oci::put_json(&store, oci::MEDIA_CONFIG, &config).unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MEDIA_MANIFEST.into(),
        config,
        layers: layer_descs,
    };
    let mut manifest_desc = oci::put_json(&store, oci::MEDIA_MANIFEST, &manifest).unwrap();
    manifest_desc.platform = Some(oci::Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
    });
    let file = std::fs::File::create(out).unwrap();
    oci::write_layout_archive(&store, &manifest_desc, name, MTIME, file).unwrap();
}

/// The OCI archive of a Debian bookworm minbase image (`python` or `gcc`), made by
/// `scripts/debian-image` with debootstrap on first use and cached under /var/cache/strata/images.
/// Its name is `localhost/strata-test/debian-KIND:bookworm`.
pub fn debian(kind: &str) -> std::path::PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/debian-image");
    let out = Command::new(&script)
        .arg(kind)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/debian-image");
    assert!(out.status.success(), "scripts/debian-image {kind} failed");
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Every file of a tar archive (an OCI layout or docker archive), by path.
pub fn archive_files(archive: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut files = std::collections::BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(path, data);
    }
    files
}

/// Deterministic bytes that compress poorly (xorshift), for test and benchmark files.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
