//! `strata-snapshotter`: the daemon containerd talks to as proxy snapshot plugin `strata`.

use std::path::PathBuf;

use clap::Parser;
use strata_snapshotter::config::{Config, LogFormat, DEFAULT_CONFIG};
use strata_snapshotter::metrics;

mod commands;
use tracing_subscriber::EnvFilter;

const AFTER_HELP: &str = r#"Plug it into containerd (/etc/containerd/config.toml), then restart containerd:

  [proxy_plugins.strata]
    type = "snapshot"
    address = "/run/strata/snapshotter.sock"

and use it:  ctr images pull --snapshotter strata docker.io/library/busybox:latest
             ctr run --rm --snapshotter strata docker.io/library/busybox:latest demo echo hi

Lazy pulls (zstd:chunked or eStargz layers mounted from the registry over FUSE):
  strata-snapshotter convert registry.example.com/app:1 registry.example.com/app:1-chunked
  strata-snapshotter pull --lazy registry.example.com/app:1-chunked
  ctr run --rm --snapshotter strata registry.example.com/app:1-chunked demo cat /etc/os-release
  strata-snapshotter status

Config file (TOML; flags override it):
  root = "/var/lib/strata"
  address = "/run/strata/snapshotter.sock"
  group = ""                    # socket 0660 for this group; empty: 0600, root only
  async_remove = false          # true: Remove drops metadata only, Cleanup reclaims disk
  [log]
  level = "info"                # or a filter such as "strata_snapshotter=debug"
  format = "text"               # or "json"
  [lazy]
  enabled = true
  allow_unverified = false      # serve layers whose TOC has no checksum annotation
  insecure_registries = []      # plain HTTP (localhost and 127.0.0.1 always are)
  fetch_timeout_secs = 10       # a read the registry cannot serve in time fails with EIO
  cache_max_bytes = 10737418240 # chunk cache bound (shared by all layers)
  background_fetch = true       # fetch the rest of each layer after mounting it
  passthrough = true            # fully fetched files read by the kernel directly (Linux 6.9+)
  metrics_address = ""          # e.g. "127.0.0.1:9109" for Prometheus /metrics

Stop it with SIGTERM or SIGINT; after a crash the next start repairs the root."#;

