//! Prepare / Mounts / Commit / Remove latency through containerd's own socket, snapshotter
//! `strata` (proxy) against containerd's built-in `overlayfs`, in one run on one machine.
//!
//! `snapshot-latency [ITERATIONS]` (default 300) prints median and p99 per call and the ratios.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{connect, Daemon};
use strata_snapshotter::api::snapshots::v1::{self as pb, snapshots_client::SnapshotsClient};
use tonic::transport::Channel;
use tonic::Request;

const CALLS: [&str; 4] = ["Prepare", "Mounts", "Commit", "Remove"];

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "bench".parse().unwrap());
    r
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
            labels: HashMap::new(),
        };
        self.client.prepare(req(r)).await.unwrap();
        let r = pb::CommitSnapshotRequest {
            snapshotter: sn,
            name: "base".into(),
            key: "base-active".into(),
            labels: HashMap::new(),
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
            labels: HashMap::new(),
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
        let r = pb::CommitSnapshotRequest {
            snapshotter: sn.clone(),
            name: name.clone(),
            key,
            labels: HashMap::new(),
        };
        self.client.commit(req(r)).await.unwrap();
        self.record("Commit", t);
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

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ITERATIONS is a number"))
        .unwrap_or(300);
    let strata = Daemon::start();
    let containerd = Containerd::start(&strata.socket);
    let mut runs = Vec::new();
    for sn in ["overlayfs", "strata"] {
        let client = SnapshotsClient::new(connect(&containerd.address).await);
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
        "{:<8} {:>14} {:>14} {:>14} {:>14} {:>9} {:>9}",
        "call",
        "overlayfs p50",
        "overlayfs p99",
        "strata p50",
        "strata p99",
        "p50 ratio",
        "p99 ratio"
    );
    for call in CALLS {
        let (o50, o99) = runs[0].stat(call);
        let (s50, s99) = runs[1].stat(call);
        println!(
            "{call:<8} {o50:>14.0} {o99:>14.0} {s50:>14.0} {s99:>14.0} {:>9.2} {:>9.2}",
            s50 / o50,
            s99 / o99
        );
    }
    println!("(ratio = strata / overlayfs; below 1 means Strata is faster)");
}
