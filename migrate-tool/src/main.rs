//! `migrate-tool`: move a Docker data root off aufs, overlay (v1) or devicemapper onto overlay2.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use migrate_tool::dataroot::DataRoot;

const AFTER_HELP: &str = r#"Start with `migrate-tool plan`: it only reads, and says what it found, what a migration
would write and what must be fixed first (dockerd running, running containers, missing layers).

  migrate-tool plan --data-root /var/lib/docker
  migrate-tool plan --data-root /var/lib/docker --json"#;

/// Move a Docker data root off the removed storage drivers onto overlay2, losing nothing.
#[derive(Parser)]
#[command(name = "migrate-tool", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report what the data root holds and what a migration needs (read-only)
    Plan {
        /// Docker's data root
        #[arg(long, default_value = "/var/lib/docker", value_name = "DIR")]
        data_root: PathBuf,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Plan { data_root, json } => {
            let root = DataRoot::open(&data_root)
                .with_context(|| format!("read Docker data root {}", data_root.display()))?;
            let plan = migrate_tool::plan::plan(&root);
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{plan}");
            }
            Ok(())
        }
    }
}
