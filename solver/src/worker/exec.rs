//! Running an exec op: the input snapshot mounted as a container root, a generated OCI runtime
//! spec, and runc (or `--oci-runtime`) with its output streamed line by line.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceType, ProcessBuilder, RootBuilder, Spec, UserBuilder};

use super::{rootfs, WorkerError};
use crate::llb;

/// What one exec needs besides its root.
pub struct ExecSpec<'a> {
    pub meta: &'a llb::Meta,
    /// Mounts besides the root, and environment (secrets as env) added at run time.
    pub extra: &'a [super::mounts::SpecMount],
    pub extra_env: &'a [String],
    pub network: llb::NetMode,
    pub runtime: &'a str,
    pub state_dir: &'a Path,
    pub id: &'a str,
    /// A frontend, not a build step: read-only root, no capabilities, root user without a
    /// passwd lookup.
    pub sandbox: bool,
    /// Set when the build is cancelled: the process is killed.
    pub cancel: &'a std::sync::atomic::AtomicBool,
}

/// Where a process's standard output goes.
pub enum Stdout<'a> {
    /// Line by line to a log, like stderr.
    Log(&'a (dyn Fn(&str) + Sync)),
    /// Kept as bytes (at most this many; more is an error).
    Capture(usize),
}

/// Docker's default capability set: what RUN steps expect (chown, setuid for package managers,
/// writing files root does not own, ...).
fn docker_capabilities() -> Result<oci_spec::runtime::LinuxCapabilities, oci_spec::OciSpecError> {
    use oci_spec::runtime::Capability::*;
    let caps: std::collections::HashSet<oci_spec::runtime::Capability> = [
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
    .into_iter()
    .collect();
    oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
}

/// Lines kept for the error message of a failed command.
const TAIL: usize = 10;

fn spec(rootfs_dir: &Path, e: &ExecSpec) -> Result<Spec, WorkerError> {
    let (uid, gid) = if e.sandbox {
        (0, 0)
    } else {
        rootfs::user(rootfs_dir, &e.meta.user).map_err(WorkerError::Exec)?
    };
    let cwd = if e.meta.cwd.is_empty() {
        "/".to_string()
    } else {
        e.meta.cwd.clone()
    };
    // BuildKit creates the working directory when it is missing.
    let cwd_path =
        rootfs::resolve(rootfs_dir, &cwd, true).map_err(|e| WorkerError::Exec(e.to_string()))?;
    if !cwd_path.exists() && !e.sandbox {
        super::tree::mkdir_all(&cwd_path, (uid, gid))
            .map_err(|err| WorkerError::Exec(format!("create working directory {cwd}: {err}")))?;
    }
    let build = |e: oci_spec::OciSpecError| WorkerError::Exec(format!("runtime spec: {e}"));
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(e.meta.args.clone())
        .env([e.meta.env.clone(), e.extra_env.to_vec()].concat())
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(build)?,
        )
        .no_new_privileges(true)
        .capabilities(if e.sandbox {
            let none = oci_spec::runtime::Capabilities::new();
            oci_spec::runtime::LinuxCapabilitiesBuilder::default()
                .bounding(none.clone())
                .effective(none.clone())
                .permitted(none.clone())
                .inheritable(none.clone())
                .ambient(none)
                .build()
                .map_err(build)?
        } else {
            docker_capabilities().map_err(build)?
        })
        .build()
        .map_err(build)?;
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in e.extra {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&m.dest)
                .typ(m.kind)
                .source(&m.source)
                .options(m.options.clone())
                .build()
                .map_err(build)?,
        );
    }
    spec.set_mounts(Some(mounts));
    spec.set_hostname(Some("strata".into()));
    spec.set_root(Some(
        RootBuilder::default()
            .path(rootfs_dir)
            .readonly(e.sandbox)
            .build()
            .map_err(build)?,
    ));
    if let Some(linux) = spec.linux_mut() {
        if e.network != llb::NetMode::None {
            if let Some(ns) = linux.namespaces_mut() {
                ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
            }
        }
        // No cgroup namespace juggling: runc's defaults place the step under its own cgroup.
        linux.set_cgroups_path(None);
    }
    Ok(spec)
}

