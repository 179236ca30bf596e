//! `strata du` and `strata prune`: the build cache's records and the disk they hold.

use strata_solver::gc::{self, Policy};
use strata_solver::progress::human_size;

use super::open_worker;
use crate::Cli;

pub fn du(cli: &Cli) -> anyhow::Result<()> {
    let w = open_worker(cli)?;
    let mut total = 0i64;
    println!("{:<72} {:>10}  DESCRIPTION", "CACHE KEY", "SIZE");
    for (key, rec) in w.db.caches()? {
        let size = w.snapshots.usage(&rec.snapshot).map_or(0, |u| u.size);
        total += size;
        println!(
            "{key:<72} {:>10}  {}",
            human_size(size as u64),
            rec.description
        );
    }
    println!("total: {}", human_size(total as u64));
    Ok(())
}

pub fn prune(
    cli: &Cli,
    keep_duration: Option<&str>,
    keep_storage: Option<&str>,
) -> anyhow::Result<()> {
    let w = open_worker(cli)?;
    let policy = Policy {
        keep_duration: keep_duration.map(gc::parse_duration).transpose()?,
        keep_storage: keep_storage.map(gc::parse_size).transpose()?,
    };
    let r = gc::prune(&w, &policy)?;
    // Context copies are dropped by age (--keep-duration) or all at once (no limits).
    let contexts = match (policy.keep_duration, policy.keep_storage) {
        (None, Some(_)) => 0,
        (keep, _) => strata_solver::service::context::prune(
            &cli.root.join("contexts"),
            keep.map(std::time::Duration::from_secs),
        )?,
    };
    println!(
        "removed {} cache records, freed {}; {contexts} clients' context copies removed",
        r.records,
        human_size(r.freed)
    );
    Ok(())
}
