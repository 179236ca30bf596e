//! Docker data roots for migrate-tool's tests and benchmark: a real one made by dockerd 20.10 on
//! the overlay (v1) driver, and the same rewritten into aufs' and devicemapper's exact on-disk
//! forms (dockerd's own diffIDs and tar-split data kept), since those drivers cannot run on this
//! kernel.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::dockerd::Dockerd;
use crate::strata::Strata;

/// dockerd on overlay (v1) with three images (one with a whiteout and an opaque directory, one
/// the [`crate::attr_layer`]) and
/// containers with and without writes; stopped, ready to migrate.
pub fn overlay_v1_fixture() -> (Strata, Dockerd) {
    let s = Strata::new();
    let base = s.root.path().join("busybox.tar");
    s.dockerfile("FROM busybox\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=busybox:latest", base.display()),
    ]);
    let app = s.root.path().join("app.tar");
    s.dockerfile("FROM busybox\nRUN mkdir -p /data/dir && echo old > /data/dir/old && echo kept > /data/f && ln /data/f /data/hard && ln -s f /data/sym\nRUN rm /etc/group && rm -r /data/dir && mkdir /data/dir && echo new > /data/dir/new && chmod 4755 /data/f\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=app:1", app.display()),
    ]);
    let attrs = s.root.path().join("attrs.tar");
    crate::attr_layer::write_archive(&attrs);
    let d = Dockerd::start("overlay", &[]);
    d.load(&base);
    d.load(&app);
    d.load(&attrs);
    d.docker(&[
        "create",
        "--name",
        "written",
        "--network",
        "none",
        "app:1",
        "sh",
        "-c",
        "test -f /w && cat /w || echo earlier write > /w",
    ]);
    d.docker(&["start", "-a", "written"]);
    d.docker(&[
        "create",
        "--name",
        "fresh",
        "--network",
        "none",
        "busybox:latest",
        "true",
    ]);
    (s, d)
}

