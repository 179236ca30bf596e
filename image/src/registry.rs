//! An OCI distribution (registry) client: references, manifests, blobs (whole or by range) and
//! pushes, with Bearer/Basic auth from `WWW-Authenticate` and `~/.docker/config.json`, plain HTTP
//! for localhost and configured insecure hosts, timeouts, and retries with backoff.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;

use crate::content::Digest;

/// Media types a manifest request accepts.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}: expected [host[:port]/]name[:tag][@sha256:...]")]
    Reference(String),
    #[error("{what}: {status} {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: {source}")]
    Transport {
        what: String,
        source: Box<ureq::Transport>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Auth(String),
    #[error("{what}: the registry sent content with digest {actual}, not {expected}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `docker.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    /// `library/busybox`
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let bad = || RegistryError::Reference(s.to_string());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|_| bad())?.to_string())),
            None => (s, None),
        };
        let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(c) => (&rest[..slash + c], Some(rest[slash + c + 1..].to_string())),
            None => (rest, None),
        };
        let first = name.split('/').next().unwrap_or("");
        let (registry, repository) = if name.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost")
        {
            (first.to_string(), name[first.len() + 1..].to_string())
        } else if name.contains('/') {
            ("docker.io".to_string(), name.to_string())
        } else {
            ("docker.io".to_string(), format!("library/{name}"))
        };
        let tag_ok = tag.as_deref().is_none_or(valid_tag);
        if s.len() > 255 || !valid_repository(&repository) || !valid_registry(&registry) || !tag_ok
        {
            return Err(bad());
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".into())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

/// `a/b-c/d.e`: components of lowercase letters and digits joined by `.`, `_`, `__` or dashes,
/// as the distribution spec allows (so never `..`, never empty, never a control character).
fn valid_repository(r: &str) -> bool {
    r.split('/').all(|c| {
        let b = c.as_bytes();
        let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        !b.is_empty()
            && alnum(&b[0])
            && alnum(&b[b.len() - 1])
            && b.iter().all(|x| alnum(x) || b"._-".contains(x))
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("._")
            && !c.contains("_.")
    })
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub(crate) fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|x| x.is_ascii_alphanumeric() || b"_.-".contains(x))
}

/// A registry host: letters, digits, `.`, `-`, an optional `:port`, or a bracketed IPv6 address.
fn valid_registry(r: &str) -> bool {
    !r.is_empty()
        && !r.contains("..")
        && r.bytes()
            .all(|x| x.is_ascii_alphanumeric() || b".-:[]".contains(&x))
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Blobs larger than this are uploaded in pieces of this size.
const UPLOAD_CHUNK: usize = 16 << 20;

/// Client settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hosts reached over plain HTTP (localhost and 127.0.0.1 always are).
    pub insecure: Vec<String>,
    pub timeout: Duration,
    pub retries: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            insecure: Vec::new(),
            timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

/// A registry client; cheap to share between threads.
pub struct Client {
    agent: ureq::Agent,
    opts: Options,
    /// Bearer tokens by (registry, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
}

fn docker_credentials(registry: &str) -> Option<(String, String)> {
    let home = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))?;
    let text = std::fs::read_to_string(home.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let keys = if registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/",
            "docker.io",
            "index.docker.io",
        ]
    } else {
        vec![registry]
    };
    let entry = keys
        .iter()
        .find_map(|k| auths.get(*k).or_else(|| auths.get(&format!("https://{k}"))))?;
    let auth = entry.get("auth")?.as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn param<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("{key}=\""))? + key.len() + 2;
    let end = header[start..].find('"')? + start;
    Some(&header[start..end])
}

