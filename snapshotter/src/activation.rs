//! systemd's socket activation (`sd_listen_fds`): serving on a listening socket the service
//! manager (or any supervisor speaking the protocol) made and keeps. The socket outlives the
//! process, so calls made while the snapshotter restarts wait in its backlog instead of failing
//! with "connection refused".

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;

use anyhow::{bail, Context};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

/// The listening socket passed by `LISTEN_FDS`/`LISTEN_PID`, or `None` when this process was not
/// socket-activated. Takes it once: the variables are removed, and the descriptor is made
/// close-on-exec so that no child (the lazy layers' servers) inherits it.
pub fn inherited_listener() -> anyhow::Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None); // meant for another process (a parent that exec'd us without reset)
    }
    if fds != "1" {
        bail!("LISTEN_FDS={fds}: strata-snapshotter serves exactly one socket; give its .socket unit one ListenStream=");
    }
    // SAFETY: by the protocol descriptor 3 is ours and nothing else in this process owns it; the
    // variables are gone, so it is taken only once.
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST_FD) };
    let meta = std::fs::File::from(fd.try_clone().context("LISTEN_FDS: descriptor 3")?)
        .metadata()
        .context("LISTEN_FDS: descriptor 3")?;
    if !meta.file_type().is_socket() {
        bail!("LISTEN_FDS: descriptor 3 is not a socket: use ListenStream=/run/strata/snapshotter.sock");
    }
    nix::fcntl::fcntl(
        FIRST_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("LISTEN_FDS: set close-on-exec")?;
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .context("LISTEN_FDS: non-blocking")?;
    Ok(Some(listener))
}
