//! Typed instructions to LLB and the image config of the target stage.
//!
//! Only the stages the target needs are converted (so an unused stage with a missing base image
//! does no harm). Base images are resolved through [`ImageResolver`] to a manifest digest, which
//! pins the source op (a moved tag busts the cache) and provides the inherited config.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use strata_image::oci::{History, ImageConfig};

use super::expand;
use super::instructions::{instructions, Command, Copy, Instruction, Located};
use super::parser::parse;
use super::DockerfileError;
use crate::llb::{self, file_action, op, Builder, Definition, FileAction, Input, Op, OpMetadata};
use crate::pattern::{self, Ignore};

/// Resolves base image references for the frontend.
pub trait ImageResolver {
    /// The manifest digest and config of `reference` (as written after `FROM`).
    fn resolve(&self, reference: &str) -> Result<(String, ImageConfig), String>;
}

/// Settings of one conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    pub ignore: Ignore,
    /// Named contexts (`--build-context NAME=...`): FROM NAME and --from=NAME use this image.
    pub contexts: BTreeMap<String, String>,
}

/// The result: the LLB graph and the image config (rootfs filled in by the exporter).
#[derive(Debug, Clone)]
pub struct Converted {
    pub definition: Definition,
    pub config: ImageConfig,
    pub syntax: Option<String>,
}

/// Args every build knows without declaring them.
const PREDEFINED: &[&str] = &[
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
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Metadata key of an op's progress name.
pub const CUSTOM_NAME: &str = "llb.customname";

struct Stage {
    name: Option<String>,
    from: Located,
    body: Vec<Located>,
}

struct State {
    root: Option<Input>,
    config: ImageConfig,
    /// ARG values in scope (visible to RUN as env, not part of the image).
    args: BTreeMap<String, String>,
    /// Where each ENV name is in `config.config.env`, so that ENV and lookups stay O(1).
    env_at: HashMap<String, usize>,
}

struct Converter<'a> {
    stages: Vec<Stage>,
    global_args: BTreeMap<String, Option<String>>,
    opts: &'a ConvertOptions,
    resolver: &'a dyn ImageResolver,
    escape: char,
    builder: Builder,
    done: BTreeMap<usize, (Option<Input>, ImageConfig)>,
    visiting: BTreeSet<usize>,
}

fn err(l: &Located, msg: impl Into<String>) -> DockerfileError {
    DockerfileError::at(l.node.line, msg)
}

