//! What ops read: base images (pinned by digest), other stages, the build context (restricted to
//! the paths an instruction names), and the inputs list of an op.

use std::collections::BTreeMap;

use strata_image::oci::ImageConfig;

use super::super::instructions::Located;
use super::{err, Converter, CUSTOM_NAME};
use crate::dockerfile::DockerfileError;
use crate::llb::{self, op, Input, Op, OpMetadata};

type Result<T> = std::result::Result<T, DockerfileError>;

/// The config of `FROM scratch`.
pub(super) fn scratch_config() -> ImageConfig {
    ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    }
}

/// The index of `from` among `inputs` (added if new), or NO_INPUT.
pub(super) fn push_input(inputs: &mut Vec<Input>, from: Option<Input>) -> i64 {
    match from {
        None => llb::NO_INPUT,
        Some(i) => inputs.iter().position(|x| *x == i).unwrap_or_else(|| {
            inputs.push(i);
            inputs.len() - 1
        }) as i64,
    }
}

/// A source op of `identifier`.
fn source(identifier: String, attrs: BTreeMap<String, String>) -> Op {
    Op {
        inputs: vec![],
        kind: Some(op::Kind::Source(llb::SourceOp { identifier, attrs })),
    }
}

impl Converter<'_> {
    /// Base image `image` of stage `stage`: its source op (pinned to the resolved digest) and
    /// its config.
    pub(super) fn base_image(
        &mut self,
        stage: usize,
        from: &Located,
        image: &str,
        step: String,
    ) -> Result<(Input, ImageConfig)> {
        let (digest, config) = self
            .resolver
            .resolve(image)
            .map_err(|e| err(from, format!("base image {image}: {e}")))?;
        let op = source(format!("docker-image://{image}@{digest}"), BTreeMap::new());
        Ok((self.builder.add(&op, self.meta(stage, step)), config))
    }

    /// The root of stage or image `from` (as named by `--from` / `from=`).
    pub(super) fn root_of(
        &mut self,
        stage: usize,
        l: &Located,
        what: &str,
        from: &str,
    ) -> Result<Option<Input>> {
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
                let op = source(format!("docker-image://{from}@{digest}"), BTreeMap::new());
                let name = format!("[{}] FROM {from}", self.stage_label(stage));
                Ok(Some(self.builder.add(&op, self.meta(stage, name))))
            }
        }
    }

    /// The build context restricted to `include` (paths or patterns): the cache key covers
    /// exactly the files they select.
    pub(super) fn context_source(&mut self, include: Vec<String>) -> Input {
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
        let op = source("local://context".into(), attrs.into());
        let name = "[internal] load build context".to_string();
        self.builder.add(&op, internal(name))
    }
}

/// The metadata of an op that belongs to no stage, shown as `name`.
pub(super) fn internal(name: String) -> OpMetadata {
    OpMetadata {
        ignore_cache: false,
        description: [(CUSTOM_NAME.to_string(), name)].into(),
    }
}
