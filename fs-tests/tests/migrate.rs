//! migrate-tool against a real Docker data root: dockerd 20.10 with the overlay (v1) driver.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::strata::Strata;

/// Every entry under `root` with its size, mode and mtime: to prove a command wrote nothing.
fn listing(root: &Path) -> BTreeMap<String, (u64, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.insert(p.display().to_string(), (m.len(), m.mode(), m.mtime()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn sorted(s: String) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_string).collect();
    v.sort();
    v
}

fn plan(root: &Path) -> (bool, serde_json::Value, String) {
    let out = Command::new(strata_fs_tests::workspace_bin("migrate-tool"))
        .args(["plan", "--json", "--data-root"])
        .arg(root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn problems(v: &serde_json::Value, severity: &str) -> Vec<String> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["severity"] == severity)
        .map(|p| p["what"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plan_reads_an_overlay_v1_data_root_and_writes_nothing() {
    // Images built by strata, loaded into a dockerd on the overlay (v1) driver.
    let s = Strata::new();
    let archive = s.root.path().join("images.tar");
    s.dockerfile("FROM busybox\nRUN rm /etc/group && mkdir /data && echo kept > /data/f\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=app:1", archive.display()),
    ]);
    let base = s.root.path().join("busybox.tar");
    s.dockerfile("FROM busybox\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=busybox:latest", base.display()),
    ]);

    let mut d = Dockerd::start("overlay", &[]);
    d.load(&base);
    d.load(&archive);
    d.docker(&[
        "create",
        "--name",
        "written",
        "--network",
        "none",
        "app:1",
        "sh",
        "-c",
        "echo hi > /w",
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
    d.docker(&[
        "run",
        "-d",
        "--name",
        "busy",
        "--network",
        "none",
        "busybox:latest",
        "sleep",
        "1000",
    ]);
    let root = d.data_root();

    let (ok, v, text) = plan(&root);
    assert!(ok, "{text}");
    assert_eq!(v["driver"], "overlay", "{text}");
    let blockers = problems(&v, "blocker");
    assert!(
        blockers.iter().any(|b| b.contains("dockerd")),
        "{blockers:?}"
    );
    assert!(
        blockers
            .iter()
            .any(|b| b.contains("container busy is running")),
        "{blockers:?}"
    );

    d.stop();
    let before = listing(&root);
    let (ok, v, text) = plan(&root);
    assert!(ok, "{text}");
    assert_eq!(listing(&root), before, "plan must not write anything");
    assert_eq!(v["images"], 2, "{text}");
    assert_eq!(v["tags"], 2, "{text}");
    assert_eq!(v["layers"], 2, "busybox and app's RUN layer: {text}");
    assert_eq!(v["containers"], 3, "{text}");
    assert!(
        v["bytes_to_write"].as_u64().unwrap() < v["layer_bytes"].as_u64().unwrap() / 10,
        "overlay layers are hard-linked: only metadata is written: {text}"
    );
    assert!(problems(&v, "blocker").is_empty(), "{text}");

    // A layer whose driver directory is gone is a blocker that names it.
    let layer = std::fs::read_dir(root.join("image/overlay/layerdb/sha256"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let cache_id = std::fs::read_to_string(layer.join("cache-id")).unwrap();
    std::fs::rename(
        root.join("overlay").join(cache_id.trim()),
        root.join("moved-away"),
    )
    .unwrap();
    let (_, v, _) = plan(&root);
    assert!(
        problems(&v, "blocker")
            .iter()
            .any(|b| b.contains("is missing") && b.contains(cache_id.trim())),
        "{v}"
    );

    // Not a data root at all.
    let (ok, _, text) = plan(s.path());
    assert!(!ok && text.contains("is not a Docker data root"), "{text}");
}

/// dockerd on overlay (v1) with two images (one with a whiteout and an opaque directory) and
/// containers with and without writes; stopped, ready to migrate.
fn overlay_v1_fixture() -> (Strata, Dockerd) {
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
    let d = Dockerd::start("overlay", &[]);
    d.load(&base);
    d.load(&app);
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

fn tool(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(strata_fs_tests::workspace_bin("migrate-tool"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The whole journey from `legacy` (made by `convert` from a real overlay v1 root) to dockerd on
/// overlay2, then cleanup.
fn journey(legacy: &str, convert: fn(&Path)) {
    let (s, mut d) = overlay_v1_fixture();
    let images = sorted(d.docker(&[
        "images",
        "--no-trunc",
        "--format",
        "{{.ID}} {{.Repository}}:{{.Tag}}",
    ]));
    let containers =
        sorted(d.docker(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"]));
    d.stop();
    let root = d.data_root();
    convert(&root);
    let daemon_json = s.root.path().join("daemon.json");
    let source_before = listing(&root.join(legacy));

    let out = tool(
        &[
            "migrate",
            "--data-root",
            root.to_str().unwrap(),
            "--daemon-json",
            daemon_json.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = tool(&["verify", "--data-root", root.to_str().unwrap()], &[]);
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        listing(&root.join(legacy)),
        source_before,
        "the source tree is untouched until cleanup"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&daemon_json).unwrap()).unwrap();
    assert_eq!(cfg["storage-driver"], "overlay2");

    // Real dockerd on overlay2: same images, containers with their writes, and docker save's
    // layer tars hash to the original diffIDs.
    d.restart("overlay2");
    assert_eq!(
        sorted(d.docker(&[
            "images",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Repository}}:{{.Tag}}"
        ])),
        images
    );
    assert_eq!(
        sorted(d.docker(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"])),
        containers
    );
    let run = d.docker(&["run", "--rm", "--network", "none", "app:1", "sh", "-c", "cat /data/f /data/dir/new; ls /data/dir; test ! -e /etc/group && echo group-gone; stat -c %a /data/f"]);
    assert_eq!(
        run.split_whitespace().collect::<Vec<_>>(),
        ["kept", "new", "new", "group-gone", "4755"],
        "{run}"
    );
    assert_eq!(
        d.docker(&["start", "-a", "written"]).trim(),
        "earlier write"
    );
    let saved = s.root.path().join("saved.tar");
    d.docker(&["save", "-o", saved.to_str().unwrap(), "app:1"]);
    let diff_ids: Vec<String> = {
        let inspect = d.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            "app:1",
        ]);
        serde_json::from_str(inspect.trim()).unwrap()
    };
    let mut found = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&saved).unwrap());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy().ends_with("layer.tar") {
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            std::io::copy(&mut e, &mut h).unwrap();
            found.push(format!("sha256:{}", hex::encode(sha2::Digest::finalize(h))));
        }
    }
    for id in &diff_ids {
        assert!(
            found.contains(id),
            "docker save has no layer with diffID {id}: {found:?}"
        );
    }
    d.stop();

    // cleanup frees the old driver only now.
    let out = tool(&["cleanup", "--data-root", root.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.join(legacy).exists() && !root.join("image").join(legacy).exists());
}

#[test]
fn migrate_overlay_v1_and_run_on_overlay2() {
    journey("overlay", |_| {});
}

#[test]
fn migrate_aufs_and_run_on_overlay2() {
    journey("aufs", overlay_to_aufs);
}

/// Rewrites a real overlay v1 data root into aufs' exact on-disk form: each layer's own files
/// (its original tar, rebuilt from dockerd's tar-split and extracted as-is, `.wh.` files
/// included) under `aufs/diff/<id>`, ancestors in `aufs/layers/<id>`, container branches with
/// aufs whiteouts, and dockerd's image and layer store moved to `image/aufs` unchanged.
fn overlay_to_aufs(root: &Path) {
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
        let mut ar = tar::Archive::new(&tar_bytes[..]);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_preserve_mtime(true);
        ar.set_unpack_xattrs(true);
        ar.unpack(root.join("aufs/diff").join(id)).unwrap();
        let lower: Vec<String> = ancestors(chain).into_iter().skip(1).collect();
        fs::write(root.join("aufs/layers").join(id), lower.join("\n")).unwrap();
        fs::create_dir_all(root.join("aufs/mnt").join(id)).unwrap();
    }
    for e in fs::read_dir(store.join("layerdb/mounts"))
        .unwrap()
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

#[test]
fn migrate_survives_sigkill_after_every_journal_step() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    let daemon_json = s.root.path().join("daemon.json");
    let source_before = listing(&root.join("overlay"));
    let args = [
        "migrate",
        "--data-root",
        root.to_str().unwrap(),
        "--daemon-json",
        daemon_json.to_str().unwrap(),
    ];
    let mut kills = 0;
    loop {
        // Each run finishes one more step, then SIGKILLs itself.
        let out = tool(&args, &[("STRATA_MIGRATE_KILL_AFTER", "1")]);
        if out.status.success() {
            break;
        }
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(9),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        kills += 1;
        assert_eq!(
            listing(&root.join("overlay")),
            source_before,
            "the source changed after {kills} kills"
        );
        assert!(kills < 100, "no progress");
    }
    assert!(kills >= 8, "only {kills} steps");
    let verify = tool(&["verify", "--data-root", root.to_str().unwrap()], &[]);
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Rollback returns to overlay, and the old dockerd works again.
    let out = tool(
        &[
            "rollback",
            "--data-root",
            root.to_str().unwrap(),
            "--daemon-json",
            daemon_json.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.restart("overlay");
    assert_eq!(
        d.docker(&["start", "-a", "written"]).trim(),
        "earlier write"
    );
}

#[test]
fn altered_layer_files_stop_the_migration() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    // Change a file of an image layer on disk behind dockerd's back.
    let victim = std::fs::read_dir(root.join("overlay"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("root/data/f"))
        .find(|p| p.exists())
        .unwrap();
    std::fs::write(&victim, "tampered").unwrap();
    let daemon_json = s.root.path().join("daemon.json");
    let out = tool(
        &[
            "migrate",
            "--data-root",
            root.to_str().unwrap(),
            "--daemon-json",
            daemon_json.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("data/f")
            && (err.contains("the file was changed")
                || err.contains("was altered")
                || err.contains("no regular file of this size")),
        "{err}"
    );
    assert!(!root.join("overlay2").exists(), "nothing switched");
    assert!(!daemon_json.exists(), "dockerd's config untouched");
}

#[test]
fn bad_data_roots_are_refused_and_left_untouched() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    let daemon_json = s.root.path().join("daemon.json");
    let migrate = |root: &Path| {
        tool(
            &[
                "migrate",
                "--data-root",
                root.to_str().unwrap(),
                "--daemon-json",
                daemon_json.to_str().unwrap(),
            ],
            &[],
        )
    };
    let layers: Vec<std::path::PathBuf> =
        std::fs::read_dir(root.join("image/overlay/layerdb/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();

    // A truncated tar-split.
    let split = layers[0].join("tar-split.json.gz");
    let saved = std::fs::read(&split).unwrap();
    std::fs::write(&split, &saved[..saved.len() / 2]).unwrap();
    let before = listing(&root.join("overlay"));
    let out = migrate(&root);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("tar-split")
            && err.contains(layers[0].file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert_eq!(listing(&root.join("overlay")), before);
    assert!(!root.join("overlay2").exists() && !daemon_json.exists());
    std::fs::write(&split, &saved).unwrap();

    // A missing parent.
    let child = layers.iter().find(|l| l.join("parent").exists()).unwrap();
    let parent = std::fs::read_to_string(child.join("parent")).unwrap();
    std::fs::write(
        child.join("parent"),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    )
    .unwrap();
    let out = migrate(&root);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("refusing to migrate")
            && err.contains("not in the layer store"),
        "{err}"
    );
    std::fs::write(child.join("parent"), parent).unwrap();

    // A data root of another driver.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("image/overlay2/layerdb")).unwrap();
    let out = migrate(other.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("overlay2"), "{err}");

    // After all that, the real migration still works.
    let out = migrate(&root);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn migrate_devicemapper_and_run_on_overlay2() {
    journey("devicemapper", overlay_to_devicemapper);
}

/// Rewrites a real overlay v1 data root into devicemapper's form: every layer (image, init,
/// container) a full ext4 filesystem with its files under `rootfs/`, laid into a thin pool's
/// data file at the blocks that pool metadata (made by `thin_restore` from generated XML) maps.
fn overlay_to_devicemapper(root: &Path) {
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
        .unwrap()
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
        let size = 64u64 << 20;
        let mk = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&stage)
            .arg(&image)
            .arg("64M")
            .output()
            .unwrap();
        assert!(
            mk.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&mk.stderr)
        );
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
