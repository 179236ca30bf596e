//! An ssh agent in the build process, for `--ssh ID=KEYFILE[,KEYFILE...]`: it holds unencrypted
//! private keys and answers the two requests a client needs (list identities, sign), as in the
//! agent protocol (draft-miller-ssh-agent). Keys with a passphrase belong in the user's own agent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use ssh_encoding::Encode;
use ssh_key::{Algorithm, HashAlg, PrivateKey};

use crate::spec::InvalidSpec;

const FAILURE: u8 = 5;
const REQUEST_IDENTITIES: u8 = 11;
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_REQUEST: u8 = 13;
const SIGN_RESPONSE: u8 = 14;
const RSA_SHA2_256: u32 = 2;
const RSA_SHA2_512: u32 = 4;
/// Requests are small (a key blob and a session hash); anything larger is not an agent client.
const MAX_MESSAGE: usize = 256 << 10;

/// Keys loaded from files.
pub struct Keys {
    keys: Vec<PrivateKey>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} keys)", self.keys.len())
    }
}

impl Keys {
    /// Loads OpenSSH private keys; refuses encrypted ones with the fix.
    pub fn load(id: &str, paths: &[&Path]) -> Result<Keys, InvalidSpec> {
        let mut keys = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--ssh {id}: cannot read key {}: {e}", path.display()))?;
            let key = PrivateKey::from_openssh(&text)
                .or_else(|e| {
                    padded_ecdsa(&text)
                        .and_then(|blob| PrivateKey::from_bytes(&blob).ok())
                        .ok_or(e)
                })
                .map_err(|e| {
                format!(
                    "--ssh {id}: {} is not an OpenSSH private key ({e}); convert it with `ssh-keygen -p -f {}` or load it into ssh-agent and pass --ssh {id}=$SSH_AUTH_SOCK",
                    path.display(),
                    path.display()
                )
            })?;
            if key.is_encrypted() {
                return Err(format!(
                    "--ssh {id}: key {} has a passphrase; add it to your agent (`ssh-add {}`) and pass --ssh {id}=$SSH_AUTH_SOCK",
                    path.display(),
                    path.display()
                ).into());
            }
            keys.push(key);
        }
        Ok(Keys { keys })
    }

    /// Answers requests on `stream` until the client closes it.
    pub fn serve(&self, mut stream: UnixStream) {
        loop {
            let mut len = [0u8; 4];
            if stream.read_exact(&mut len).is_err() {
                return;
            }
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 || len > MAX_MESSAGE {
                return;
            }
            let mut msg = vec![0u8; len];
            if stream.read_exact(&mut msg).is_err() {
                return;
            }
            let reply = self.answer(&msg).unwrap_or_else(|| vec![FAILURE]);
            let mut out = (reply.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }

    fn answer(&self, msg: &[u8]) -> Option<Vec<u8>> {
        match msg[0] {
            REQUEST_IDENTITIES => {
                let mut out = vec![IDENTITIES_ANSWER];
                out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
                for k in &self.keys {
                    put_string(&mut out, &k.public_key().to_bytes().ok()?);
                    put_string(&mut out, k.comment().as_bytes());
                }
                Some(out)
            }
            SIGN_REQUEST => {
                let mut rest = &msg[1..];
                let blob = take_string(&mut rest)?;
                let data = take_string(&mut rest)?;
                let flags = rest
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                    .unwrap_or(0);
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.public_key().to_bytes().ok().as_deref() == Some(blob))?;
                let sig = match key.key_data().rsa() {
                    Some(rsa) => sign_rsa(rsa, data, flags)?,
                    None => signature::Signer::try_sign(key, data).ok()?,
                };
                let mut encoded = Vec::new();
                sig.encode(&mut encoded).ok()?;
                let mut out = vec![SIGN_RESPONSE];
                put_string(&mut out, &encoded);
                Some(out)
            }
            _ => None,
        }
    }
}