/// Converts Dockerfile `text` to LLB.
pub fn convert(
    text: &str,
    opts: &ConvertOptions,
    resolver: &dyn ImageResolver,
) -> Result<Converted, DockerfileError> {
    let parsed = parse(text)?;
    let located = instructions(&parsed.nodes)?;
    let mut global_args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for l in located {
        match (&l.instruction, stages.last_mut()) {
            (Instruction::From { name, .. }, _) => {
                if let Some(n) = name {
                    if stages.iter().any(|s| s.name.as_deref() == Some(n)) {
                        return Err(err(&l, format!("duplicate stage name {n:?}")));
                    }
                }
                stages.push(Stage {
                    name: name.clone(),
                    from: l,
                    body: Vec::new(),
                });
            }
            (Instruction::Arg(pairs), None) => {
                for (k, v) in pairs {
                    global_args.insert(k.clone(), v.clone());
                }
            }
            (_, Some(stage)) => stage.body.push(l),
            (_, None) => unreachable!("instructions() requires FROM first"),
        }
    }
    let target = match &opts.target {
        None => stages.len() - 1,
        Some(t) => {
            let t = t.to_ascii_lowercase();
            stages
                .iter()
                .position(|s| s.name.as_deref() == Some(t.as_str()))
                .ok_or_else(|| DockerfileError {
                    line: None,
                    message: format!(
                        "target stage {t:?} not found; stages: {}",
                        stages
                            .iter()
                            .filter_map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?
        }
    };
    let mut c = Converter {
        stages,
        global_args,
        opts,
        resolver,
        escape: parsed.directives.escape,
        builder: Builder::default(),
        done: BTreeMap::new(),
        visiting: BTreeSet::new(),
    };
    let (root, config) = c.stage(target)?;
    Ok(Converted {
        definition: c.builder.finish(root),
        config,
        syntax: parsed.directives.syntax,
    })
}

impl Converter<'_> {
    fn global(&self, name: &str) -> Option<String> {
        if let Some(v) = self.opts.build_args.get(name) {
            if self.global_args.contains_key(name) {
                return Some(v.clone());
            }
        }
        self.global_args.get(name).cloned().flatten()
    }

    fn stage_index(&self, name: &str, current: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Some(i);
        }
        // A number refers to an earlier stage by position.
        lower.parse::<usize>().ok().filter(|i| *i < current)
    }

    fn stage_label(&self, i: usize) -> String {
        self.stages[i]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{i}"))
    }

    fn meta(&self, stage: usize, name: String) -> OpMetadata {
        let stage_name = self.stage_label(stage);
        let ignore = self.opts.no_cache
            || self
                .opts
                .no_cache_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(&stage_name));
        OpMetadata {
            ignore_cache: ignore,
            description: [
                (CUSTOM_NAME.to_string(), name),
                ("strata.stage".to_string(), stage_name),
            ]
            .into(),
        }
    }

    /// Converts stage `i` (once), returning its root and config.
    fn stage(&mut self, i: usize) -> Result<(Option<Input>, ImageConfig), DockerfileError> {
        if let Some(done) = self.done.get(&i) {
            return Ok(done.clone());
        }
        if !self.visiting.insert(i) {
            return Err(err(
                &self.stages[i].from,
                format!("circular dependency on stage {:?}", self.stage_label(i)),
            ));
        }
        let from = self.stages[i].from.clone();
        let Instruction::From { image, .. } = &from.instruction else {
            unreachable!()
        };
        let lookup = |n: &str| self.global(n);
        let image = expand::word(image, self.escape, &lookup).map_err(|e| err(&from, e))?;
        let image = self.opts.contexts.get(&image).cloned().unwrap_or(image);
        let total = self.stages[i].body.len() + 1;
        let label = self.stage_label(i);
        let mut state = if image == "scratch" {
            State {
                root: None,
                config: ImageConfig {
                    architecture: "amd64".into(),
                    os: "linux".into(),
                    ..Default::default()
                },
                args: BTreeMap::new(),
                env_at: HashMap::new(),
            }
        } else if let Some(s) = self.stage_index(&image, i).filter(|s| *s != i) {
            let (root, config) = self.stage(s)?;
            State {
                root,
                config,
                args: BTreeMap::new(),
                env_at: HashMap::new(),
            }
        } else {
            let (digest, config) = self
                .resolver
                .resolve(&image)
                .map_err(|e| err(&from, format!("base image {image}: {e}")))?;
            let source = Op {
                inputs: vec![],
                kind: Some(op::Kind::Source(llb::SourceOp {
                    identifier: format!("docker-image://{image}@{digest}"),
                    attrs: BTreeMap::new(),
                })),
            };
            let root = self.builder.add(
                &source,
                self.meta(i, format!("[{label} 1/{total}] FROM {image}")),
            );
            State {
                root: Some(root),
                config,
                args: BTreeMap::new(),
                env_at: HashMap::new(),
            }
        };
        if state.config.config.env.is_empty() {
            state.config.config.env.push(DEFAULT_PATH.into());
        }
        state.env_at = env_index(&state.config.config.env);
        // The base image's ONBUILD triggers run first, and are not passed on.
        for trigger in state.config.config.on_build.take().unwrap_or_default() {
            let parsed = parse(&trigger).map_err(|e| {
                err(
                    &from,
                    format!(
                        "ONBUILD trigger {trigger:?} of the base image: {}",
                        e.message
                    ),
                )
            })?;
            for node in parsed.nodes {
                let instruction = super::instructions::instruction(&node).map_err(|e| {
                    err(&from, format!("ONBUILD trigger {trigger:?}: {}", e.message))
                })?;
                if matches!(
                    instruction,
                    Instruction::From { .. } | Instruction::Onbuild(_)
                ) {
                    return Err(err(
                        &from,
                        format!("ONBUILD trigger {trigger:?}: FROM and ONBUILD cannot be triggers"),
                    ));
                }
                let located = Located { node, instruction };
                let step = format!("[{label} 1/{total}] ONBUILD {}", one_line(&trigger));
                self.instruction(i, &located, step, &mut state)?;
            }
        }
        let body = self.stages[i].body.clone();
        for (n, l) in body.iter().enumerate() {
            let step = format!("[{label} {}/{total}] {}", n + 2, one_line(&l.node.original));
            self.instruction(i, l, step, &mut state)?;
        }
        self.visiting.remove(&i);
        let result = (state.root, state.config);
        self.done.insert(i, result.clone());
        Ok(result)
    }

    fn instruction(
        &mut self,
        stage: usize,
        l: &Located,
        step: String,
        st: &mut State,
    ) -> Result<(), DockerfileError> {
        let esc = self.escape;
        // ENV wins over ARG of the same name, as in Docker. Both are read in place (no copy per
        // instruction: 10,000 ENV lines stay linear); an instruction sees them as they were
        // before it, so ENV and ARG collect their values before setting any.
        let (env, env_at, args) = (&st.config.config.env, &st.env_at, &st.args);
        let lookup = |n: &str| variable(env, env_at, args, n);
        let word = |s: &str| expand::word(s, esc, &lookup).map_err(|e| err(l, e));
        let history = |st: &mut State, empty: bool| {
            st.config.history.push(History {
                created_by: history_line(&l.node.original),
                empty_layer: empty,
                ..Default::default()
            });
        };
        match &l.instruction {
            Instruction::From { .. } => unreachable!("FROM starts a stage"),
            Instruction::Arg(pairs) => {
                let mut values = Vec::new();
                for (k, default) in pairs {
                    let value = match self.opts.build_args.get(k) {
                        Some(v) => Some(v.clone()),
                        None => default.as_deref().map(word).transpose()?,
                    };
                    let value = value.or_else(|| self.global(k)).or_else(|| predefined(k));
                    values.extend(value.map(|v| (k.clone(), v)));
                }
                st.args.extend(values);
                return Ok(());
            }
            Instruction::Env(pairs) => {
                let values = pairs
                    .iter()
                    .map(|(k, v)| Ok((k, word(v)?)))
                    .collect::<Result<Vec<_>, DockerfileError>>()?;
                for (k, v) in values {
                    set_env(&mut st.config.config.env, &mut st.env_at, k, &v);
                }
                history(st, true);
            }
            Instruction::Label(pairs) => {
                for (k, v) in pairs {
                    st.config.config.labels.insert(word(k)?, word(v)?);
                }
                history(st, true);
            }
            Instruction::Workdir(dir) => {
                let dir = word(dir)?;
                let wd = resolve_path(&st.config.config.working_dir, &dir);
                st.config.config.working_dir = wd.clone();
                let action = file_action::Action::Mkdir(llb::FileActionMkDir {
                    path: wd,
                    mode: 0o755,
                    make_parents: true,
                    owner: None,
                    timestamp: -1,
                });
                self.file_op(stage, st, vec![(action, None)], step)?;
                history(st, false);
            }
            Instruction::User(u) => {
                st.config.config.user = word(u)?;
                history(st, true);
            }
            Instruction::Run {
                command,
                heredocs,
                network,
                mounts: mount_specs,
            } => {
                let Some(root) = st.root.clone() else {
                    return Err(err(
                        l,
                        "RUN needs a base image with a shell: FROM scratch has none",
                    ));
                };
                let shell = st
                    .config
                    .config
                    .shell
                    .clone()
                    .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
                let args = match (command, heredocs.first()) {
                    (Command::Shell(s), Some(h))
                        if s.trim_start().starts_with("<<")
                            && s.split_whitespace().count() == 1 =>
                    {
                        // The script runs in the shell, which expands its variables at run time.
                        [shell, vec![h.content.clone()]].concat()
                    }
                    (Command::Shell(s), Some(_)) => {
                        // The shell runs the heredocs itself: hand it the instruction as written.
                        let mut script = s.clone();
                        for h in heredocs {
                            script.push('\n');
                            script.push_str(&h.content);
                            script.push_str(&h.name);
                        }
                        [shell, vec![script]].concat()
                    }
                    (Command::Shell(s), None) => [shell, vec![s.clone()]].concat(),
                    (Command::Exec(v), _) => v.clone(),
                };
                let mut env = st.config.config.env.clone();
                for (k, v) in &st.args {
                    if !env
                        .iter()
                        .any(|e| e.split_once('=').map(|(ek, _)| ek) == Some(k.as_str()))
                    {
                        env.push(format!("{k}={v}"));
                    }
                }
                // The default, like BuildKit's without CNI, is the host's network.
                let network = match network.as_deref() {
                    Some("host") => llb::NetMode::Host,
                    Some("none") => llb::NetMode::None,
                    _ => llb::NetMode::Unset,
                };
                let mut inputs = vec![root];
                let wd = st.config.config.working_dir.clone();
                let env_map: BTreeMap<String, String> = env
                    .iter()
                    .filter_map(|e| e.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let (extra, secretenv) = self.run_mounts(
                    stage,
                    l,
                    mount_specs,
                    &wd,
                    &|n| env_map.get(n).cloned(),
                    &mut inputs,
                )?;
                if let Some(first_ssh) = extra
                    .iter()
                    .find(|m| m.mount_type == llb::MountType::Ssh as i32)
                {
                    env.push(format!("SSH_AUTH_SOCK={}", first_ssh.dest));
                }
                let mut mounts = vec![llb::Mount {
                    input: 0,
                    dest: "/".into(),
                    output: 0,
                    ..Default::default()
                }];
                mounts.extend(extra);
                let exec = Op {
                    inputs,
                    kind: Some(op::Kind::Exec(llb::ExecOp {
                        meta: Some(llb::Meta {
                            args,
                            env,
                            cwd: if st.config.config.working_dir.is_empty() {
                                "/".into()
                            } else {
                                st.config.config.working_dir.clone()
                            },
                            user: st.config.config.user.clone(),
                        }),
                        mounts,
                        network: network as i32,
                        secretenv,
                    })),
                };
                st.root = Some(self.builder.add(&exec, self.meta(stage, step)));
                history(st, false);
            }
            Instruction::Copy(c) => {
                // COPY changes the state it expands words for: it gets its own copy.
                let (env, env_at, args) = (
                    st.config.config.env.clone(),
                    st.env_at.clone(),
                    st.args.clone(),
                );
                let lookup = |n: &str| variable(&env, &env_at, &args, n);
                let word = |s: &str| expand::word(s, esc, &lookup).map_err(|e| err(l, e));
                self.copy(stage, l, c, st, step, &word)?;
                history(st, false);
            }
            Instruction::Cmd(cmd) => {
                st.config.config.cmd = Some(command_vec(cmd, &st.config));
                history(st, true);
            }
            Instruction::Entrypoint(cmd) => {
                st.config.config.entrypoint = Some(command_vec(cmd, &st.config));
                // Docker resets CMD when ENTRYPOINT is set in the same stage.
                st.config.config.cmd = None;
                history(st, true);
            }
            Instruction::Expose(ports) => {
                for p in ports {
                    let p = word(p)?;
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
                history(st, true);
            }
            Instruction::Volume(vols) => {
                for v in vols {
                    st.config
                        .config
                        .volumes
                        .insert(word(v)?, serde_json::json!({}));
                }
                history(st, true);
            }
            Instruction::StopSignal(s) => {
                st.config.config.stop_signal = word(s)?;
                history(st, true);
            }
            Instruction::Healthcheck(h) => {
                st.config.config.healthcheck = Some(match h {
                    None => serde_json::json!({ "Test": ["NONE"] }),
                    Some(h) => {
                        let mut v = serde_json::json!({ "Test": h.test });
                        for (k, val) in &h.flags {
                            let key = match k.as_str() {
                                "interval" => "Interval",
                                "timeout" => "Timeout",
                                "start-period" => "StartPeriod",
                                "start-interval" => "StartInterval",
                                _ => "Retries",
                            };
                            v[key] = if key == "Retries" {
                                serde_json::json!(val.parse::<u64>().unwrap_or(0))
                            } else {
                                serde_json::json!(duration_ns(val).ok_or_else(|| err(
                                    l,
                                    format!(
                                        "bad duration {val:?} for --{k}: use e.g. 30s or 1m30s"
                                    )
                                ))?)
                            };
                        }
                        v
                    }
                });
                history(st, true);
            }
            Instruction::Shell(sh) => {
                st.config.config.shell = Some(sh.clone());
                history(st, true);
            }
            Instruction::Onbuild(trigger) => {
                st.config
                    .config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(trigger.clone());
                history(st, true);
            }
            Instruction::Maintainer(_) => history(st, true),
        }
        Ok(())
    }

    fn copy(
        &mut self,
        stage: usize,
        l: &Located,
        c: &Copy,
        st: &mut State,
        step: String,
        word: &dyn Fn(&str) -> Result<String, DockerfileError>,
    ) -> Result<(), DockerfileError> {
        let dest_raw = word(&c.dest)?;
        let dest = resolve_path(&st.config.config.working_dir, &dest_raw);
        let dest = if dest_raw.ends_with('/') && !dest.ends_with('/') {
            format!("{dest}/")
        } else {
            dest
        };
        let owner = c
            .chown
            .as_ref()
            .map(|o| word(o))
            .transpose()?
            .map(|user| llb::ChownOpt { user });
        let mode = match &c.chmod {
            None => -1,
            Some(m) => i32::from_str_radix(&word(m)?, 8)
                .map_err(|_| err(l, format!("--chmod={m}: use an octal mode such as 0755")))?,
        };
        let mut actions = Vec::new();
        if !c.heredocs.is_empty() {
            for h in &c.heredocs {
                let path = if dest.ends_with('/') {
                    format!("{dest}{}", h.name)
                } else {
                    dest.clone()
                };
                let data = if h.expand {
                    word(&h.content)?.into_bytes()
                } else {
                    h.content.clone().into_bytes()
                };
                actions.push((
                    file_action::Action::Mkfile(llb::FileActionMkFile {
                        path,
                        mode: if mode < 0 { 0o644 } else { mode },
                        data,
                        owner: owner.clone(),
                        timestamp: -1,
                    }),
                    None,
                ));
            }
        }
        let srcs: Vec<String> = c
            .srcs
            .iter()
            .filter(|s| !s.starts_with("<<"))
            .map(|s| word(s))
            .collect::<Result<_, _>>()?;
        if srcs.len() > 1 && !dest.ends_with('/') {
            return Err(err(l, format!("when copying several sources, the destination must be a directory ending in /: {dest_raw}/")));
        }
        if !srcs.is_empty() {
            // ADD of URLs: each a download source of its own.
            let (urls, srcs): (Vec<String>, Vec<String>) = srcs
                .into_iter()
                .partition(|s| c.add && (s.starts_with("http://") || s.starts_with("https://")));
            for url in urls {
                let mut attrs = BTreeMap::new();
                if let Some(sum) = &c.checksum {
                    attrs.insert("checksum".to_string(), word(sum)?);
                }
                let op = Op {
                    inputs: vec![],
                    kind: Some(op::Kind::Source(llb::SourceOp {
                        identifier: url.clone(),
                        attrs,
                    })),
                };
                let src = self.builder.add(
                    &op,
                    OpMetadata {
                        ignore_cache: false,
                        description: [(
                            CUSTOM_NAME.to_string(),
                            format!("[internal] download {url}"),
                        )]
                        .into(),
                    },
                );
                let action = llb::FileActionCopy {
                    src: "/".into(),
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode,
                    timestamp: -1,
                    ..Default::default()
                };
                actions.push((file_action::Action::Copy(action), Some(src)));
            }
            if srcs.is_empty() {
                return self.file_op(stage, st, actions, step);
            }
            let source = match &c.from {
                Some(from) => Some(self.root_of(stage, l, "COPY", from)?),
                None => None,
            };
            let source = match source {
                Some(root) => root,
                None => Some(self.context_source(srcs.iter().map(|s| pattern::clean(s)).collect())),
            };
            let Some(source) = source else {
                return Err(err(
                    l,
                    "COPY --from a stage that is FROM scratch with nothing in it",
                ));
            };
            // An empty wildcard is fine beside other sources (BuildKit's rule).
            let several = srcs.len() > 1;
            for src in srcs {
                let action = llb::FileActionCopy {
                    src: format!("/{}", pattern::clean(&src)),
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode,
                    follow_symlink: true,
                    dir_copy_contents: true,
                    attempt_unpack: c.add,
                    create_dest_path: true,
                    allow_wildcard: true,
                    allow_empty_wildcard: several,
                    timestamp: -1,
                };
                actions.push((file_action::Action::Copy(action), Some(source.clone())));
            }
        }
        self.file_op(stage, st, actions, step)
    }

    /// The root of stage or image `from` (as named by `--from` / `from=`).
    fn root_of(
        &mut self,
        stage: usize,
        l: &Located,
        what: &str,
        from: &str,
    ) -> Result<Option<Input>, DockerfileError> {
        let mapped = self.opts.contexts.get(from).cloned();
        let from = mapped.as_deref().unwrap_or(from);
        match self.stage_index(from, stage) {
            Some(s) if s == stage => Err(err(
                l,
                format!("{what} --from={from} refers to its own stage"),
            )),
            Some(s) => Ok(self.stage(s)?.0),
            None => {
                let (digest, _) = self.resolver.resolve(from).map_err(|e| err(l, format!("{what} --from={from}: not a stage of this Dockerfile, and as an image: {e}")))?;
                let op = Op {
                    inputs: vec![],
                    kind: Some(op::Kind::Source(llb::SourceOp {
                        identifier: format!("docker-image://{from}@{digest}"),
                        attrs: BTreeMap::new(),
                    })),
                };
                Ok(Some(self.builder.add(
                    &op,
                    self.meta(stage, format!("[{}] FROM {from}", self.stage_label(stage))),
                )))
            }
        }
    }

    /// The build context restricted to `include` (paths or patterns): the cache key covers
    /// exactly the files they select.
    fn context_source(&mut self, include: Vec<String>) -> Input {
        let attrs = [
            (
                "includepatterns".to_string(),
                serde_json::to_string(&include).expect("json"),
            ),
            (
                "excludepatterns".to_string(),
                serde_json::to_string(&self.opts.ignore.patterns()).expect("json"),
            ),
        ];
        let op = Op {
            inputs: vec![],
            kind: Some(op::Kind::Source(llb::SourceOp {
                identifier: "local://context".into(),
                attrs: attrs.into(),
            })),
        };
        self.builder.add(
            &op,
            OpMetadata {
                ignore_cache: false,
                description: [(
                    CUSTOM_NAME.to_string(),
                    "[internal] load build context".to_string(),
                )]
                .into(),
            },
        )
    }

    /// The exec mounts (after the root at index 0) and secret env vars of `RUN --mount` flags.
    #[allow(clippy::too_many_arguments)]
    fn run_mounts(
        &mut self,
        stage: usize,
        l: &Located,
        specs: &[String],
        wd: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
        inputs: &mut Vec<Input>,
    ) -> Result<(Vec<llb::Mount>, Vec<llb::SecretEnv>), DockerfileError> {
        use super::mounts::{parse, Kind};
        let esc = self.escape;
        let mut mounts = Vec::new();
        let mut env = Vec::new();
        let mut ssh = 0;
        for spec in specs {
            let m = parse(spec, &|v| expand::word(v, esc, lookup)).map_err(|e| err(l, e))?;
            let kind = m.kind.expect("parse sets a kind");
            let target = m.target.as_ref().map(|t| resolve_path(wd, t));
            let mut mount = llb::Mount {
                input: llb::NO_INPUT,
                output: -1,
                dest: target.clone().unwrap_or_default(),
                readonly: m.readonly.unwrap_or(false),
                ..Default::default()
            };
            match kind {
                Kind::Bind => {
                    let from = match &m.from {
                        Some(f) => self.root_of(stage, l, "RUN --mount", f)?,
                        None => Some(self.context_source(vec![pattern::clean(
                            m.source.as_deref().unwrap_or(""),
                        )])),
                    };
                    mount.input = push_input(inputs, from);
                    mount.selector =
                        format!("/{}", pattern::clean(m.source.as_deref().unwrap_or("")));
                    mount.readonly = m.readonly.unwrap_or(true);
                    mount.mount_type = llb::MountType::Bind as i32;
                }
                Kind::Cache => {
                    let from = match &m.from {
                        Some(f) => self.root_of(stage, l, "RUN --mount", f)?,
                        None => None,
                    };
                    mount.input = push_input(inputs, from);
                    mount.selector =
                        format!("/{}", pattern::clean(m.source.as_deref().unwrap_or("")));
                    let sharing = match m.sharing.as_deref() {
                        Some("private") => llb::CacheSharing::Private,
                        Some("locked") => llb::CacheSharing::Locked,
                        _ => llb::CacheSharing::Shared,
                    };
                    mount.mount_type = llb::MountType::Cache as i32;
                    mount.cache_opt = Some(llb::CacheOpt {
                        id: m.id.clone().or_else(|| target.clone()).unwrap_or_default(),
                        sharing: sharing as i32,
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                        mode: m.mode.unwrap_or(0o755),
                    });
                }
                Kind::Tmpfs => {
                    mount.mount_type = llb::MountType::Tmpfs as i32;
                    mount.tmpfs_opt = Some(llb::TmpfsOpt {
                        size: m.size.unwrap_or(0),
                    });
                }
                Kind::Secret => {
                    let id =
                        m.id.clone()
                            .or_else(|| {
                                target
                                    .as_ref()
                                    .and_then(|t| t.rsplit('/').next().map(str::to_string))
                            })
                            .unwrap_or_default();
                    if id.is_empty() {
                        return Err(err(
                            l,
                            "--mount type=secret needs id= (or a target to name it)",
                        ));
                    }
                    if let Some(name) = &m.env {
                        env.push(llb::SecretEnv {
                            id: id.clone(),
                            name: name.clone(),
                            optional: !m.required,
                        });
                        if m.target.is_none() {
                            continue;
                        }
                    }
                    mount.dest = target
                        .clone()
                        .unwrap_or_else(|| format!("/run/secrets/{id}"));
                    mount.mount_type = llb::MountType::Secret as i32;
                    mount.readonly = true;
                    mount.secret_opt = Some(llb::SecretOpt {
                        id,
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                        mode: m.mode.unwrap_or(0o400),
                        optional: !m.required,
                    });
                }
                Kind::Ssh => {
                    let id = m.id.clone().unwrap_or_else(|| "default".into());
                    mount.dest = target
                        .clone()
                        .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{ssh}"));
                    ssh += 1;
                    mount.mount_type = llb::MountType::Ssh as i32;
                    mount.readonly = true;
                    mount.ssh_opt = Some(llb::SecretOpt {
                        id,
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                        mode: m.mode.unwrap_or(0o600),
                        optional: !m.required,
                    });
                }
            }
            mounts.push(mount);
        }
        Ok((mounts, env))
    }

    /// One file op applying `actions` in order onto the stage's root; each action may read from a
    /// secondary input.
    fn file_op(
        &mut self,
        stage: usize,
        st: &mut State,
        actions: Vec<(file_action::Action, Option<Input>)>,
        step: String,
    ) -> Result<(), DockerfileError> {
        let mut inputs: Vec<Input> = Vec::new();
        let base = match &st.root {
            Some(r) => {
                inputs.push(r.clone());
                0
            }
            None => llb::NO_INPUT,
        };
        let mut out = Vec::new();
        for (i, (action, secondary)) in actions.into_iter().enumerate() {
            let secondary_input = match secondary {
                Some(s) => {
                    let idx = inputs.iter().position(|x| *x == s).unwrap_or_else(|| {
                        inputs.push(s);
                        inputs.len() - 1
                    });
                    idx as i64
                }
                None => llb::NO_INPUT,
            };
            out.push(FileAction {
                input: if i == 0 { base } else { llb::NO_INPUT },
                secondary_input,
                output: 0,
                action: Some(action),
            });
        }
        let op = Op {
            inputs,
            kind: Some(op::Kind::File(llb::FileOp { actions: out })),
        };
        st.root = Some(self.builder.add(&op, self.meta(stage, step)));
        Ok(())
    }
}

/// The index of `from` among `inputs` (added if new), or NO_INPUT.
fn push_input(inputs: &mut Vec<Input>, from: Option<Input>) -> i64 {
    match from {
        None => llb::NO_INPUT,
        Some(i) => inputs.iter().position(|x| *x == i).unwrap_or_else(|| {
            inputs.push(i);
            inputs.len() - 1
        }) as i64,
    }
}

fn predefined(k: &str) -> Option<String> {
    if PREDEFINED.contains(&k) {
        return std::env::var(k).ok();
    }
    match k {
        "TARGETPLATFORM" | "BUILDPLATFORM" => Some("linux/amd64".into()),
        "TARGETOS" | "BUILDOS" => Some("linux".into()),
        "TARGETARCH" | "BUILDARCH" => Some("amd64".into()),
        _ => None,
    }
}

fn command_vec(cmd: &Command, config: &ImageConfig) -> Vec<String> {
    match cmd {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let shell = config
                .config
                .shell
                .clone()
                .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
            [shell, vec![s.clone()]].concat()
        }
    }
}

/// `dir` made absolute against the working directory `wd`.
fn resolve_path(wd: &str, dir: &str) -> String {
    let joined = if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("{}/{dir}", if wd.is_empty() { "" } else { wd })
    };
    format!("/{}", pattern::clean(&joined))
}

