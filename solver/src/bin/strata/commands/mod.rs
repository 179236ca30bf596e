//! One file per `strata` command, each a few lines calling the library.

pub mod build;
pub mod cache;
pub mod debug;
pub mod images;
pub mod prune;
pub mod serve;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use strata_solver::progress::Mode;
use strata_solver::worker::Worker;

use crate::Cli;

#[derive(Subcommand)]
pub enum ImagesCmd {
    /// List images
    Ls,
    /// Load an OCI image layout archive (what `--output type=oci` and `skopeo copy oci-archive:` write)
    Load { archive: PathBuf },
    /// Pull an image from its registry
    Pull { reference: String },
    /// Push an image of the local store to its registry
    Push { name: String },
    /// Remove an image name (its layers stay until pruned)
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// List cache volumes: id, size, last used
    Ls,
    /// Remove cache volumes (all, or those matching --filter id=ID)
    Prune {
        #[arg(long, value_name = "id=ID")]
        filter: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DebugCmd {
    /// Print the LLB a Dockerfile compiles to, as JSON
    DumpLlb(FrontendArgs),
}

#[derive(Args, Clone)]
pub struct FrontendArgs {
    /// Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Build-time variable
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Stage to build (default: the last)
    #[arg(long)]
    pub target: Option<String>,
    /// Run this local executable as the frontend for `# syntax = NAME` (NAME=PATH), or for any
    /// name that is not docker/dockerfile (PATH); see docs/frontends.md
    #[arg(long = "frontend-path", value_name = "[NAME=]PATH")]
    pub frontend_paths: Vec<String>,
    /// Build context directory
    pub context: PathBuf,
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// Name the result in the local image store
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,
    /// Where to write the result: type=oci,dest=FILE | type=docker,dest=FILE | type=local,dest=DIR |
    /// type=image,name=REF[,push=true] | type=registry,name=REF |
    /// type=containerd,name=REF[,address=SOCK][,namespace=NS] (default: $CONTAINERD_ADDRESS, $CONTAINERD_NAMESPACE as ctr)
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,
    /// Run every step, ignoring the cache
    #[arg(long)]
    pub no_cache: bool,
    /// Run the steps of these stages, ignoring the cache
    #[arg(long, value_name = "STAGE")]
    pub no_cache_filter: Vec<String>,
    /// Progress output
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: Mode,
    /// Named context: NAME=oci-layout:///DIR[:TAG] or NAME=docker-image://REF; FROM NAME and
    /// --from=NAME then use that image
    #[arg(long = "build-context", value_name = "NAME=SOURCE")]
    pub build_contexts: Vec<String>,
    /// Secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (never stored in the image or cache)
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// ssh agent for RUN --mount=type=ssh: default=$SSH_AUTH_SOCK, ID=SOCKET, or ID=KEYFILE[,KEYFILE]
    /// (unencrypted keys served by an agent inside strata; keys with a passphrase: use your agent)
    #[arg(long = "ssh", value_name = "ID=SOCKET|KEYS")]
    pub ssh: Vec<String>,
    /// Export the build cache: type=registry,ref=REF | type=local,dest=DIR[,tag=T] | type=inline,
    /// with [,mode=min|max][,mounts=true] (max: every step; mounts: RUN --mount=type=cache
    /// volumes too; inline: the image's own layers, in its config)
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,
    /// Import a build cache: type=registry,ref=REF (a cache, or an image with an inline cache),
    /// REF, or type=local,src=DIR[,tag=T]; [,mounts=true]. A missing cache makes a cold build
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,
    /// Check the registry for newer base images even when the local store has them
    #[arg(long)]
    pub pull: bool,
    /// Steps run at once (default: 64, whatever the CPU count: waiting steps do not wait for a
    /// core; use 1 to run steps one by one)
    #[arg(long, value_name = "N")]
    pub max_parallelism: Option<usize>,
    /// Build on this builder: unix:///run/strata/buildd.sock or
    /// ssh://[user@]host[:port][/path/to/buildd.sock] (runs `strata dial-stdio` there with your
    /// ssh; STRATA_SSH_COMMAND replaces `ssh`). Default: a builder in this process, on --root
    #[arg(long, env = "STRATA_BUILDER", value_name = "ADDRESS")]
    pub builder: Option<String>,
    /// With --builder: also load the result (named by the first -t) into this machine's store
    /// under --root
    #[arg(long)]
    pub load: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Socket to listen on
    #[arg(
        long,
        default_value = "unix:///run/strata/buildd.sock",
        value_name = "unix:///PATH"
    )]
    pub address: String,
    /// Group whose members may use the socket (mode 0660); default: root only (0600)
    #[arg(long, value_name = "NAME|GID")]
    pub group: Option<String>,
}

/// The worker over the store under `--root`.
pub fn open_worker(cli: &Cli) -> anyhow::Result<Arc<Worker>> {
    let registry = strata_image::registry::Options {
        insecure: cli.insecure_registry.clone(),
        ..Default::default()
    };
    let w = Worker::open(&cli.root, &cli.oci_runtime, registry)
        .with_context(|| format!("open the build store under {}", cli.root.display()))?;
    Ok(Arc::new(w))
}
