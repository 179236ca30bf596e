//! Frontends, chosen by the `# syntax = NAME` line of the source file: the built-in Dockerfile
//! frontend, or an external one (an image, or a local executable given by `--frontend-path`) run
//! in a sandbox that reads the source file and the context and writes LLB on stdout. The
//! protocol is documented in `docs/frontends.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use strata_image::nonce;
use strata_image::oci::ImageConfig;

use crate::llb::{self, Definition};
use crate::spec::InvalidSpec;
use crate::worker::exec::{self, ExecSpec, Stdout};
use crate::worker::mounts::SpecMount;
use crate::worker::{Worker, WorkerError};

/// Where frontends find their inputs and put their outputs, inside the sandbox.
pub const SOURCE: &str = "/run/strata/source";
pub const CONTEXT: &str = "/run/strata/context";
pub const OUT: &str = "/run/strata/out";
const EXECUTABLE: &str = "/run/strata/frontend";
/// Largest LLB definition a frontend may write.
const MAX_DEFINITION: usize = 64 << 20;

/// The frontend a build uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Frontend {
    Dockerfile,
    /// A local executable (`--frontend-path`).
    Executable {
        name: String,
        path: PathBuf,
    },
    /// An image whose entrypoint is the frontend, pulled like a base image.
    Image(String),
}

/// `docker/dockerfile`, `docker/dockerfile:1`, `:1.x`, `:experimental` (also with a `docker.io/`
/// prefix) name the built-in frontend: no download, no network.
pub fn is_builtin(name: &str) -> bool {
    let name = name
        .trim_start_matches("docker.io/")
        .split('@')
        .next()
        .unwrap_or(name);
    name == "docker/dockerfile"
        || name == "docker/dockerfile:1"
        || name.starts_with("docker/dockerfile:1.")
        || name.starts_with("docker/dockerfile:1-")
        || name == "docker/dockerfile:experimental"
}

/// Picks the frontend for `syntax` given the `--frontend-path` flags (`NAME=PATH`, or a bare
/// `PATH` that serves any external name).
pub fn select(syntax: Option<&str>, paths: &[String]) -> Result<Frontend, InvalidSpec> {
    let Some(name) = syntax.filter(|s| !is_builtin(s)) else {
        return Ok(Frontend::Dockerfile);
    };
    let mut fallback = None;
    for p in paths {
        match p.split_once('=') {
            Some((n, path)) if n == name => {
                return executable(name, path);
            }
            Some(_) => {}
            None => fallback = Some(p.as_str()),
        }
    }
    match fallback {
        Some(path) => executable(name, path),
        None => Ok(Frontend::Image(name.to_string())),
    }
}

fn executable(name: &str, path: &str) -> Result<Frontend, InvalidSpec> {
    let path = Path::new(path).canonicalize().map_err(|e| {
        format!("--frontend-path {path}: {e}; give the path of the frontend executable")
    })?;
    if !path.is_file() {
        return Err(format!(
            "--frontend-path {}: not a file; give the path of the frontend executable",
            path.display()
        )
        .into());
    }
    Ok(Frontend::Executable {
        name: name.to_string(),
        path,
    })
}

/// What a frontend is given.
pub struct Request<'a> {
    /// The source file (Dockerfile, manifest.yml, ...).
    pub source: &'a Path,
    pub context: &'a Path,
    pub build_args: &'a BTreeMap<String, String>,
    pub target: Option<&'a str>,
    /// Set when the build is cancelled.
    pub cancel: &'a std::sync::atomic::AtomicBool,
}

/// What a frontend returns.
pub struct Response {
    pub definition: Definition,
    pub config: ImageConfig,
}