/// An `rsa-sha2-512` or `rsa-sha2-256` signature, as `flags` ask; the SHA-1 `ssh-rsa` form (no
/// flag) is refused, as OpenSSH 8.8+ servers refuse it.
fn sign_rsa(
    k: &ssh_key::private::RsaKeypair,
    data: &[u8],
    flags: u32,
) -> Option<ssh_key::Signature> {
    use sha2::Digest;
    let big = |m: &ssh_key::Mpint| rsa::BigUint::try_from(m).ok();
    let key = rsa::RsaPrivateKey::from_components(
        big(&k.public.n)?,
        big(&k.public.e)?,
        big(&k.private.d)?,
        vec![big(&k.private.p)?, big(&k.private.q)?],
    )
    .ok()?;
    let (hash, bytes) = if flags & RSA_SHA2_512 != 0 {
        let digest = sha2::Sha512::digest(data);
        (
            HashAlg::Sha512,
            key.sign(rsa::Pkcs1v15Sign::new::<sha2::Sha512>(), &digest),
        )
    } else if flags & RSA_SHA2_256 != 0 {
        let digest = sha2::Sha256::digest(data);
        (
            HashAlg::Sha256,
            key.sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest),
        )
    } else {
        return None;
    };
    ssh_key::Signature::new(Algorithm::Rsa { hash: Some(hash) }, bytes.ok()?).ok()
}

/// The binary form of an unencrypted OpenSSH ECDSA key file whose private scalar is shorter
/// than its curve's size, the scalar padded with zeros. OpenSSH writes the scalar as a minimal
/// mpint, so about one P-256 key in 256 has a shorter one, which ssh-key 0.6.7 refuses
/// ("length invalid"). None for any other key: nothing to mend.
fn padded_ecdsa(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let magic = b"openssh-key-v1\0";
    let mut rest = blob.strip_prefix(magic)?;
    let (cipher, kdf, options) = (
        take_string(&mut rest)?,
        take_string(&mut rest)?,
        take_string(&mut rest)?,
    );
    if cipher != b"none" || rest.get(..4)? != 1u32.to_be_bytes() {
        return None;
    }
    rest = &rest[4..];
    let public = take_string(&mut rest)?;
    let mut private = take_string(&mut rest)?;
    let checks = private.get(..8)?;
    private = &private[8..];
    let kind = take_string(&mut private)?;
    let size = match kind {
        b"ecdsa-sha2-nistp256" => 32,
        b"ecdsa-sha2-nistp384" => 48,
        _ => return None,
    };
    let (curve, point, scalar, comment) = (
        take_string(&mut private)?,
        take_string(&mut private)?,
        take_string(&mut private)?,
        take_string(&mut private)?,
    );
    if scalar.len() >= size {
        return None;
    }
    let mut section = checks.to_vec();
    for field in [
        kind,
        curve,
        point,
        &[vec![0; size - scalar.len()], scalar.to_vec()].concat(),
        comment,
    ] {
        put_string(&mut section, field);
    }
    // The private section is padded 1, 2, 3, ... to the cipher's block size (8 for none).
    for pad in 1..=7u8 {
        if section.len() % 8 == 0 {
            break;
        }
        section.push(pad);
    }
    let mut out = magic.to_vec();
    for field in [cipher, kdf, options] {
        put_string(&mut out, field);
    }
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, public);
    put_string(&mut out, &section);
    Some(out)
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn take_string<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let s = rest.get(4..4 + len)?;
    *rest = &rest[4 + len..];
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use signature::Verifier;
    use ssh_encoding::Decode;

    fn keygen(dir: &Path, kind: &str) -> std::path::PathBuf {
        let key = dir.join(kind);
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", kind, "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen (openssh-client)")
            .success();
        assert!(ok);
        key
    }

    #[test]
    fn lists_and_signs_with_every_key_type() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = ["ed25519", "ecdsa", "rsa"]
            .iter()
            .map(|k| keygen(dir.path(), k))
            .collect();
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let keys = Keys::load("t", &refs).unwrap();
        let list = keys.answer(&[REQUEST_IDENTITIES]).unwrap();
        assert_eq!(list[0], IDENTITIES_ANSWER);
        assert_eq!(&list[1..5], &3u32.to_be_bytes());
        for (path, flags) in paths.iter().zip([0u32, 0, 4]).chain([(&paths[2], 2)]) {
            let public = ssh_key::PublicKey::from_openssh(
                &std::fs::read_to_string(path.with_extension("pub")).unwrap(),
            )
            .unwrap();
            let mut req = vec![SIGN_REQUEST];
            put_string(&mut req, &public.to_bytes().unwrap());
            put_string(&mut req, b"session hash");
            req.extend_from_slice(&flags.to_be_bytes());
            let reply = keys
                .answer(&req)
                .unwrap_or_else(|| panic!("{} refused", path.display()));
            assert_eq!(reply[0], SIGN_RESPONSE);
            let mut rest = &reply[1..];
            let mut blob = take_string(&mut rest).unwrap();
            let sig = ssh_key::Signature::decode(&mut blob).unwrap();
            public.key_data().verify(b"session hash", &sig).unwrap();
        }
        // An unknown key or message: failure, never a panic.
        assert!(keys.answer(&[SIGN_REQUEST, 0, 0, 0, 9]).is_none());
        assert!(keys.answer(&[99]).is_none());
    }

    /// A P-256 key whose scalar OpenSSH wrote in 31 bytes (generated for this test only).
    const SHORT_SCALAR_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAaAAAABNlY2RzYS
