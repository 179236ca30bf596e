//! RUN --mount=type=ssh with OpenSSH's own tools in the step: the user's ssh-agent forwarded, and
//! key files served by strata's in-process agent (listed by `ssh-add -l`, signing for
//! `ssh-keygen -Y sign`).

use std::path::Path;
use std::process::Command;

use strata_fs_tests::image;
use strata_fs_tests::strata::Strata;

fn keygen(dir: &Path, name: &str, kind: &str, passphrase: &str) -> String {
    let key = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen {kind}");
    key.display().to_string()
}

fn stack() -> Strata {
    Strata::with_image(&image::debian("python"))
}

const FROM: &str = "FROM localhost/strata-test/debian-python:bookworm\n";

#[test]
fn ssh_add_in_the_step_lists_the_key_of_the_users_agent() {
    let s = stack();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "users-agent-key", "ed25519", "");
    let sock = dir.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    s.dockerfile(&format!(
        "{FROM}RUN --mount=type=ssh,mode=0600,uid=100,gid=102 stat -c 'sock %u %g %a' $SSH_AUTH_SOCK && ssh-add -l\n"
    ));
    let b = s.build_ok(&["--ssh", &format!("default={}", sock.display())]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(b.progress.contains("sock 100 102 600"), "{}", b.progress);
    assert!(
        b.progress.contains("users-agent-key (ED25519)"),
        "{}",
        b.progress
    );
}

#[test]
fn key_files_are_served_by_strata_and_sign_in_the_step() {
    let s = stack();
    let dir = tempfile::tempdir().unwrap();
    let ed = keygen(dir.path(), "file-key-ed25519", "ed25519", "");
    let ec = keygen(dir.path(), "file-key-ecdsa", "ecdsa", "");
    let rsa = keygen(dir.path(), "file-key-rsa", "rsa", "");
    s.file(
        "ed.pub",
        &std::fs::read_to_string(format!("{ed}.pub")).unwrap(),
    );
    s.file(
        "rsa.pub",
        &std::fs::read_to_string(format!("{rsa}.pub")).unwrap(),
    );
    // ssh-keygen -Y sign with only a public key asks the agent to sign.
    s.dockerfile(&format!(
        "{FROM}COPY ed.pub rsa.pub /keys/\n\
         RUN --mount=type=ssh,id=deploy ssh-add -l && cd /tmp && echo payload > data && \
         for k in ed rsa; do ssh-keygen -q -Y sign -n file -f /keys/$k.pub data && \
         ssh-keygen -Y check-novalidate -n file -f /keys/$k.pub -s data.sig < data && rm data.sig; done\n"
    ));
    let b = s.build_ok(&["--ssh", &format!("deploy={ed},{ec},{rsa}")]);
    for name in [
        "file-key-ed25519 (ED25519)",
        "file-key-ecdsa (ECDSA)",
        "file-key-rsa (RSA)",
    ] {
        assert!(b.progress.contains(name), "{name}: {}", b.progress);
    }
    assert_eq!(
        b.progress.matches("Good \"file\" signature with").count(),
        2,
        "{}",
        b.progress
    );
    // The key never reaches the image or the cache.
    let private = std::fs::read(&ed).unwrap();
    let (_, out) = s.build_local(&["--ssh", &format!("deploy={ed}")]);
    let found = Command::new("grep")
        .args(["-rlF", std::str::from_utf8(&private[40..90]).unwrap()])
        .arg(out.path())
        .arg(s.root.path())
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&found.stdout)
    );

    // A key with a passphrase, a missing file: refused with the fix.
    let locked = keygen(dir.path(), "locked", "ed25519", "secret-pass");
    let b = s.build(&["--ssh", &format!("deploy={locked}")]);
    assert!(
        !b.ok && b.progress.contains("has a passphrase") && b.progress.contains("ssh-add"),
        "{}",
        b.progress
    );
    let b = s.build(&["--ssh", "deploy=/nonexistent/key"]);
    assert!(
        !b.ok
            && b.progress
                .contains("neither an ssh agent socket nor key files"),
        "{}",
        b.progress
    );
}
