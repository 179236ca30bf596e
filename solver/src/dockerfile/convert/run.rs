//! RUN: an exec op on the stage's root, with its mounts, network and environment.

use super::super::instructions::{Command, Located};
use super::super::parser::Heredoc;
use super::config::shell;
use super::{env, err, Converter, State};
use crate::dockerfile::DockerfileError;
use crate::llb::{self, op, Op};

/// A RUN instruction's parts.
pub(super) struct Run<'a> {
    pub command: &'a Command,
    pub heredocs: &'a [Heredoc],
    pub network: Option<&'a str>,
    /// Raw `--mount` values.
    pub mounts: &'a [String],
}

impl Converter<'_> {
    pub(super) fn run(
        &mut self,
        stage: usize,
        l: &Located,
        run: &Run,
        step: String,
        st: &mut State,
    ) -> Result<(), DockerfileError> {
        let Some(root) = st.root.clone() else {
            return Err(err(
                l,
                "RUN needs a base image with a shell: FROM scratch has none",
            ));
        };
        let mut env = env::for_run(st);
        let mut inputs = vec![root];
        let wd = st.config.config.working_dir.clone();
        let lookup = |n: &str| env::variable(st, n);
        let (extra, secretenv) =
            self.run_mounts(stage, l, run.mounts, &wd, &lookup, &mut inputs)?;
        let ssh = extra
            .iter()
            .find(|m| m.mount_type == llb::MountType::Ssh as i32);
        if let Some(first_ssh) = ssh {
            env.push(format!("SSH_AUTH_SOCK={}", first_ssh.dest));
        }
        let root_mount = llb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        };
        let exec = llb::ExecOp {
            meta: Some(llb::Meta {
                args: args(run, shell(&st.config)),
                env,
                cwd: if wd.is_empty() { "/".into() } else { wd },
                user: st.config.config.user.clone(),
            }),
            mounts: [vec![root_mount], extra].concat(),
            network: network(run.network) as i32,
            secretenv,
        };
        let exec = Op {
            inputs,
            kind: Some(op::Kind::Exec(exec)),
        };
        st.root = Some(self.builder.add(&exec, self.meta(stage, step)));
        Ok(())
    }
}

/// The process's argv: the exec form as is; the shell form (and its heredocs) through `shell`.
fn args(run: &Run, shell: Vec<String>) -> Vec<String> {
    match (run.command, run.heredocs.first()) {
        (Command::Shell(s), Some(h))
            if s.trim_start().starts_with("<<") && s.split_whitespace().count() == 1 =>
        {
            // The script runs in the shell, which expands its variables at run time.
            [shell, vec![h.content.clone()]].concat()
        }
        (Command::Shell(s), Some(_)) => {
            // The shell runs the heredocs itself: hand it the instruction as written.
            let mut script = s.clone();
            for h in run.heredocs {
                script.push('\n');
                script.push_str(&h.content);
                script.push_str(&h.name);
            }
            [shell, vec![script]].concat()
        }
        (Command::Shell(s), None) => [shell, vec![s.clone()]].concat(),
        (Command::Exec(v), _) => v.clone(),
    }
}

/// `--network`; the default, like BuildKit's without CNI, is the host's network.
fn network(flag: Option<&str>) -> llb::NetMode {
    match flag {
        Some("host") => llb::NetMode::Host,
        Some("none") => llb::NetMode::None,
        _ => llb::NetMode::Unset,
    }
}