1zaGEyLW5pc3RwMjU2AAAACG5pc3RwMjU2AAAAQQTPFp+DiUgY0H6O5Fmot5SCSlw3ltI9
xEv87xJgUnJFNsC8aJPueqh/cS9FS14Bvizrbya4ac9LhKPpD6Q9/bY7AAAAqHzB3nV8wd
51AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBM8Wn4OJSBjQfo7k
Wai3lIJKXDeW0j3ES/zvEmBSckU2wLxok+56qH9xL0VLXgG+LOtvJrhpz0uEo+kPpD39tj
sAAAAfKilORCeQWi2kaZa+1KvavjpTk2L1PK6fWznYt6oVgAAAAAxzaG9ydC1zY2FsYXIB
AgMEBQ==
-----END OPENSSH PRIVATE KEY-----
";
    const SHORT_SCALAR_PUB: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBM8Wn4OJSBjQfo7kWai3lIJKXDeW0j3ES/zvEmBSckU2wLxok+56qH9xL0VLXgG+LOtvJrhpz0uEo+kPpD39tjs= short-scalar";

    #[test]
    fn ecdsa_keys_with_a_short_scalar_load_and_sign() {
        assert!(
            PrivateKey::from_openssh(SHORT_SCALAR_KEY).is_err(),
            "ssh-key alone refuses it"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, SHORT_SCALAR_KEY).unwrap();
        let keys = Keys::load("t", &[path.as_path()]).unwrap();
        let public = ssh_key::PublicKey::from_openssh(SHORT_SCALAR_PUB).unwrap();
        assert_eq!(keys.keys[0].public_key().key_data(), public.key_data());
        let mut req = vec![SIGN_REQUEST];
        put_string(&mut req, &public.to_bytes().unwrap());
        put_string(&mut req, b"session hash");
        req.extend_from_slice(&0u32.to_be_bytes());
        let reply = keys.answer(&req).unwrap();
        let mut rest = &reply[1..];
        let mut blob = take_string(&mut rest).unwrap();
        let sig = ssh_key::Signature::decode(&mut blob).unwrap();
        public.key_data().verify(b"session hash", &sig).unwrap();
        // Other keys are left to ssh-key as they are.
        assert!(padded_ecdsa("not a key").is_none());
    }
}