/// Rewrites a real overlay v1 data root into aufs' exact on-disk form: each layer's own files
/// (its original tar, rebuilt from dockerd's tar-split and extracted as-is, `.wh.` files
/// included) under `aufs/diff/<id>`, ancestors in `aufs/layers/<id>`, container branches with
/// aufs whiteouts, and dockerd's image and layer store moved to `image/aufs` unchanged.
pub fn overlay_to_aufs(root: &Path) {
    use std::fs;
    let store = root.join("image/overlay");
    let mut cache = BTreeMap::new();
    let mut parent = BTreeMap::new();
    for e in fs::read_dir(store.join("layerdb/sha256"))
        .unwrap()
        .flatten()
    {
        let chain = format!("sha256:{}", e.file_name().to_string_lossy());
        cache.insert(
            chain.clone(),
            fs::read_to_string(e.path().join("cache-id"))
                .unwrap()
                .trim()
                .to_string(),
        );
        if let Ok(p) = fs::read_to_string(e.path().join("parent")) {
            parent.insert(chain, p.trim().to_string());
        }
    }
    let ancestors = |chain: &str| {
        let mut out = Vec::new();
        let mut next = Some(chain.to_string());
        while let Some(c) = next {
            out.push(cache[&c].clone());
            next = parent.get(&c).cloned();
        }
        out
    };
    for d in ["diff", "layers", "mnt"] {
        fs::create_dir_all(root.join("aufs").join(d)).unwrap();
    }
    for (chain, id) in &cache {
        let split = store
            .join("layerdb/sha256")
            .join(chain.trim_start_matches("sha256:"))
            .join("tar-split.json.gz");
        let entries = migrate_tool::tarsplit::read(&split).unwrap();
        let mut tar_bytes = Vec::new();
        migrate_tool::tarsplit::assemble(
            &entries,
            &root.join("overlay").join(id).join("root"),
            &mut tar_bytes,
        )
        .unwrap();
        // As dockerd's aufs driver extracted it: `.wh.` names kept, every attribute set.
        let dir = root.join("aufs/diff").join(id);
        fs::create_dir_all(&dir).unwrap();
        strata_image::layer::extract(&tar_bytes[..], &dir).unwrap();
        let lower: Vec<String> = ancestors(chain).into_iter().skip(1).collect();
        fs::write(root.join("aufs/layers").join(id), lower.join("\n")).unwrap();
        fs::create_dir_all(root.join("aufs/mnt").join(id)).unwrap();
    }
    for e in fs::read_dir(store.join("layerdb/mounts"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let mount = fs::read_to_string(e.path().join("mount-id"))
            .unwrap()
            .trim()
            .to_string();
        let init = fs::read_to_string(e.path().join("init-id"))
            .unwrap()
            .trim()
            .to_string();
        let image = ancestors(fs::read_to_string(e.path().join("parent")).unwrap().trim());
        for (id, lower) in [
            (init.clone(), image.clone()),
            (mount.clone(), [vec![init.clone()], image.clone()].concat()),
        ] {
            let dst = root.join("aufs/diff").join(&id);
            assert!(Command::new("cp")
                .arg("-a")
                .arg(root.join("overlay").join(&id).join("upper"))
                .arg(&dst)
                .status()
                .unwrap()
                .success());
            to_aufs_whiteouts(&dst);
            fs::write(root.join("aufs/layers").join(&id), lower.join("\n")).unwrap();
            fs::create_dir_all(root.join("aufs/mnt").join(&id)).unwrap();
        }
        let config = root
            .join("containers")
            .join(e.file_name())
            .join("config.v2.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
        v["Driver"] = serde_json::json!("aufs");
        fs::write(&config, serde_json::to_vec(&v).unwrap()).unwrap();
    }
    fs::rename(&store, root.join("image/aufs")).unwrap();
    fs::remove_dir_all(root.join("overlay")).unwrap();
}

/// overlay whiteouts (0/0 devices, opaque xattrs) to aufs ones (`.wh.` files).
fn to_aufs_whiteouts(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if xattr::get(dir, "trusted.overlay.opaque")
        .ok()
        .flatten()
        .as_deref()
        == Some(b"y")
    {
        xattr::remove(dir, "trusted.overlay.opaque").unwrap();
        std::fs::write(dir.join(".wh..wh..opq"), "").unwrap();
    }
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.file_type().is_char_device() && m.rdev() == 0 {
            std::fs::remove_file(e.path()).unwrap();
            std::fs::write(
                dir.join(format!(".wh.{}", e.file_name().to_string_lossy())),
                "",
            )
            .unwrap();
        } else if m.is_dir() {
            to_aufs_whiteouts(&e.path());
        }
    }
}

/// Rewrites a real overlay v1 data root into devicemapper's form: every layer (image, init,
/// container) a full ext4 filesystem with its files under `rootfs/`, laid into a thin pool's
/// data file at the blocks that pool metadata (made by `thin_restore` from generated XML) maps.
pub fn overlay_to_devicemapper(root: &Path) {
    use std::fs;
    use std::io::{Read, Seek, SeekFrom, Write};
    const BLOCK: u64 = 128 * 512;
    let store = root.join("image/overlay");
    let v1 = root.join("overlay");
    let work = root.join("dm-fixture");
    fs::create_dir_all(&work).unwrap();
    // (device id string, full tree) for every layer dockerd would have a device for.
    let mut trees: Vec<(String, std::path::PathBuf, Option<std::path::PathBuf>)> = Vec::new();
    for e in fs::read_dir(store.join("layerdb/sha256"))
        .unwrap()
        .flatten()
    {
        let id = fs::read_to_string(e.path().join("cache-id"))
            .unwrap()
            .trim()
            .to_string();
        trees.push((id.clone(), v1.join(&id).join("root"), None));
    }
    for e in fs::read_dir(store.join("layerdb/mounts"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for file in ["init-id", "mount-id"] {
            let id = fs::read_to_string(e.path().join(file))
                .unwrap()
                .trim()
                .to_string();
            let lower = fs::read_to_string(v1.join(&id).join("lower-id"))
                .unwrap()
                .trim()
                .to_string();
            trees.push((
                id.clone(),
                v1.join(&lower).join("root"),
                Some(v1.join(&id).join("upper")),
            ));
        }
    }
    let dm = root.join("devicemapper");
    fs::create_dir_all(dm.join("devicemapper")).unwrap();
    fs::create_dir_all(dm.join("metadata")).unwrap();
    let mut data = fs::File::create(dm.join("devicemapper/data")).unwrap();
    let mut xml = String::new();
    let mut next_block = 0u64;
    for (n, (id, base, upper)) in trees.iter().enumerate() {
        // The layer's full filesystem: its upper (if any) over its image root, read through a
        // read-only overlay mount, copied under rootfs/.
        let stage = work.join(format!("{id}.stage"));
        fs::create_dir_all(stage.join("rootfs")).unwrap();
        let src = match upper {
            None => base.clone(),
            Some(u) => {
                let m = work.join(format!("{id}.merged"));
                fs::create_dir_all(&m).unwrap();
                let opts = format!("lowerdir={}:{}", u.display(), base.display());
                assert!(Command::new("mount")
                    .args(["-t", "overlay", "overlay", "-o", &opts])
                    .arg(&m)
                    .status()
                    .unwrap()
                    .success());
                m
            }
        };
        assert!(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(stage.join("rootfs"))
            .status()
            .unwrap()
            .success());
        if upper.is_some() {
            assert!(Command::new("umount").arg(&src).status().unwrap().success());
        }
        let image = work.join(format!("{id}.img"));
        // Room for the tree plus ext4's own needs, in whole pool blocks.
        let tree: u64 = String::from_utf8(
            Command::new("du")
                .args(["-sb"])
                .arg(&stage)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
        let size = ((tree + tree / 4 + (48 << 20)) / BLOCK + 1) * BLOCK;
        let mk = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&stage)
            .arg(&image)
            .arg(format!("{}k", size / 1024))
            .output()
            .unwrap();
        assert!(
            mk.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&mk.stderr)
        );
        // mke2fs may leave out a last, too small block group: take the file's own length, padded
        // to whole pool blocks.
        let size = fs::metadata(&image).unwrap().len().div_ceil(BLOCK) * BLOCK;
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let device_id = n as u64 + 1;
        let blocks = size / BLOCK;
        xml.push_str(&format!("  <device dev_id=\"{device_id}\" mapped_blocks=\"{blocks}\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n    <range_mapping origin_begin=\"0\" data_begin=\"{next_block}\" length=\"{blocks}\" time=\"0\"/>\n  </device>\n"));
        let mut img = fs::File::open(&image).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            img.read_exact(&mut buf).unwrap();
            if buf.iter().any(|x| *x != 0) {
                data.seek(SeekFrom::Start((next_block + b) * BLOCK))
                    .unwrap();
                data.write_all(&buf).unwrap();
            }
        }
        fs::write(dm.join("metadata").join(id), format!("{{\"device_id\":{device_id},\"size\":{size},\"transaction_id\":{device_id},\"initialized\":false,\"deleted\":false}}")).unwrap();
        next_block += blocks;
    }
    data.set_len(next_block * BLOCK).unwrap();
    let full = format!("<superblock uuid=\"\" time=\"0\" transaction=\"{}\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{next_block}\">\n{xml}</superblock>\n", trees.len());
    fs::write(work.join("pool.xml"), full).unwrap();
    let meta = dm.join("devicemapper/metadata");
    fs::File::create(&meta).unwrap().set_len(32 << 20).unwrap();
    let out = Command::new("thin_restore")
        .arg("-i")
        .arg(work.join("pool.xml"))
        .arg("-o")
        .arg(&meta)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thin_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(
        dm.join("metadata/deviceset-metadata"),
        "{\"next_device_id\":100,\"BaseDeviceUUID\":\"\",\"BaseDeviceFilesystem\":\"ext4\"}",
    )
    .unwrap();
    for e in fs::read_dir(root.join("containers")).unwrap().flatten() {
        let config = e.path().join("config.v2.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
        v["Driver"] = serde_json::json!("devicemapper");
        fs::write(&config, serde_json::to_vec(&v).unwrap()).unwrap();
    }
    fs::rename(&store, root.join("image/devicemapper")).unwrap();
    fs::remove_dir_all(&v1).unwrap();
    fs::remove_dir_all(&work).unwrap();
}
