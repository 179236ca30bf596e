//! `strata`: build container images from Dockerfiles, without a daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use strata_image::oci::ImageConfig;
use strata_solver::dockerfile::convert::{convert, ConvertOptions};
use strata_solver::export::{self, Output};
use strata_solver::frontend::{self, Frontend};
use strata_solver::llb::{Definition, Graph};
use strata_solver::pattern::Ignore;
use strata_solver::progress::{Mode, Progress};
use strata_solver::remote_cache::{self, CacheSpec};
use strata_solver::solver::Solver;
use strata_solver::worker::agent::Keys;
use strata_solver::worker::mounts::{Agent, Session};
use strata_solver::worker::{Context, Worker, CANCELLED};

const AFTER_HELP: &str = r#"Examples:
  strata images load busybox.tar                      # an OCI layout archive becomes a base image
  strata build -t app .                                # build ./Dockerfile, name it app
  strata build --output type=oci,dest=app.tar -t app . # and write an OCI archive (ctr images import app.tar)
  strata build --target test --no-cache-filter test .  # one stage, rerunning only its steps
  SOURCE_DATE_EPOCH=0 strata build --output type=oci,dest=a.tar .   # reproducible digests

Builds run as root: steps run in runc over overlayfs snapshots under --root."#;

/// Build container images from Dockerfiles: parallel, cached, daemonless.
#[derive(Parser)]
#[command(name = "strata", version, after_help = AFTER_HELP)]
struct Cli {
    /// Store for snapshots, cache and images
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/strata",
        value_name = "DIR"
    )]
    root: PathBuf,
    /// OCI runtime that runs RUN steps
    #[arg(long, global = true, default_value = "runc", value_name = "PATH")]
    oci_runtime: String,
    /// Registry reached over plain HTTP (localhost and 127.0.0.1 always are)
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image from a Dockerfile and a context directory
    Build(Box<BuildArgs>),
    /// List, load, pull, push or remove images in the local store
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Show the disk used by the build cache
    Du,
    /// List or remove cache-mount volumes (RUN --mount=type=cache)
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Remove build cache records (least recently used first) and their snapshots; with no
    /// limits, everything. After each build, the cache is trimmed to 10GB.
    Prune {
        /// Keep records used within this long (e.g. 48h, 30m)
        #[arg(long, value_name = "DURATION")]
        keep_duration: Option<String>,
        /// Keep at most this much cache (e.g. 5GB, 500MB)
        #[arg(long, value_name = "SIZE")]
        keep_storage: Option<String>,
    },
    /// Developer tools
    #[command(subcommand)]
    Debug(DebugCmd),
}

