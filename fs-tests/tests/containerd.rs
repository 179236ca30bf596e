//! End to end: an unmodified containerd (Debian's 1.6) with strata-snapshotter as proxy plugin
//! `strata`, importing images and running containers with runc.

use std::path::Path;

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{Daemon, Snap};
use strata_fs_tests::image::{busybox_layer, LayerBuilder};
use strata_fs_tests::require_root;

const BUSYBOX: &str = "docker.io/strata/busybox:1";
const LAYERED: &str = "docker.io/strata/layered:1";

/// The busybox layer plus a second layer that deletes a file and makes a directory opaque.
fn layered_layers() -> Vec<Vec<u8>> {
    let mut base = busybox_layer();
    base.file("data/keep", 0o644, b"keep\n")
        .file("data/gone", 0o644, b"gone\n")
        .file("data/dir/old", 0o644, b"old\n");
    let mut top = LayerBuilder::default();
    top.dir("data", 0o755)
        .whiteout("data", "gone")
        .dir("data/dir", 0o755)
        .opaque("data/dir")
        .file("data/dir/new", 0o644, b"new\n");
    vec![base.finish(), top.finish()]
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_runs_containers_on_strata() {
    require_root();
    let mut strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    c.import(BUSYBOX, &[busybox_layer().finish()]);
    c.import(LAYERED, &layered_layers());

    // A container prints through Strata's mounts.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        BUSYBOX,
        "hello",
        "/bin/echo",
        "hello",
    ]);
    assert_eq!(out.trim(), "hello");

    // Two layers with a whiteout and an opaque directory show the merged tree.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        LAYERED,
        "layered",
        "/bin/sh",
        "-c",
        "ls /data; ls /data/dir",
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["dir", "keep", "new"]
    );

    // A container's writes land in its active snapshot's upper directory.
    c.ctr(&[
        "run",
        "--snapshotter",
        "strata",
        BUSYBOX,
        "writer",
        "/bin/sh",
        "-c",
        "echo written > /note",
    ]);
    let mut s = Snap::new(&strata).await;
    let active = s.try_list(&["kind==active"]).await.unwrap();
    let writer = active
        .iter()
        .find(|i| i.name.ends_with("/writer"))
        .expect("active snapshot of container writer");
    let mounts = s.try_mounts(&writer.name).await.unwrap();
    let upper = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .expect("overlay with upperdir");
    assert_eq!(
        std::fs::read_to_string(Path::new(upper).join("note")).unwrap(),
        "written\n"
    );

    // ctr's snapshot commands show Strata's data.
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("writer ") && l.contains("Active")),
        "{ls}"
    );
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        3,
        "busybox, layered base and top: {ls}"
    );
    let info = c.ctr(&["snapshots", "--snapshotter", "strata", "info", "writer"]);
    assert!(info.contains("\"Kind\": \"Active\""), "{info}");
    let usage = c.ctr(&["snapshots", "--snapshotter", "strata", "usage", "writer"]);
    assert!(
        usage
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("writer")),
        "{usage}"
    );

    // Restarting the snapshotter keeps every snapshot; containers still run.
    let before = s.names(&[]).await;
    strata.restart();
    let mut s = Snap::new(&strata).await;
    assert_eq!(s.names(&[]).await, before);
    // containerd's proxy connection redials with a backoff capped at 3 s: wait for it as a user would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let run = [
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        BUSYBOX,
        "again",
        "/bin/cat",
        "/etc/passwd",
    ];
    while !c
        .try_ctr(&["snapshots", "--snapshotter", "strata", "ls"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "containerd did not reconnect to strata"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = c.ctr(&run);
    assert!(out.starts_with("root:x:0:0"), "{out}");

    // Removing the container removes its snapshot: at once from containerd's view, and from
    // Strata when containerd's garbage collector runs (after each deletion, as configured).
    c.ctr(&["containers", "rm", "writer"]);
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(!ls.lines().any(|l| l.starts_with("writer ")), "{ls}");
    // Deleting a lease with --sync runs containerd's garbage collector there and then.
    let lease = c.ctr(&["leases", "create"]);
    let lease = lease
        .split_whitespace()
        .next()
        .expect("a lease id")
        .to_string();
    c.ctr(&["leases", "delete", "--sync", &lease]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let active = s.try_list(&["kind==active"]).await.unwrap();
        if active.iter().all(|i| !i.name.ends_with("/writer")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "containerd's GC never removed {active:?}\n{}",
            c.log()
                .lines()
                .filter(|l| l.contains("gc")
                    || l.contains("level=error")
                    || l.contains("level=warn"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        !Path::new(upper).exists(),
        "the removed snapshot's directory is gone"
    );
}
