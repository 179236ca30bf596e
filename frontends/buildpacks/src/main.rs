//! `strata-frontend-buildpacks`: a Strata frontend that builds Cloud Foundry apps from their
//! `manifest.yml` (first line `# syntax = strata/buildpacks`).
//!
//! It follows the external frontend protocol (docs/frontends.md): the source file and the build
//! context come read-only through `STRATA_FRONTEND_SOURCE` and `STRATA_FRONTEND_CONTEXT`, options
//! as JSON in `STRATA_FRONTEND_OPTS`; the LLB definition goes to stdout and the image config to
//! `$STRATA_FRONTEND_OUT/config.json`.
//!
//! Build args: `STACK_IMAGE`, the image apps are built on (default: the app's `stack:` when it
//! names an image, else `python:3.12-slim`).

mod buildpack;
mod manifest;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use prost::Message;
use serde::Deserialize;

use buildpack::Buildpack;
use manifest::Manifest;

const DEFAULT_STACK: &str = "docker.io/library/python:3.12-slim";

#[derive(Deserialize, Default)]
struct Opts {
    #[serde(default, rename = "build-args")]
    build_args: BTreeMap<String, String>,
    target: Option<String>,
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: this program is a strata frontend; run it through `strata build` (see docs/frontends.md)")
    })
}

fn run() -> anyhow::Result<()> {
    let source = env("STRATA_FRONTEND_SOURCE")?;
    let context = PathBuf::from(env("STRATA_FRONTEND_CONTEXT")?);
    let out = PathBuf::from(env("STRATA_FRONTEND_OUT")?);
    let opts: Opts = match std::env::var("STRATA_FRONTEND_OPTS") {
        Ok(s) => serde_json::from_str(&s).context("STRATA_FRONTEND_OPTS is not JSON")?,
        Err(_) => Opts::default(),
    };
    let text = std::fs::read_to_string(&source).with_context(|| format!("read {source}"))?;
    let manifest = Manifest::parse(&text)?;
    let app = manifest.app(opts.target.as_deref())?;
    let app_path = app.path.as_deref().unwrap_or(".");
    // `path:` is relative to the context and stays inside it.
    if Path::new(app_path)
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
    {
        anyhow::bail!(
            "application {}: path {app_path:?} leaves the build context; use a directory inside it",
            app.name
        );
    }
    let app_dir = context.join(app_path);
    let bp = Buildpack::choose(app, &app_dir)?;
    let command = buildpack::start_command(app, &app_dir)?;
    // `stack:` may name an image; Cloud Foundry's stack names (cflinuxfs4) are not images.
    let named = app
        .stack
        .as_deref()
        .filter(|s| s.contains('/') || s.contains(':'));
    if let (Some(s), None) = (&app.stack, named) {
        eprintln!("-----> stack {s:?} is a Cloud Foundry stack, not an image: building on {DEFAULT_STACK} (set the STACK_IMAGE build arg to choose)");
    }
    let stack = opts
        .build_args
        .get("STACK_IMAGE")
        .map(String::as_str)
        .or(named)
        .unwrap_or(DEFAULT_STACK)
        .to_string();
    eprintln!("-----> {}: {} on {stack}", app.name, bp.name());
    let (definition, config) = buildpack::compile(app, bp, &stack, app_path, &command);
    std::fs::write(out.join("config.json"), serde_json::to_vec(&config)?)
        .with_context(|| format!("write {}/config.json", out.display()))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&definition.encode_to_vec())?;
    stdout.flush()?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
