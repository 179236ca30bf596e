//! What stays on the client during a build: `--secret` values and `--ssh` agents, given to the
//! builder only when a step asks for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ClientError;
use crate::worker::agent::Keys;

/// An ssh agent the client answers for.
#[derive(Debug, Clone)]
pub enum Agent {
    /// The user's agent (`--ssh default=$SSH_AUTH_SOCK`): connections are relayed to it.
    Socket(PathBuf),
    /// Keys from files (`--ssh id=KEYFILE`), served by [`Keys`] in this process.
    Keys(Arc<Keys>),
}

/// The secrets and agents of one build.
#[derive(Default)]
pub struct Held {
    pub secrets: HashMap<String, Vec<u8>>,
    pub agents: HashMap<String, Agent>,
}

/// Reads the `--secret` values and finds the `--ssh` agents.
pub fn hold(secrets: &[String], ssh: &[String]) -> Result<Held, ClientError> {
    let mut out = Held::default();
    for spec in secrets {
        let (id, value) = crate::secrets::parse(spec)?;
        out.secrets.insert(id, value);
    }
    for spec in ssh {
        let (id, agent) = ssh_agent(spec)?;
        out.agents.insert(id, agent);
    }
    Ok(out)
}

/// `--ssh ID=SOCKET`, `--ssh ID=KEYFILE[,KEYFILE]`, or `--ssh ID` (the user's `$SSH_AUTH_SOCK`).
fn ssh_agent(spec: &str) -> Result<(String, Agent), ClientError> {
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
        _ => return Err(ClientError::Input(format!("--ssh {spec}: {value:?} is neither an ssh agent socket nor key files; pass --ssh {id}=$SSH_AUTH_SOCK (after ssh-agent and ssh-add) or --ssh {id}=~/.ssh/id_ed25519"))),
    };
    Ok((id, agent))
}
