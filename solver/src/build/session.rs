//! What stays on the client during a build: `--secret` values and `--ssh` agents.

use std::path::Path;
use std::sync::Arc;

use super::BuildError;
use crate::worker::agent::Keys;
use crate::worker::mounts::{Agent, Session};

/// The build's secrets and ssh agents from `--secret` and `--ssh` specs.
pub fn session(secrets: &[String], ssh: &[String]) -> Result<Session, BuildError> {
    let mut out = Session::default();
    for spec in secrets {
        let (id, value) = crate::secrets::parse(spec)?;
        out.secrets.insert(id, value);
    }
    for spec in ssh {
        let (id, agent) = ssh_agent(spec)?;
        out.ssh.insert(id, agent);
    }
    Ok(out)
}

/// `--ssh ID=SOCKET`, `--ssh ID=KEYFILE[,KEYFILE]`, or `--ssh ID` (the user's `$SSH_AUTH_SOCK`).
fn ssh_agent(spec: &str) -> Result<(String, Agent), BuildError> {
    let (id, value) = match spec.split_once('=') {
        Some((i, v)) => (i.to_string(), v.to_string()),
        None => (
            spec.to_string(),
            std::env::var("SSH_AUTH_SOCK").unwrap_or_default(),
        ),
    };
    let paths: Vec<&Path> = value.split(',').map(Path::new).collect();
    let is_socket = |p: &Path| {
        std::fs::metadata(p)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    };
    let agent = match paths.as_slice() {
        [p] if is_socket(p) => Agent::Socket(p.to_path_buf()),
        ps if !value.is_empty() && ps.iter().all(|p| p.is_file()) => {
            Agent::Keys(Arc::new(Keys::load(&id, ps)?))
        }
        _ => return Err(BuildError::Input(format!("--ssh {spec}: {value:?} is neither an ssh agent socket nor key files; pass --ssh {id}=$SSH_AUTH_SOCK (after ssh-agent and ssh-add) or --ssh {id}=~/.ssh/id_ed25519"))),
    };
    Ok((id, agent))
}
