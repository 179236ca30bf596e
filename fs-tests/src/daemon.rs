//! A `strata-snapshotter` process under a temp dir, and a gRPC client for it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use strata_snapshotter::api::snapshots::v1::snapshots_client::SnapshotsClient;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running snapshotter. Dropping it kills the process (its root stays with the `TempDir`).
pub struct Daemon {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    level: &'static str,
    child: Option<Child>,
    _dir: Option<TempDir>,
}

impl Daemon {
    /// Starts a daemon on a fresh temp dir.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts a daemon on a fresh temp dir with extra command-line `args`.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_logging("debug", args)
    }

    /// Starts a daemon on a fresh temp dir logging at its default level (`info`), as benchmarks
    /// measure it: tests log at `debug` to show what happened when they fail.
    pub fn start_quiet(args: &[&str]) -> Daemon {
        Daemon::start_logging("info", args)
    }

    fn start_logging(level: &'static str, args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("strata-")
            .tempdir()
            .unwrap();
        let mut d = Daemon::new(dir.path(), args);
        d.level = level;
        d._dir = Some(dir);
        d.spawn();
        d
    }

    /// Starts a daemon whose root, socket and log live in `dir` (kept across restarts).
    pub fn start_in(dir: &Path) -> Daemon {
        Daemon::start_in_with(dir, &[])
    }

    /// [`Daemon::start_in`] with extra arguments (kept for restarts).
    pub fn start_in_with(dir: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon::new(dir, args);
        d.spawn();
        d
    }

    fn new(dir: &Path, args: &[&str]) -> Daemon {
        Daemon {
            root: dir.join("root"),
            socket: dir.join("strata.sock"),
            log: dir.join("strata.log"),
            args: args.iter().map(|a| a.to_string()).collect(),
            level: "debug",
            child: None,
            _dir: None,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(crate::workspace_bin("strata-snapshotter"))
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--log-level")
            .arg(self.level)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn strata-snapshotter");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "strata-snapshotter exited with {status}: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "strata-snapshotter did not listen within 30s: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        match self.child.take() {
            None => true,
            Some(mut child) => {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                child.wait().map(|s| s.success()).unwrap_or(false)
            }
        }
    }

    /// Starts the daemon again on the same root and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the daemon again after a kill, on the same root and socket.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    /// A new gRPC client on the socket.
    pub async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(connect(&self.socket).await)
    }
}

impl Daemon {
    /// `strata-snapshotter status --prometheus` for this daemon's root.
    pub fn lazy_metrics(&self) -> String {
        let out = Command::new(crate::workspace_bin("strata-snapshotter"))
            .arg("--root")
            .arg(&self.root)
            .args(["status", "--prometheus"])
            .output()
            .expect("run strata-snapshotter status");
        assert!(
            out.status.success(),
            "strata-snapshotter status --prometheus failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The sum over all layers of metric `name` in Prometheus text `text`. Fails closed: a name with
/// no sample (renamed, misspelt, no layer) or a sample that is not a number panics, so that
/// "0 failures" can only come from a metric that was really read.
pub fn metric(text: &str, name: &str) -> u64 {
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect();
    assert!(
        !samples.is_empty(),
        "no sample of metric {name} in:\n{text}"
    );
    samples
        .iter()
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("metric sample {l:?} is not a number"))
        })
        .sum()
}

/// Starts strata-snapshotter on `root` serving a supervisor's `listener` as descriptor 3, the way
/// systemd's socket activation does (LISTEN_FDS=1, LISTEN_PID); output goes to `log`.
pub fn spawn_activated(root: &Path, listener: &OwnedFd, log: &Path) -> Child {
    // A copy above 3, so that dup2 onto 3 in the child always makes a new, inheritable descriptor.
    let high = nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10),
    )
    .unwrap();
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    let raw = high.as_raw_fd();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(crate::workspace_bin("strata-snapshotter"))
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(root.join("never-bound.sock"))
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: dup2 is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(high);
    child
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Lazy layers' FUSE servers outlive the daemon by design; unmounted, they exit.
        crate::detach_mounts_under(&self.root);
    }
}

/// A tonic channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            UnixStream::connect(path.clone())
        }))
        .await
        .unwrap_or_else(|e| panic!("connect to socket: {e}"))
}

/// Thin convenience over the gRPC client, for tests.
pub struct Snap {
    pub client: SnapshotsClient<Channel>,
    /// With `STRATA_LAZY_LOWERS=1`, [`Snap::layer`] makes lazy layers.
    lazy: Option<crate::lazy_lowers::LazyLowers>,
}

use std::collections::HashMap;
use strata_snapshotter::api::snapshots::v1 as pb;
use strata_snapshotter::api::types::Mount;
use tonic::Status;

pub type Labels = HashMap<String, String>;

impl Snap {
    /// A client of the snapshotter serving `socket`.
    pub async fn at(socket: &Path) -> Snap {
        Snap {
            client: SnapshotsClient::new(connect(socket).await),
            lazy: None,
        }
    }

