//! The instructions that only change the image config (and ARG, which changes what later
//! instructions see): each a short function, none of them an op.

use strata_image::oci::ImageConfig;

use super::super::instructions::{Command, Healthcheck, Instruction, Located};
use super::{env, Converter, State};
use crate::dockerfile::DockerfileError;

/// Args every build knows without declaring them, from the client's environment.
const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

type Result<T = ()> = std::result::Result<T, DockerfileError>;

impl Converter<'_> {
    /// ARG: a build arg, else the default, else a global ARG, else a predefined one.
    pub(super) fn arg(
        &self,
        l: &Located,
        pairs: &[(String, Option<String>)],
        st: &mut State,
    ) -> Result {
        // Every value is read before any is set: an instruction sees the state before it.
        let mut values = Vec::new();
        for (k, default) in pairs {
            let value = match self.opts.build_args.get(k) {
                Some(v) => Some(v.clone()),
                None => default
                    .as_deref()
                    .map(|d| self.expand(st, l, d))
                    .transpose()?,
            };
            let value = value.or_else(|| self.global(k)).or_else(|| predefined(k));
            values.extend(value.map(|v| (k.clone(), v)));
        }
        st.args.extend(values);
        Ok(())
    }

    /// An instruction that only changes the image config.
    pub(super) fn config(&self, l: &Located, ins: &Instruction, st: &mut State) -> Result {
        let word = |st: &State, s: &str| self.expand(st, l, s);
        match ins {
            Instruction::Env(pairs) => {
                let values = pairs
                    .iter()
                    .map(|(k, v)| Ok((k, word(st, v)?)))
                    .collect::<Result<Vec<_>>>()?;
                for (k, v) in values {
                    env::set(st, k, &v);
                }
            }
            Instruction::Label(pairs) => {
                for (k, v) in pairs {
                    let (k, v) = (word(st, k)?, word(st, v)?);
                    st.config.config.labels.insert(k, v);
                }
            }
            Instruction::User(u) => st.config.config.user = word(st, u)?,
            Instruction::Cmd(cmd) => st.config.config.cmd = Some(command_vec(cmd, &st.config)),
            Instruction::Entrypoint(cmd) => {
                st.config.config.entrypoint = Some(command_vec(cmd, &st.config));
                // Docker resets CMD when ENTRYPOINT is set in the same stage.
                st.config.config.cmd = None;
            }
            Instruction::Expose(ports) => self.expose(l, ports, st)?,
            Instruction::Volume(vols) => {
                for v in vols {
                    let v = word(st, v)?;
                    st.config.config.volumes.insert(v, serde_json::json!({}));
                }
            }
            Instruction::StopSignal(s) => st.config.config.stop_signal = word(st, s)?,
            Instruction::Healthcheck(h) => {
                st.config.config.healthcheck = Some(healthcheck_json(h.as_ref()));
            }
            Instruction::Shell(sh) => st.config.config.shell = Some(sh.clone()),
            Instruction::Onbuild(trigger) => {
                let triggers = st.config.config.on_build.get_or_insert_with(Vec::new);
                triggers.push(trigger.clone());
            }
            Instruction::Maintainer(_) => {}
            other => unreachable!("{other:?} is not a config instruction"),
        }
        Ok(())
    }

    /// EXPOSE: ports, `/tcp` unless a protocol is given.
    fn expose(&self, l: &Located, ports: &[String], st: &mut State) -> Result {
        for p in ports {
            let p = self.expand(st, l, p)?;
            let p = if p.contains('/') {
                p
            } else {
                format!("{p}/tcp")
            };
            st.config
                .config
                .exposed_ports
                .insert(p, serde_json::json!({}));
        }
        Ok(())
    }
}

/// A predefined arg: the proxies from the environment, and the platform's.
fn predefined(k: &str) -> Option<String> {
    if PROXY_ARGS.contains(&k) {
        return std::env::var(k).ok();
    }
    match k {
        "TARGETPLATFORM" | "BUILDPLATFORM" => Some("linux/amd64".into()),
        "TARGETOS" | "BUILDOS" => Some("linux".into()),
        "TARGETARCH" | "BUILDARCH" => Some("amd64".into()),
        _ => None,
    }
}

/// The shell form run through the stage's SHELL (or `/bin/sh -c`).
pub(super) fn command_vec(cmd: &Command, config: &ImageConfig) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => [shell(config), vec![s.clone()]].concat(),
    }
}

/// The stage's SHELL, `/bin/sh -c` by default.
pub(super) fn shell(config: &ImageConfig) -> Vec<String> {
    let default = || vec!["/bin/sh".into(), "-c".into()];
    config.config.shell.clone().unwrap_or_else(default)
}

/// The image config's `Healthcheck` (Docker's field names; durations in nanoseconds).
fn healthcheck_json(h: Option<&Healthcheck>) -> serde_json::Value {
    let Some(h) = h else {
        return serde_json::json!({ "Test": ["NONE"] });
    };
    let mut v = serde_json::json!({ "Test": h.test });
    let fields = [
        ("Interval", h.interval),
        ("Timeout", h.timeout),
        ("StartPeriod", h.start_period),
        ("StartInterval", h.start_interval),
        ("Retries", h.retries),
    ];
    for (key, value) in fields {
        if let Some(n) = value {
            v[key] = serde_json::json!(n);
        }
    }
    v
}