impl Client {
    pub fn new(opts: Options) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .redirects(5)
            .build();
        Client {
            agent,
            opts,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn base(&self, registry: &str) -> String {
        let host = registry.split(':').next().unwrap_or(registry);
        let plain = host == "localhost"
            || host == "127.0.0.1"
            || host == "[::1]"
            || self
                .opts
                .insecure
                .iter()
                .any(|h| h == registry || h == host);
        let api = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        format!("{}://{api}/v2", if plain { "http" } else { "https" })
    }

    fn token(&self, registry: &str, scope: &str) -> Option<String> {
        self.tokens
            .lock()
            .get(&(registry.to_string(), scope.to_string()))
            .cloned()
    }

    /// Answers a 401 challenge, remembering the token for the scope.
    fn authenticate(
        &self,
        registry: &str,
        scope: &str,
        challenge: &str,
    ) -> Result<(), RegistryError> {
        let creds = docker_credentials(registry);
        let value = if challenge.to_ascii_lowercase().starts_with("basic") {
            let (u, p) = creds.ok_or_else(|| RegistryError::Auth(format!("{registry} wants a login: run `docker login {registry}` (credentials are read from ~/.docker/config.json)")))?;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        } else {
            let realm = param(challenge, "realm").ok_or_else(|| {
                RegistryError::Auth(format!("{registry}: unsupported challenge {challenge:?}"))
            })?;
            let mut req = self
                .agent
                .get(realm)
                .query("scope", param(challenge, "scope").unwrap_or(scope));
            if let Some(service) = param(challenge, "service") {
                req = req.query("service", service);
            }
            if let Some((u, p)) = &creds {
                req = req.set(
                    "Authorization",
                    &format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                    ),
                );
            }
            let what = format!("token for {registry} ({scope})");
            let resp = req.call().map_err(|e| classify(&what, e))?;
            let v: serde_json::Value = serde_json::from_reader(resp.into_reader())
                .map_err(|e| RegistryError::Auth(format!("{what}: {e}")))?;
            let t = v
                .get("token")
                .or_else(|| v.get("access_token"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| RegistryError::Auth(format!("{what}: no token in the answer")))?;
            format!("Bearer {t}")
        };
        self.tokens
            .lock()
            .insert((registry.to_string(), scope.to_string()), value);
        Ok(())
    }

    /// Sends a request built by `make`, answering one auth challenge and retrying transient
    /// failures with backoff.
    fn send(
        &self,
        r: &Reference,
        push: bool,
        what: &str,
        make: &dyn Fn(&ureq::Agent) -> ureq::Request,
        body: Option<&[u8]>,
    ) -> Result<ureq::Response, RegistryError> {
        let scope = format!(
            "repository:{}:{}",
            r.repository,
            if push { "pull,push" } else { "pull" }
        );
        let mut attempt = 0;
        let mut authed = false;
        loop {
            let mut req = make(&self.agent);
            if let Some(t) = self.token(&r.registry, &scope) {
                req = req.set("Authorization", &t);
            }
            let result = match body {
                Some(b) => req.send_bytes(b),
                None => req.call(),
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if !authed => {
                    authed = true;
                    let challenge = resp
                        .header("www-authenticate")
                        .unwrap_or("Bearer")
                        .to_string();
                    self.authenticate(&r.registry, &scope, &challenge)?;
                }
                Err(ureq::Error::Status(code, _))
                    if (code >= 500 || code == 429) && attempt < self.opts.retries =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                Err(ureq::Error::Transport(_)) if attempt < self.opts.retries => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                Err(e) => return Err(classify(what, e)),
            }
        }
    }

    /// A plain GET of `url` (for ADD of remote files), with this client's timeouts.
    pub fn get(&self, url: &str) -> Result<Box<dyn Read + Send + Sync>, RegistryError> {
        let what = format!("GET {url}");
        self.agent
            .get(url)
            .call()
            .map(|r| r.into_reader())
            .map_err(|e| classify(&what, e))
    }

    /// The manifest (or index) of `r`: bytes, media type, digest (verified when pinned).
    pub fn manifest(&self, r: &Reference) -> Result<(Vec<u8>, String, String), RegistryError> {
        let url = format!(
            "{}/{}/manifests/{}",
            self.base(&r.registry),
            r.repository,
            r.object()
        );
        let what = format!("fetch manifest of {r}");
        let resp = self.send(
            r,
            false,
            &what,
            &|a| a.get(&url).set("Accept", ACCEPT),
            None,
        )?;
        let media = resp
            .header("content-type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(16 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Io {
                what: what.clone(),
                source: e,
            })?;
        let digest = Digest::of(&bytes).to_string();
        if let Some(want) = &r.digest {
            if *want != digest {
                return Err(RegistryError::Digest {
                    what,
                    expected: want.clone(),
                    actual: digest,
                });
            }
        }
        Ok((bytes, media, digest))
    }

    /// Streams blob `digest` of `r` into `out`, returning its size. The caller verifies content
    /// (e.g. by writing into the content store with the expected digest).
    pub fn blob(
        &self,
        r: &Reference,
        digest: &str,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        let url = format!("{}/{}/blobs/{digest}", self.base(&r.registry), r.repository);
        let what = format!("fetch blob {digest} of {}", r.repository);
        let resp = self.send(r, false, &what, &|a| a.get(&url), None)?;
        std::io::copy(&mut resp.into_reader(), out)
            .map_err(|e| RegistryError::Io { what, source: e })
    }

