//! `strata debug dump-llb`: the LLB a source compiles to, as JSON.

use std::sync::Arc;

use strata_solver::build::source::{compile, Source};
use strata_solver::client;
use strata_solver::llb::Graph;
use strata_solver::progress::{Mode, Progress};

use super::{open_worker, FrontendArgs};
use crate::Cli;

pub async fn dump_llb(cli: &Cli, f: &FrontendArgs) -> anyhow::Result<()> {
    let loaded = client::source::load(f.file.as_deref(), &f.context)?;
    let build_args = client::source::build_args(&f.build_args)
        .iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let src = Source {
        name: loaded.path.display().to_string(),
        text: loaded.text,
        ignore: loaded.ignore,
        build_args,
        target: f.target.clone(),
        frontend_paths: f.frontend_paths.clone(),
        pull: false,
    };
    let w = open_worker(cli)?;
    let progress = Arc::new(Progress::new(Mode::Quiet));
    let fe = src.frontend()?;
    let cancel = Default::default();
    let opts = src.convert_options();
    let (definition, _) = compile(&w, &src, fe, Some(&f.context), opts, &progress, &cancel).await?;
    let graph = Graph::from_definition(&definition)?;
    println!("{}", serde_json::to_string_pretty(&graph.to_json())?);
    Ok(())
}
