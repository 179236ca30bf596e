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
    // The key never reaches the image or the cache: neither its private scalar's raw bytes nor
    // the base64 text that encodes them in the key file.
    let (_, out) = s.build_local(&["--ssh", &format!("deploy={ed}")]);
    let needles = private_needles(&ed);
    let mut scanned = 0;
    for root in [out.path(), s.root.path()] {
        scanned += assert_absent(root, &needles);
    }
    assert!(scanned > 10, "only {scanned} files scanned for the key");

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

/// Byte strings only this ed25519 key file holds: its 32-byte private seed, raw, and a piece of
/// the key file's base64 text that encodes nothing but seed bytes.
fn private_needles(key: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(key).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let body = base64::engine::general_purpose::STANDARD
        .decode(lines.concat())
        .unwrap();
    // The private section holds: string pub (32), string priv (64: seed + pub), comment.
    let at = body
        .windows(4)
        .rposition(|w| w == [0, 0, 0, 64])
        .expect("an ed25519 private key of 64 bytes");
    let seed = body[at + 4..at + 36].to_vec();
    assert_eq!(
        &body[at + 36..at + 68],
        &body[at - 32..at],
        "seed then public key"
    );
    // Base64 characters 4k.. encode bytes 3k..: take the whole groups inside the seed.
    let first = (at + 4).div_ceil(3);
    let last = (at + 36) / 3;
    let joined = lines.concat();
    let piece = joined[first * 4..last * 4].to_string();
    let mut needles = vec![seed];
    // In the file the text is wrapped: search the longest part of the piece on one line.
    let line_len = lines[0].len();
    let start = first * 4;
    let split = (start / line_len + 1) * line_len;
    let (a, b) = piece.split_at((split - start).min(piece.len()));
    needles.push(if a.len() >= b.len() { a } else { b }.as_bytes().to_vec());
    assert!(needles[1].len() >= 16, "base64 needle too short");
    assert!(
        text.as_bytes()
            .windows(needles[1].len())
            .any(|w| w == &needles[1][..]),
        "the base64 needle must come from the key file itself"
    );
    needles
}

/// Asserts that no regular file under `root` contains a needle; returns how many were read.
fn assert_absent(root: &Path, needles: &[Vec<u8>]) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            n += assert_absent(&e.path(), needles);
        } else if ft.is_file() {
            let data = std::fs::read(e.path()).unwrap();
            for needle in needles {
                assert!(
                    !data.windows(needle.len()).any(|w| w == &needle[..]),
                    "private key bytes found in {}",
                    e.path().display()
                );
            }
            n += 1;
        }
    }
    n
}
