//! Restart and binary upgrade without a service manager (SIGUSR2, as nginx and haproxy do it).
//!
//! The running daemon starts its successor — whatever binary is at its path now — with the
//! listening socket as descriptor 3 and a pipe as descriptor 4 (`STRATA_HANDOVER_FDS=3,4`). The
//! successor says `r` when it has read its config and is ready to take over; only then does the
//! predecessor stop accepting, finish the calls in flight and close the metadata database. The
//! successor opens it (retrying while the predecessor still holds its lock), says `s` once it
//! serves, and the predecessor exits. Calls made in between wait in the socket's backlog. A
//! successor that fails before `r` is stopped and the predecessor carries on; one that fails after
//! it makes the predecessor open the database again and serve on.
//!
//! Under systemd, use the socket unit and `systemctl restart` instead: the socket outlives the
//! process the same way, and systemd keeps track of one main process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The variable that tells a successor which descriptors it was handed.
const ENV: &str = "STRATA_HANDOVER_FDS";
/// How long a successor may take to say it is ready, and then to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const SERVING_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's process id, for `strata-snapshotter restart`.
pub fn pid_file(root: &Path) -> PathBuf {
    root.join("snapshotter.pid")
}

/// Why the last upgrade failed (removed when one starts).
fn failure_file(root: &Path) -> PathBuf {
    root.join("upgrade.failed")
}

/// Records this process as the one serving `root`.
pub fn write_pid(root: &Path) -> std::io::Result<()> {
    let staged = root.join(".snapshotter.pid.tmp");
    std::fs::write(&staged, format!("{}\n", std::process::id()))?;
    std::fs::rename(staged, pid_file(root))
}

/// A successor's side of the handover.
pub struct Handover {
    pub listener: UnixListener,
    /// The predecessor bound the socket's path itself (the last process removes it).
    pub bound: bool,
    pipe: File,
}

impl Handover {
    /// The descriptors a predecessor handed this process, if it was started by one. Taken once:
    /// the variable is removed and the descriptors made close-on-exec.
    pub fn take() -> anyhow::Result<Option<Handover>> {
        let Some(fds) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        std::env::remove_var(ENV);
        let bound = match fds.to_str() {
            Some("3,4") => false,
            Some("3,4,bound") => true,
            _ => bail!("{ENV}={fds:?}: a predecessor hands over descriptors 3,4"),
        };
        for fd in [3, 4] {
            let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
            nix::fcntl::fcntl(fd, cloexec).context("handover: set close-on-exec")?;
        }
        // SAFETY: by the protocol descriptors 3 and 4 are ours, and the variable is gone, so they
        // are taken only once.
        let (listener, pipe) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
        let listener = UnixListener::from(listener);
        listener
            .set_nonblocking(true)
            .context("handover: non-blocking")?;
        let mut h = Handover {
            listener,
            bound,
            pipe: File::from(pipe),
        };
        h.say(b'r')?;
        Ok(Some(h))
    }

    /// Tells the predecessor this process serves; it exits then.
    pub fn serving(mut self) -> anyhow::Result<()> {
        self.say(b's')
    }

    fn say(&mut self, what: u8) -> anyhow::Result<()> {
        self.pipe
            .write_all(&[what])
            .context("handover: tell the predecessor")
    }
}

/// A successor this process started, ready to take over.
pub struct Successor {
    child: Child,
    pipe: File,
}

/// Starts `exe` (with this process's arguments) as the successor serving `listener` (whose path
/// this process bound, when `bound`), and waits until it is ready to take over. On failure it is
/// stopped and this process carries on.
pub fn start_successor(
    exe: &Path,
    listener: &UnixListener,
    bound: bool,
    root: &Path,
) -> anyhow::Result<Successor> {
    let _ = std::fs::remove_file(failure_file(root));
    let (read, write) = nix::unistd::pipe().context("handover pipe")?;
    let (sock, tell) = (listener.as_raw_fd(), write.as_raw_fd());
    let mut cmd = Command::new(exe);
    let fds = if bound { "3,4,bound" } else { "3,4" };
    cmd.args(std::env::args_os().skip(1)).env(ENV, fds);
    // SAFETY: only dup2, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(sock, 3), (tell, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("start the successor {}", exe.display()))?;
    drop(write);
    let mut s = Successor {
        child,
        pipe: File::from(read),
    };
    if let Err(e) = s.expect(b'r', READY_TIMEOUT) {
        return Err(s.failed(root, e));
    }
    Ok(s)
}

impl Successor {
    /// Waits until the successor serves (this process has let go of the database by now).
    pub fn wait_serving(mut self, root: &Path) -> anyhow::Result<()> {
        match self.expect(b's', SERVING_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(root, e)),
        }
    }

    /// Reads the successor's next word; an early end (it died) or a timeout is an error.
    fn expect(&mut self, want: u8, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let fd = self.pipe.as_raw_fd();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the successor did not answer within {}s", timeout.as_secs());
            }
            let mut fds = [libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd for the length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, left.as_millis() as i32) };
            if n <= 0 {
                continue; // timeout (rechecked above) or EINTR
            }
            let mut b = [0u8];
            match self.pipe.read(&mut b) {
                Ok(1) if b[0] == want => return Ok(()),
                Ok(1) => bail!(
                    "the successor said {:?}, not {:?}",
                    b[0] as char,
                    want as char
                ),
                _ => bail!("the successor exited before it served (see its log above)"),
            }
        }
    }

    /// Stops the successor and records why the upgrade failed.
    fn failed(&mut self, root: &Path, e: anyhow::Error) -> anyhow::Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::write(failure_file(root), format!("{e:#}\n"));
        e
    }
}

/// `strata-snapshotter restart`: asks the daemon serving `root` to hand over to the binary now on
/// disk, and waits until the successor serves.
pub fn request_restart(root: &Path) -> anyhow::Result<u32> {
    let read_pid = || -> Option<i32> {
        std::fs::read_to_string(pid_file(root))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let Some(old) = read_pid() else {
        bail!(
            "no strata-snapshotter serves {}: {} is missing",
            root.display(),
            pid_file(root).display()
        );
    };
    let _ = std::fs::remove_file(failure_file(root));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGUSR2)
        .with_context(|| format!("signal the daemon (pid {old}); is it running? try systemctl restart strata-snapshotter"))?;
    let wait = READY_TIMEOUT + SERVING_TIMEOUT + Duration::from_secs(10);
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(why) = std::fs::read_to_string(failure_file(root)) {
            bail!("the successor failed, pid {old} serves on: {}", why.trim());
        }
        match read_pid() {
            Some(new) if new != old => return Ok(new as u32),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    bail!(
        "pid {old} did not hand over within {}s: see its log",
        wait.as_secs()
    )
}
