//! Build secrets (`--secret id=ID,src=FILE|env=VAR`): reading them with a size cap, and masking
//! their values in everything a build prints or keeps (step output, error messages).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

/// BuildKit's cap: a secret is a key or a token, not a file tree.
pub const MAX_SECRET_BYTES: u64 = 500 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("--secret {spec:?}: {reason}; use id=ID,src=FILE or id=ID,env=VAR")]
    Spec { spec: String, reason: String },
    #[error("secret {id}: cannot read src {path}: {source}")]
    Read {
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {id}: {what} is larger than {} KiB; secrets are keys and tokens: pass bigger files with RUN --mount=type=bind", MAX_SECRET_BYTES / 1024)]
    TooLarge { id: String, what: String },
    #[error("secret {id}: environment variable {var} is not set; export it or give src=FILE")]
    NoEnv { id: String, var: String },
}

/// Parses one `--secret` value and reads the secret: (id, value).
pub fn parse(spec: &str) -> Result<(String, Vec<u8>), SecretError> {
    let bad = |reason: &str| SecretError::Spec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (mut id, mut src, mut env) = (None, None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(v.to_string()),
            Some(("env", v)) => env = Some(v.to_string()),
            Some(("type", "file" | "env")) => {}
            _ => return Err(bad(&format!("unknown part {part:?}"))),
        }
    }
    let id = id
        .or_else(|| {
            let name = Path::new(src.as_deref()?).file_name()?;
            Some(name.to_string_lossy().into_owned())
        })
        .ok_or_else(|| bad("missing id="))?;
    if id.is_empty() {
        return Err(bad("the id is empty"));
    }
    let value = match (src, env) {
        (Some(path), _) => read_file(&id, &path)?,
        (None, Some(var)) => read_env(&id, &var)?,
        (None, None) => read_env(&id, &id)?,
    };
    Ok((id, value))
}

fn read_file(id: &str, path: &str) -> Result<Vec<u8>, SecretError> {
    let err = |source| SecretError::Read {
        id: id.to_string(),
        path: path.to_string(),
        source,
    };
    let mut value = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut value)
        .map_err(err)?;
    if value.len() as u64 > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge {
            id: id.to_string(),
            what: format!("src {path}"),
        });
    }
    Ok(value)
}

fn read_env(id: &str, var: &str) -> Result<Vec<u8>, SecretError> {
    let value = std::env::var_os(var).ok_or_else(|| SecretError::NoEnv {
        id: id.to_string(),
        var: var.to_string(),
    })?;
    let value = std::os::unix::ffi::OsStringExt::into_vec(value);
    if value.len() as u64 > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge {
            id: id.to_string(),
            what: format!("environment variable {var}"),
        });
    }
    Ok(value)
}

/// What masking looks for: each secret whole, without its trailing newline, and each of its
/// lines (output is printed line by line), longest first so that no part of a longer one is left.
/// Values shorter than 3 bytes are not masked: they would blank out ordinary output.
pub fn needles(secrets: &HashMap<String, Vec<u8>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in secrets.values() {
        let s = String::from_utf8_lossy(v);
        let whole = s.trim_end_matches(['\n', '\r']);
        out.push(whole.to_string());
        out.extend(whole.lines().map(|l| l.trim_end_matches('\r').to_string()));
    }
    out.retain(|s| s.trim().len() >= 3);
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    out.dedup();
    out
}

/// `text` with every needle replaced by `****`.
pub fn mask(needles: &[String], text: &str) -> String {
    let mut out = text.to_string();
    for n in needles {
        if out.contains(n.as_str()) {
            out = out.replace(n.as_str(), "****");
        }
    }
    out
}

/// How a build asks its client for a secret's value (blocking): None if the client has none.
pub type Ask = Arc<dyn Fn(&str) -> Result<Option<Vec<u8>>, String> + Send + Sync>;

/// A build's secrets: asked of the client the first time a running step mounts one (a cached
/// step asks for nothing), then held in memory for the rest of the build.
#[derive(Clone, Default)]
pub struct Secrets {
    held: Arc<Mutex<HashMap<String, Option<Vec<u8>>>>>,
    /// The ids the client holds, and how to ask for them.
    ask: Option<(Arc<HashSet<String>>, Ask)>,
}

impl Secrets {
    pub fn new(ids: HashSet<String>, ask: Ask) -> Secrets {
        Secrets {
            held: Default::default(),
            ask: Some((Arc::new(ids), ask)),
        }
    }

    /// The value of secret `id`, if the client has it.
    pub fn get(&self, id: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = self.held.lock().get(id) {
            return Ok(v.clone());
        }
        let value = match &self.ask {
            Some((ids, ask)) if ids.contains(id) => ask(id)?,
            _ => None,
        };
        self.held.lock().insert(id.to_string(), value.clone());
        Ok(value)
    }

    /// What to mask: the values asked for so far (only those can have reached a step).
    pub fn needles(&self) -> Vec<String> {
        let held = self.held.lock();
        let values: HashMap<String, Vec<u8>> = held
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        needles(&values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_asked_for_once_and_only_if_the_client_holds_it() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let ask: Ask = Arc::new(move |id: &str| {
            log.lock().push(id.to_string());
            Ok(Some(b"t0k3n-value".to_vec()))
        });
        let s = Secrets::new(HashSet::from(["token".to_string()]), ask);
        assert!(s.needles().is_empty(), "nothing asked, nothing to mask");
        assert_eq!(s.get("token").unwrap().unwrap(), b"t0k3n-value");
        assert_eq!(s.get("token").unwrap().unwrap(), b"t0k3n-value");
        assert_eq!(s.get("other").unwrap(), None);
        assert_eq!(*asked.lock(), ["token"]);
        assert_eq!(s.needles(), ["t0k3n-value"]);
    }

    #[test]
    fn every_line_of_a_multiline_secret_is_masked() {
        let s = HashMap::from([("k".to_string(), b"line-one\nline-two\n".to_vec())]);
        let n = needles(&s);
        assert_eq!(mask(&n, "a line-two b"), "a **** b");
        assert_eq!(mask(&n, "line-one\nline-two"), "****");
        assert_eq!(mask(&n, "no"), "no");
    }

    #[test]
    fn oversized_and_nameless_secrets_are_clear_errors() {
        let e = parse("id=big,src=/dev/zero").unwrap_err().to_string();
        assert!(
            e.contains("larger than 500 KiB") && e.contains("big"),
            "{e}"
        );
        let e = parse("id=,src=/etc/hostname").unwrap_err().to_string();
        assert!(e.contains("the id is empty"), "{e}");
        let e = parse("id=x,src=/nonexistent/file").unwrap_err().to_string();
        assert!(e.contains("cannot read src /nonexistent/file"), "{e}");
    }
}
