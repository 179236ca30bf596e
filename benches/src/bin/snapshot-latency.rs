//! Prepare / Mounts / Stat / Commit / Walk / Remove latency through containerd's own socket, snapshotter
//! `strata` (proxy) against containerd's built-in `overlayfs`, in one run on one machine.
//!
//! `snapshot-latency [ITERATIONS]` (default 300) prints median and p99 per call and the ratios.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strata_benches::Row;
use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{connect, Daemon};
use strata_snapshotter::api::snapshots::v1::{self as pb, snapshots_client::SnapshotsClient};
use tonic::transport::Channel;
use tonic::Request;

const CALLS: [&str; 6] = ["Prepare", "Mounts", "Stat", "Commit", "Walk", "Remove"];

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "bench".parse().unwrap());
    r
}

/// Without a lease or this label, containerd's GC may collect a snapshot between two calls.
fn gc_root() -> HashMap<String, String> {
    [("containerd.io/gc.root".to_string(), "bench".to_string())].into()
}

struct Run {
    client: SnapshotsClient<Channel>,
    snapshotter: String,
    samples: HashMap<&'static str, Vec<Duration>>,
}

impl Run {
    async fn setup(&mut self) {
        let sn = self.snapshotter.clone();
        let r = pb::PrepareSnapshotRequest {
            snapshotter: sn.clone(),
            key: "base-active".into(),
            parent: String::new(),
            labels: gc_root(),
        };
        self.client.prepare(req(r)).await.unwrap();
        let r = pb::CommitSnapshotRequest {
            snapshotter: sn,
            name: "base".into(),
            key: "base-active".into(),
            labels: gc_root(),
        };
        self.client.commit(req(r)).await.unwrap();
    }

    async fn iteration(&mut self, i: usize) {
        let sn = self.snapshotter.clone();
        let (key, name) = (format!("active-{i}"), format!("committed-{i}"));
        let t = Instant::now();
        let r = pb::PrepareSnapshotRequest {
            snapshotter: sn.clone(),
            key: key.clone(),
            parent: "base".into(),
            labels: gc_root(),
        };
        self.client.prepare(req(r)).await.unwrap();
        self.record("Prepare", t);
        let t = Instant::now();
        let r = pb::MountsRequest {
            snapshotter: sn.clone(),
            key: key.clone(),
        };
        self.client.mounts(req(r)).await.unwrap();
        self.record("Mounts", t);
        let t = Instant::now();
        let r = pb::StatSnapshotRequest {
            snapshotter: sn.clone(),
            key: key.clone(),
        };
        self.client.stat(req(r)).await.unwrap();
        self.record("Stat", t);
        let t = Instant::now();
        let r = pb::CommitSnapshotRequest {
            snapshotter: sn.clone(),
            name: name.clone(),
            key,
            labels: gc_root(),
        };
        self.client.commit(req(r)).await.unwrap();
        self.record("Commit", t);
        let t = Instant::now();
        let r = pb::ListSnapshotsRequest {
            snapshotter: sn.clone(),
            filters: Vec::new(),
        };
        let mut walk = self.client.list(req(r)).await.unwrap().into_inner();
        while walk.message().await.unwrap().is_some() {}
        self.record("Walk", t);
        let t = Instant::now();
        let r = pb::RemoveSnapshotRequest {
            snapshotter: sn,
            key: name,
        };
        self.client.remove(req(r)).await.unwrap();
        self.record("Remove", t);
    }

    fn record(&mut self, call: &'static str, start: Instant) {
        self.samples.entry(call).or_default().push(start.elapsed());
    }

    fn stat(&self, call: &str) -> (f64, f64) {
        let mut v = self.samples[call].clone();
        v.sort();
        let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
        (pick(0.5), pick(0.99))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ITERATIONS is a number"))
        .unwrap_or(300);
    let strata = Daemon::start_quiet(&[]);
    let containerd = Containerd::start(&strata.socket);
    let mut runs = Vec::new();
    // The third run calls a second strata-snapshotter's own socket (containerd's GC would collect
    // snapshots it does not know on the first): what containerd's metadata and proxy hop add.
    let direct = Daemon::start_quiet(&[]);
    for (sn, socket) in [
        ("overlayfs", &containerd.address),
        ("strata", &containerd.address),
        ("strata", &direct.socket),
    ] {
        let client = SnapshotsClient::new(connect(socket).await);
        let mut run = Run {
            client,
            snapshotter: sn.into(),
            samples: HashMap::new(),
        };
        run.setup().await;
        runs.push(run);
    }
    // Interleave in blocks so that both see the same machine state (page cache, journal, load).
    for block in 0..iterations.div_ceil(25) {
        for run in runs.iter_mut() {
            for i in block * 25..((block + 1) * 25).min(iterations) {
                run.iteration(i).await;
            }
        }
    }
    println!("snapshot latency through containerd's socket, {iterations} iterations each (µs)");
    println!(
        "{:<8} {:>13} {:>13} {:>11} {:>11} {:>9} {:>9} {:>11} {:>11}",
        "call",
        "overlayfs p50",
        "overlayfs p99",
        "strata p50",
        "strata p99",
        "p50 ratio",
        "p99 ratio",
        "direct p50",
        "direct p99"
    );
    for call in CALLS {
        let (o50, o99) = runs[0].stat(call);
        let (s50, s99) = runs[1].stat(call);
        let (d50, d99) = runs[2].stat(call);
        println!(
            "{call:<8} {o50:>13.0} {o99:>13.0} {s50:>11.0} {s99:>11.0} {:>9.2} {:>9.2} {d50:>11.0} {d99:>11.0}",
            s50 / o50,
            s99 / o99
        );
        let case = format!("{call} p50 through containerd");
        Row::new("snapshot", &case, "µs", s50)
            .against("containerd's overlayfs", o50)
            .report();
        Row::new(
            "snapshot",
            &format!("{call} p50 on its own socket"),
            "µs",
            d50,
        )
        .report();
    }
    println!("ratio = strata / overlayfs, both through containerd (below 1: Strata is faster);");
    println!(
        "direct = strata-snapshotter's own socket, without containerd's metadata and proxy hop"
    );
}