fn one_line(s: &str) -> String {
    let joined: Vec<&str> = s.lines().map(str::trim).collect();
    let mut line = joined.join(" ");
    if line.len() > 120 {
        line.truncate(
            line.char_indices()
                .nth(117)
                .map(|(i, _)| i)
                .unwrap_or(line.len()),
        );
        line.push_str("...");
    }
    line
}

fn history_line(original: &str) -> String {
    let first = original.lines().next().unwrap_or("");
    let word_end = first.find(char::is_whitespace).unwrap_or(first.len());
    let (ins, rest) = original.split_at(word_end);
    format!("{} {} # buildkit", ins.to_uppercase(), rest.trim())
}

/// `1m30s`, `30s`, `500ms` in nanoseconds.
fn duration_ns(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    Some(total as u64)
}

/// The value of Dockerfile variable `n`: ENV first, then ARG.
fn variable(
    env: &[String],
    env_at: &HashMap<String, usize>,
    args: &BTreeMap<String, String>,
    n: &str,
) -> Option<String> {
    let from_env = env_at.get(n).and_then(|&i| env[i].split_once('='));
    from_env
        .map(|(_, v)| v.to_string())
        .or_else(|| args.get(n).cloned())
}

/// Each name's position in an image's `KEY=VALUE` environment (its first, as BuildKit uses).
fn env_index(env: &[String]) -> HashMap<String, usize> {
    let mut at = HashMap::new();
    for (i, e) in env.iter().enumerate() {
        let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        at.entry(key.to_string()).or_insert(i);
    }
    at
}

