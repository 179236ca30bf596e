//! kill -9 at random points of a stream of prepare/commit/remove: the next start must repair the
//! root so that metadata and directories agree, and containerd must still run containers.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{rngs::StdRng, Rng, SeedableRng};
use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{Daemon, Snap};
use strata_fs_tests::image::busybox_layer;
use strata_fs_tests::require_root;
use strata_snapshotter::layout::Entry;
use strata_snapshotter::store::Kind;
use strata_snapshotter::{Options, Snapshots};
use tonic::Code;

const OPS: usize = 500;

/// The errors a call may get because the daemon was killed under it: Unavailable, Cancelled, or
/// the Unknown ("transport error", "h2 protocol error: ...") that tonic gives a connection or
/// HTTP/2 stream cut by the dying process. Any other error, and
/// any error at all while no kill is in flight, is a real failure (Store, Io and Corrupt errors
/// are `Internal`: they must never pass for a dropped connection).
fn killed_under_it(status: &tonic::Status, kill_in_flight: bool) -> bool {
    let m = status.message();
    let cut_stream = status.code() == Code::Unknown
        && (m == "transport error" || m.starts_with("h2 protocol error"));
    kill_in_flight && (matches!(status.code(), Code::Unavailable | Code::Cancelled) || cut_stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_at_random_points_is_repaired_at_next_start() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("strata-crash-")
        .tempdir()
        .unwrap();
    let mut d = Daemon::start_in(dir.path());
    let mut s = Snap::new(&d).await;
    // Snapshots the loop never removes: they must come through every crash intact.
    s.layer("stable-base", "", |p| {
        std::fs::write(p.join("kept"), "kept across crashes").unwrap()
    })
    .await;
    s.prepare("stable-active", "stable-base").await;
    let mut rng = StdRng::seed_from_u64(0x5747a7a);
    let mut kills = 0;
    let mut killer: Option<std::thread::JoinHandle<()>> = None;
    let mut until_kill = rng.gen_range(5..30);

    for i in 0..OPS {
        until_kill -= 1;
        if until_kill == 0 && killer.is_none() {
            // SIGKILL from another thread a few hundred microseconds in: it lands mid-operation.
            let pid = Pid::from_raw(d.pid() as i32);
            let delay = Duration::from_micros(rng.gen_range(0..4000));
            killer = Some(std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = kill(pid, Signal::SIGKILL);
            }));
            until_kill = rng.gen_range(5..30);
        }
        let result = match s.try_list(&[]).await {
            Err(e) => Err(e),
            Ok(all) => {
                let committed: Vec<String> = all
                    .iter()
                    .filter(|i| i.kind == 3)
                    .map(|i| i.name.clone())
                    .collect();
                let active: Vec<String> = all
                    .iter()
                    .filter(|i| i.kind == 2)
                    .map(|i| i.name.clone())
                    .collect();
                let parents: HashSet<String> = all.iter().map(|i| i.parent.clone()).collect();
                match rng.gen_range(0..3) {
                    0 => {
                        let parent = if committed.is_empty() || rng.gen_bool(0.2) {
                            String::new()
                        } else {
                            committed[rng.gen_range(0..committed.len())].clone()
                        };
                        s.try_prepare(&format!("active-{i}"), &parent)
                            .await
                            .map(drop)
                    }
                    1 if active.len() > 1 => {
                        let active: Vec<&String> = active
                            .iter()
                            .filter(|k| !k.starts_with("stable-"))
                            .collect();
                        let key = active[rng.gen_range(0..active.len())];
                        s.try_commit(&format!("committed-{i}"), key).await
                    }
                    _ => {
                        let leaves: Vec<&String> = all
                            .iter()
                            .map(|i| &i.name)
                            .filter(|n| !parents.contains(*n) && !n.starts_with("stable-"))
                            .collect();
                        match leaves.is_empty() {
                            true => Ok(()),
                            false => s.try_remove(leaves[rng.gen_range(0..leaves.len())]).await,
                        }
                    }
                }
            }
        };
        if let Err(e) = result {
            if !killed_under_it(&e, killer.is_some()) {
                panic!(
                    "operation {i} failed with a real error (kill in flight: {}): {e}\n{}",
                    killer.is_some(),
                    d.log_text()
                );
            }
        }
        if let Some(k) = killer.as_ref() {
            if k.is_finished() {
                killer.take().unwrap().join().unwrap();
                d.kill9();
                kills += 1;
                d.start_again();
                s = Snap::new(&d).await;
            }
        }
    }
    if let Some(k) = killer.take() {
        k.join().unwrap();
        d.kill9();
        kills += 1;
        d.start_again();
    }
    assert!(kills >= 10, "only {kills} kills");
    d.kill9();

    // What the next start sees: every record has its directory and link, every directory a record.
    let snapshots = Snapshots::open(&d.root, Options::default()).unwrap();
    let report = snapshots.cleanup().unwrap();
    assert!(
        report.missing.is_empty(),
        "records without directories: {:?}",
        report.missing
    );
    assert!(
        report.removed.is_empty(),
        "the start-up cleanup left strays: {:?}",
        report.removed
    );
    let all = snapshots.list(&[]).unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
    let stable = snapshots
        .stat("stable-active")
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {names:?}\n{}",
                d.log_text()
                    .lines()
                    .filter(|l| l.contains("stable"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
        .record;
    assert_eq!(
        (stable.kind, stable.parent.as_str()),
        (Kind::Active, "stable-base")
    );
    let base = snapshots.stat("stable-base").unwrap().record;
    let kept = std::fs::read_to_string(snapshots.layout().fs_dir(base.id).join("kept")).unwrap();
    assert_eq!(kept, "kept across crashes");
    let owned: HashSet<u64> = all.iter().map(|s| s.record.id).collect();
    for (path, entry) in snapshots.layout().entries().unwrap() {
        match entry {
            Entry::Snapshot(id) | Entry::Link(id) => {
                assert!(owned.contains(&id), "unowned {}", path.display())
            }
            Entry::Stray => panic!("stray {}", path.display()),
        }
    }
    for snap in &all {
        assert!(
            snapshots.layout().fs_dir(snap.record.id).is_dir(),
            "{} lost its directory",
            snap.key
        );
        assert!(
            snapshots.layout().link(snap.record.id).exists(),
            "{} lost its link",
            snap.key
        );
        if snap.record.kind != Kind::Committed {
            snapshots.mounts(&snap.key).unwrap();
        }
        if !snap.record.parent.is_empty() {
            assert_eq!(
                snapshots.stat(&snap.record.parent).unwrap().record.kind,
                Kind::Committed
            );
        }
    }
    drop(snapshots);

    // And containerd still runs a container on it.
    d.start_again();
    let c = Containerd::start(&d.socket);
    c.import(
        "docker.io/strata/busybox:crash",
        &[busybox_layer().finish()],
    );
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        "docker.io/strata/busybox:crash",
        "after-crash",
        "/bin/echo",
        "alive",
    ]);
    assert_eq!(out.trim(), "alive");
    println!("{kills} kills during {OPS} operations; root repaired");
}
