//! A layer made to carry every attribute an overlay2 layer can hold — nanosecond mtimes, file
//! capabilities and other xattrs, setuid/setgid/sticky modes, owners, a symlink, a hard link,
//! devices, a fifo and a sparse file — as a table, a `docker load`-able archive of it, and a check
//! of a directory against the table. The table is the expectation: nothing is read back through
//! the code under test.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The image name the archive loads as.
pub const IMAGE: &str = "attrs:1";

/// `cap_net_bind_service` in permitted and effective (VFS_CAP_REVISION_2), as `setcap` writes it.
pub const CAP_NET_BIND_SERVICE: [u8; 20] =
    [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

const SPARSE_LEN: usize = 8 << 20;

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Dir,
    File(&'static [u8]),
    /// `SPARSE_LEN` bytes, zero but one byte in the middle.
    Sparse,
    Symlink(&'static str),
    HardLink(&'static str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

pub struct Entry {
    pub path: &'static str,
    pub kind: Kind,
    pub mode: u32,
    pub owner: (u32, u32),
    pub mtime: (i64, i64),
    pub xattrs: &'static [(&'static str, &'static [u8])],
}

const T: i64 = 1_614_834_367; // 2021-03-04 05:06:07 UTC

pub const ENTRIES: &[Entry] = &[
    Entry {
        path: "attrs",
        kind: Kind::Dir,
        mode: 0o755,
        owner: (0, 0),
        mtime: (T, 100_000_001),
        xattrs: &[],
    },
    Entry {
        path: "attrs/cap",
        kind: Kind::File(b"#!/bin/sh\necho cap\n"),
        mode: 0o755,
        owner: (0, 0),
        mtime: (T, 123_456_789),
        xattrs: &[
            ("security.capability", &CAP_NET_BIND_SERVICE),
            ("user.note", b"hello"),
        ],
    },
    Entry {
        path: "attrs/suid",
        kind: Kind::File(b"suid"),
        mode: 0o4755,
        owner: (1234, 5678),
        mtime: (T, 222_222_222),
        xattrs: &[],
    },
    Entry {
        path: "attrs/sgid",
        kind: Kind::Dir,
        mode: 0o2775,
        owner: (1, 2),
        mtime: (T, 333_333_333),
        xattrs: &[],
    },
    Entry {
        path: "attrs/sticky",
        kind: Kind::Dir,
        mode: 0o1777,
        owner: (0, 0),
        mtime: (T, 444_444_444),
        xattrs: &[("trusted.strata", b"t")],
    },
    Entry {
        path: "attrs/link",
        kind: Kind::Symlink("cap"),
        mode: 0o777,
        owner: (0, 0),
        mtime: (T, 555_555_555),
        xattrs: &[],
    },
    // Not to attrs/cap: dockerd chowns a hard link entry after linking it, which drops the
    // target's capability in dockerd's own copy.
    Entry {
        path: "attrs/hard",
        kind: Kind::HardLink("attrs/suid"),
        mode: 0o4755,
        owner: (1234, 5678),
        mtime: (T, 222_222_222),
        xattrs: &[],
    },
    Entry {
        path: "attrs/null",
        kind: Kind::Char(1, 3),
        mode: 0o666,
        owner: (0, 0),
        mtime: (T, 666_666_666),
        xattrs: &[],
    },
    Entry {
        path: "attrs/loop",
        kind: Kind::Block(7, 0),
        mode: 0o660,
        owner: (0, 6),
        mtime: (T, 1),
        xattrs: &[],
    },
    Entry {
        path: "attrs/fifo",
        kind: Kind::Fifo,
        mode: 0o600,
        owner: (0, 0),
        mtime: (T, 777_777_777),
        xattrs: &[],
    },
    Entry {
        path: "attrs/sparse",
        kind: Kind::Sparse,
        mode: 0o644,
        owner: (0, 0),
        mtime: (T, 888_888_888),
        xattrs: &[("user.sparse", b"yes")],
    },
];

fn sparse_content() -> Vec<u8> {
    let mut v = vec![0u8; SPARSE_LEN];
    v[SPARSE_LEN / 2] = 1;
    v
}

/// The layer tar (PAX headers for times and xattrs, as BuildKit and Go's tar write them).
pub fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in ENTRIES {
        let mtime = format!("{}.{:09}", e.mtime.0, e.mtime.1);
        let mut pax: Vec<(String, Vec<u8>)> = vec![("mtime".into(), mtime.into_bytes())];
        pax.extend(
            e.xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.to_vec())),
        );
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode);
        h.set_uid(e.owner.0.into());
        h.set_gid(e.owner.1.into());
        h.set_mtime(e.mtime.0 as u64);
        h.set_size(0);
        let data: Vec<u8> = match e.kind {
            Kind::File(d) => d.to_vec(),
            Kind::Sparse => sparse_content(),
            _ => Vec::new(),
        };
        h.set_size(data.len() as u64);
        let kind = match e.kind {
            Kind::Dir => tar::EntryType::Directory,
            Kind::File(_) | Kind::Sparse => tar::EntryType::Regular,
            Kind::Symlink(_) => tar::EntryType::Symlink,
            Kind::HardLink(_) => tar::EntryType::Link,
            Kind::Char(..) => tar::EntryType::Char,
            Kind::Block(..) => tar::EntryType::Block,
            Kind::Fifo => tar::EntryType::Fifo,
        };
        h.set_entry_type(kind);
        if let Kind::Char(ma, mi) | Kind::Block(ma, mi) = e.kind {
            h.set_device_major(ma).unwrap();
            h.set_device_minor(mi).unwrap();
        }
        match e.kind {
            Kind::Symlink(t) | Kind::HardLink(t) => b.append_link(&mut h, e.path, t).unwrap(),
            _ => b.append_data(&mut h, e.path, &data[..]).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

/// The layer's diffID.
pub fn diff_id() -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(layer_tar())))
}

