//! containerd's snapshotter test suite, case by case, against a real strata-snapshotter over its
//! gRPC socket. Every case mounts the returned mounts for real and checks what is in them.

use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use strata_fs_tests::daemon::{Daemon, Labels, Snap};
use strata_fs_tests::mount::Mounted;
use strata_fs_tests::{require_root, tree};
use tonic::Code;

async fn setup() -> (Daemon, Snap) {
    require_root();
    let d = Daemon::start();
    let s = Snap::new(&d).await;
    (d, s)
}

fn write(root: &Path, rel: &str, data: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

const ACTIVE: i32 = 2;
const VIEW: i32 = 1;
const COMMITTED: i32 = 3;

#[tokio::test(flavor = "multi_thread")]
async fn basic_prepare_commit_view_walk() {
    let (_d, mut s) = setup().await;
    let m = Mounted::new(&s.prepare("preparing", "").await);
    write(m.path(), "foo", "foo\n");
    write(m.path(), "a/b/c", "abc\n");
    m.unmount();
    s.commit("committed", "preparing").await;
    assert_eq!(
        s.try_stat("preparing").await.unwrap_err().code(),
        Code::NotFound
    );
    let info = s.stat("committed").await;
    assert_eq!((info.kind, info.parent.as_str()), (COMMITTED, ""));

    let m = Mounted::new(&s.prepare("next-preparing", "committed").await);
    assert_eq!(read(m.path(), "foo"), "foo\n");
    assert_eq!(read(m.path(), "a/b/c"), "abc\n");
    write(m.path(), "bar", "bar\n");
    fs::remove_file(m.join("foo")).unwrap();
    m.unmount();
    s.commit("next-committed", "next-preparing").await;
    let info = s.stat("next-committed").await;
    assert_eq!((info.kind, info.parent.as_str()), (COMMITTED, "committed"));

    let v = Mounted::new(&s.view("view", "next-committed").await);
    assert!(!v.join("foo").exists());
    assert_eq!(read(v.path(), "bar"), "bar\n");
    assert_eq!(read(v.path(), "a/b/c"), "abc\n");
    assert_eq!(s.stat("view").await.kind, VIEW);
    drop(v);

    assert_eq!(s.names(&[]).await, ["committed", "next-committed", "view"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn stat_active_and_committed() {
    let (_d, mut s) = setup().await;
    s.layer("base", "", |p| write(p, "x", "1")).await;
    s.prepare("active", "base").await;
    let a = s.stat("active").await;
    assert_eq!(
        (a.name.as_str(), a.kind, a.parent.as_str()),
        ("active", ACTIVE, "base")
    );
    let c = s.stat("base").await;
    assert_eq!(
        (c.name.as_str(), c.kind, c.parent.as_str()),
        ("base", COMMITTED, "")
    );
    assert!(c.created_at.is_some() && c.updated_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn parents_are_transitive() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| write(p, "one", "1")).await;
    s.layer("l2", "l1", |p| write(p, "two", "2")).await;
    s.layer("l3", "l2", |p| write(p, "three", "3")).await;
    assert_eq!(s.stat("l3").await.parent, "l2");
    assert_eq!(s.stat("l2").await.parent, "l1");
    assert_eq!(s.stat("l1").await.parent, "");
    let v = Mounted::new(&s.view("v", "l3").await);
    for (f, c) in [("one", "1"), ("two", "2"), ("three", "3")] {
        assert_eq!(read(v.path(), f), c);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prepare_and_view_refuse_existing_keys() {
    let (_d, mut s) = setup().await;
    s.layer("base", "", |_| {}).await;
    s.prepare("k1", "base").await;
    assert_eq!(
        s.try_view("k1", "base").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        s.try_prepare("k1", "base").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    s.view("k2", "base").await;
    assert_eq!(
        s.try_prepare("k2", "base").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        s.try_prepare("base", "").await.unwrap_err().code(),
        Code::AlreadyExists
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn update_labels_times_and_immutable_fields() {
    let (_d, mut s) = setup().await;
    let labels: Labels = [
        ("l1".to_string(), "v1".to_string()),
        ("l2".into(), "v2".into()),
    ]
    .into();
    s.prepare("a", "").await;
    s.try_commit_labels("c", "a", labels.clone()).await.unwrap();
    let before = s.stat("c").await;
    assert_eq!(before.labels, labels);

    let mut info = before.clone();
    info.labels = [
        ("l1".to_string(), "changed".to_string()),
        ("l3".into(), "v3".into()),
    ]
    .into();
    let after = s
        .try_update(info.clone(), &["labels.l1", "labels.l3"])
        .await
        .unwrap();
    let want: Labels = [
        ("l1".to_string(), "changed".to_string()),
        ("l2".into(), "v2".into()),
        ("l3".into(), "v3".into()),
    ]
    .into();
    assert_eq!(after.labels, want);
    assert_eq!(after.created_at, before.created_at);
    assert_ne!(after.updated_at, before.updated_at);

    // A label path absent from the given labels deletes the label.
    let after = s.try_update(info.clone(), &["labels.l2"]).await.unwrap();
    assert!(!after.labels.contains_key("l2"));
    // No paths: replace all labels.
    let after = s.try_update(info.clone(), &[]).await.unwrap();
    assert_eq!(after.labels, info.labels);
    assert_eq!(s.stat("c").await.labels, info.labels);

    for field in [
        "name",
        "kind",
        "parent",
        "created_at",
        "updated_at",
        "bogus",
    ] {
        let err = s.try_update(info.clone(), &[field]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{err}");
    }
    let mut missing = info.clone();
    missing.name = "nope".into();
    assert_eq!(
        s.try_update(missing, &["labels"]).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_and_reuse_keys() {
    let (_d, mut s) = setup().await;
    s.layer("base", "", |p| write(p, "f", "base")).await;
    s.prepare("work", "base").await;
    assert_eq!(
        s.try_remove("base").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    s.remove("work").await;
    assert_eq!(
        s.try_remove("work").await.unwrap_err().code(),
        Code::NotFound
    );
    // The key is free again, and the reuse sees the parent's files, not the old upper.
    let m = Mounted::new(&s.prepare("work", "base").await);
    assert_eq!(read(m.path(), "f"), "base");
    write(m.path(), "g", "new");
    drop(m);
    s.remove("work").await;
    let m = Mounted::new(&s.prepare("work", "base").await);
    assert!(!m.join("g").exists());
    drop(m);
    s.remove("work").await;
    s.remove("base").await;
    s.layer("base", "", |p| write(p, "f", "again")).await;
    let v = Mounted::new(&s.view("v", "base").await);
    assert_eq!(read(v.path(), "f"), "again");
}

#[tokio::test(flavor = "multi_thread")]
async fn walk_with_filters() {
    let (_d, mut s) = setup().await;
    let l = |k: &str, v: &str| -> Labels { [(k.to_string(), v.to_string())].into() };
    s.prepare("a", "").await;
    s.try_commit_labels("base", "a", l("containerd.io/snapshot/tier", "gold"))
        .await
        .unwrap();
    s.prepare("b", "").await;
    s.try_commit_labels("other", "b", l("plain", "x y"))
        .await
        .unwrap();
    s.prepare("child", "base").await;
    s.view("look", "other").await;

    assert_eq!(s.names(&["kind==committed"]).await, ["base", "other"]);
    assert_eq!(s.names(&["kind==active"]).await, ["child"]);
    assert_eq!(s.names(&["kind==view"]).await, ["look"]);
    assert_eq!(s.names(&["name==child"]).await, ["child"]);
    assert_eq!(s.names(&["parent==base"]).await, ["child"]);
    assert_eq!(
        s.names(&[r#"labels."containerd.io/snapshot/tier"==gold"#])
            .await,
        ["base"]
    );
    assert_eq!(
        s.names(&[r#"labels."containerd.io/snapshot/tier""#]).await,
        ["base"]
    );
    assert_eq!(s.names(&["labels.plain==x y"]).await, ["other"]);
    assert_eq!(s.names(&["kind==committed,name==other"]).await, ["other"]);
    assert_eq!(s.names(&["kind==view|name==base"]).await, ["base", "look"]);
    assert_eq!(
        s.names(&["kind==view", "name==child"]).await,
        ["child", "look"]
    );
    assert_eq!(s.names(&["name~=^o"]).await, ["other"]);
    assert_eq!(s.names(&["kind!=committed"]).await, ["child", "look"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_updates_in_upper_layers() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| write(p, "etc/config", "one")).await;
    s.layer("l2", "l1", |p| {
        assert_eq!(read(p, "etc/config"), "one");
        write(p, "etc/config", "two");
    })
    .await;
    s.layer("l3", "l2", |p| {
        fs::OpenOptions::new()
            .append(true)
            .open(p.join("etc/config"))
            .unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(p.join("etc/config"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"+three").unwrap();
    })
    .await;
    for (name, want) in [("l1", "one"), ("l2", "two"), ("l3", "two+three")] {
        let v = Mounted::new(&s.view(&format!("v-{name}"), name).await);
        assert_eq!(read(v.path(), "etc/config"), want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_directory_of_a_lower_layer_makes_it_opaque() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        write(p, "lib/a", "a");
        write(p, "lib/sub/b", "b");
    })
    .await;
    s.layer("l2", "l1", |p| {
        fs::remove_dir_all(p.join("lib")).unwrap();
        write(p, "lib/c", "c");
    })
    .await;
    let v = Mounted::new(&s.view("v", "l2").await);
    let names: Vec<String> = fs::read_dir(v.join("lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["c"]);
    drop(v);
    let v = Mounted::new(&s.view("v1", "l1").await);
    assert_eq!(read(v.path(), "lib/sub/b"), "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn chown_in_lower_layers() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        write(p, "dir/file", "x");
        chown(p.join("dir"), Some(1001), Some(1002)).unwrap();
        chown(p.join("dir/file"), Some(1003), Some(1004)).unwrap();
    })
    .await;
    s.layer("l2", "l1", |p| {
        chown(p.join("dir/file"), Some(2001), Some(2002)).unwrap();
    })
    .await;
    let v = Mounted::new(&s.view("v", "l2").await);
    let d = fs::metadata(v.join("dir")).unwrap();
    assert_eq!((d.uid(), d.gid()), (1001, 1002));
    let f = fs::metadata(v.join("dir/file")).unwrap();
    assert_eq!((f.uid(), f.gid()), (2001, 2002));
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_permissions_survive_commit() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        fs::create_dir(p.join("private")).unwrap();
        fs::set_permissions(p.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(p.join("sticky")).unwrap();
        fs::set_permissions(p.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    })
    .await;
    s.layer("l2", "l1", |p| write(p, "private/x", "x")).await;
    let v = Mounted::new(&s.view("v", "l2").await);
    assert_eq!(
        fs::metadata(v.join("private")).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        fs::metadata(v.join("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_an_intermediate_snapshot() {
    let (_d, mut s) = setup().await;
    s.layer("base", "", |p| write(p, "b", "b")).await;
    s.layer("mid", "base", |p| write(p, "m", "m")).await;
    s.prepare("top", "mid").await;
    let err = s.try_remove("mid").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("mid"), "{err}");
    s.remove("top").await;
    s.remove("mid").await;
    s.remove("base").await;
    assert!(s.names(&[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_files_in_a_child_are_whiteouts() {
    let (d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        write(p, "keep", "k");
        write(p, "gone", "g");
        write(p, "dir/gone-too", "g");
    })
    .await;
    s.layer("l2", "l1", |p| {
        fs::remove_file(p.join("gone")).unwrap();
        fs::remove_file(p.join("dir/gone-too")).unwrap();
    })
    .await;
    let v = Mounted::new(&s.view("v", "l2").await);
    assert!(v.join("keep").exists());
    assert!(!v.join("gone").exists());
    assert!(!v.join("dir/gone-too").exists());
    drop(v);
    // On disk, the child holds overlay whiteouts: character devices 0/0.
    let found = walk_files(&d.root.join("snapshots"))
        .into_iter()
        .filter(|p| p.file_name().unwrap() == "gone")
        .filter(|p| {
            let m = fs::symlink_metadata(p).unwrap();
            std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) && m.rdev() == 0
        })
        .count();
    assert_eq!(found, 1);
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_files(&p));
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_and_hard_linking_files_from_a_lower_layer() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        write(p, "src/file", "content");
        write(p, "src/other", "other");
    })
    .await;
    s.layer("l2", "l1", |p| {
        fs::rename(p.join("src/file"), p.join("moved")).unwrap();
        fs::hard_link(p.join("src/other"), p.join("linked")).unwrap();
    })
    .await;
    let v = Mounted::new(&s.view("v", "l2").await);
    assert!(!v.join("src/file").exists());
    assert_eq!(read(v.path(), "moved"), "content");
    assert_eq!(read(v.path(), "linked"), "other");
    let a = fs::metadata(v.join("linked")).unwrap();
    let b = fs::metadata(v.join("src/other")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link keeps one inode");
}

#[tokio::test(flavor = "multi_thread")]
async fn views_are_read_only() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| write(p, "f", "x")).await;
    s.layer("l2", "l1", |p| write(p, "g", "y")).await;
    for (key, parent) in [("v1", "l1"), ("v2", "l2"), ("v0", "")] {
        let v = Mounted::new(&s.view(key, parent).await);
        let err = fs::write(v.join("new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{key}: {err}");
    }
    assert_eq!(
        s.try_commit("c", "v1").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stat_inside_walk() {
    let (_d, mut s) = setup().await;
    s.layer("a", "", |_| {}).await;
    s.layer("b", "a", |_| {}).await;
    s.prepare("c", "b").await;
    let all = s.try_list(&[]).await.unwrap();
    assert_eq!(all.len(), 3);
    for info in all {
        let st = s.stat(&info.name).await;
        assert_eq!(st, info);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_twice_and_reopen() {
    let (mut d, mut s) = setup().await;
    s.layer("a", "", |p| write(p, "f", "kept")).await;
    // Two SIGTERMs back to back (the second lands during shutdown): still one clean exit.
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    assert!(d.stop(), "SIGTERM twice exits cleanly: {}", d.log_text());
    assert!(!d.socket.exists(), "socket removed at shutdown");
    d.start_again();
    let mut s = Snap::new(&d).await;
    let v = Mounted::new(&s.view("v", "a").await);
    assert_eq!(read(v.path(), "f"), "kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn root_permission_is_0755() {
    let (_d, mut s) = setup().await;
    let m = Mounted::new(&s.prepare("a", "").await);
    assert_eq!(fs::metadata(m.path()).unwrap().mode() & 0o7777, 0o755);
    drop(m);
    s.commit("c", "a").await;
    let m = Mounted::new(&s.prepare("b", "c").await);
    assert_eq!(fs::metadata(m.path()).unwrap().mode() & 0o7777, 0o755);
}

#[tokio::test(flavor = "multi_thread")]
async fn renames() {
    let (_d, mut s) = setup().await;
    s.layer("l1", "", |p| {
        fs::create_dir(p.join("dir1")).unwrap();
        write(p, "somefiles/f1", "was here");
        write(p, "somefiles/f2", "nothing interesting");
    })
    .await;
    s.layer("l2", "l1", |p| {
        write(p, "somefiles/f1-overwrite", "new content 1");
        fs::rename(p.join("somefiles/f1-overwrite"), p.join("somefiles/f1")).unwrap();
        fs::rename(p.join("somefiles/f2"), p.join("somefiles/f3")).unwrap();
        // A directory created in this layer renames freely.
        fs::create_dir(p.join("fresh")).unwrap();
        write(p, "fresh/x", "x");
        fs::rename(p.join("fresh"), p.join("renamed")).unwrap();
    })
    .await;
    let v = Mounted::new(&s.view("v", "l2").await);
    assert_eq!(read(v.path(), "somefiles/f1"), "new content 1");
    assert!(!v.join("somefiles/f2").exists());
    assert_eq!(read(v.path(), "somefiles/f3"), "nothing interesting");
    assert_eq!(read(v.path(), "renamed/x"), "x");
    assert!(v.join("dir1").is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_measured_when_active_and_recorded_at_commit() {
    let (_d, mut s) = setup().await;
    let m = Mounted::new(&s.prepare("a", "").await);
    fs::write(m.join("big"), vec![7u8; 1 << 20]).unwrap();
    fs::hard_link(m.join("big"), m.join("big-link")).unwrap();
    let (size, inodes) = s.try_usage("a").await.unwrap();
    assert!(size >= 1 << 20, "{size}");
    assert_eq!(inodes, 2, "root dir + one file (hard link counted once)");
    drop(m);
    s.commit("c", "a").await;
    assert_eq!(s.try_usage("c").await.unwrap(), (size, inodes));
    s.view("v", "c").await;
    assert_eq!(s.try_usage("v").await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_shapes_follow_containerd() {
    let (_d, mut s) = setup().await;
    let m = s.prepare("a", "").await;
    assert_eq!(
        (m[0].r#type.as_str(), m[0].options.as_slice()),
        ("bind", &["rw".to_string(), "rbind".into()][..])
    );
    s.commit("c1", "a").await;
    let v = s.view("v1", "c1").await;
    assert_eq!(
        (v[0].r#type.as_str(), v[0].options[0].as_str()),
        ("bind", "ro")
    );
    s.prepare("b", "c1").await;
    s.commit("c2", "b").await;
    let v = s.view("v2", "c2").await;
    assert_eq!(v[0].r#type, "overlay");
    assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir")));
    let p = s.prepare("p", "c2").await;
    assert!(p[0].options.iter().any(|o| o.starts_with("upperdir")));
    assert_eq!(s.try_mounts("p").await.unwrap(), p);
    assert_eq!(
        s.try_mounts("c2").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

/// A chain of `depth` layers, each changing a few files, must equal the same changes applied to
/// one flat directory, file by file.
async fn chain_equals_flat_reference(depth: usize) {
    let (_d, mut s) = setup().await;
    let flat = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(depth as u64);
    let mut parent = String::new();
    for i in 0..depth {
        let name = format!("layer-{i}");
        let ops: Vec<(u8, usize, u32)> = (0..4)
            .map(|_| (rng.gen_range(0..4), rng.gen_range(0..40), rng.gen()))
            .collect();
        let apply = |root: &Path| {
            for (op, n, v) in &ops {
                let f = root.join(format!("d{}/f{n}", n % 5));
                match op {
                    0 | 1 => {
                        fs::create_dir_all(f.parent().unwrap()).unwrap();
                        fs::write(&f, format!("layer {i} value {v}")).unwrap();
                    }
                    2 => {
                        let _ = fs::remove_file(&f);
                    }
                    _ => {
                        if f.exists() {
                            fs::set_permissions(
                                &f,
                                fs::Permissions::from_mode(0o600 | (v & 0o077)),
                            )
                            .unwrap();
                        }
                    }
                }
            }
        };
        apply(flat.path());
        s.layer(&name, &parent, apply).await;
        parent = name;
    }
    let v = s.view("top", &parent).await;
    let opts: usize = v[0].options.iter().map(|o| o.len() + 1).sum();
    if depth >= 200 {
        // Full paths overflow the mount page: this mount exercises containerd's compaction.
        assert!(opts > 4096, "{opts}");
    }
    let v = Mounted::new(&v);
    tree::assert_same(v.path(), flat.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_of_128_layers() {
    chain_equals_flat_reference(128).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_of_200_layers() {
    chain_equals_flat_reference(200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_of_500_layers_the_kernel_limit() {
    chain_equals_flat_reference(500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn async_remove_defers_disk_reclaim_to_cleanup() {
    require_root();
    let d = Daemon::start_with(&["--async-remove"]);
    let mut s = Snap::new(&d).await;
    let m = s.prepare("a", "").await;
    let dir = Path::new(&m[0].source).to_path_buf();
    assert!(dir.is_dir());
    s.remove("a").await;
    assert_eq!(s.try_stat("a").await.unwrap_err().code(), Code::NotFound);
    assert!(
        dir.is_dir(),
        "async remove leaves the directory for Cleanup"
    );
    s.cleanup().await;
    assert!(!dir.exists(), "Cleanup reclaimed {}", dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_sets_options_and_flags_override_it() {
    require_root();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    fs::write(cfg.path(), "async_remove = true\naddress = \"/nonexistent/overridden.sock\"\n[log]\nformat = \"json\"\n").unwrap();
    let d = Daemon::start_with(&["--config", cfg.path().to_str().unwrap()]);
    let mut s = Snap::new(&d).await;
    let m = s.prepare("a", "").await;
    s.remove("a").await;
    assert!(
        Path::new(&m[0].source).is_dir(),
        "async_remove from the file applies"
    );
    assert!(
        d.log_text().lines().any(|l| l.starts_with('{')),
        "json logs: {}",
        d.log_text()
    );

    fs::write(cfg.path(), "rooot = \"/x\"\n").unwrap();
    let out = std::process::Command::new(strata_fs_tests::workspace_bin("strata-snapshotter"))
        .args(["--config", cfg.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rooot") && err.contains(cfg.path().to_str().unwrap()),
        "{err}"
    );
}