#[derive(Subcommand)]
enum ImagesCmd {
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
enum CacheCmd {
    /// List cache volumes: id, size, last used
    Ls,
    /// Remove cache volumes (all, or those matching --filter id=ID)
    Prune {
        #[arg(long, value_name = "id=ID")]
        filter: Option<String>,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Print the LLB a Dockerfile compiles to, as JSON
    DumpLlb(FrontendArgs),
}

#[derive(Args, Clone)]
struct FrontendArgs {
    /// Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Build-time variable
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// Stage to build (default: the last)
    #[arg(long)]
    target: Option<String>,
    /// Run this local executable as the frontend for `# syntax = NAME` (NAME=PATH), or for any
    /// name that is not docker/dockerfile (PATH); see docs/frontends.md
    #[arg(long = "frontend-path", value_name = "[NAME=]PATH")]
    frontend_paths: Vec<String>,
    /// Build context directory
    context: PathBuf,
}

#[derive(Args)]
struct BuildArgs {
    #[command(flatten)]
    frontend: FrontendArgs,
    /// Name the result in the local image store
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    tags: Vec<String>,
    /// Where to write the result: type=oci,dest=FILE | type=docker,dest=FILE | type=local,dest=DIR |
    /// type=image,name=REF[,push=true] | type=registry,name=REF |
    /// type=containerd,name=REF[,address=SOCK][,namespace=NS]
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    outputs: Vec<String>,
    /// Run every step, ignoring the cache
    #[arg(long)]
    no_cache: bool,
    /// Run the steps of these stages, ignoring the cache
    #[arg(long, value_name = "STAGE")]
    no_cache_filter: Vec<String>,
    /// Progress output
    #[arg(long, value_enum, default_value = "auto")]
    progress: Mode,
    /// Named context: NAME=oci-layout:///DIR[:TAG] or NAME=docker-image://REF; FROM NAME and
    /// --from=NAME then use that image
    #[arg(long = "build-context", value_name = "NAME=SOURCE")]
    build_contexts: Vec<String>,
    /// Secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (never stored in the image or cache)
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    /// ssh agent for RUN --mount=type=ssh: default=$SSH_AUTH_SOCK, ID=SOCKET, or ID=KEYFILE[,KEYFILE]
    /// (unencrypted keys served by an agent inside strata; keys with a passphrase: use your agent)
    #[arg(long = "ssh", value_name = "ID=SOCKET|KEYS")]
    ssh: Vec<String>,
    /// Export the build cache to a registry: type=registry,ref=REF[,mode=min|max][,mounts=true]
    /// (max: every step; mounts: RUN --mount=type=cache volumes too)
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Import a build cache exported with --cache-to: type=registry,ref=REF[,mounts=true] or REF
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Check the registry for newer base images even when the local store has them
    #[arg(long)]
    pull: bool,
    /// Steps run at once (default: number of CPUs)
    #[arg(long, value_name = "N")]
    max_parallelism: Option<usize>,
}

fn read_dockerfile(f: &FrontendArgs) -> anyhow::Result<(PathBuf, String)> {
    let path = f
        .file
        .clone()
        .unwrap_or_else(|| f.context.join("Dockerfile"));
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "no Dockerfile at {}: pass -f FILE or add a Dockerfile to the context",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot read Dockerfile {}: {e}", path.display()),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        anyhow::anyhow!(
            "Dockerfile {}:{line}: not UTF-8 text (invalid byte at offset {at}); save it as UTF-8",
            path.display()
        )
    })?;
    Ok((path, text))
}

fn ignore_rules(dockerfile: &Path, context: &Path) -> anyhow::Result<Ignore> {
    let specific = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
    for p in [specific, context.join(".dockerignore")] {
        if p.is_file() {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
            return Ok(Ignore::parse(&text));
        }
    }
    Ok(Ignore::default())
}

fn convert_options(f: &FrontendArgs, ignore: Ignore) -> anyhow::Result<ConvertOptions> {
    let mut build_args = BTreeMap::new();
    for a in &f.build_args {
        match a.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            // `--build-arg NAME` takes the value from the environment, as docker does.
            None => std::env::var(a)
                .ok()
                .and_then(|v| build_args.insert(a.clone(), v)),
        };
    }
    Ok(ConvertOptions {
        build_args,
        target: f.target.clone(),
        ignore,
        ..Default::default()
    })
}

/// Compiles the source file to LLB and an image config with the frontend its `# syntax` line
/// names: the built-in Dockerfile frontend, or an external one run in a sandbox.
async fn frontend(
    worker: &Arc<Worker>,
    f: &FrontendArgs,
    path: &Path,
    text: String,
    opts: ConvertOptions,
    progress: &Arc<Progress>,
) -> anyhow::Result<(Definition, ImageConfig)> {
    let syntax = strata_solver::dockerfile::parser::syntax(&text);
    let fe = frontend::select(syntax.as_deref(), &f.frontend_paths).map_err(anyhow::Error::msg)?;
    if fe == Frontend::Dockerfile {
        let w = worker.clone();
        let c = tokio::task::spawn_blocking(move || convert(&text, &opts, &*w)).await??;
        return Ok((c.definition, c.config));
    }
    let (w, progress) = (worker.clone(), progress.clone());
    let (source, context) = (path.to_path_buf(), f.context.clone());
    let r = tokio::task::spawn_blocking(move || {
        let v = progress.vertex(&format!(
            "[internal] frontend {}",
            syntax.unwrap_or_default()
        ));
        let req = frontend::Request {
            source: &source,
            context: &context,
            build_args: &opts.build_args,
            target: opts.target.as_deref(),
        };
        let r = w.run_frontend(&fe, &req, &|l| v.log(l));
        match &r {
            Ok(_) => v.done(),
            Err(e) => v.error(&e.to_string()),
        }
        r
    })
    .await??;
    Ok((r.definition, r.config))
}