/// containerd snapshotter: overlay2-style layered snapshots with crash-safe metadata.
#[derive(Parser, Debug)]
#[command(name = "strata-snapshotter", version, after_help = AFTER_HELP)]
struct Cli {
    /// Directory holding snapshots and metadata [default: /var/lib/strata]
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket to serve containerd's Snapshots API on [default: /run/strata/snapshotter.sock]
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Group allowed to use the socket (mode 0660) [default: none: mode 0600, root only]
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// TOML config file; a missing file is an error only when given explicitly
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level or tracing filter (overrides the config's log.level and RUST_LOG)
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<Format>,
    /// Remove only metadata on Remove; reclaim directories at the next Cleanup
    #[arg(long)]
    async_remove: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Rewrite an image's layers as zstd:chunked (or eStargz) so that it can be pulled lazily.
    /// SRC and DST: a registry reference, oci-archive:FILE, or (SRC only) oci:DIR
    #[command(
        after_help = "Examples:\n  strata-snapshotter convert registry.example.com/app:1 registry.example.com/app:1-chunked\n  strata-snapshotter convert oci:./app-layout oci-archive:app-chunked.tar --prefetch reads.txt\n  strata-snapshotter convert --estargz registry.example.com/app:1 registry.example.com/app:1-esgz"
    )]
    Convert {
        /// The image to convert
        src: String,
        /// Where the converted image goes (a registry reference or oci-archive:FILE)
        dst: String,
        /// Files larger than this are cut in chunks fetched independently
        #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
        chunk_size: u64,
        /// Paths in the order a workload reads them (one per line): placed first in their layers
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        /// Write eStargz (gzip, stargz-snapshotter's format; diff_ids change) instead
        #[arg(long)]
        estargz: bool,
        /// Registry reached over plain HTTP (localhost and 127.0.0.1 always are)
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// Pull an image into containerd, mounting its zstd:chunked and eStargz layers from the
    /// registry instead of downloading them (like `ctr-remote image rpull`); other layers are
    /// pulled whole
    #[command(
        after_help = "Example:\n  strata-snapshotter pull --lazy registry.example.com/app:1-chunked\n  ctr run --rm --snapshotter strata registry.example.com/app:1-chunked demo\n\nCONTAINERD_ADDRESS and CONTAINERD_NAMESPACE are honoured, as by ctr."
    )]
    Pull {
        /// Required: the layers are mounted lazily
        #[arg(long)]
        lazy: bool,
        /// The image, e.g. registry.example.com/app:1 (made lazy-pullable by `convert`)
        reference: String,
        /// containerd's socket
        #[arg(
            long,
            env = "CONTAINERD_ADDRESS",
            default_value = "/run/containerd/containerd.sock",
            value_name = "SOCKET"
        )]
        containerd_address: PathBuf,
        /// containerd namespace the image goes to (`ctr -n`)
        #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "default")]
        namespace: String,
        /// containerd's name for this snapshotter (its proxy_plugins entry)
        #[arg(long, default_value = "strata")]
        snapshotter: String,
        /// Registry reached over plain HTTP (localhost and 127.0.0.1 always are)
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// Per lazy layer: bytes fetched / total, cache hits, chunk verification failures, fetch
    /// errors (--prometheus: the metrics endpoint's text)
    #[command(
        after_help = "Examples:\n  strata-snapshotter status\n  strata-snapshotter --root /var/lib/strata status --prometheus\n  strata-snapshotter status --prefetch-list registry.example.com/app:1 > reads.txt"
    )]
    Status {
        /// Print Prometheus' text format instead of a table
        #[arg(long)]
        prometheus: bool,
        /// Print the files containers of IMAGE read here, in the order they read them: the
        /// prefetch list for `convert --prefetch` and `strata build --output ...,prefetch=FILE`
        #[arg(long, value_name = "IMAGE", conflicts_with = "prometheus")]
        prefetch_list: Option<String>,
        /// Registry reached over plain HTTP (localhost and 127.0.0.1 always are)
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// Restart the daemon serving --root without a moment offline: it starts the binary now on
    /// disk with its socket, hands over, and exits (SIGUSR2 does the same). Under systemd, use
    /// `systemctl restart strata-snapshotter` with the socket unit instead.
    #[command(
        after_help = "Example, after installing a new binary:\n  install -m0755 target/release/strata-snapshotter /usr/local/bin/ && strata-snapshotter restart"
    )]
    Restart,
    /// Serve one lazy layer over FUSE (started by the daemon)
    #[command(hide = true)]
    ServeLayer { state: PathBuf, mountpoint: PathBuf },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Format {
    Text,
    Json,
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let explicit = cli.config.is_some();
    let path = cli.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let mut config = Config::load(&path, explicit)?;
    if let Some(root) = cli.root {
        config.root = root;
    }
    if let Some(address) = cli.address {
        config.address = address;
    }
    if let Some(group) = cli.group {
        config.group = group;
    }
    if let Some(level) = cli.log_level.or_else(|| std::env::var("RUST_LOG").ok()) {
        config.log.level = level;
    }
    if let Some(format) = cli.log_format {
        config.log.format = match format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        };
    }
    config.async_remove |= cli.async_remove;
    init_logging(&config);

    match cli.command {
        None => {}
        Some(Cmd::ServeLayer { state, mountpoint }) => {
            return strata_snapshotter::lazy::fs::serve(&state, &mountpoint)
        }
        Some(Cmd::Status {
            prefetch_list: Some(image),
            insecure_registry,
            ..
        }) => return commands::prefetch_list(&config.root, &image, insecure_registry),
        Some(Cmd::Status { prometheus, .. }) => return status(&config.root, prometheus),
        Some(Cmd::Restart) => {
            let pid = strata_snapshotter::upgrade::request_restart(&config.root)?;
            println!("restarted: pid {pid} serves {} now", config.root.display());
            return Ok(());
        }
        Some(Cmd::Convert {
            src,
            dst,
            chunk_size,
            prefetch,
            estargz,
            insecure_registry,
        }) => {
            let format = match estargz {
                true => strata_image::chunked::write::Format::Estargz,
                false => strata_image::chunked::write::Format::ZstdChunked,
            };
            return commands::convert(
                &src,
                &dst,
                (chunk_size, format),
                prefetch.as_deref(),
                insecure_registry,
            );
        }
        Some(Cmd::Pull {
            lazy,
            reference,
            containerd_address,
            namespace,
            snapshotter,
            insecure_registry,
        }) => {
            if !lazy {
                anyhow::bail!(
                    "pull only pulls lazily: add --lazy (or use `ctr images pull` for a full pull)"
                );
            }
            return commands::pull_lazy(
                &reference,
                &containerd_address,
                &namespace,
                &snapshotter,
                insecure_registry,
            );
        }
    }

    strata_snapshotter::daemon::run(&config)
}

fn status(root: &std::path::Path, prometheus: bool) -> anyhow::Result<()> {
    let layers = strata_snapshotter::lazy::layer_stats(root);
    let unreadable = layers.iter().filter(|(_, s)| s.is_err()).count();
    if prometheus {
        print!("{}", metrics::prometheus(root, 0));
        if unreadable > 0 {
            anyhow::bail!("{unreadable} lazy layers have no readable counters: run `strata-snapshotter status` for which");
        }
        return Ok(());
    }
    if layers.is_empty() {
        println!("no lazy layers under {}", root.display());
        return Ok(());
    }
    println!(
        "{:<20} {:>21} {:>6} {:>10} {:>13} {:>12} {:>12}",
        "LAYER",
        "FETCHED / TOTAL",
        "%",
        "CACHE HITS",
        "VERIFY FAILS",
        "FETCH ERRORS",
        "PASSTHROUGH"
    );
    for (digest, s) in layers {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                println!(
                    "{:<20} counters unreadable: {e}",
                    &digest[..19.min(digest.len())]
                );
                continue;
            }
        };
        let pct = if s.total_bytes > 0 {
            100.0 * s.fetched_bytes as f64 / s.total_bytes as f64
        } else {
            0.0
        };
        println!(
            "{:<20} {:>21} {:>5.1}% {:>10} {:>13} {:>12} {:>12}",
            &digest[..19.min(digest.len())],
            format!("{} / {}", s.fetched_bytes, s.total_bytes),
            pct,
            s.cache_hits,
            s.verify_failures,
            s.fetch_errors,
            s.passthrough_opens
        );
    }
    if unreadable > 0 {
        anyhow::bail!("{unreadable} lazy layers have no readable counters (above): their servers may have died; restart strata-snapshotter to remount them");
    }
    Ok(())
}
