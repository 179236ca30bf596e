//! `RUN --mount` flags to the exec op's mounts: one function per mount type.

use super::super::instructions::Located;
use super::super::mounts::{parse, Kind, RunMount};
use super::sources::push_input;
use super::{err, expand, resolve_path, Converter};
use crate::dockerfile::DockerfileError;
use crate::llb::{self, Input};
use crate::pattern;

type Result<T> = std::result::Result<T, DockerfileError>;

/// The mounts after the root (index 0) and the secrets exposed as env vars.
type Mounts = (Vec<llb::Mount>, Vec<llb::SecretEnv>);

impl Converter<'_> {
    /// The exec mounts and secret env vars of `RUN --mount` flags `specs`; inputs they read are
    /// added to `inputs`.
    pub(super) fn run_mounts(
        &mut self,
        stage: usize,
        l: &Located,
        specs: &[String],
        wd: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
        inputs: &mut Vec<Input>,
    ) -> Result<Mounts> {
        let esc = self.escape;
        let (mut mounts, mut env) = (Vec::new(), Vec::new());
        let mut ssh = 0;
        for spec in specs {
            let m = parse(spec, &|v| expand::word(v, esc, lookup)).map_err(|e| err(l, e))?;
            let target = m.target.as_ref().map(|t| resolve_path(wd, t));
            let mut mount = llb::Mount {
                input: llb::NO_INPUT,
                output: -1,
                dest: target.clone().unwrap_or_default(),
                readonly: m.readonly.unwrap_or(false),
                ..Default::default()
            };
            match m.kind.expect("parse sets a kind") {
                Kind::Bind => self.bind(stage, l, &m, &mut mount, inputs)?,
                Kind::Cache => self.cache(stage, l, &m, target, &mut mount, inputs)?,
                Kind::Tmpfs => tmpfs(&m, &mut mount),
                Kind::Secret => {
                    let (id, as_env) = secret_id(l, &m, target.as_deref())?;
                    if let Some(name) = &m.env {
                        env.push(llb::SecretEnv {
                            id: id.clone(),
                            name: name.clone(),
                            optional: !m.required,
                        });
                    }
                    if as_env {
                        continue;
                    }
                    secret(&m, id, target, &mut mount);
                }
                Kind::Ssh => {
                    ssh_agent(&m, target, ssh, &mut mount);
                    ssh += 1;
                }
            }
            mounts.push(mount);
        }
        Ok((mounts, env))
    }

    /// `type=bind`: a path of the context, a stage or an image, read-only by default.
    fn bind(
        &mut self,
        stage: usize,
        l: &Located,
        m: &RunMount,
        mount: &mut llb::Mount,
        inputs: &mut Vec<Input>,
    ) -> Result<()> {
        let source = pattern::clean(m.source.as_deref().unwrap_or(""));
        let from = match &m.from {
            Some(f) => self.root_of(stage, l, "RUN --mount", f)?,
            None => Some(self.context_source(vec![source.clone()])),
        };
        mount.input = push_input(inputs, from);
        mount.selector = format!("/{source}");
        mount.readonly = m.readonly.unwrap_or(true);
        mount.mount_type = llb::MountType::Bind as i32;
        Ok(())
    }

    /// `type=cache`: a persistent volume, keyed by `id` (the target by default).
    fn cache(
        &mut self,
        stage: usize,
        l: &Located,
        m: &RunMount,
        target: Option<String>,
        mount: &mut llb::Mount,
        inputs: &mut Vec<Input>,
    ) -> Result<()> {
        let from = match &m.from {
            Some(f) => self.root_of(stage, l, "RUN --mount", f)?,
            None => None,
        };
        mount.input = push_input(inputs, from);
        mount.selector = format!("/{}", pattern::clean(m.source.as_deref().unwrap_or("")));
        let sharing = match m.sharing.as_deref() {
            Some("private") => llb::CacheSharing::Private,
            Some("locked") => llb::CacheSharing::Locked,
            _ => llb::CacheSharing::Shared,
        };
        mount.mount_type = llb::MountType::Cache as i32;
        mount.cache_opt = Some(llb::CacheOpt {
            id: m.id.clone().or(target).unwrap_or_default(),
            sharing: sharing as i32,
            uid: m.uid.unwrap_or(0),
            gid: m.gid.unwrap_or(0),
            mode: m.mode.unwrap_or(0o755),
        });
        Ok(())
    }
}

fn tmpfs(m: &RunMount, mount: &mut llb::Mount) {
    mount.mount_type = llb::MountType::Tmpfs as i32;
    mount.tmpfs_opt = Some(llb::TmpfsOpt {
        size: m.size.unwrap_or(0),
    });
}

/// A secret's id (`id=`, else the target's file name), and whether it is only an env var.
fn secret_id(l: &Located, m: &RunMount, target: Option<&str>) -> Result<(String, bool)> {
    let from_target = || target.and_then(|t| t.rsplit('/').next().map(str::to_string));
    let id = m.id.clone().or_else(from_target).unwrap_or_default();
    if id.is_empty() {
        return Err(err(
            l,
            "--mount type=secret needs id= (or a target to name it)",
        ));
    }
    Ok((id, m.env.is_some() && m.target.is_none()))
}

/// `type=secret`: a read-only file on a tmpfs, `/run/secrets/<id>` by default.
fn secret(m: &RunMount, id: String, target: Option<String>, mount: &mut llb::Mount) {
    mount.dest = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
    mount.mount_type = llb::MountType::Secret as i32;
    mount.readonly = true;
    mount.secret_opt = Some(file_opt(m, id, 0o400));
}

/// `type=ssh`: the n-th agent socket, at BuildKit's default path unless a target is given.
fn ssh_agent(m: &RunMount, target: Option<String>, n: usize, mount: &mut llb::Mount) {
    let id = m.id.clone().unwrap_or_else(|| "default".into());
    mount.dest = target.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{n}"));
    mount.mount_type = llb::MountType::Ssh as i32;
    mount.readonly = true;
    mount.ssh_opt = Some(file_opt(m, id, 0o600));
}

/// The owner, mode (`mode` by default) and requiredness of a secret file or agent socket.
fn file_opt(m: &RunMount, id: String, mode: u32) -> llb::SecretOpt {
    llb::SecretOpt {
        id,
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
        mode: m.mode.unwrap_or(mode),
        optional: !m.required,
    }
}
