//! `strata cache ls|prune`: the cache-mount volumes of `RUN --mount=type=cache`.

use strata_solver::progress::human_size;

use super::{open_worker, CacheCmd};
use crate::Cli;

pub fn run(cli: &Cli, cmd: &CacheCmd) -> anyhow::Result<()> {
    let w = open_worker(cli)?;
    match cmd {
        CacheCmd::Ls => {
            println!("{:<40} {:>10}  LAST USED", "ID", "SIZE");
            for v in w.volumes.list()? {
                let ago = strata_solver::db::now().saturating_sub(v.last_used);
                println!("{:<40} {:>10}  {} ago", v.id, human_size(v.size), age(ago));
            }
        }
        CacheCmd::Prune { filter } => {
            let want = filter
                .as_deref()
                .map(|f| {
                    f.strip_prefix("id=")
                        .ok_or_else(|| anyhow::anyhow!("--filter {f:?}: use id=ID"))
                })
                .transpose()?;
            let mut n = 0;
            for v in w.volumes.list()? {
                if want.is_none_or(|id| id == v.id) {
                    w.volumes.remove(&v.id)?;
                    n += 1;
                }
            }
            println!("removed {n} cache volumes");
        }
    }
    Ok(())
}

/// Seconds as the largest unit that keeps two digits.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