/// Runs the command in `rootfs_dir`, streaming output lines to `log`. Returns when it exits;
/// a non-zero exit is an error carrying the exit code and the last lines of output.
pub fn run(
    rootfs_dir: &Path,
    e: &ExecSpec,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(), WorkerError> {
    run_with(rootfs_dir, e, log, Stdout::Log(log)).map(drop)
}

/// [`run`] with a choice of where stdout goes; returns what was captured.
pub fn run_with(
    rootfs_dir: &Path,
    e: &ExecSpec,
    log: &(dyn Fn(&str) + Sync),
    stdout: Stdout,
) -> Result<Vec<u8>, WorkerError> {
    let bundle: PathBuf = e.state_dir.join("bundles").join(e.id);
    fs::create_dir_all(&bundle)
        .map_err(|err| WorkerError::Exec(format!("create bundle {}: {err}", bundle.display())))?;
    let spec = spec(rootfs_dir, e)?;
    spec.save(bundle.join("config.json"))
        .map_err(|err| WorkerError::Exec(format!("write runtime spec: {err}")))?;
    let runtime_root = e.state_dir.join("runtime");
    let mut child = runtime_command(e.runtime, &runtime_root)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(e.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| {
            WorkerError::Exec(format!(
                "cannot start OCI runtime {:?}: {err}; install runc or pass --oci-runtime",
                e.runtime
            ))
        })?;
    let tail = parking_lot::Mutex::new(std::collections::VecDeque::new());
    let captured = parking_lot::Mutex::new((Vec::new(), false));
    let status = std::thread::scope(|s| {
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let mut logged = vec![Box::new(err) as Box<dyn std::io::Read + Send>];
        match stdout {
            Stdout::Log(_) => logged.push(Box::new(out)),
            Stdout::Capture(limit) => {
                let captured = &captured;
                s.spawn(move || {
                    use std::io::Read;
                    let mut out = out;
                    let mut buf = Vec::new();
                    let r = (&mut out).take(limit as u64 + 1).read_to_end(&mut buf);
                    let over = buf.len() > limit || r.is_err();
                    // Drained so that a chatty process is never blocked on a full pipe.
                    let _ = std::io::copy(&mut out, &mut std::io::sink());
                    *captured.lock() = (buf, over);
                });
            }
        }
        for stream in logged {
            let tail = &tail;
            s.spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log(&line);
                    let mut t = tail.lock();
                    t.push_back(line);
                    if t.len() > TAIL {
                        t.pop_front();
                    }
                }
            });
        }
        wait_or_cancel(&mut child, e, &runtime_root)
    });
    // `run` in the foreground deletes the container when its process exits; one is left only
    // when the runtime itself was killed (Ctrl-C) or crashed. A stat, not a runtime process.
    if runtime_root.join(e.id).exists() {
        let _ = runtime_command(e.runtime, &runtime_root)
            .args(["delete", "-f", e.id])
            .stderr(Stdio::null())
            .status();
    }
    let _ = fs::remove_dir_all(&bundle);
    let status =
        status.map_err(|err| WorkerError::Exec(format!("waiting for {}: {err}", e.runtime)))?;
    let (out, over) = captured.into_inner();
    match status {
        None => Err(WorkerError::Cancelled),
        Some(_) if over => Err(WorkerError::Exec(format!(
            "{}: standard output is larger than the limit",
            e.meta.args.join(" ")
        ))),
        Some(s) if s.success() => Ok(out),
        Some(s) => {
            let tail: Vec<String> = tail.into_inner().into_iter().collect();
            Err(WorkerError::ExitCode {
                command: e.meta.args.join(" "),
                code: s.code().unwrap_or(-1),
                tail: tail.join("\n"),
            })
        }
    }
}

/// The OCI runtime with its state under `root`, ready for a subcommand.
fn runtime_command(runtime: &str, root: &Path) -> Command {
    let mut c = Command::new(runtime);
    c.arg("--root").arg(root);
    c
}

/// Waits for the runtime's exit, or kills the container when the step is cancelled (`None`).
/// The wait blocks in a thread of its own, so a step ends when its process does, not at the
/// next tick of a poll.
fn wait_or_cancel(
    child: &mut std::process::Child,
    e: &ExecSpec,
    runtime_root: &Path,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            let _ = tx.send(child.wait());
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(status) => return status.map(Some),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(std::io::Error::other("the wait for the runtime ended"))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if e.cancel.load(Ordering::SeqCst) {
                let _ = runtime_command(e.runtime, runtime_root)
                    .args(["kill", e.id, "KILL"])
                    .status();
                if rx.recv_timeout(Duration::from_secs(5)).is_err() {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = rx.recv();
                }
                return Ok(None);
            }
        }
    })
}

/// Kills and deletes the containers a killed builder left in the runtime state under
/// `state_dir`, and their bundles.
pub fn remove_containers(runtime: &str, state_dir: &Path) {
    let runtime_root = state_dir.join("runtime");
    if !runtime_root.exists() {
        return;
    }
    let listed = runtime_command(runtime, &runtime_root)
        .args(["list", "-q"])
        .stderr(Stdio::null())
        .output();
    let ids = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    for id in ids.unwrap_or_default().lines().filter(|l| !l.is_empty()) {
        tracing::info!(id, "removing a container an interrupted build left");
        let _ = runtime_command(runtime, &runtime_root)
            .args(["delete", "-f", id])
            .stderr(Stdio::null())
            .status();
    }
    if let Ok(rd) = fs::read_dir(state_dir.join("bundles")) {
        for e in rd.flatten() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
