//! The daemon's life: take or bind the socket, open the root, serve containerd until told to
//! stop, and on SIGUSR2 hand over to a successor ([`crate::upgrade`]) — or, when the successor
//! fails after taking the database, open it again and serve on.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Runtime;
use tracing::{error, info};

use crate::config::Config;
use crate::lazy::remote::Lazy;
use crate::server::{self, Stop};
use crate::snapshots::{Options, RemoteLayers, Snapshots};
use crate::upgrade::{self, Handover};
use crate::{activation, metrics};

/// How long a successor waits for its predecessor to let go of the database or metrics port.
const TAKE_OVER: Duration = Duration::from_secs(50);

/// Runs the daemon with `config` until SIGTERM/SIGINT, or until a successor serves.
pub fn run(config: &Config) -> anyhow::Result<()> {
    // The path now: after an upgrade the new binary is found there (/proc/self/exe would name
    // this process's own, possibly replaced, file).
    let exe = std::env::current_exe().context("find this executable")?;
    let mut handover = Handover::take()?;
    // One async thread: requests are tiny and all disk work runs on the blocking pool, so a
    // single thread saves the cross-thread wake-ups that dominated latency.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    // Taken before anything is spawned (the lazy layers' servers must not inherit it); a socket
    // of our own is bound only once the root is open and its lazy layers are mounted again, so
    // that a connectable socket means a ready daemon.
    let mut taken = taken_listener(config, handover.as_mut())?;
    loop {
        let successor = handover.is_some();
        let (snapshots, lazy) = open(config, successor)?;
        let (listener, bound) = match taken.take() {
            Some(l) => l,
            None => bind(&runtime, config)?,
        };
        if let Some(h) = handover.take() {
            h.serving()?;
            info!("took over from the previous process");
        }
        upgrade::write_pid(&config.root).context("write the pid file")?;
        let metrics = serve_metrics(&runtime, config, &lazy, successor)?;
        let start = {
            let (exe, root, bound) = (exe.clone(), config.root.clone(), bound.is_some());
            let l = Arc::new(listener.try_clone()?);
            move || upgrade::start_successor(&exe, &l, bound, &root)
        };
        let stop = runtime.block_on(server::serve(
            Arc::new(snapshots),
            listener.try_clone().context("serve the socket")?,
            server::signals(start),
        ))?;
        if let Some(task) = metrics {
            // Dropped now, so that the successor can bind its port.
            runtime.block_on(async {
                task.abort();
                let _ = task.await;
            });
        }
        match stop {
            Stop::Terminate => {
                if let Some(path) = bound {
                    let _ = std::fs::remove_file(path);
                }
                let _ = std::fs::remove_file(upgrade::pid_file(&config.root));
                return Ok(());
            }
            Stop::Upgrade(successor) => match successor.wait_serving(&config.root) {
                Ok(()) => {
                    info!("handed over to the successor");
                    return Ok(());
                }
                Err(e) => {
                    error!(
                        error = format!("{e:#}"),
                        "the successor failed; serving again"
                    );
                    taken = Some((listener, bound));
                }
            },
        }
    }
}

/// A socket and the path to remove when the last process exits (when it was bound by us).
type Listening = (UnixListener, Option<PathBuf>);

/// The socket handed over by a predecessor or passed by the service manager, if any.
fn taken_listener(
    config: &Config,
    handover: Option<&mut Handover>,
) -> anyhow::Result<Option<Listening>> {
    if let Some(h) = handover {
        let l = h.listener.try_clone().context("the handed-over socket")?;
        return Ok(Some((l, h.bound.then(|| config.address.clone()))));
    }
    let inherited = activation::inherited_listener()?;
    if inherited.is_some() {
        info!("serving containerd snapshots API on the socket the service manager passed");
    }
    Ok(inherited.map(|l| (l, None)))
}

/// The socket bound at the configured address.
fn bind(runtime: &Runtime, config: &Config) -> anyhow::Result<Listening> {
    let group = server::socket_group(&config.group)?;
    let l = runtime.block_on(server::bind(&config.address, group))?;
    info!(address = %config.address.display(), "serving containerd snapshots API");
    Ok((l.into_std()?, Some(config.address.clone())))
}

/// Opens the root with lazy layers attached and remounts those whose mount is gone. A successor
/// retries while its predecessor still holds the database.
fn open(config: &Config, successor: bool) -> anyhow::Result<(Snapshots, Arc<Lazy>)> {
    let options = Options {
        async_remove: config.async_remove,
    };
    // Lazy layers are unmounted before removal even when new ones are off (`[lazy] enabled`).
    let lazy = Arc::new(Lazy::new(&config.root, config.lazy.clone())?);
    let deadline = Instant::now() + TAKE_OVER;
    let snapshots = loop {
        match Snapshots::open_with(&config.root, options.clone(), Some(lazy.clone())) {
            Ok(s) => break s,
            Err(e) if successor && Instant::now() < deadline => {
                tracing::debug!(error = %e, "the predecessor still holds the root");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                let root = config.root.display();
                return Err(e).with_context(|| format!("open snapshotter root {root}"));
            }
        }
    };
    let remounted = lazy.check(&snapshots)?;
    if remounted > 0 {
        info!(remounted, "lazy layers mounted again");
    }
    Ok((snapshots, lazy))
}

/// The metrics endpoint on the runtime, when configured; a successor retries while its
/// predecessor still holds the port.
fn serve_metrics(
    runtime: &Runtime,
    config: &Config,
    lazy: &Arc<Lazy>,
    successor: bool,
) -> anyhow::Result<Option<tokio::task::JoinHandle<hyper::Result<()>>>> {
    let address = &config.lazy.metrics_address;
    if address.is_empty() {
        return Ok(None);
    }
    let deadline = Instant::now() + TAKE_OVER;
    let listener = loop {
        match metrics::bind(address) {
            Ok(l) => break l,
            Err(_) if successor && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).with_context(|| format!("metrics on {address}")),
        }
    };
    let task = metrics::serve(listener, config.root.clone(), lazy.clone());
    Ok(Some(runtime.spawn(task)))
}
