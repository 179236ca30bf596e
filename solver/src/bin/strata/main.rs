//! `strata`: build container images from Dockerfiles, without a daemon.

mod commands;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use commands::{BuildArgs, CacheCmd, DebugCmd, ImagesCmd, ServeArgs};

const AFTER_HELP: &str = r#"Examples:
  strata images load busybox.tar                      # an OCI layout archive becomes a base image
  strata build -t app .                                # build ./Dockerfile, name it app
  strata build --output type=oci,dest=app.tar -t app . # and write an OCI archive (ctr images import app.tar)
  strata build --target test --no-cache-filter test .  # one stage, rerunning only its steps
  SOURCE_DATE_EPOCH=0 strata build --output type=oci,dest=a.tar .   # reproducible digests

Builds run as root: steps run in runc over overlayfs snapshots under --root."#;

const BUILD_HELP: &str = r#"Examples:
  strata build -t app .                                     # ./Dockerfile, named app in the local store
  strata build -f ci/Dockerfile --target test .             # one stage of another Dockerfile
  strata build --output type=registry,name=registry.example.com/app:1 .
  strata build --secret id=npmrc,src=$HOME/.npmrc --ssh default .
  strata build --cache-to type=registry,ref=registry.example.com/app:cache,mode=max \
               --cache-from registry.example.com/app:cache .
  strata build --cache-to type=local,dest=.ci-cache,mode=max --cache-from type=local,src=.ci-cache .
  strata build --cache-to type=inline --output type=registry,name=registry.example.com/app:1 .
  strata build --cache-from registry.example.com/app:1 .   # warm from the image's inline cache"#;

const SERVE_HELP: &str = r#"Examples:
  strata serve                                    # on /run/strata/buildd.sock, root only
  strata serve --group strata --root /srv/strata  # members of group strata may build
  strata build --builder unix:///run/strata/buildd.sock -t app .
  strata build --builder ssh://me@buildhost -t app .        # runs `strata dial-stdio` there
  STRATA_BUILDER=ssh://me@buildhost:2222 strata build .

Clients send only the context files that changed since their last build on this builder;
secrets and ssh agents stay on the client and are asked for when a step uses them.
SIGTERM cancels running builds (their clients are told why) and stops. systemd unit:
solver/strata-buildd.service."#;

/// Build container images from Dockerfiles: parallel, cached, daemonless.
#[derive(Parser)]
#[command(name = "strata", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Store for snapshots, cache and images
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/strata",
        value_name = "DIR"
    )]
    pub root: PathBuf,
    /// OCI runtime that runs RUN steps
    #[arg(long, global = true, default_value = "runc", value_name = "PATH")]
    pub oci_runtime: String,
    /// Registry reached over plain HTTP (localhost and 127.0.0.1 always are)
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image from a Dockerfile and a context directory
    #[command(after_help = BUILD_HELP)]
    Build(Box<BuildArgs>),
    /// List, load, pull, push or remove images in the local store
    #[command(
        subcommand,
        after_help = "Examples:\n  strata images load busybox.tar\n  strata images pull docker.io/library/alpine:3.19\n  strata images push registry.example.com/app:1\n  strata images ls"
    )]
    Images(ImagesCmd),
    /// Show the disk used by the build cache
    #[command(after_help = "Example:\n  strata du | tail -1   # the total")]
    Du,
    /// List or remove cache-mount volumes (RUN --mount=type=cache)
    #[command(
        subcommand,
        after_help = "Examples:\n  strata cache ls\n  strata cache prune --filter id=/root/.cache/pip"
    )]
    Cache(CacheCmd),
    /// Remove build cache records (least recently used first) and their snapshots; with no
    /// limits, everything. After each build, the cache is trimmed to 10GB.
    #[command(
        after_help = "Examples:\n  strata prune --keep-duration 48h\n  strata prune --keep-storage 5GB\n  strata prune   # everything"
    )]
    Prune {
        /// Keep records used within this long (e.g. 48h, 30m)
        #[arg(long, value_name = "DURATION")]
        keep_duration: Option<String>,
        /// Keep at most this much cache (e.g. 5GB, 500MB)
        #[arg(long, value_name = "SIZE")]
        keep_storage: Option<String>,
    },
    /// Run the builder as a service that clients reach with `strata build --builder`
    #[command(after_help = SERVE_HELP)]
    Serve(ServeArgs),
    /// Connect stdin and stdout to a builder's socket (what `--builder ssh://` runs remotely)
    #[command(
        name = "dial-stdio",
        after_help = "Example (what `strata build --builder ssh://me@host` does):\n  ssh -T me@host strata dial-stdio --addr unix:///run/strata/buildd.sock"
    )]
    DialStdio {
        /// The builder's socket
        #[arg(
            long,
            default_value = "unix:///run/strata/buildd.sock",
            value_name = "unix:///PATH"
        )]
        addr: String,
    },
    /// Developer tools
    #[command(
        subcommand,
        after_help = "Example:\n  strata debug dump-llb . | jq '.ops[].description'"
    )]
    Debug(DebugCmd),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STRATA_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("start async runtime")?;
    match &cli.command {
        Cmd::Build(args) => rt.block_on(commands::build::run(&cli, args)),
        Cmd::Images(cmd) => commands::images::run(&cli, cmd),
        Cmd::Du => commands::prune::du(&cli),
        Cmd::Prune {
            keep_duration,
            keep_storage,
        } => commands::prune::prune(&cli, keep_duration.as_deref(), keep_storage.as_deref()),
        Cmd::Cache(cmd) => commands::cache::run(&cli, cmd),
        Cmd::Debug(DebugCmd::DumpLlb(f)) => rt.block_on(commands::debug::dump_llb(&cli, f)),
        Cmd::Serve(args) => rt.block_on(commands::serve::serve(&cli, args)),
        Cmd::DialStdio { addr } => rt.block_on(commands::serve::dial_stdio(addr)),
    }
}
