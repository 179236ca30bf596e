//! migrate-tool against a real Docker data root: dockerd 20.10 with the overlay (v1) driver.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use strata_fs_tests::attr_layer;
use strata_fs_tests::docker_roots::{overlay_to_aufs, overlay_to_devicemapper, overlay_v1_fixture};

/// Every entry under `root` with its size, mode, owner, mtime to the nanosecond, xattrs,
/// symlink target and content hash: to prove a command wrote nothing.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let content = if m.is_file() {
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            std::io::copy(&mut std::fs::File::open(&p).unwrap(), &mut h).unwrap();
            hex::encode(sha2::Digest::finalize(h))
        } else {
            String::new()
        };
        let xattrs: Vec<_> = xattr::list(&p)
            .unwrap()
            .map(|k| (k.clone(), xattr::get(&p, &k).unwrap()))
            .collect();
        let entry = format!(
            "{} {:o} {}:{} {}.{:09} {:?} {:?} {content}",
            m.len(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec(),
            xattrs,
            std::fs::read_link(&p).ok()
        );
        out.insert(p.display().to_string(), entry);
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
    let (s, mut d) = overlay_v1_fixture();
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
    assert_eq!(v["images"], 3, "{text}");
    assert_eq!(v["tags"], 3, "{text}");
    assert_eq!(
        v["layers"], 4,
        "busybox, app's two RUN layers and the attribute layer: {text}"
    );
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
    let attrs_source = attr_layer::files(&root, "overlay", "overlay", "/root");
    attr_layer::dig_holes(&attrs_source);
    let fixture = attr_layer::check(&attrs_source);
    assert!(
        fixture.is_empty(),
        "dockerd's own copy differs from the layer:\n{}",
        fixture.join("\n")
    );
    convert(&root);
    let daemon_json = s.root.path().join("daemon.json");
    let source_before = listing(&root.join(legacy));

    on_root_ok("migrate", &root, &daemon_json);
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
    let migrated = attr_layer::files(&root, "overlay2", "overlay2", "/diff");
    let lost = attr_layer::check(&migrated);
    assert!(
        lost.is_empty(),
        "{legacy} -> overlay2 lost attributes:\n{}",
        lost.join("\n")
    );

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

/// Kills `migrate` after every journal step in turn; each rerun goes on, verify passes, the
/// source is untouched, and rollback points everything back at `legacy`.
fn sigkill_after_every_step(legacy: &str, convert: fn(&Path)) {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    let attrs_source = attr_layer::files(&root, "overlay", "overlay", "/root");
    attr_layer::dig_holes(&attrs_source);
    let fixture = attr_layer::check(&attrs_source);
    assert!(
        fixture.is_empty(),
        "dockerd's own copy differs from the layer:\n{}",
        fixture.join("\n")
    );
    convert(&root);
    let daemon_json = s.root.path().join("daemon.json");
    let source_before = listing(&root.join(legacy));
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
            listing(&root.join(legacy)),
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
    on_root_ok("rollback", &root, &daemon_json);
    assert!(!root.join("overlay2").exists() && !root.join("image/overlay2").exists());
    for e in std::fs::read_dir(root.join("containers"))
        .unwrap()
        .flatten()
    {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(e.path().join("config.v2.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["Driver"], legacy);
    }
    if legacy == "overlay" {
        // The only old driver that still runs here: dockerd works on it again.
        d.restart("overlay");
        assert_eq!(
            d.docker(&["start", "-a", "written"]).trim(),
            "earlier write"
        );
    }
}

#[test]
fn overlay_migration_survives_sigkill_after_every_step() {
    sigkill_after_every_step("overlay", |_| {});
}

#[test]
fn aufs_migration_survives_sigkill_after_every_step() {
    sigkill_after_every_step("aufs", overlay_to_aufs);
}

#[test]
fn devicemapper_migration_survives_sigkill_after_every_step() {
    sigkill_after_every_step("devicemapper", overlay_to_devicemapper);
}

#[test]
fn deleted_devicemapper_devices_block_the_migration() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    overlay_to_devicemapper(&root);
    let meta = std::fs::read_dir(root.join("devicemapper/metadata"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.ends_with("deviceset-metadata"))
        .unwrap();
    let text = std::fs::read_to_string(&meta)
        .unwrap()
        .replace("\"deleted\":false", "\"deleted\":true");
    std::fs::write(&meta, text).unwrap();
    let daemon_json = s.root.path().join("daemon.json");
    let out = on_root("migrate", &root, &daemon_json);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("marked deleted"),
        "{err}"
    );
    assert!(!root.join("overlay2").exists() && !daemon_json.exists());
}

/// `migrate-tool COMMAND --data-root ROOT --daemon-json JSON`.
fn on_root(command: &str, root: &Path, daemon_json: &Path) -> std::process::Output {
    let (root, json) = (root.to_str().unwrap(), daemon_json.to_str().unwrap());
    tool(&[command, "--data-root", root, "--daemon-json", json], &[])
}

/// [`on_root`], which must succeed.
fn on_root_ok(command: &str, root: &Path, daemon_json: &Path) {
    let out = on_root(command, root, daemon_json);
    assert!(
        out.status.success(),
        "migrate-tool {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// After a passing verify, one mtime, one mode and one xattr changed in a migrated layer: verify
/// names all three (path and field) and cleanup refuses to delete the old driver's copy.
#[test]
fn verify_names_every_changed_attribute_and_cleanup_refuses() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    on_root_ok("migrate", &root, &s.root.path().join("daemon.json"));
    let verify = || tool(&["verify", "--data-root", root.to_str().unwrap()], &[]);
    assert!(verify().status.success());
    let diff = attr_layer::files(&root, "overlay2", "overlay2", "/diff");
    let t = nix::sys::time::TimeSpec::new(1_614_834_367, 0);
    nix::sys::stat::utimensat(
        None,
        &diff.join("attrs/suid"),
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    std::fs::set_permissions(
        diff.join("attrs/cap"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    xattr::set(diff.join("attrs/sparse"), "user.sparse", b"no").unwrap();
    let out = verify();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for want in [
        "attrs/suid: mtime: 1614834367.000000000 on disk, 1614834367.222222222 in the layer",
        "attrs/cap: mode: 700 on disk, 755 in the layer",
        "attrs/sparse: xattrs",
    ] {
        assert!(
            text.contains(want),
            "verify does not report {want:?}:\n{text}"
        );
    }
    let out = tool(&["cleanup", "--data-root", root.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "cleanup ran after a failed verify");
    assert!(root.join("overlay").exists() && root.join("image/overlay").exists());
}

/// A layer whose directory on disk is a symlink to a copy of its files outside the data root:
/// the rebuild would hash the same, so only resolving beneath the layer root catches it. The layer
/// is refused naming the path, and nothing under the data root links to the outside files.
#[test]
fn a_layer_path_through_a_symlink_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    let layer = attr_layer::files(&root, "overlay", "overlay", "/root");
    let outside = s.root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::rename(layer.join("attrs"), outside.join("attrs")).unwrap();
    std::os::unix::fs::symlink(outside.join("attrs"), layer.join("attrs")).unwrap();
    let daemon_json = s.root.path().join("daemon.json");
    let out = on_root("migrate", &root, &daemon_json);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "migrated through a symlink: {err}");
    assert!(err.contains("attrs") && err.contains("symlink"), "{err}");
    let outside_inodes: Vec<u64> = ["cap", "suid", "sparse"]
        .iter()
        .map(|f| {
            std::fs::metadata(outside.join("attrs").join(f))
                .unwrap()
                .ino()
        })
        .collect();
    let mut stack = vec![root.clone()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() && p != layer.join("attrs") {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if m.is_file() && p.starts_with(root.join(migrate_tool::journal::TMP)) {
            assert!(
                !outside_inodes.contains(&m.ino()),
                "{} links to a file outside",
                p.display()
            );
        }
    }
    assert!(!daemon_json.exists(), "dockerd's config untouched");
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
    let out = on_root("migrate", &root, &daemon_json);
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

#[test]
fn migrate_to_strata_makes_images_run_on_containerd_with_strata() {
    use strata_fs_tests::containerd::Containerd;
    use strata_fs_tests::daemon::Daemon;
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    let root = d.data_root();
    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    let daemon_json = s.root.path().join("daemon.json");
    let out = tool(
        &[
            "migrate",
            "--data-root",
            root.to_str().unwrap(),
            "--daemon-json",
            daemon_json.to_str().unwrap(),
            "--to",
            "strata",
            "--containerd-address",
            c.address.to_str().unwrap(),
            "--namespace",
            &c.namespace,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("imported docker.io/library/app:1"),
        "{stdout}"
    );
    // Unpacked into Strata before anything runs: the chain is there, committed.
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(
        ls.lines().filter(|l| l.contains("Committed")).count() >= 2,
        "{ls}"
    );
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        "docker.io/library/app:1",
        "from-docker",
        "cat",
        "/data/f",
    ]);
    assert_eq!(out.trim(), "kept");
}

#[test]
fn too_little_free_space_blocks_the_migration() {
    let (s, mut d) = overlay_v1_fixture();
    d.stop();
    // The data root on a small tmpfs that is almost full.
    let small = tempfile::tempdir().unwrap();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap()
        .success());
    let root = small.path().join("docker");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(d.data_root())
        .arg(&root)
        .status()
        .unwrap()
        .success());
    let fill = small.path().join("fill");
    let free = |p: &Path| {
        let v = nix::sys::statvfs::statvfs(p).unwrap();
        v.blocks_available() * v.fragment_size()
    };
    let avail = free(small.path());
    std::fs::write(&fill, vec![1u8; (avail - (8 << 20)) as usize]).unwrap();
    let daemon_json = s.root.path().join("daemon.json");
    let out = on_root("migrate", &root, &daemon_json);
    let err = String::from_utf8_lossy(&out.stderr);
    let refused = !out.status.success() && err.contains("bytes free") && err.contains("free space");
    let _ = std::fs::remove_file(&fill);
    let _ = nix::mount::umount2(small.path(), nix::mount::MntFlags::MNT_DETACH);
    assert!(refused, "{err}");
}
