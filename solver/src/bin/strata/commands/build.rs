//! `strata build`: the client side of a build, against `--builder` or a builder in this process.

use std::sync::Arc;

use anyhow::Context as _;
use strata_solver::client::{self, connect, Request};
use strata_solver::progress::Printer;
use strata_solver::service::{serve, Service};

use super::{open_worker, BuildArgs};
use crate::Cli;

pub async fn run(cli: &Cli, args: &BuildArgs) -> anyhow::Result<()> {
    let printer = Arc::new(Printer::new(args.progress));
    let mut req = request(args)?;
    let conn = match &args.builder {
        Some(addr) => connect::connect(&connect::Address::parse(addr)?).await?,
        None => {
            let service = Service::new(open_worker(cli)?, &cli.root);
            connect::in_process(serve::in_process(service)).await?
        }
    };
    // --load: the image comes back as an OCI archive and goes into the local store (a builder in
    // this process already wrote it there).
    let load = (args.load && args.builder.is_some())
        .then(tempfile::tempdir)
        .transpose()?;
    if let Some(dir) = &load {
        let name = args
            .tags
            .first()
            .context("--load needs a name: add -t NAME")?;
        let dest = dir.path().join("load.tar");
        req.outputs
            .push(format!("type=oci,dest={},name={name}", dest.display()));
    }
    client::build(conn, &req, printer).await?;
    if let Some(dir) = load {
        let worker = open_worker(cli)?;
        let loaded = worker.load_archive(&dir.path().join("load.tar"))?;
        // The archive carries the first -t; the others name the same image.
        let first = loaded
            .first()
            .context("--load: the archive names no image")?;
        let first = worker
            .db
            .image(first)?
            .context("--load: the loaded image")?;
        for tag in args.tags.iter().skip(1) {
            let name = strata_solver::worker::images::normalize(tag);
            worker.db.put_image(&strata_solver::db::ImageRecord {
                name,
                ..first.clone()
            })?;
        }
        for name in loaded.iter().chain(args.tags.iter().skip(1)) {
            eprintln!("loaded {name} into {}", cli.root.display());
        }
    }
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
    let f = &args.frontend;
    Ok(Request {
        file: f.file.clone(),
        context: f.context.clone(),
        build_args: f.build_args.clone(),
        target: f.target.clone(),
        frontend_paths: f.frontend_paths.clone(),
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
