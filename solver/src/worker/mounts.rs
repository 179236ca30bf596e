//! The extra mounts of a RUN step (`--mount=type=cache|secret|ssh|tmpfs|bind`), prepared on the
//! host for the runtime spec and undone when the step ends. Secrets live only in a tmpfs and in
//! the step's environment: never in a layer, a cache key or a log.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::volumes::{Init, Lease, Sharing};
use nix::mount::{mount, MsFlags};
use strata_image::nonce;
use strata_snapshotter::mounts::unmount;

use super::{rootfs, tree, Context, Ref, Worker, WorkerError};
use crate::llb;

/// Secrets and ssh agents the client gave this build (`--secret`, `--ssh`).
#[derive(Default, Clone)]
pub struct Session {
    pub secrets: crate::secrets::Secrets,
    /// ssh id → how to reach the agent that answers for it.
    pub ssh: HashMap<String, Dialer>,
    /// Set when the build is cancelled (Ctrl-C, or its client went away): running steps are
    /// killed, mounts undone, no cache record written for them.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl Session {
    /// The value of secret `id`, asked of the client the first time; None if it has none.
    fn secret(&self, id: &str) -> Result<Option<Vec<u8>>, WorkerError> {
        self.secrets
            .get(id)
            .map_err(|m| WorkerError::Exec(format!("secret {id}: the client did not answer: {m}")))
    }

    /// `e` with every secret value in its text replaced by `****`: a failed step's error carries
    /// its last lines of output, and errors reach the terminal, rawjson events and logs.
    pub fn mask_error(&self, e: WorkerError) -> WorkerError {
        let needles = self.secrets.needles();
        let mask = |s: &str| crate::secrets::mask(&needles, s);
        match e {
            WorkerError::ExitCode {
                command,
                code,
                tail,
            } => WorkerError::ExitCode {
                command: mask(&command),
                code,
                tail: mask(&tail),
            },
            WorkerError::Exec(msg) => WorkerError::Exec(mask(&msg)),
            other => other,
        }
    }
}

/// The host's `/etc/resolv.conf` and `/etc/hosts`, read-only, for steps on the host's network.
pub fn name_resolution() -> Vec<SpecMount> {
    ["/etc/resolv.conf", "/etc/hosts"]
        .into_iter()
        .filter(|p| Path::new(p).is_file())
        .map(|p| SpecMount {
            dest: p.into(),
            source: p.into(),
            kind: "bind",
            options: vec!["bind".into(), "ro".into(), "nosuid".into(), "nodev".into()],
        })
        .collect()
}

/// Opens one connection to an ssh agent (the client's, relayed over its session): each
/// connection a step makes to its agent socket is relayed to one of these.
pub type Dialer = Arc<dyn Fn() -> std::io::Result<UnixStream> + Send + Sync>;

/// A mount the runtime spec gets.
#[derive(Debug, Clone)]
pub struct SpecMount {
    pub dest: String,
    pub source: PathBuf,
    /// `bind` or `tmpfs`
    pub kind: &'static str,
    pub options: Vec<String>,
}

/// What a step's mounts hold on to until it ends; dropping it undoes them.
#[derive(Default)]
pub struct Prepared {
    pub spec: Vec<SpecMount>,
    pub env: Vec<String>,
    mounted: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    views: Vec<String>,
    _leases: Vec<Lease>,
    stop: Vec<Arc<AtomicBool>>,
}

/// A step's inputs and its build context, which mounts read from.
struct Inputs<'a> {
    inputs: &'a [Ref],
    context: Option<&'a Context>,
}

/// `--mount type=secret,env=NAME`: the secrets a step gets as environment variables.
fn secret_env(secretenv: &[llb::SecretEnv], session: &Session) -> Result<Vec<String>, WorkerError> {
    let mut env = Vec::new();
    for e in secretenv {
        match session.secret(&e.id)? {
            Some(v) => env.push(format!("{}={}", e.name, String::from_utf8_lossy(&v))),
            None if e.optional => {}
            None => {
                return Err(WorkerError::Exec(format!(
                    "secret {}: not found; pass it with --secret id={},src=FILE or id={},env=VAR",
                    e.id, e.id, e.id
                )))
            }
        }
    }
    Ok(env)
}

/// What the session holds for the mount's id; None when it holds nothing and the mount is
/// optional, an error (`missing`) when it is required.
fn given<'a, T>(
    held: &'a HashMap<String, T>,
    o: &llb::SecretOpt,
    missing: impl FnOnce() -> String,
) -> Result<Option<&'a T>, WorkerError> {
    match held.get(&o.id) {
        Some(v) => Ok(Some(v)),
        None if o.optional => Ok(None),
        None => Err(WorkerError::Exec(missing())),
    }
}

