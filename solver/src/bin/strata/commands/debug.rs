//! `strata debug dump-llb`: the LLB a source compiles to, as JSON.

use std::sync::Arc;

use strata_solver::build::source;
use strata_solver::llb::Graph;
use strata_solver::progress::{Mode, Progress};

use super::{open_worker, FrontendArgs};
use crate::Cli;

pub async fn dump_llb(cli: &Cli, f: &FrontendArgs) -> anyhow::Result<()> {
    let src = f.source();
    let (path, text) = source::read_dockerfile(&src)?;
    let ignore = source::ignore_rules(&path, &src.context)?;
    let loaded = source::Loaded { path, text, ignore };
    let w = open_worker(cli)?;
    let opts = source::convert_options(&src, loaded.ignore.clone());
    let progress = Arc::new(Progress::new(Mode::Quiet));
    let (definition, _) = source::compile(&w, &src, &loaded, opts, &progress).await?;
    let graph = Graph::from_definition(&definition)?;
    println!("{}", serde_json::to_string_pretty(&graph.to_json())?);
    Ok(())
}
