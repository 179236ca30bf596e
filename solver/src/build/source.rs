//! The source of a build: the Dockerfile (or another frontend's source file), its context and
//! `.dockerignore`, build args and named contexts, compiled to LLB by the frontend that its
//! `# syntax` line names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_image::oci::ImageConfig;

use super::BuildError;
use crate::dockerfile::convert::{convert, ConvertOptions};
use crate::frontend::{self, Frontend};
use crate::llb::Definition;
use crate::pattern::Ignore;
use crate::progress::Progress;
use crate::worker::Worker;

/// Where the build's source is, and the frontend's inputs.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The Dockerfile (default: `<context>/Dockerfile`).
    pub file: Option<PathBuf>,
    pub context: PathBuf,
    /// `--build-arg KEY=VALUE`, or `KEY` to take the value from the environment.
    pub build_args: Vec<String>,
    pub target: Option<String>,
    /// `--frontend-path [NAME=]PATH`.
    pub frontend_paths: Vec<String>,
}

/// The source file as read, and the ignore rules of the context.
pub struct Loaded {
    pub path: PathBuf,
    pub text: String,
    pub ignore: Ignore,
}

/// Reads the source file and the `.dockerignore`, shown as BuildKit's internal steps.
pub fn load(source: &Source, progress: &Progress) -> Result<Loaded, BuildError> {
    let v = progress.vertex("[internal] load build definition from Dockerfile");
    let (path, text) = read_dockerfile(source)?;
    v.log(&format!("transferring dockerfile: {}B done", text.len()));
    v.done();
    let v = progress.vertex("[internal] load .dockerignore");
    let ignore = ignore_rules(&path, &source.context)?;
    v.done();
    Ok(Loaded { path, text, ignore })
}

/// The Dockerfile's text, which must be UTF-8.
pub fn read_dockerfile(source: &Source) -> Result<(PathBuf, String), BuildError> {
    let path = source
        .file
        .clone()
        .unwrap_or_else(|| source.context.join("Dockerfile"));
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BuildError::Input(format!(
            "no Dockerfile at {}: pass -f FILE or add a Dockerfile to the context",
            path.display()
        )),
        _ => BuildError::Input(format!("cannot read Dockerfile {}: {e}", path.display())),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        BuildError::Input(format!(
            "Dockerfile {}:{line}: not UTF-8 text (invalid byte at offset {at}); save it as UTF-8",
            path.display()
        ))
    })?;
    Ok((path, text))
}

/// `<Dockerfile>.dockerignore`, else the context's `.dockerignore`, else nothing ignored.
pub fn ignore_rules(dockerfile: &Path, context: &Path) -> Result<Ignore, BuildError> {
    let specific = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
    for p in [specific, context.join(".dockerignore")] {
        if p.is_file() {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| BuildError::Input(format!("read {}: {e}", p.display())))?;
            return Ok(Ignore::parse(&text));
        }
    }
    Ok(Ignore::default())
}

/// The frontend's options: build args (a bare `NAME` takes the environment's value, as docker
/// does), target, ignore rules.
pub fn convert_options(source: &Source, ignore: Ignore) -> ConvertOptions {
    let mut build_args = BTreeMap::new();
    for a in &source.build_args {
        match a.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            None => std::env::var(a)
                .ok()
                .and_then(|v| build_args.insert(a.clone(), v)),
        };
    }
    ConvertOptions {
        build_args,
        target: source.target.clone(),
        ignore,
        ..Default::default()
    }
}

/// `--build-context NAME=oci-layout:///DIR[:TAG]` (loaded into the store) or
/// `NAME=docker-image://REF`: the image FROM NAME and --from=NAME use.
pub fn named_contexts(
    worker: &Worker,
    specs: &[String],
) -> Result<BTreeMap<String, String>, BuildError> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let (name, source) = spec.split_once('=').ok_or_else(|| BuildError::Input(format!("--build-context {spec:?}: use NAME=oci-layout:///DIR[:TAG] or NAME=docker-image://REF")))?;
        let image = if let Some(path) = source.strip_prefix("oci-layout://") {
            let (dir, tag) = match path.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d, Some(t)),
                _ => (path, None),
            };
            let name = format!(
                "localhost/strata-context/{}:{}",
                name.to_ascii_lowercase(),
                tag.unwrap_or("latest")
            );
            worker.load_layout_dir(Path::new(dir), tag, &name)?
        } else if let Some(r) = source.strip_prefix("docker-image://") {
            r.to_string()
        } else {
            return Err(BuildError::Input(format!("--build-context {spec:?}: the source must be oci-layout:///DIR[:TAG] or docker-image://REF")));
        };
        out.insert(name.to_string(), image);
    }
    Ok(out)
}

/// Compiles the source to LLB and an image config with the frontend its `# syntax` line names:
/// the built-in Dockerfile frontend, or an external one run in a sandbox.
pub async fn compile(
    worker: &Arc<Worker>,
    source: &Source,
    loaded: &Loaded,
    opts: ConvertOptions,
    progress: &Arc<Progress>,
) -> Result<(Definition, ImageConfig), BuildError> {
    let syntax = crate::dockerfile::parser::syntax(&loaded.text);
    let fe = frontend::select(syntax.as_deref(), &source.frontend_paths)?;
    let (w, text) = (worker.clone(), loaded.text.clone());
    if fe == Frontend::Dockerfile {
        let c = tokio::task::spawn_blocking(move || convert(&text, &opts, &*w)).await??;
        return Ok((c.definition, c.config));
    }
    let progress = progress.clone();
    let (path, context) = (loaded.path.clone(), source.context.clone());
    let r = tokio::task::spawn_blocking(move || {
        let v = progress.vertex(&format!(
            "[internal] frontend {}",
            syntax.unwrap_or_default()
        ));
        let req = frontend::Request {
            source: &path,
            context: &context,
            build_args: &opts.build_args,
            target: opts.target.as_deref(),
        };
        let r = w.run_frontend(&fe, &req, &|l| v.log(l));
        match &r {
            Ok(_) => v.done(),
            Err(e) => v.error(&e.to_string()),
        }
        r
    })
    .await??;
    Ok((r.definition, r.config))
}
