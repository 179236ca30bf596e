//! `strata images ls|load|pull|push|rm`: the local image store.

use anyhow::bail;
use strata_solver::progress::human_size;

use super::{open_worker, ImagesCmd};
use crate::Cli;

pub fn run(cli: &Cli, cmd: &ImagesCmd) -> anyhow::Result<()> {
    let w = open_worker(cli)?;
    match cmd {
        ImagesCmd::Ls => ls(&w)?,
        ImagesCmd::Load { archive } => {
            for name in w.load_archive(archive)? {
                println!("loaded {name}");
            }
        }
        ImagesCmd::Pull { reference } => println!("pulled {}", w.pull(reference)?),
        ImagesCmd::Push { name } => {
            let (desc, _) = w.manifest(name)?;
            let desc =
                strata_solver::form::apply(&w, &desc, &strata_solver::form::LayerForm::OCI, &[])?;
            w.push(name, &desc)?;
            println!("pushed {name} ({})", desc.digest);
        }
        ImagesCmd::Rm { name } => {
            let n = strata_solver::worker::images::normalize(name);
            if w.db.image(&n)?.is_none() {
                bail!("image {n} is not in the local store (see `strata images ls`)");
            }
            w.db.delete_image(&n)?;
            println!("untagged {n}");
        }
    }
    Ok(())
}

fn ls(w: &strata_solver::worker::Worker) -> anyhow::Result<()> {
    println!("{:<60} {:<20} {:>10}", "NAME", "DIGEST", "SIZE");
    for img in w.db.images()? {
        let size: u64 = w
            .manifest(&img.name)
            .map(|(_, m)| m.layers.iter().map(|l| l.size).sum::<u64>() + m.config.size)
            .unwrap_or(0);
        // Names are checked at load; records from before that are printed escaped.
        let digest: String = img.manifest.digest.chars().take(19).collect();
        println!(
            "{:<60} {:<20} {:>10}",
            img.name.escape_debug().to_string(),
            digest.escape_debug().to_string(),
            human_size(size)
        );
    }
    Ok(())
}
