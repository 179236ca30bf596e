//! `strata build`: the build flow of the library, with this process as the builder.

use std::sync::Arc;

use anyhow::Context as _;
use strata_solver::build::{self, Request};
use strata_solver::progress::Progress;

use super::{open_worker, BuildArgs};
use crate::Cli;

pub async fn run(cli: &Cli, args: &BuildArgs) -> anyhow::Result<()> {
    let progress = Arc::new(Progress::new(args.progress));
    let worker = open_worker(cli)?;
    build::build(worker, &request(args)?, progress).await?;
    Ok(())
}

fn request(args: &BuildArgs) -> anyhow::Result<Request> {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not unix seconds"))
        })
        .transpose()?;
    Ok(Request {
        source: args.frontend.source(),
        tags: args.tags.clone(),
        outputs: args.outputs.clone(),
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        build_contexts: args.build_contexts.clone(),
        secrets: args.secrets.clone(),
        ssh: args.ssh.clone(),
        cache_to: args.cache_to.clone(),
        cache_from: args.cache_from.clone(),
        pull: args.pull,
        max_parallelism: args.max_parallelism,
        epoch,
    })
}