fn open_worker(cli: &Cli) -> anyhow::Result<Arc<Worker>> {
    let registry = strata_image::registry::Options {
        insecure: cli.insecure_registry.clone(),
        ..Default::default()
    };
    let w = Worker::open(&cli.root, &cli.oci_runtime, registry)
        .with_context(|| format!("open the build store under {}", cli.root.display()))?;
    Ok(Arc::new(w))
}

async fn build(cli: &Cli, args: &BuildArgs) -> anyhow::Result<()> {
    let progress = Arc::new(Progress::new(args.progress));
    let f = &args.frontend;
    let v = progress.vertex("[internal] load build definition from Dockerfile");
    let (path, text) = read_dockerfile(f)?;
    v.log(&format!("transferring dockerfile: {}B done", text.len()));
    v.done();
    let v = progress.vertex("[internal] load .dockerignore");
    let ignore = ignore_rules(&path, &f.context)?;
    v.done();
    let mut outputs: Vec<Output> = args
        .outputs
        .iter()
        .map(|o| Output::parse(o).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    for t in &args.tags {
        strata_solver::worker::images::checked_name(t).map_err(|e| anyhow::anyhow!("-t {e}"))?;
    }
    // An OCI archive without a name= is named like the first -t.
    for o in &mut outputs {
        if let Output::Oci {
            name: name @ None, ..
        }
        | Output::Docker {
            name: name @ None, ..
        } = o
        {
            *name = args.tags.first().cloned();
        }
    }
    outputs.extend(args.tags.iter().map(|t| Output::Image {
        name: t.clone(),
        push: false,
    }));
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not unix seconds"))
        })
        .transpose()?;

    let mut worker = open_worker(cli)?;
    Arc::get_mut(&mut worker)
        .expect("not shared yet")
        .always_pull = args.pull;
    let mut opts = convert_options(f, ignore.clone())?;
    opts.no_cache = args.no_cache;
    for spec in &args.build_contexts {
        let (name, source) = spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--build-context {spec:?}: use NAME=oci-layout:///DIR[:TAG] or NAME=docker-image://REF"))?;
        let image = if let Some(path) = source.strip_prefix("oci-layout://") {
            let (dir, tag) = match path.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d, Some(t)),
                _ => (path, None),
            };
            worker.load_layout_dir(
                Path::new(dir),
                tag,
                &format!(
                    "localhost/strata-context/{}:{}",
                    name.to_ascii_lowercase(),
                    tag.unwrap_or("latest")
                ),
            )?
        } else if let Some(r) = source.strip_prefix("docker-image://") {
            r.to_string()
        } else {
            bail!("--build-context {spec:?}: the source must be oci-layout:///DIR[:TAG] or docker-image://REF");
        };
        opts.contexts.insert(name.to_string(), image);
    }
    opts.no_cache_filter = args.no_cache_filter.clone();
    let cache_to = parse_cache_specs(&args.cache_to, "--cache-to")?;
    let cache_from = parse_cache_specs(&args.cache_from, "--cache-from")?;
    let (definition, config) = frontend(&worker, f, &path, text, opts, &progress).await?;
    let graph = Graph::from_definition(&definition)?;
    let volume_ids = graph.cache_ids();
    for spec in cache_from {
        let (w, p) = (worker.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            let v = p.vertex(&format!("importing cache manifest from {}", spec.reference));
            match remote_cache::import(&w, &spec) {
                Ok(s) => {
                    v.log(&format!(
                        "{} records ({} layers), {} cache volumes imported; {} already here",
                        s.records, s.layers, s.volumes, s.kept
                    ));
                    v.done();
                }
                // A missing or unreachable cache makes a cold build, as in BuildKit.
                Err(e) => {
                    v.log(&format!("not imported: {e}"));
                    v.done();
                }
            }
        })
        .await?;
    }
    let context = Context {
        dir: f
            .context
            .canonicalize()
            .with_context(|| format!("build context {}", f.context.display()))?,
        ignore,
    };
    let parallel = args.max_parallelism.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let session = session(&args.secrets, &args.ssh)?;
    let solver = Solver::new(
        worker.clone(),
        graph,
        Some(context),
        session,
        progress.clone(),
        parallel,
    );

    // Ctrl-C: running steps are killed, mounts undone, no cache record written for them.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            CANCELLED.store(true, Ordering::SeqCst);
        }
    });
    let done = solver
        .solve()
        .await
        .map_err(|e| anyhow::anyhow!("failed to solve: {e}"))?;
    let result = done
        .map(|d| d.result.clone())
        .unwrap_or(strata_solver::worker::Ref::Scratch);

    let v = progress.vertex("exporting to image");
    let w = worker.clone();
    let r = result.clone();
    let outs = outputs.clone();
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let manifest = export::image(&w, &r, config, epoch)?;
        let mut lines = vec![format!("writing image {}", manifest.digest)];
        for o in &outs {
            lines.push(export::write(&w, o, &r, &manifest, epoch)?);
        }
        Ok(lines)
    })
    .await??;
    for l in &lines {
        v.log(l);
    }
    v.done();
    for spec in cache_to {
        let (w, p, keys) = (worker.clone(), progress.clone(), solver.keys());
        let final_chain = match &result {
            strata_solver::worker::Ref::Snapshot(top) => {
                let mut c = worker.snapshots.parents(top)?;
                c.push(top.clone());
                c
            }
            _ => Vec::new(),
        };
        let ids = volume_ids.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let v = p.vertex(&format!("exporting cache to {}", spec.reference));
            match remote_cache::export(&w, &spec, &keys, &final_chain, &ids) {
                Ok(s) => {
                    v.log(&format!(
                        "{} records, {} layers, {} cache volumes",
                        s.records, s.layers, s.volumes
                    ));
                    v.done();
                    Ok(())
                }
                Err(e) => {
                    v.error(&e.to_string());
                    Err(anyhow::anyhow!("--cache-to {}: {e}", spec.reference))
                }
            }
        })
        .await??;
    }
    // The default GC policy, after every build.
    let w = worker.clone();
    let trimmed = tokio::task::spawn_blocking(move || {
        strata_solver::gc::prune(&w, &strata_solver::gc::DEFAULT)
    })
    .await??;
    if trimmed.records > 0 {
        progress.note(&format!(
            "trimmed the build cache to 10GB: {} records, {} freed",
            trimmed.records,
            human(trimmed.freed)
        ));
    }
    let s = solver.stats();
    progress.note(&format!(
        "built in {:.1}s: {} steps, {} cached, {} run",
        progress.started.elapsed().as_secs_f64(),
        s.vertices,
        s.cached,
        s.executed
    ));
    Ok(())
}