impl Worker {
    /// Runs external frontend `fe` (not [`Frontend::Dockerfile`]) in its sandbox; its stderr
    /// goes to `log`.
    pub fn run_frontend(
        &self,
        fe: &Frontend,
        req: &Request,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Response, WorkerError> {
        let scratch = self.state_dir().join("frontend").join(nonce());
        let out = scratch.join("out");
        std::fs::create_dir_all(&out)
            .map_err(WorkerError::io(format!("create {}", out.display())))?;
        let r = self.run_frontend_in(fe, req, &scratch, log);
        let _ = strata_snapshotter::layout::remove_tree(&scratch);
        r
    }

    fn run_frontend_in(
        &self,
        fe: &Frontend,
        req: &Request,
        scratch: &Path,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Response, WorkerError> {
        let opts = serde_json::json!({
            "build-args": req.build_args,
            "target": req.target,
        });
        let source_name = req
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // runc resolves relative sources against the bundle, so the paths must be absolute.
        let absolute = |p: &Path| {
            p.canonicalize()
                .map_err(WorkerError::io(format!("{}", p.display())))
        };
        let mut mounts = vec![
            bind(&absolute(req.context)?, CONTEXT, true),
            bind(&absolute(req.source)?, SOURCE, true),
            bind(&scratch.join("out"), OUT, false),
            SpecMount {
                dest: "/tmp".into(),
                source: "tmpfs".into(),
                kind: "tmpfs",
                options: vec!["nosuid".into(), "nodev".into(), "size=65536k".into()],
            },
        ];
        let mut meta = llb::Meta {
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                format!("STRATA_FRONTEND_SOURCE={SOURCE}"),
                format!("STRATA_FRONTEND_SOURCE_NAME={source_name}"),
                format!("STRATA_FRONTEND_CONTEXT={CONTEXT}"),
                format!("STRATA_FRONTEND_OUT={OUT}"),
                format!("STRATA_FRONTEND_OPTS={opts}"),
            ],
            cwd: "/".into(),
            ..Default::default()
        };
        let (name, stdout) = match fe {
            Frontend::Dockerfile => {
                return Err(WorkerError::Exec(
                    "the Dockerfile frontend is built in".into(),
                ))
            }
            Frontend::Executable { name, path } => {
                let root = scratch.join("root");
                host_root(&root, &mut mounts)?;
                mounts.push(bind(path, EXECUTABLE, true));
                meta.args = vec![EXECUTABLE.into()];
                (name, self.sandboxed(&root, &meta, &mounts, req.cancel, log))
            }
            Frontend::Image(name) => {
                let (digest, config) =
                    crate::dockerfile::convert::ImageResolver::resolve(&self.resolver(false), name)
                        .map_err(|e| WorkerError::Image(format!("frontend image {name}: {e}")))?;
                let c = &config.config;
                meta.args = [
                    c.entrypoint.clone().unwrap_or_default(),
                    c.cmd.clone().unwrap_or_default(),
                ]
                .concat();
                if meta.args.is_empty() {
                    return Err(WorkerError::Image(format!(
                        "frontend image {name} has no ENTRYPOINT or CMD to run"
                    )));
                }
                meta.env.extend(c.env.iter().cloned());
                if !c.working_dir.is_empty() {
                    meta.cwd = c.working_dir.clone();
                }
                let top = self.unpack(&digest)?;
                let stdout = self.with_scratch(top.as_deref(), |root| {
                    self.sandboxed(root, &meta, &mounts, req.cancel, log)
                });
                (name, stdout)
            }
        };
        let stdout = stdout.map_err(|e| frontend_error(name, e))?;
        response(name, &stdout, scratch)
    }

    fn sandboxed(
        &self,
        root: &Path,
        meta: &llb::Meta,
        mounts: &[SpecMount],
        cancel: &std::sync::atomic::AtomicBool,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Vec<u8>, WorkerError> {
        let id = format!("strata-frontend-{}", nonce());
        let spec = ExecSpec {
            meta,
            extra: mounts,
            extra_env: &[],
            network: llb::NetMode::None,
            runtime: &self.runtime,
            state_dir: self.state_dir(),
            id: &id,
            sandbox: true,
            cancel,
        };
        exec::run_with(root, &spec, log, Stdout::Capture(MAX_DEFINITION))
    }
}

fn frontend_error(name: &str, e: WorkerError) -> WorkerError {
    match e {
        WorkerError::ExitCode { code, tail, .. } => WorkerError::Exec(format!(
            "frontend {name} failed (exit code {code}):\n{tail}"
        )),
        other => other,
    }
}

fn bind(source: &Path, dest: &str, readonly: bool) -> SpecMount {
    let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
    options.push(if readonly { "ro" } else { "rw" }.into());
    SpecMount {
        dest: dest.into(),
        source: source.to_path_buf(),
        kind: "bind",
        options,
    }
}

/// A root for a local executable: the host's `/usr` (and `/lib*`, `/bin`, `/sbin` as on the
/// host: symlinks on merged-/usr systems) and the loader cache, read-only; nothing else.
fn host_root(root: &Path, mounts: &mut Vec<SpecMount>) -> Result<(), WorkerError> {
    let io = |what: &Path, e: std::io::Error| {
        WorkerError::Exec(format!("frontend sandbox {}: {e}", what.display()))
    };
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    mounts.push(bind(Path::new("/usr"), "/usr", true));
    for dir in ["bin", "sbin", "lib", "lib32", "lib64"] {
        let host = Path::new("/").join(dir);
        match std::fs::read_link(&host) {
            Ok(target) => {
                std::os::unix::fs::symlink(&target, root.join(dir)).map_err(|e| io(&host, e))?
            }
            Err(_) if host.is_dir() => mounts.push(bind(&host, &format!("/{dir}"), true)),
            Err(_) => {}
        }
    }
    let cache = Path::new("/etc/ld.so.cache");
    if cache.is_file() {
        mounts.push(bind(cache, "/etc/ld.so.cache", true));
    }
    Ok(())
}

/// Decodes the frontend's stdout (a `pb.Definition`) and its `out/config.json`.
fn response(name: &str, stdout: &[u8], scratch: &Path) -> Result<Response, WorkerError> {
    let bad = |what: String| WorkerError::Exec(format!("frontend {name}: {what}"));
    if stdout.is_empty() {
        return Err(bad(
            "wrote nothing on stdout; a frontend must write an LLB definition (pb.Definition) there"
                .into(),
        ));
    }
    let definition = Definition::decode(stdout).map_err(|e| {
        bad(format!(
            "stdout ({} bytes) is not an LLB definition (pb.Definition): {e}",
            stdout.len()
        ))
    })?;
    llb::Graph::from_definition(&definition)
        .map_err(|e| bad(format!("its LLB definition is invalid: {e}")))?;
    let path = scratch.join("out").join("config.json");
    let mut config: ImageConfig = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("{OUT}/config.json is not an OCI image config: {e}")))?,
        Err(_) => ImageConfig::default(),
    };
    if config.os.is_empty() {
        config.os = "linux".into();
    }
    if config.architecture.is_empty() {
        config.architecture = "amd64".into();
    }
    // Layers are the builder's business, whatever the frontend wrote.
    config.rootfs = Default::default();
    Ok(Response { definition, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_stay_offline() {
        for n in [
            "docker/dockerfile",
            "docker/dockerfile:1",
            "docker/dockerfile:1.7",
            "docker/dockerfile:1.4-labs",
            "docker.io/docker/dockerfile:1",
            "docker/dockerfile:experimental",
        ] {
            assert_eq!(select(Some(n), &[]).unwrap(), Frontend::Dockerfile, "{n}");
        }
        assert_eq!(select(None, &[]).unwrap(), Frontend::Dockerfile);
        assert_eq!(
            select(Some("example.com/fe:1"), &[]).unwrap(),
            Frontend::Image("example.com/fe:1".into())
        );
    }

    #[test]
    fn frontend_paths_match_by_name_or_serve_all() {
        let exe = std::env::current_exe().unwrap();
        let named = format!("strata/buildpacks={}", exe.display());
        match select(Some("strata/buildpacks"), std::slice::from_ref(&named)).unwrap() {
            Frontend::Executable { name, path } => {
                assert_eq!(name, "strata/buildpacks");
                assert_eq!(path, exe.canonicalize().unwrap());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            select(Some("other/fe"), &[named]).unwrap(),
            Frontend::Image("other/fe".into())
        );
        let any = exe.display().to_string();
        assert!(matches!(
            select(Some("other/fe"), &[any]).unwrap(),
            Frontend::Executable { .. }
        ));
        let err = select(Some("x"), &["/nonexistent/fe".into()]).unwrap_err();
        assert!(err.0.contains("/nonexistent/fe"), "{err}");
    }
}