/// Writes a `docker load` archive of the image [`IMAGE`] made of the one layer.
pub fn write_archive(path: &Path) {
    let layer = layer_tar();
    let diff = diff_id();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff] },
    })
    .to_string();
    let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
    let manifest = serde_json::json!([{
        "Config": config_name, "RepoTags": [IMAGE], "Layers": ["layer/layer.tar"],
    }])
    .to_string();
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in [
        ("layer/layer.tar", layer.as_slice()),
        (config_name.as_str(), config.as_bytes()),
        ("manifest.json", manifest.as_bytes()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.finish().unwrap();
}

/// Makes the zero blocks of the sparse file under `root` (a driver's copy of the layer) holes, as
/// a layer extracted from a sparse tar has them; its content, and so the diffID, is unchanged.
pub fn dig_holes(root: &Path) {
    let p = root.join("attrs/sparse");
    let out = std::process::Command::new("fallocate")
        .arg("-d")
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fallocate -d {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::metadata(&p).unwrap().blocks() * 512 <= 64 << 10,
        "{} is not sparse",
        p.display()
    );
    let e = ENTRIES.iter().find(|e| e.path == "attrs/sparse").unwrap();
    let t = nix::sys::time::TimeSpec::new(e.mtime.0, e.mtime.1);
    nix::sys::stat::utimensat(
        None,
        &p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// Every way the tree at `root` differs from the table, one line per entry and field.
pub fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for e in ENTRIES {
        let p = root.join(e.path);
        let Ok(m) = fs::symlink_metadata(&p) else {
            problems.push(format!("{}: missing", e.path));
            continue;
        };
        let mut bad = |field: &str, got: String, want: String| {
            if got != want {
                problems.push(format!("{}: {field} is {got}, want {want}", e.path));
            }
        };
        let ft = m.file_type();
        let kind = match e.kind {
            Kind::Dir => ft.is_dir(),
            Kind::File(_) | Kind::Sparse | Kind::HardLink(_) => ft.is_file(),
            Kind::Symlink(_) => ft.is_symlink(),
            Kind::Char(..) => ft.is_char_device(),
            Kind::Block(..) => ft.is_block_device(),
            Kind::Fifo => ft.is_fifo(),
        };
        bad(
            "type",
            format!("{ft:?} ok={kind}"),
            format!("{ft:?} ok=true"),
        );
        if !ft.is_symlink() {
            bad(
                "mode",
                format!("{:o}", m.mode() & 0o7777),
                format!("{:o}", e.mode),
            );
        }
        bad(
            "owner",
            format!("{}:{}", m.uid(), m.gid()),
            format!("{}:{}", e.owner.0, e.owner.1),
        );
        bad(
            "mtime",
            format!("{}.{:09}", m.mtime(), m.mtime_nsec()),
            format!("{}.{:09}", e.mtime.0, e.mtime.1),
        );
        let mut want_x: Vec<(String, Vec<u8>)> = e
            .xattrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        if let Kind::HardLink(t) = e.kind {
            let target = ENTRIES.iter().find(|x| x.path == t).unwrap();
            want_x = target
                .xattrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            let same = fs::symlink_metadata(root.join(t))
                .map(|t| (t.dev(), t.ino()))
                .ok();
            bad(
                "hard link",
                format!("{:?}", same),
                format!("{:?}", Some((m.dev(), m.ino()))),
            );
        }
        want_x.sort();
        let mut got_x: Vec<(String, Vec<u8>)> = xattr::list(&p)
            .unwrap()
            .map(|k| {
                (
                    k.to_string_lossy().into_owned(),
                    xattr::get(&p, &k).unwrap().unwrap_or_default(),
                )
            })
            .filter(|(k, _)| !k.starts_with("trusted.overlay."))
            .collect();
        got_x.sort();
        bad("xattrs", format!("{got_x:?}"), format!("{want_x:?}"));
        match e.kind {
            Kind::File(d) => bad(
                "content",
                format!("{:?}", fs::read(&p).ok()),
                format!("{:?}", Some(d)),
            ),
            Kind::Sparse => {
                bad(
                    "content",
                    format!("{}", fs::read(&p).ok() == Some(sparse_content())),
                    "true".into(),
                );
                bad(
                    "allocated bytes <= 64 KiB",
                    format!("{}", m.blocks() * 512 <= 64 << 10),
                    "true".into(),
                );
            }
            Kind::Symlink(t) => bad(
                "target",
                format!("{:?}", fs::read_link(&p).ok()),
                format!("{:?}", Some(Path::new(t))),
            ),
            Kind::Char(ma, mi) | Kind::Block(ma, mi) => bad(
                "device",
                format!(
                    "{}:{}",
                    nix::sys::stat::major(m.rdev()),
                    nix::sys::stat::minor(m.rdev())
                ),
                format!("{ma}:{mi}"),
            ),
            _ => {}
        }
    }
    problems
}

/// The directory of the layer's files in a driver's tree: `<data-root>/<driver>/<cache-id><sub>`,
/// the cache id read from the image store `image/<store>`.
pub fn files(data_root: &Path, store: &str, driver_dir: &str, sub: &str) -> std::path::PathBuf {
    let id = fs::read_to_string(
        data_root
            .join("image")
            .join(store)
            .join("layerdb/sha256")
            .join(diff_id().trim_start_matches("sha256:"))
            .join("cache-id"),
    )
    .unwrap();
    data_root
        .join(driver_dir)
        .join(format!("{}{sub}", id.trim()))
}