fn parse_cache_specs(specs: &[String], flag: &str) -> anyhow::Result<Vec<CacheSpec>> {
    specs
        .iter()
        .map(|s| CacheSpec::parse(s, flag).map_err(anyhow::Error::msg))
        .collect()
}

/// The build's secrets and ssh agents from `--secret` and `--ssh`.
fn session(secrets: &[String], ssh: &[String]) -> anyhow::Result<Session> {
    let mut out = Session::default();
    for spec in secrets {
        let (id, value) = strata_solver::secrets::parse(spec)?;
        out.secrets.insert(id, value);
    }
    for spec in ssh {
        let (id, value) = match spec.split_once('=') {
            Some((i, v)) => (i.to_string(), v.to_string()),
            None => (
                spec.clone(),
                std::env::var("SSH_AUTH_SOCK").unwrap_or_default(),
            ),
        };
        let paths: Vec<&Path> = value.split(',').map(Path::new).collect();
        let is_socket = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                .unwrap_or(false)
        };
        let agent = match paths.as_slice() {
            [p] if is_socket(p) => Agent::Socket(p.to_path_buf()),
            ps if !value.is_empty() && ps.iter().all(|p| p.is_file()) => Agent::Keys(Arc::new(
                Keys::load(&id, ps).map_err(anyhow::Error::msg)?,
            )),
            _ => bail!("--ssh {spec}: {value:?} is neither an ssh agent socket nor key files; pass --ssh {id}=$SSH_AUTH_SOCK (after ssh-agent and ssh-add) or --ssh {id}=~/.ssh/id_ed25519"),
        };
        out.ssh.insert(id, agent);
    }
    Ok(out)
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: use e.g. 10GB, 500MB"))?;
    let mult = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        _ => bail!("size {s:?}: unit must be B, KB, MB, GB or TB"),
    };
    Ok((n * mult) as u64)
}

fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("duration {s:?}: use e.g. 48h, 30m, 7d"))?;
    Ok(n * match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("duration {s:?}: unit must be s, m, h or d"),
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STRATA_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("start async runtime")?;
    match &cli.command {
        Cmd::Build(args) => rt.block_on(build(&cli, args)),
        Cmd::Images(ImagesCmd::Ls) => {
            let w = open_worker(&cli)?;
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
                    human(size)
                );
            }
            Ok(())
        }
        Cmd::Images(ImagesCmd::Load { archive }) => {
            let w = open_worker(&cli)?;
            for name in w.load_archive(archive)? {
                println!("loaded {name}");
            }
            Ok(())
        }
        Cmd::Images(ImagesCmd::Pull { reference }) => {
            let w = open_worker(&cli)?;
            println!("pulled {}", w.pull(reference)?);
            Ok(())
        }
        Cmd::Images(ImagesCmd::Push { name }) => {
            let w = open_worker(&cli)?;
            let (desc, _) = w.manifest(name)?;
            w.push(name, &desc)?;
            println!("pushed {name} ({})", desc.digest);
            Ok(())
        }
        Cmd::Images(ImagesCmd::Rm { name }) => {
            let w = open_worker(&cli)?;
            let n = strata_solver::worker::images::normalize(name);
            if w.db.image(&n)?.is_none() {
                bail!("image {n} is not in the local store (see `strata images ls`)");
            }
            w.db.delete_image(&n)?;
            println!("untagged {n}");
            Ok(())
        }
        Cmd::Du => {
            let w = open_worker(&cli)?;
            let mut total = 0i64;
            println!("{:<72} {:>10}  DESCRIPTION", "CACHE KEY", "SIZE");
            for (key, rec) in w.db.caches()? {
                let size = w
                    .snapshots
                    .usage(&rec.snapshot)
                    .map(|u| u.size)
                    .unwrap_or(0);
                total += size;
                println!("{key:<72} {:>10}  {}", human(size as u64), rec.description);
            }
            println!("total: {}", human(total as u64));
            Ok(())
        }
        Cmd::Prune {
            keep_duration,
            keep_storage,
        } => {
            let w = open_worker(&cli)?;
            let policy = strata_solver::gc::Policy {
                keep_duration: keep_duration.as_deref().map(parse_duration).transpose()?,
                keep_storage: keep_storage.as_deref().map(parse_size).transpose()?,
            };
            let r = strata_solver::gc::prune(&w, &policy)?;
            println!(
                "removed {} cache records, freed {}",
                r.records,
                human(r.freed)
            );
            Ok(())
        }
        Cmd::Cache(CacheCmd::Ls) => {
            let w = open_worker(&cli)?;
            println!("{:<40} {:>10}  LAST USED", "ID", "SIZE");
            for v in w.volumes.list()? {
                let ago = strata_solver::db::now().saturating_sub(v.last_used);
                println!("{:<40} {:>10}  {} ago", v.id, human(v.size), age(ago));
            }
            Ok(())
        }
        Cmd::Cache(CacheCmd::Prune { filter }) => {
            let w = open_worker(&cli)?;
            let want = match filter.as_deref() {
                None => None,
                Some(f) => Some(
                    f.strip_prefix("id=")
                        .ok_or_else(|| anyhow::anyhow!("--filter {f:?}: use id=ID"))?
                        .to_string(),
                ),
            };
            let mut n = 0;
            for v in w.volumes.list()? {
                if want.as_ref().is_none_or(|id| *id == v.id) {
                    w.volumes.remove(&v.id)?;
                    n += 1;
                }
            }
            println!("removed {n} cache volumes");
            Ok(())
        }
        Cmd::Debug(DebugCmd::DumpLlb(f)) => {
            let (path, text) = read_dockerfile(f)?;
            let w = open_worker(&cli)?;
            let opts = convert_options(f, ignore_rules(&path, &f.context)?)?;
            let progress = Arc::new(Progress::new(Mode::Quiet));
            let (definition, _) = rt.block_on(frontend(&w, f, &path, text, opts, &progress))?;
            let graph = Graph::from_definition(&definition)?;
            println!("{}", serde_json::to_string_pretty(&graph.to_json())?);
            Ok(())
        }
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", units[i])
    }
}