    pub async fn new(d: &Daemon) -> Snap {
        Snap {
            client: d.client().await,
            lazy: crate::lazy_lowers::wanted().then(crate::lazy_lowers::LazyLowers::new),
        }
    }

    pub async fn try_prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: "strata".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Labels::new(),
        };
        Ok(self.client.prepare(req).await?.into_inner().mounts)
    }

    pub async fn prepare(&mut self, key: &str, parent: &str) -> Vec<Mount> {
        self.try_prepare(key, parent)
            .await
            .unwrap_or_else(|e| panic!("prepare {key}: {e}"))
    }

    pub async fn try_view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: "strata".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Labels::new(),
        };
        Ok(self.client.view(req).await?.into_inner().mounts)
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Vec<Mount> {
        self.try_view(key, parent)
            .await
            .unwrap_or_else(|e| panic!("view {key}: {e}"))
    }

    pub async fn try_mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::MountsRequest {
            snapshotter: "strata".into(),
            key: key.into(),
        };
        Ok(self.client.mounts(req).await?.into_inner().mounts)
    }

    pub async fn try_commit_labels(
        &mut self,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> Result<(), Status> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: "strata".into(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        self.client.commit(req).await.map(drop)
    }

    pub async fn try_commit(&mut self, name: &str, key: &str) -> Result<(), Status> {
        self.try_commit_labels(name, key, Labels::new()).await
    }

    pub async fn commit(&mut self, name: &str, key: &str) {
        self.try_commit(name, key)
            .await
            .unwrap_or_else(|e| panic!("commit {key} as {name}: {e}"))
    }

    pub async fn try_remove(&mut self, key: &str) -> Result<(), Status> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: "strata".into(),
            key: key.into(),
        };
        self.client.remove(req).await.map(drop)
    }

    pub async fn remove(&mut self, key: &str) {
        self.try_remove(key)
            .await
            .unwrap_or_else(|e| panic!("remove {key}: {e}"))
    }

    pub async fn try_stat(&mut self, key: &str) -> Result<pb::Info, Status> {
        let req = pb::StatSnapshotRequest {
            snapshotter: "strata".into(),
            key: key.into(),
        };
        Ok(self
            .client
            .stat(req)
            .await?
            .into_inner()
            .info
            .expect("stat returns info"))
    }

    pub async fn stat(&mut self, key: &str) -> pb::Info {
        self.try_stat(key)
            .await
            .unwrap_or_else(|e| panic!("stat {key}: {e}"))
    }

    pub async fn try_update(&mut self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, Status> {
        let req = pb::UpdateSnapshotRequest {
            snapshotter: "strata".into(),
            info: Some(info),
            update_mask: (!paths.is_empty()).then(|| prost_types_mask(paths)),
        };
        Ok(self
            .client
            .update(req)
            .await?
            .into_inner()
            .info
            .expect("update returns info"))
    }

    pub async fn try_usage(&mut self, key: &str) -> Result<(i64, i64), Status> {
        let req = pb::UsageRequest {
            snapshotter: "strata".into(),
            key: key.into(),
        };
        let u = self.client.usage(req).await?.into_inner();
        Ok((u.size, u.inodes))
    }

    pub async fn try_list(&mut self, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        };
        let mut stream = self.client.list(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(resp) = stream.message().await? {
            out.extend(resp.info);
        }
        Ok(out)
    }

    /// Names of the snapshots matching `filters`, sorted.
    pub async fn names(&mut self, filters: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = self
            .try_list(filters)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        names
    }

    pub async fn cleanup(&mut self) {
        let req = pb::CleanupRequest {
            snapshotter: "strata".into(),
        };
        self.client.cleanup(req).await.unwrap();
    }

    /// Prepares `key` on `parent`, runs `f` on the mounted tree, and commits it as `name` (or,
    /// with lazy lowers, pushes it and prepares it again as a remote snapshot named `name`).
    pub async fn layer(&mut self, name: &str, parent: &str, f: impl FnOnce(&Path)) {
        let key = format!("{name}-active");
        let mounts = self.prepare(&key, parent).await;
        let m = crate::mount::Mounted::new(&mounts);
        f(m.path());
        m.unmount();
        let Some(lazy) = self.lazy.as_mut() else {
            return self.commit(name, &key).await;
        };
        let labels = lazy.push(&mounts, name);
        self.remove(&key).await;
        let req = pb::PrepareSnapshotRequest {
            snapshotter: "strata".into(),
            key: format!("{name}-lazy"),
            parent: parent.into(),
            labels,
        };
        match self.client.prepare(req).await {
            Err(e) if e.code() == tonic::Code::AlreadyExists => {}
            other => panic!("lazy prepare of {name}: expected AlreadyExists, got {other:?}"),
        }
    }
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|s| s.to_string()).collect(),
    }
}
