//! The snapshotter's socket is never open to every local user, whatever the umask it starts with.
//! (Alone in its test binary: the umask is process-wide.)

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use strata_fs_tests::daemon::Daemon;

#[test]
fn the_socket_is_root_only_or_group_only_under_any_umask() {
    strata_fs_tests::require_root();
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let d = Daemon::start();
    let m = std::fs::symlink_metadata(&d.socket).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600, "umask 0 must not open the socket");

    let daemon_gid = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    let g = Daemon::start_with(&["--group", "daemon"]);
    let m = std::fs::symlink_metadata(&g.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, daemon_gid));
    assert!(
        !std::fs::read_dir(g.socket.parent().unwrap())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".strata.sock")),
        "no staged socket is left behind"
    );
}