/// The volume a cache mount asks for.
fn cache_request(m: &llb::Mount) -> (String, Sharing, Init) {
    let c = m.cache_opt.clone().unwrap_or_default();
    let sharing = match llb::CacheSharing::from_i32(c.sharing) {
        Some(llb::CacheSharing::Private) => Sharing::Private,
        Some(llb::CacheSharing::Locked) => Sharing::Locked,
        _ => Sharing::Shared,
    };
    let init = Init {
        mode: c.mode,
        uid: c.uid,
        gid: c.gid,
    };
    (c.id, sharing, init)
}

/// Empties a cache volume (`--no-cache` starts the step's caches afresh).
fn empty_dir(dir: &Path) -> Result<(), WorkerError> {
    let entries =
        fs::read_dir(dir).map_err(WorkerError::io(format!("read cache {}", dir.display())))?;
    for e in entries.flatten() {
        let _ = strata_snapshotter::layout::remove_tree(&e.path());
    }
    Ok(())
}

/// `from=`: an empty volume is seeded with the files of `seed`.
fn seed_cache(seed: &Path, volume: &Path) -> Result<(), WorkerError> {
    let empty = fs::read_dir(volume).is_ok_and(|mut d| d.next().is_none());
    if !empty {
        return Ok(());
    }
    let src = tree::Source {
        root: seed,
        ignore: None,
    };
    let attrs = || tree::Attrs {
        owner: None,
        mode: None,
    };
    let entries =
        fs::read_dir(seed).map_err(WorkerError::io(format!("read {}", seed.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        tree::copy(
            &src,
            &e.path(),
            &name.to_string_lossy(),
            &volume.join(&name),
            attrs(),
        )
        .map_err(WorkerError::io("seed cache"))?;
    }
    Ok(())
}

/// `source=`: a path inside the volume, which a symlink on the way could lead out of.
fn cache_source(volume: &Path, selector: &str) -> Result<PathBuf, WorkerError> {
    let mut walk = volume.to_path_buf();
    let parts = Path::new(selector).components();
    for c in parts.filter(|c| matches!(c, std::path::Component::Normal(_))) {
        walk.push(c);
        if fs::symlink_metadata(&walk).is_ok_and(|md| md.file_type().is_symlink()) {
            return Err(WorkerError::Exec(format!("cache mount source={selector}: {} is a symlink; a cache source must be a plain path inside the cache", c.as_os_str().to_string_lossy())));
        }
    }
    let sub = rootfs::resolve(volume, selector, true)
        .map_err(WorkerError::io(format!("cache source {selector}")))?;
    fs::create_dir_all(&sub).map_err(WorkerError::io(format!("create cache source {selector}")))?;
    Ok(sub)
}

/// A bind of `source` at the mount's destination, read-only if it is.
fn bind_spec(m: &llb::Mount, source: PathBuf) -> SpecMount {
    let mut options = vec!["rbind".to_string()];
    if m.readonly {
        options.push("ro".into());
    }
    SpecMount {
        dest: m.dest.clone(),
        source,
        kind: "bind",
        options,
    }
}

/// `type=tmpfs`, of the size asked for.
fn tmpfs_mount(m: &llb::Mount) -> SpecMount {
    let size = m.tmpfs_opt.as_ref().map(|t| t.size).unwrap_or(0);
    let mut options = vec!["nosuid".to_string(), "nodev".into()];
    if size > 0 {
        options.push(format!("size={}k", size / 1024));
    }
    SpecMount {
        dest: m.dest.clone(),
        source: PathBuf::from("tmpfs"),
        kind: "tmpfs",
        options,
    }
}

/// Gives a secret file or agent socket (`what`) the owner and mode its mount asks for.
fn set_owner_mode(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    what: &str,
) -> Result<(), WorkerError> {
    lchown(path, Some(uid), Some(gid)).map_err(WorkerError::io(format!("chown {what}")))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(WorkerError::io(format!("chmod {what}")))
}

impl Worker {
    fn scratch_dir(&self, p: &mut Prepared) -> Result<PathBuf, WorkerError> {
        let d = self.state_dir().join("mnt").join(nonce());
        fs::create_dir_all(&d).map_err(WorkerError::io(format!("create {}", d.display())))?;
        p.dirs.push(d.clone());
        Ok(d)
    }

    /// The host directory of input `r` at `selector`, kept available until `p` drops.
    fn input_dir(
        &self,
        r: &Ref,
        selector: &str,
        context: Option<&Context>,
        p: &mut Prepared,
    ) -> Result<PathBuf, WorkerError> {
        match r {
            Ref::Snapshot(key) => {
                let view = format!("tmp/{}", nonce());
                let m = self.snapshots.view(&view, key, Default::default())?;
                p.views.push(view);
                let dir = self.scratch_dir(p)?;
                strata_snapshotter::mounts::mount_all(&m, &dir)?;
                p.mounted.push(dir.clone());
                rootfs::resolve(&dir, selector, true)
                    .map_err(WorkerError::io(format!("resolve {selector}")))
            }
            Ref::Context => {
                let ctx = context.ok_or_else(|| {
                    WorkerError::Exec("a bind mount of the context, but this build has none".into())
                })?;
                let src = tree::Source {
                    root: &ctx.dir,
                    ignore: Some(&ctx.ignore),
                };
                let path = rootfs::resolve(&ctx.dir, selector, true)
                    .map_err(WorkerError::io(format!("resolve {selector}")))?;
                // Only what .dockerignore lets through may reach the step.
                let dir = self.scratch_dir(p)?;
                let dest = dir.join("ctx");
                tree::copy(
                    &src,
                    &path,
                    selector.trim_start_matches('/'),
                    &dest,
                    tree::Attrs {
                        owner: Some((0, 0)),
                        mode: None,
                    },
                )
                .map_err(WorkerError::io(format!("copy context {selector}")))?;
                Ok(dest)
            }
            Ref::Scratch => {
                let d = self.scratch_dir(p)?;
                Ok(d)
            }
            Ref::Http { .. } => Err(WorkerError::Exec("a download cannot be mounted".into())),
        }
    }

    /// Prepares `mounts` (all but the root) of a step.
    pub fn prepare_mounts(
        &self,
        mounts: &[llb::Mount],
        secretenv: &[llb::SecretEnv],
        inputs: &[Ref],
        context: Option<&Context>,
        session: &Session,
        reset_caches: bool,
    ) -> Result<Prepared, WorkerError> {
        let mut p = Prepared {
            env: secret_env(secretenv, session)?,
            ..Default::default()
        };
        let from = Inputs { inputs, context };
        // mounts[0] is the root.
        let mounts = mounts.get(1..).unwrap_or_default();
        self.cache_mounts(mounts, &from, reset_caches, &mut p)?;
        let mut agents = 0;
        for m in mounts {
            match llb::MountType::from_i32(m.mount_type) {
                Some(llb::MountType::Cache) | None => {}
                Some(llb::MountType::Bind) => self.bind_mount(m, &from, &mut p)?,
                Some(llb::MountType::Tmpfs) => p.spec.push(tmpfs_mount(m)),
                Some(llb::MountType::Secret) => self.secret_mount(m, session, &mut p)?,
                Some(llb::MountType::Ssh) => {
                    self.ssh_mount(m, session, agents, &mut p)?;
                    agents += 1;
                }
            }
        }
        Ok(p)
    }

    /// Cache volumes, all acquired at once (in id order, so steps never deadlock).
    fn cache_mounts(
        &self,
        mounts: &[llb::Mount],
        from: &Inputs,
        reset: bool,
        p: &mut Prepared,
    ) -> Result<(), WorkerError> {
        let caches: Vec<&llb::Mount> = mounts
            .iter()
            .filter(|m| m.mount_type == llb::MountType::Cache as i32)
            .collect();
        let requests: Vec<_> = caches.iter().map(|m| cache_request(m)).collect();
        let leases = self.volumes.acquire_all(&requests)?;
        for (m, lease) in caches.iter().zip(&leases) {
            if reset {
                empty_dir(&lease.path)?;
            }
            let source = if m.input >= 0 {
                let seed =
                    self.input_dir(&from.inputs[m.input as usize], &m.selector, from.context, p)?;
                seed_cache(&seed, &lease.path)?;
                lease.path.clone()
            } else {
                cache_source(&lease.path, &m.selector)?
            };
            p.spec.push(bind_spec(m, source));
        }
        p._leases = leases;
        Ok(())
    }

    /// `type=bind`: the input's directory; a read-write bind gets a throwaway overlay so that
    /// writes never land in the source.
    fn bind_mount(
        &self,
        m: &llb::Mount,
        from: &Inputs,
        p: &mut Prepared,
    ) -> Result<(), WorkerError> {
        let input = usize::try_from(m.input)
            .ok()
            .and_then(|i| from.inputs.get(i))
            .cloned()
            .unwrap_or(Ref::Scratch);
        let src = self.input_dir(&input, &m.selector, from.context, p)?;
        let source = if m.readonly {
            src
        } else {
            self.throwaway_overlay(&src, p)?
        };
        p.spec.push(bind_spec(m, source));
        Ok(())
    }

    /// An overlay of `lower` whose upper is discarded with the step.
    fn throwaway_overlay(&self, lower: &Path, p: &mut Prepared) -> Result<PathBuf, WorkerError> {
        let d = self.scratch_dir(p)?;
        let (upper, work, merged) = (d.join("u"), d.join("w"), d.join("m"));
        for x in [&upper, &work, &merged] {
            fs::create_dir(x).map_err(WorkerError::io(format!("create {}", x.display())))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| WorkerError::io("rw bind mount overlay")(e.into()))?;
        p.mounted.push(merged.clone());
        Ok(merged)
    }

    /// `type=secret`: the value in a file on a tmpfs of its own, bound read-only.
    fn secret_mount(
        &self,
        m: &llb::Mount,
        session: &Session,
        p: &mut Prepared,
    ) -> Result<(), WorkerError> {
        let o = m.secret_opt.clone().unwrap_or_default();
        let missing = || {
            format!(
                "secret {0}: not found; pass it with --secret id={0},src=FILE",
                o.id
            )
        };
        let value = match session.secret(&o.id)? {
            Some(v) => v,
            None if o.optional => return Ok(()),
            None => return Err(WorkerError::Exec(missing())),
        };
        let dir = self.scratch_dir(p)?;
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if o.mode & 0o111 == 0 {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            flags,
            Some("mode=0755,size=1m"),
        )
        .map_err(|e| WorkerError::io("secret tmpfs")(e.into()))?;
        p.mounted.push(dir.clone());
        let file = dir.join("secret");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(WorkerError::io("write secret"))?;
        f.write_all(&value)
            .map_err(WorkerError::io("write secret"))?;
        set_owner_mode(&file, o.uid, o.gid, o.mode, "secret")?;
        p.spec.push(SpecMount {
            dest: m.dest.clone(),
            source: file,
            kind: "bind",
            options: vec!["rbind".into(), "ro".into()],
        });
        Ok(())
    }

    /// `type=ssh`: socket number `n` of the step, forwarded to the agent of its id.
    fn ssh_mount(
        &self,
        m: &llb::Mount,
        session: &Session,
        n: usize,
        p: &mut Prepared,
    ) -> Result<(), WorkerError> {
        let o = m.ssh_opt.clone().unwrap_or_default();
        let missing = || {
            format!(
                "ssh agent {:?}: not given; pass --ssh {}=$SSH_AUTH_SOCK",
                o.id, o.id
            )
        };
        let Some(agent) = given(&session.ssh, &o, missing)? else {
            return Ok(());
        };
        let sock = self.scratch_dir(p)?.join(format!("agent.{n}"));
        p.stop.push(forward_agent(&sock, agent.clone())?);
        set_owner_mode(&sock, o.uid, o.gid, o.mode, "ssh socket")?;
        p.spec.push(SpecMount {
            dest: m.dest.clone(),
            source: sock,
            kind: "bind",
            options: vec!["rbind".into()],
        });
        Ok(())
    }

    /// Undoes what `prepare_mounts` did.
    pub fn release_mounts(&self, mut p: Prepared) {
        for s in &p.stop {
            s.store(true, Ordering::SeqCst);
        }
        for m in p.mounted.iter().rev() {
            let _ = unmount(m);
        }
        for v in &p.views {
            let _ = self.snapshots.remove(v);
        }
        for d in p.dirs.iter().rev() {
            let _ = fs::remove_dir_all(d);
        }
        p.mounted.clear();
    }
}

/// Serves `sock`: every connection is relayed to the user's agent or answered from loaded keys;
/// stops when the flag is set.
fn forward_agent(sock: &Path, agent: Dialer) -> Result<Arc<AtomicBool>, WorkerError> {
    let listener = UnixListener::bind(sock)
        .map_err(WorkerError::io(format!("listen on {}", sock.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(WorkerError::io("ssh socket"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((client, _)) => {
                    let agent = agent.clone();
                    std::thread::spawn(move || {
                        let _ = client.set_nonblocking(false);
                        if let Ok(upstream) = agent() {
                            relay(client, upstream);
                        }
                    });
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    });
    Ok(stop)
}

/// Copies bytes both ways between a step's connection and the user's agent.
pub fn relay(client: UnixStream, upstream: UnixStream) {
    let (Ok(mut c1), Ok(mut u1)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c1, &mut u1);
        let _ = u1.shutdown(std::net::Shutdown::Write);
    });
    let (mut c2, mut u2) = (client, upstream);
    let _ = std::io::copy(&mut u2, &mut c2);
    let _ = c2.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}
