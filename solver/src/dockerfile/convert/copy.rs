//! COPY and ADD (heredoc files, downloads, context and stage sources) and WORKDIR's directory:
//! each one file op on the stage's root.

use std::collections::BTreeMap;

use super::super::instructions::{Copy, Located};
use super::sources::{internal, push_input};
use super::{err, resolve_path, Converter, State};
use crate::dockerfile::DockerfileError;
use crate::llb::{self, file_action::Action, op, FileAction, Input, Op};
use crate::pattern;

type Result<T = ()> = std::result::Result<T, DockerfileError>;

/// A file action and the input it reads from, if any.
type Actions = Vec<(Action, Option<Input>)>;

/// What every action of one COPY shares.
struct Target {
    /// As written, for errors.
    raw: String,
    dest: String,
    owner: Option<llb::ChownOpt>,
    /// `--chmod`, or -1.
    mode: i32,
}

impl Converter<'_> {
    /// WORKDIR: the directory is made (with its parents) as well as set.
    pub(super) fn workdir(
        &mut self,
        stage: usize,
        l: &Located,
        dir: &str,
        step: String,
        st: &mut State,
    ) -> Result {
        let dir = self.expand(st, l, dir)?;
        let wd = resolve_path(&st.config.config.working_dir, &dir);
        st.config.config.working_dir = wd.clone();
        let action = Action::Mkdir(llb::FileActionMkDir {
            path: wd,
            mode: 0o755,
            make_parents: true,
            owner: None,
            timestamp: -1,
        });
        self.file_op(stage, st, vec![(action, None)], step)
    }

    pub(super) fn copy(
        &mut self,
        stage: usize,
        l: &Located,
        c: &Copy,
        step: String,
        st: &mut State,
    ) -> Result {
        let t = self.target(l, c, st)?;
        let mut actions = self.heredoc_files(l, c, &t, st)?;
        let srcs: Vec<String> = c
            .srcs
            .iter()
            .filter(|s| !s.starts_with("<<"))
            .map(|s| self.expand(st, l, s))
            .collect::<Result<_>>()?;
        if srcs.len() > 1 && !t.dest.ends_with('/') {
            return Err(err(l, format!("when copying several sources, the destination must be a directory ending in /: {}/", t.raw)));
        }
        // ADD of URLs: each a download source of its own.
        let (urls, srcs): (Vec<String>, Vec<String>) = srcs
            .into_iter()
            .partition(|s| c.add && (s.starts_with("http://") || s.starts_with("https://")));
        for url in urls {
            actions.push(self.download(l, c, &url, &t, st)?);
        }
        if !srcs.is_empty() {
            actions.extend(self.copies(stage, l, c, srcs, &t)?);
        }
        self.file_op(stage, st, actions, step)
    }

    /// The destination (absolute; a trailing `/` kept), owner and mode of a COPY.
    fn target(&self, l: &Located, c: &Copy, st: &State) -> Result<Target> {
        let raw = self.expand(st, l, &c.dest)?;
        let dest = resolve_path(&st.config.config.working_dir, &raw);
        let dest = if raw.ends_with('/') && !dest.ends_with('/') {
            format!("{dest}/")
        } else {
            dest
        };
        let owner = c
            .chown
            .as_ref()
            .map(|o| self.expand(st, l, o))
            .transpose()?;
        let mode = match &c.chmod {
            None => -1,
            Some(m) => i32::from_str_radix(&self.expand(st, l, m)?, 8)
                .map_err(|_| err(l, format!("--chmod={m}: use an octal mode such as 0755")))?,
        };
        Ok(Target {
            raw,
            dest,
            owner: owner.map(|user| llb::ChownOpt { user }),
            mode,
        })
    }

    /// `COPY <<EOF`: each heredoc a file, its variables expanded unless its delimiter is quoted.
    fn heredoc_files(&self, l: &Located, c: &Copy, t: &Target, st: &State) -> Result<Actions> {
        let mut actions = Vec::new();
        for h in &c.heredocs {
            let path = if t.dest.ends_with('/') {
                format!("{}{}", t.dest, h.name)
            } else {
                t.dest.clone()
            };
            let data = if h.expand {
                self.expand(st, l, &h.content)?
            } else {
                h.content.clone()
            };
            let file = llb::FileActionMkFile {
                path,
                mode: if t.mode < 0 { 0o644 } else { t.mode },
                data: data.into_bytes(),
                owner: t.owner.clone(),
                timestamp: -1,
            };
            actions.push((Action::Mkfile(file), None));
        }
        Ok(actions)
    }

    /// `ADD URL`: a download source (checked against `--checksum`), copied to the destination.
    fn download(
        &mut self,
        l: &Located,
        c: &Copy,
        url: &str,
        t: &Target,
        st: &State,
    ) -> Result<(Action, Option<Input>)> {
        let mut attrs = BTreeMap::new();
        if let Some(sum) = &c.checksum {
            attrs.insert("checksum".to_string(), self.expand(st, l, sum)?);
        }
        let op = Op {
            inputs: vec![],
            kind: Some(op::Kind::Source(llb::SourceOp {
                identifier: url.to_string(),
                attrs,
            })),
        };
        let name = format!("[internal] download {url}");
        let src = self.builder.add(&op, internal(name));
        let action = llb::FileActionCopy {
            src: "/".into(),
            dest: t.dest.clone(),
            owner: t.owner.clone(),
            mode: t.mode,
            timestamp: -1,
            ..Default::default()
        };
        Ok((Action::Copy(action), Some(src)))
    }

    /// Copies of `srcs` from `--from` (a stage or image) or the build context.
    fn copies(
        &mut self,
        stage: usize,
        l: &Located,
        c: &Copy,
        srcs: Vec<String>,
        t: &Target,
    ) -> Result<Actions> {
        let source = match &c.from {
            Some(from) => self.root_of(stage, l, "COPY", from)?,
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
        let copy = |src: String| llb::FileActionCopy {
            src: format!("/{}", pattern::clean(&src)),
            dest: t.dest.clone(),
            owner: t.owner.clone(),
            mode: t.mode,
            follow_symlink: true,
            dir_copy_contents: true,
            attempt_unpack: c.add,
            create_dest_path: true,
            allow_wildcard: true,
            allow_empty_wildcard: several,
            timestamp: -1,
        };
        let actions = srcs.into_iter().map(copy);
        Ok(actions
            .map(|a| (Action::Copy(a), Some(source.clone())))
            .collect())
    }

    /// One file op applying `actions` in order onto the stage's root; each action may read from
    /// a secondary input.
    pub(super) fn file_op(
        &mut self,
        stage: usize,
        st: &mut State,
        actions: Actions,
        step: String,
    ) -> Result {
        let mut inputs: Vec<Input> = Vec::new();
        let base = push_input(&mut inputs, st.root.clone());
        let mut out = Vec::new();
        for (i, (action, secondary)) in actions.into_iter().enumerate() {
            out.push(FileAction {
                input: if i == 0 { base } else { llb::NO_INPUT },
                secondary_input: push_input(&mut inputs, secondary),
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
