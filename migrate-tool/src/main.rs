//! `migrate-tool`: move a Docker data root off aufs, overlay (v1) or devicemapper onto overlay2.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use migrate_tool::dataroot::DataRoot;

const AFTER_HELP: &str = r#"The order of work, each step safe to interrupt and rerun:

  migrate-tool plan    --data-root /var/lib/docker   # read-only: what is there, what stands in the way
  systemctl stop docker                               # migrate refuses while dockerd or containers run
  migrate-tool migrate --data-root /var/lib/docker   # builds overlay2 beside the old tree, then switches
  migrate-tool verify  --data-root /var/lib/docker   # rebuilds every layer tar and checks its diffID
  systemctl start docker                              # now on overlay2 (daemon.json says so)
  migrate-tool cleanup --data-root /var/lib/docker   # only after a passing verify: frees the old driver
  migrate-tool rollback --data-root /var/lib/docker  # instead of cleanup: back to the old driver

Image layers of aufs and overlay are hard-linked, not copied: migration writes almost nothing."#;

/// Move a Docker data root off the removed storage drivers onto overlay2, losing nothing.
#[derive(Parser)]
#[command(name = "migrate-tool", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Target {
    /// containerd with snapshotter `strata` (strata-snapshotter must be its proxy plugin)
    Strata,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report what the data root holds and what a migration needs (read-only)
    #[command(
        after_help = "Examples:\n  migrate-tool plan\n  migrate-tool plan --data-root /srv/docker --json | jq '.problems[] | select(.severity == \"blocker\")'"
    )]
    Plan {
        /// Docker's data root
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Build the overlay2 tree beside the old one through a journal, then switch dockerd over
    #[command(
        after_help = "Examples:\n  systemctl stop docker && migrate-tool migrate\n  migrate-tool migrate --to strata   # and into containerd on the strata snapshotter\n\nKilled or failed, run the same command again: it resumes from its journal."
    )]
    Migrate {
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
        /// dockerd's config file, where storage-driver is set to overlay2
        #[arg(long, default_value = "/etc/docker/daemon.json", value_name = "FILE")]
        daemon_json: PathBuf,
        /// Also import every image into containerd, unpacked into the Strata snapshotter
        #[arg(long, value_enum, value_name = "TARGET")]
        to: Option<Target>,
        /// containerd's socket (with --to strata)
        #[arg(
            long,
            env = "CONTAINERD_ADDRESS",
            default_value = "/run/containerd/containerd.sock",
            value_name = "SOCKET"
        )]
        containerd_address: PathBuf,
        /// containerd namespace (with --to strata)
        #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "default")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// Check every migrated layer against its diffID and metadata, and every container's files
    #[command(
        after_help = "Example:\n  migrate-tool verify && systemctl start docker\n\nA passing verify is what allows cleanup; a failing one names each path and field."
    )]
    Verify {
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Undo a migration (before cleanup): containers and dockerd point at the old driver again
    #[command(
        after_help = "Example:\n  systemctl stop docker && migrate-tool rollback && systemctl start docker"
    )]
    Rollback {
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
        #[arg(long, default_value = "/etc/docker/daemon.json", value_name = "FILE")]
        daemon_json: PathBuf,
    },
    /// Remove the old driver's data; refused until verify has passed
    #[command(after_help = "Example:\n  migrate-tool verify && migrate-tool cleanup")]
    Cleanup {
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
    },
}

/// `--to strata` needs the containerd client, which is the cargo feature `strata`.
fn check_strata_support() -> anyhow::Result<()> {
    if cfg!(feature = "strata") {
        return Ok(());
    }
    anyhow::bail!("this migrate-tool was built without `--to strata` (containerd import); rebuild it with `cargo build --release -p migrate-tool --features strata`, or migrate to overlay2 only and leave out `--to`")
}

#[cfg(feature = "strata")]
fn import_to_strata(
    data_root: &Path,
    address: &Path,
    namespace: &str,
    work: &Path,
) -> anyhow::Result<Vec<String>> {
    Ok(migrate_tool::to_strata::import(
        data_root, address, namespace, "strata", work,
    )?)
}

#[cfg(not(feature = "strata"))]
fn import_to_strata(_: &Path, _: &Path, _: &str, _: &Path) -> anyhow::Result<Vec<String>> {
    check_strata_support().map(|()| Vec::new())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Plan { data_root, json } => plan(&data_root, json),
        Cmd::Migrate {
            data_root,
            daemon_json,
            to,
            containerd_address,
            namespace,
            json,
        } => {
            if to.is_some() {
                check_strata_support()?;
            }
            migrate(&data_root, daemon_json, json)?;
            match to {
                Some(Target::Strata) => to_strata(&data_root, &containerd_address, &namespace),
                None => Ok(()),
            }
        }
        Cmd::Verify { data_root, json } => verify(&data_root, json),
        Cmd::Rollback {
            data_root,
            daemon_json,
        } => {
            migrate_tool::finish::rollback(&data_root, &daemon_json)?;
            println!(
                "rolled back: {} uses its old driver again",
                data_root.display()
            );
            Ok(())
        }
        Cmd::Cleanup { data_root } => {
            migrate_tool::finish::cleanup(&data_root)?;
            println!("removed the old driver's data");
            Ok(())
        }
    }
}

fn open(data_root: &Path) -> anyhow::Result<DataRoot> {
    DataRoot::open(data_root)
        .with_context(|| format!("read Docker data root {}", data_root.display()))
}

fn plan(data_root: &Path, json: bool) -> anyhow::Result<()> {
    let plan = migrate_tool::plan::plan(&open(data_root)?);
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
    }
    Ok(())
}

/// A bar on a terminal; elsewhere (and without `--json`) one line per step.
fn progress_bar(json: bool) -> indicatif::ProgressBar {
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .expect("static template"),
    );
    bar
}

fn migrate(data_root: &Path, daemon_json: PathBuf, json: bool) -> anyhow::Result<()> {
    let root = open(data_root)?;
    let bar = progress_bar(json);
    let progress = |done: usize, total: usize, step: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(step.to_string());
        if bar.is_hidden() && !json {
            eprintln!("[{}/{total}] {step}", done + 1);
        }
    };
    let options = migrate_tool::migrate::Options {
        daemon_json,
        progress: &progress,
    };
    let report = migrate_tool::migrate::migrate(&root, &options)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("migrated {} image layers and {} containers to overlay2 ({} entries, {} bytes of metadata written)", report.layers, report.containers, report.entries, report.bytes_written);
        println!(
            "next: migrate-tool verify --data-root {}",
            data_root.display()
        );
    }
    Ok(())
}

fn to_strata(data_root: &Path, containerd_address: &Path, namespace: &str) -> anyhow::Result<()> {
    let work = data_root
        .join(migrate_tool::journal::TMP)
        .join("strata-content");
    let names = import_to_strata(data_root, containerd_address, namespace, &work)?;
    let _ = std::fs::remove_dir_all(&work);
    for n in &names {
        println!("imported {n} into containerd (namespace {namespace}), unpacked into strata");
    }
    Ok(())
}

fn verify(data_root: &Path, json: bool) -> anyhow::Result<()> {
    let report = migrate_tool::verify::verify(data_root)
        .with_context(|| format!("verify {}", data_root.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} layers ({} entries) and {} containers",
            report.layers, report.entries, report.containers
        );
        for p in &report.problems {
            println!("PROBLEM {p}");
        }
    }
    if !report.problems.is_empty() {
        anyhow::bail!(
            "verify found {} problems: do not start dockerd on overlay2; run migrate-tool rollback",
            report.problems.len()
        );
    }
    Ok(())
}