/// Sets `key` in an image's environment, in place when it is there (as BuildKit does).
fn set_env(env: &mut Vec<String>, env_at: &mut HashMap<String, usize>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    match env_at.get(key) {
        Some(&i) => env[i] = entry,
        None => {
            env_at.insert(key.to_string(), env.len());
            env.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llb::Graph;

    struct Fake;
    impl ImageResolver for Fake {
        fn resolve(&self, reference: &str) -> Result<(String, ImageConfig), String> {
            if reference.starts_with("missing") {
                return Err("not found in the local image store".into());
            }
            let mut c = ImageConfig::default();
            c.config.env = vec!["PATH=/bin".into(), "BASE=1".into()];
            Ok((format!("sha256:{}", "0".repeat(64)), c))
        }
    }

    fn conv(text: &str, opts: ConvertOptions) -> Result<Converted, DockerfileError> {
        convert(text, &opts, &Fake)
    }

    #[test]
    fn hostile_dockerfiles_get_errors_naming_the_line() {
        let deep = format!(
            "FROM base\nENV X={}x{}\n",
            "${a:-".repeat(3000),
            "}".repeat(3000)
        );
        let e = conv(&deep, ConvertOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Dockerfile:2") && e.contains("nested deeper"),
            "{e}"
        );
        let mut doubling = String::from(
            "FROM base\nARG a0=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n",
        );
        for i in 1..40 {
            doubling += &format!("ARG a{i}=${{a{}}}${{a{}}}\n", i - 1, i - 1);
        }
        doubling += "RUN true\n";
        let e = conv(&doubling, ConvertOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1 MiB"), "{e}");
    }

    #[test]
    fn ten_thousand_env_lines_convert_and_keep_their_order() {
        let mut text = String::from("FROM base\n");
        for i in 0..10_000 {
            text += &format!("ENV V{i}=${{BASE}}{i}\n");
        }
        text += "ENV BASE=2 V1=$BASE\n";
        let c = conv(&text, ConvertOptions::default()).unwrap();
        let env = &c.config.config.env;
        assert_eq!(env.len(), 10_002);
        assert_eq!(env[1], "BASE=2", "replaced in place");
        assert_eq!(env[2], "V0=10");
        assert_eq!(
            env[3], "V1=1",
            "an instruction sees the values from before it"
        );
    }

    #[test]
    fn stages_env_args_and_history() {
        let text = "ARG BASE=busybox\nFROM $BASE AS build\nARG V=1\nENV A=${V}x\nWORKDIR app\nRUN echo $A > out\nFROM missing-but-unused AS other\nFROM build\nCOPY --from=build /app/out /final/\nCMD [\"cat\", \"/final/out\"]\n";
        let c = conv(text, ConvertOptions::default()).unwrap();
        assert!(c.config.config.env.contains(&"A=1x".to_string()));
        assert_eq!(c.config.config.working_dir, "/app");
        assert_eq!(
            c.config.config.cmd.as_deref(),
            Some(&["cat".to_string(), "/final/out".into()][..])
        );
        let g = Graph::from_definition(&c.definition).unwrap();
        // source, workdir mkdir, run, copy: no op from the unused stage.
        assert_eq!(g.ops.len(), 4);
        let layers = c.config.history.iter().filter(|h| !h.empty_layer).count();
        assert_eq!(layers, 3);
        let run = g.ops.values().find_map(|o| match &o.kind {
            Some(op::Kind::Exec(e)) => Some(e.clone()),
            _ => None,
        });
        let meta = run.unwrap().meta.unwrap();
        assert_eq!(meta.args, ["/bin/sh", "-c", "echo $A > out"]);
        assert!(
            meta.env.contains(&"V=1".to_string()),
            "ARGs reach RUN as env: {:?}",
            meta.env
        );
        assert_eq!(meta.cwd, "/app");
    }

    #[test]
    fn targets_build_args_and_errors() {
        let text = "FROM busybox AS a\nARG X=dflt\nRUN echo $X\nFROM busybox AS b\nRUN echo b\n";
        let mut opts = ConvertOptions {
            target: Some("a".into()),
            ..Default::default()
        };
        opts.build_args.insert("X".into(), "given".into());
        let c = conv(text, opts).unwrap();
        let g = Graph::from_definition(&c.definition).unwrap();
        assert_eq!(g.ops.len(), 2);
        let e = conv(
            text,
            ConvertOptions {
                target: Some("zz".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("target stage \"zz\" not found"),
            "{e}"
        );
        let e = conv("FROM missing-image\nRUN x\n", ConvertOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = conv(
            "FROM busybox AS a\nCOPY --from=a /x /y\n",
            ConvertOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("own stage"), "{e}");
        let e = conv("FROM busybox\nCOPY a b c\n", ConvertOptions::default()).unwrap_err();
        assert!(e.to_string().contains("must be a directory"), "{e}");
        assert!(conv("FROM scratch\nRUN x\n", ConvertOptions::default()).is_err());
    }

    #[test]
    fn no_cache_filter_marks_only_that_stage() {
        let text =
            "FROM busybox AS s1\nRUN one\nFROM busybox AS s2\nCOPY --from=s1 /x /x\nRUN two\n";
        let c = conv(
            text,
            ConvertOptions {
                no_cache_filter: vec!["s1".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let ignored: Vec<&String> = c
            .definition
            .metadata
            .values()
            .filter(|m| m.ignore_cache)
            .map(|m| &m.description[CUSTOM_NAME])
            .collect();
        // The base image source is shared by both stages, so it is resolved again; s2's own
        // steps keep their cache.
        assert!(ignored.iter().any(|d| d.contains("RUN one")), "{ignored:?}");
        assert!(
            !ignored
                .iter()
                .any(|d| d.contains("RUN two") || d.contains("COPY")),
            "{ignored:?}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(duration_ns("500ms"), Some(500_000_000));
        assert_eq!(duration_ns("5"), None);
    }
}
