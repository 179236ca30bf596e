//! Typed instructions to LLB and the image config of the target stage, one instruction at a
//! time: [`config`] for the instructions that only change the image config, [`run`] and
//! [`mounts`] for RUN, [`copy`] for COPY/ADD (and WORKDIR's directory), [`sources`] for the
//! images, stages and context that ops read, [`env`] for the variables instructions see.
//!
//! Only the stages the target needs are converted (so an unused stage with a missing base image
//! does no harm). Base images are resolved through [`ImageResolver`] to a manifest digest, which
//! pins the source op (a moved tag busts the cache) and provides the inherited config.

mod config;
mod copy;
mod env;
mod mounts;
mod run;
mod sources;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use strata_image::oci::{History, ImageConfig};

use super::expand;
use super::instructions::{instructions, Instruction, Located};
use super::parser::parse;
use super::DockerfileError;
use crate::llb::{Builder, Definition, Input, OpMetadata};
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

pub use crate::llb::CUSTOM_NAME;

struct Stage {
    name: Option<String>,
    from: Located,
    body: Vec<Located>,
}

/// A stage's state while its instructions convert.
struct State {
    root: Option<Input>,
    config: ImageConfig,
    /// ARG values in scope (visible to RUN as env, not part of the image).
    args: BTreeMap<String, String>,
    /// Where each ENV name is in `config.config.env`, so that ENV and lookups stay O(1).
    env_at: HashMap<String, usize>,
}

impl State {
    fn new(root: Option<Input>, config: ImageConfig) -> State {
        State {
            root,
            config,
            args: BTreeMap::new(),
            env_at: HashMap::new(),
        }
    }
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

fn err(l: &Located, msg: impl std::fmt::Display) -> DockerfileError {
    DockerfileError::at(l.node.line, msg.to_string())
}

/// Converts Dockerfile `text` to LLB.
pub fn convert(
    text: &str,
    opts: &ConvertOptions,
    resolver: &dyn ImageResolver,
) -> Result<Converted, DockerfileError> {
    let parsed = parse(text)?;
    let (global_args, stages) = split_stages(instructions(&parsed.nodes)?)?;
    let target = target_index(&stages, opts.target.as_deref())?;
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

type GlobalArgs = BTreeMap<String, Option<String>>;

/// The ARGs before the first FROM, and the stages.
fn split_stages(located: Vec<Located>) -> Result<(GlobalArgs, Vec<Stage>), DockerfileError> {
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
            (Instruction::Arg(pairs), None) => global_args.extend(pairs.iter().cloned()),
            (_, Some(stage)) => stage.body.push(l),
            (_, None) => unreachable!("instructions() requires FROM first"),
        }
    }
    Ok((global_args, stages))
}

/// The stage `--target` names, or the last.
fn target_index(stages: &[Stage], target: Option<&str>) -> Result<usize, DockerfileError> {
    let Some(t) = target else {
        return Ok(stages.len() - 1);
    };
    let t = t.to_ascii_lowercase();
    let found = stages
        .iter()
        .position(|s| s.name.as_deref() == Some(t.as_str()));
    found.ok_or_else(|| {
        let names: Vec<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
        DockerfileError {
            line: None,
            message: format!("target stage {t:?} not found; stages: {}", names.join(", ")),
        }
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

    /// `s` with the variables instruction `l` sees expanded (ENV, then ARG).
    fn expand(&self, st: &State, l: &Located, s: &str) -> Result<String, DockerfileError> {
        let lookup = |n: &str| env::variable(st, n);
        expand::word(s, self.escape, &lookup).map_err(|e| err(l, e))
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
        let total = self.stages[i].body.len() + 1;
        let label = self.stage_label(i);
        let mut state = self.base(i, total)?;
        self.onbuild_triggers(i, total, &mut state)?;
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

    /// The state a stage starts from: scratch, another stage, or a base image.
    fn base(&mut self, i: usize, total: usize) -> Result<State, DockerfileError> {
        let from = self.stages[i].from.clone();
        let Instruction::From { image, .. } = &from.instruction else {
            unreachable!("a stage starts with FROM")
        };
        let lookup = |n: &str| self.global(n);
        let image = expand::word(image, self.escape, &lookup).map_err(|e| err(&from, e))?;
        let image = self.opts.contexts.get(&image).cloned().unwrap_or(image);
        let mut state = if image == "scratch" {
            State::new(None, sources::scratch_config())
        } else if let Some(s) = self.stage_index(&image, i).filter(|s| *s != i) {
            let (root, config) = self.stage(s)?;
            State::new(root, config)
        } else {
            let step = format!("[{} 1/{total}] FROM {image}", self.stage_label(i));
            let (root, config) = self.base_image(i, &from, &image, step)?;
            State::new(Some(root), config)
        };
        env::init(&mut state);
        Ok(state)
    }

    /// Runs the base image's ONBUILD triggers, which are not passed on.
    fn onbuild_triggers(
        &mut self,
        i: usize,
        total: usize,
        state: &mut State,
    ) -> Result<(), DockerfileError> {
        let from = self.stages[i].from.clone();
        let label = self.stage_label(i);
        for trigger in state.config.config.on_build.take().unwrap_or_default() {
            let fail = |e: String| err(&from, format!("ONBUILD trigger {trigger:?}: {e}"));
            let parsed =
                parse(&trigger).map_err(|e| fail(format!("of the base image: {}", e.message)))?;
            for node in parsed.nodes {
                let instruction =
                    super::instructions::instruction(&node).map_err(|e| fail(e.message))?;
                if matches!(
                    instruction,
                    Instruction::From { .. } | Instruction::Onbuild(_)
                ) {
                    return Err(fail("FROM and ONBUILD cannot be triggers".into()));
                }
                let located = Located { node, instruction };
                let step = format!("[{label} 1/{total}] ONBUILD {}", one_line(&trigger));
                self.instruction(i, &located, step, state)?;
            }
        }
        Ok(())
    }

    /// Converts one instruction of `stage` (shown in progress as `step`).
    fn instruction(
        &mut self,
        stage: usize,
        l: &Located,
        step: String,
        st: &mut State,
    ) -> Result<(), DockerfileError> {
        let empty_layer = match &l.instruction {
            Instruction::From { .. } => unreachable!("FROM starts a stage"),
            // ARG leaves no history entry.
            Instruction::Arg(pairs) => return self.arg(l, pairs, st),
            Instruction::Workdir(dir) => self.workdir(stage, l, dir, step, st).map(|()| false)?,
            Instruction::Run {
                command,
                heredocs,
                network,
                mounts,
            } => {
                let run = run::Run {
                    command,
                    heredocs,
                    network: network.as_deref(),
                    mounts,
                };
                self.run(stage, l, &run, step, st).map(|()| false)?
            }
            Instruction::Copy(c) => self.copy(stage, l, c, step, st).map(|()| false)?,
            other => self.config(l, other, st).map(|()| true)?,
        };
        st.config.history.push(History {
            created_by: history_line(&l.node.original),
            empty_layer,
            ..Default::default()
        });
        Ok(())
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

/// An instruction on one line of at most 120 characters, for progress.
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

/// An instruction as BuildKit records it in the image history.
fn history_line(original: &str) -> String {
    let first = original.lines().next().unwrap_or("");
    let word_end = first.find(char::is_whitespace).unwrap_or(first.len());
    let (ins, rest) = original.split_at(word_end);
    format!("{} {} # buildkit", ins.to_uppercase(), rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llb::{op, Graph};

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
}
