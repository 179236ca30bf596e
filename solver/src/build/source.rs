//! The source of a build as the builder gets it: the Dockerfile's (or another frontend's) text,
//! the context's `.dockerignore` rules, build args and named contexts, compiled to LLB by the
//! frontend that its `# syntax` line names.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use strata_image::oci::ImageConfig;

use super::{BuildError, Client, Dir};
use crate::dockerfile::convert::{convert, ConvertOptions};
use crate::frontend::{self, Frontend};
use crate::llb::Definition;
use crate::pattern::Ignore;
use crate::progress::Progress;
use crate::worker::Worker;

/// What the frontend compiles.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The file's name where the client read it (for messages) and its text.
    pub name: String,
    pub text: String,
    pub ignore: Ignore,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// `--frontend-path [NAME=]PATH`, on the builder's machine.
    pub frontend_paths: Vec<String>,
    /// Check the registry for newer base images (`--pull`).
    pub pull: bool,
}

impl Source {
    /// The frontend its `# syntax` line names.
    pub fn frontend(&self) -> Result<Frontend, BuildError> {
        let syntax = crate::dockerfile::parser::syntax(&self.text);
        Ok(frontend::select(syntax.as_deref(), &self.frontend_paths)?)
    }

    /// The Dockerfile frontend's options.
    pub fn convert_options(&self) -> ConvertOptions {
        ConvertOptions {
            build_args: self.build_args.clone(),
            target: self.target.clone(),
            ignore: self.ignore.clone(),
            ..Default::default()
        }
    }
}

/// Where a `--build-context NAME=...` comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Named {
    /// `oci-layout://DIR[:TAG]`: an OCI image layout directory on the client.
    Layout { dir: String, tag: Option<String> },
    /// `docker-image://REF`.
    Image(String),
}

/// Parses `NAME=oci-layout://DIR[:TAG]` or `NAME=docker-image://REF`.
pub fn parse_named(spec: &str) -> Result<(String, Named), BuildError> {
    let usage = "use NAME=oci-layout:///DIR[:TAG] or NAME=docker-image://REF";
    let (name, source) = spec
        .split_once('=')
        .ok_or_else(|| BuildError::Input(format!("--build-context {spec:?}: {usage}")))?;
    let named = if let Some(path) = source.strip_prefix("oci-layout://") {
        match path.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => Named::Layout {
                dir: d.into(),
                tag: Some(t.into()),
            },
            _ => Named::Layout {
                dir: path.into(),
                tag: None,
            },
        }
    } else if let Some(r) = source.strip_prefix("docker-image://") {
        Named::Image(r.into())
    } else {
        return Err(BuildError::Input(format!(
            "--build-context {spec:?}: {usage}"
        )));
    };
    Ok((name.to_string(), named))
}

/// The images `--build-context`s name, for FROM NAME and --from=NAME: an OCI layout is brought
/// from the client ([`Dir::BuildContext`]) and loaded into the store.
pub async fn named_contexts(
    worker: &Arc<Worker>,
    client: &dyn Client,
    specs: &[String],
    progress: &Progress,
) -> Result<BTreeMap<String, String>, BuildError> {
    let mut out = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let (name, named) = parse_named(spec)?;
        let image = match named {
            Named::Image(r) => r,
            Named::Layout { dir, tag } => {
                let copy = client
                    .directory(Dir::BuildContext(i), &dir, progress)
                    .await?;
                let stored = format!(
                    "localhost/strata-context/{}:{}",
                    name.to_ascii_lowercase(),
                    tag.as_deref().unwrap_or("latest")
                );
                let w = worker.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    w.load_layout_dir(&copy, tag.as_deref(), &stored)
                })
                .await?;
                loaded.map_err(|e| BuildError::Input(format!("--build-context {spec}: {e}")))?
            }
        };
        out.insert(name, image);
    }
    Ok(out)
}

/// Compiles the source to LLB and an image config: the built-in Dockerfile frontend, or an
/// external one run in a sandbox over `context` (which it may read).
pub async fn compile(
    worker: &Arc<Worker>,
    source: &Source,
    fe: Frontend,
    context: Option<&Path>,
    opts: ConvertOptions,
    progress: &Arc<Progress>,
    cancel: &Arc<AtomicBool>,
) -> Result<(Definition, ImageConfig), BuildError> {
    let (w, text) = (worker.clone(), source.text.clone());
    if fe == Frontend::Dockerfile {
        let pull = source.pull;
        let c =
            tokio::task::spawn_blocking(move || convert(&text, &opts, &w.resolver(pull))).await??;
        return Ok((c.definition, c.config));
    }
    let context = context
        .ok_or_else(|| BuildError::Input("an external frontend needs the build context".into()))?
        .to_path_buf();
    let (progress, cancel) = (progress.clone(), cancel.clone());
    let syntax = crate::dockerfile::parser::syntax(&text).unwrap_or_default();
    let file = Path::new(&source.name)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let r = tokio::task::spawn_blocking(move || {
        // The frontend reads its source as a file: a private copy of the client's text.
        let dir = tempfile::tempdir().map_err(crate::worker::WorkerError::io("temp dir"))?;
        let path = dir.path().join(file);
        std::fs::write(&path, &text).map_err(crate::worker::WorkerError::io("source copy"))?;
        let v = progress.vertex(&format!("[internal] frontend {syntax}"));
        let req = frontend::Request {
            source: &path,
            context: &context,
            build_args: &opts.build_args,
            target: opts.target.as_deref(),
            cancel: &cancel,
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
