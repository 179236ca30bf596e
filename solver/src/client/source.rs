//! The build's source as the client reads it: the Dockerfile (which must be UTF-8), the
//! `.dockerignore` that applies, and build args (a bare `NAME` takes the environment's value,
//! as docker does).

use std::path::{Path, PathBuf};

use super::ClientError;
use crate::pattern::Ignore;

/// The source file as read, and the context's ignore rules (text and parsed).
pub struct Loaded {
    pub path: PathBuf,
    pub text: String,
    pub ignore_text: String,
    pub ignore: Ignore,
}

/// Reads `file` (default `<context>/Dockerfile`) and the `.dockerignore` that applies.
pub fn load(file: Option<&Path>, context: &Path) -> Result<Loaded, ClientError> {
    let path = file.map_or_else(|| context.join("Dockerfile"), Path::to_path_buf);
    let text = read_dockerfile(&path)?;
    let ignore_text = ignore_text(&path, context)?;
    let ignore = Ignore::parse(&ignore_text);
    Ok(Loaded {
        path,
        text,
        ignore_text,
        ignore,
    })
}

fn read_dockerfile(path: &Path) -> Result<String, ClientError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::Input(format!(
            "no Dockerfile at {}: pass -f FILE or add a Dockerfile to the context",
            path.display()
        )),
        _ => ClientError::Input(format!("cannot read Dockerfile {}: {e}", path.display())),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        ClientError::Input(format!(
            "Dockerfile {}:{line}: not UTF-8 text (invalid byte at offset {at}); save it as UTF-8",
            path.display()
        ))
    })
}

/// `<Dockerfile>.dockerignore`, else the context's `.dockerignore`, else nothing ignored.
fn ignore_text(dockerfile: &Path, context: &Path) -> Result<String, ClientError> {
    let specific = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
    for p in [specific, context.join(".dockerignore")] {
        if p.is_file() {
            return std::fs::read_to_string(&p)
                .map_err(|e| ClientError::Input(format!("read {}: {e}", p.display())));
        }
    }
    Ok(String::new())
}

/// `--build-arg KEY=VALUE`, or `KEY` with the value of the environment variable (left out when
/// it is not set), as `KEY=VALUE`.
pub fn build_args(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| match a.split_once('=') {
            Some(_) => Some(a.clone()),
            None => std::env::var(a).ok().map(|v| format!("{a}={v}")),
        })
        .collect()
}
