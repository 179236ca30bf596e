//! Restart benchmark: 40 containers started at once through containerd on Strata, and 1.5 s in
//! the snapshotter is (a) left alone, (b) killed with SIGKILL and started again 100 ms later on a
//! socket it binds itself, (c) the same with the socket held by a supervisor (systemd's socket
//! activation), (d) restarted gracefully (`strata-snapshotter restart`, the binary on disk
//! replaced). For each: failed starts, and the p50/p99 of the start-to-exit time of `ctr run`.
//!
//! `restart-bench [CONTAINERS] [ROUNDS]` (default 40 and 3).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_benches::Row;

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::spawn_activated;
use strata_fs_tests::image::busybox_layer;
use strata_fs_tests::workspace_bin;

const BUSYBOX: &str = "docker.io/strata/busybox:1";

#[derive(Clone, Copy, PartialEq)]
enum Event {
    None,
    KillBound,
    KillActivated,
    Restart,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::None => "no restart",
            Event::KillBound => "SIGKILL, socket bound by the daemon",
            Event::KillActivated => "SIGKILL, socket activation",
            Event::Restart => "strata-snapshotter restart",
        }
    }
}

/// A snapshotter under test and how it was started.
struct Snapshotter {
    child: Child,
    bin: std::path::PathBuf,
    root: std::path::PathBuf,
    socket: std::path::PathBuf,
    listener: Option<OwnedFd>,
}

impl Snapshotter {
    fn start(dir: &Path, activated: bool) -> Snapshotter {
        let bin = dir.join("bin/strata-snapshotter");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(workspace_bin("strata-snapshotter"), &bin).unwrap();
        let (root, socket) = (dir.join("root"), dir.join("strata.sock"));
        let listener = activated.then(|| {
            std::os::unix::net::UnixListener::bind(&socket)
                .unwrap()
                .into()
        });
        let mut s = Snapshotter {
            child: Command::new("true").spawn().unwrap(),
            bin,
            root,
            socket,
            listener,
        };
        s.child = s.spawn();
        s
    }

    fn spawn(&self) -> Child {
        if let Some(l) = &self.listener {
            return spawn_activated(&self.root, l, &self.root.with_extension("log"));
        }
        Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Kills it and starts it again 100 ms later (the shipped unit's RestartSec).
    fn kill_and_respawn(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if self.listener.is_none() {
            // A killed daemon leaves its socket: the next one replaces it (nobody answers).
            let _ = std::fs::remove_file(&self.socket);
        }
        self.child = self.spawn();
    }

    /// Replaces the binary on disk and asks the daemon to hand over to it.
    fn restart(&self) {
        let staged = self.bin.with_extension("new");
        std::fs::copy(workspace_bin("strata-snapshotter"), &staged).unwrap();
        std::fs::rename(&staged, &self.bin).unwrap();
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .arg("restart")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(mut self) {
        let pid = std::fs::read_to_string(self.root.join("snapshotter.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round: `n` starts with `event` 1.5 s in; (seconds of each successful start, failures).
fn round(n: usize, event: Event) -> (Vec<f64>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Snapshotter::start(dir.path(), event == Event::KillActivated);
    let c = Containerd::start(&s.socket);
    c.wait_for_snapshotter("strata");
    c.import(BUSYBOX, &[busybox_layer().finish()]);
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let name = format!("c{i}");
            let mut cmd = c.ctr_command(&[
                "run",
                "--rm",
                "--snapshotter",
                "strata",
                BUSYBOX,
                &name,
                "/bin/true",
            ]);
            std::thread::spawn(move || {
                let t = Instant::now();
                let ok = cmd.output().unwrap().status.success();
                (t.elapsed().as_secs_f64(), ok)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    match event {
        Event::None => {}
        Event::KillBound | Event::KillActivated => s.kill_and_respawn(),
        Event::Restart => s.restart(),
    }
    let results: Vec<(f64, bool)> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    let times = results
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| t)
        .collect();
    drop(c);
    s.stop();
    strata_fs_tests::detach_mounts_under(dir.path());
    (times, failed)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("CONTAINERS and ROUNDS are numbers"))
        .collect();
    let n = args.first().copied().unwrap_or(40);
    let rounds = args.get(1).copied().unwrap_or(3);
    println!(
        "restart-bench: {n} containers started at once, the event 1.5 s in, {rounds} rounds each"
    );
    let mut quiet_p50 = f64::NAN;
    for event in [
        Event::None,
        Event::KillBound,
        Event::KillActivated,
        Event::Restart,
    ] {
        let (mut times, mut failed) = (Vec::new(), 0);
        for _ in 0..rounds {
            let (t, f) = round(n, event);
            times.extend(t);
            failed += f;
        }
        println!(
            "  {:<38} failed starts {failed:>3} of {:>3}; start p50 {:.2}s p99 {:.2}s",
            event.name(),
            n * rounds,
            percentile(&mut times, 0.5),
            percentile(&mut times, 0.99)
        );
        let p50 = percentile(&mut times, 0.5);
        let case = format!("{n} container starts, {}: p50", event.name());
        let row = Row::new("restart", &case, "s", p50);
        if let Event::None = event {
            quiet_p50 = p50;
            row.report();
        } else {
            row.against("no restart", quiet_p50).report();
        }
        let case = format!("{n} container starts, {}: failed starts", event.name());
        Row::new("restart", &case, "", failed as f64).report();
    }
}
