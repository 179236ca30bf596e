//! `strata serve` and `strata dial-stdio`: the builder as a service, and its far end over ssh.

use std::path::Path;

use strata_solver::service::{serve, Service};

use super::{open_worker, ServeArgs};
use crate::Cli;

pub async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let path = unix_path(&args.address)?;
    let group = strata_snapshotter::server::socket_group(args.group.as_deref().unwrap_or(""))?;
    let service = Service::new(open_worker(cli)?, &cli.root);
    serve::unix(service, Path::new(path), group).await
}

pub async fn dial_stdio(address: &str) -> anyhow::Result<()> {
    Ok(serve::dial_stdio(Path::new(unix_path(address)?)).await?)
}

fn unix_path(address: &str) -> anyhow::Result<&str> {
    match address.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(p),
        _ => anyhow::bail!(
            "--addr {address:?}: use unix:///ABSOLUTE/PATH (e.g. unix:///run/strata/buildd.sock)"
        ),
    }
}