    /// Bytes `start..end` of blob `digest` (an HTTP Range read, answered 206).
    pub fn blob_range(
        &self,
        r: &Reference,
        digest: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/{}/blobs/{digest}", self.base(&r.registry), r.repository);
        let what = format!("read bytes {start}-{end} of blob {digest}");
        let range = format!("bytes={start}-{}", end.saturating_sub(1));
        let resp = self.send(r, false, &what, &|a| a.get(&url).set("Range", &range), None)?;
        if resp.status() != 206 {
            return Err(RegistryError::Status {
                what,
                status: resp.status(),
                body: "the registry ignored the Range header".into(),
            });
        }
        let mut buf = Vec::with_capacity((end - start) as usize);
        resp.into_reader()
            .take(end - start)
            .read_to_end(&mut buf)
            .map_err(|e| RegistryError::Io { what, source: e })?;
        Ok(buf)
    }

    /// Uploads a blob unless the registry has it (monolithic upload: POST then PUT ?digest=).
    pub fn push_blob(&self, r: &Reference, digest: &str, data: &[u8]) -> Result<(), RegistryError> {
        let base = self.base(&r.registry);
        let head = format!("{base}/{}/blobs/{digest}", r.repository);
        if let Ok(resp) = self.send(r, true, "check blob", &|a| a.head(&head), None) {
            if resp.status() == 200 {
                return Ok(());
            }
        }
        let what = format!("push blob {digest} to {}", r.repository);
        let start = format!("{base}/{}/blobs/uploads/", r.repository);
        let resp = self.send(r, true, &what, &|a| a.post(&start), Some(&[]))?;
        let location = resp
            .header("location")
            .ok_or_else(|| RegistryError::Status {
                what: what.clone(),
                status: resp.status(),
                body: "no Location for the upload".into(),
            })?;
        let absolute = |l: &str| {
            if l.starts_with("http") {
                l.to_string()
            } else {
                format!("{}{l}", base.trim_end_matches("/v2"))
            }
        };
        let location = absolute(location);
        // Large blobs go up in chunks (PATCH with Content-Range), so a slow link never has
        // one request longer than the timeout allows; small ones in the closing PUT.
        let mut location = location;
        let mut body: &[u8] = data;
        if data.len() > UPLOAD_CHUNK {
            for (i, piece) in data.chunks(UPLOAD_CHUNK).enumerate() {
                let from = i * UPLOAD_CHUNK;
                let range = format!("{from}-{}", from + piece.len() - 1);
                let resp = self.send(
                    r,
                    true,
                    &what,
                    &|a| {
                        a.request("PATCH", &location)
                            .set("Content-Type", "application/octet-stream")
                            .set("Content-Range", &range)
                    },
                    Some(piece),
                )?;
                if let Some(next) = resp.header("location") {
                    location = absolute(next);
                }
            }
            body = &[];
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        self.send(
            r,
            true,
            &what,
            &|a| a.put(&put).set("Content-Type", "application/octet-stream"),
            Some(body),
        )?;
        Ok(())
    }

    /// Uploads a manifest under `r`'s tag (or digest); returns its digest.
    pub fn push_manifest(
        &self,
        r: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let url = format!(
            "{}/{}/manifests/{}",
            self.base(&r.registry),
            r.repository,
            r.object()
        );
        let what = format!("push manifest {r}");
        self.send(
            r,
            true,
            &what,
            &|a| a.put(&url).set("Content-Type", media_type),
            Some(bytes),
        )?;
        Ok(Digest::of(bytes).to_string())
    }
}

fn classify(what: &str, e: ureq::Error) -> RegistryError {
    match e {
        ureq::Error::Status(401, _) => RegistryError::Auth(format!("{what}: unauthorized: log in with `docker login` (credentials are read from ~/.docker/config.json)")),
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            RegistryError::Status { what: what.to_string(), status: code, body: body.chars().take(300).collect() }
        }
        ureq::Error::Transport(t) => RegistryError::Transport { what: what.to_string(), source: Box::new(t) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("latest"))
        );
        let r = Reference::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/app@{d}")).unwrap();
        assert_eq!(
            (r.tag.clone(), r.digest.as_deref()),
            (None, Some(d.as_str()))
        );
        assert_eq!(r.to_string(), format!("localhost/app@{d}"));
        assert!(Reference::parse("UPPER/case").is_err());
        for bad in [
            "../x",
            "a/../b",
            "a/./b",
            "a\nb:1",
            "app:\u{1b}[31mred",
            "app:../x",
            "app:",
            "a//b",
            "-a",
            "reg.example/app:v1\r",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Reference::parse("reg.example:5000/a_b/c-d.e__f:v1.2-x_y").is_ok());
        assert!(Reference::parse("app@sha256:short").is_err());
    }

    #[test]
    fn challenge_params() {
        let c = r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#;
        assert_eq!(param(c, "realm"), Some("https://auth.example/token"));
        assert_eq!(param(c, "service"), Some("registry.example"));
        assert_eq!(param(c, "missing"), None);
    }
}
