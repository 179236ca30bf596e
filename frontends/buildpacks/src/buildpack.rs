//! Buildpacks: detection (which one builds this app) and their build steps as LLB. Apps live in
//! `/home/vcap/app` and dependencies in `/home/vcap/deps`, as on Cloud Foundry.

use std::collections::BTreeMap;
use std::path::Path;

use strata_image::oci::{History, ImageConfig};
use strata_solver::llb::{
    self, file_action, op, Builder, CacheOpt, CacheSharing, Definition, ExecOp, FileAction,
    FileActionCopy, FileOp, Input, Meta, Mount, MountType, Op, OpMetadata, SourceOp,
};

use crate::manifest::App;

pub const APP_DIR: &str = "/home/vcap/app";
const VENV: &str = "/home/vcap/deps/python";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// pip's download and wheel cache: a cache mount shared by every build on the machine.
const PIP_CACHE: &str = "/root/.cache/pip";
const WHEELS: &str = "/root/.cache/pip/wheelhouse";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Buildpack {
    Python,
    Binary,
}

const SUPPORTED: &str = "python_buildpack, binary_buildpack";

impl Buildpack {
    /// The buildpack the app names, or the first whose detect step accepts `app_dir`.
    pub fn choose(app: &App, app_dir: &Path) -> anyhow::Result<Buildpack> {
        if let Some(name) = app.buildpack() {
            // Names, or git URLs such as https://github.com/cloudfoundry/python-buildpack.
            let n = name.to_ascii_lowercase();
            let last = n.trim_end_matches(".git").rsplit('/').next().unwrap_or(&n);
            return match last.replace('-', "_").as_str() {
                "python_buildpack" | "python" => Ok(Buildpack::Python),
                "binary_buildpack" | "binary" => Ok(Buildpack::Binary),
                _ => anyhow::bail!(
                    "application {}: buildpack {name:?} is not available; this frontend has {SUPPORTED}",
                    app.name
                ),
            };
        }
        let python = ["requirements.txt", "setup.py", "Pipfile", "pyproject.toml"];
        if python.iter().any(|f| app_dir.join(f).is_file()) {
            return Ok(Buildpack::Python);
        }
        anyhow::bail!(
            "application {}: no buildpack detected in {} (python needs requirements.txt, setup.py, Pipfile or pyproject.toml); set `buildpack:` to one of {SUPPORTED}",
            app.name,
            app_dir.display()
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Buildpack::Python => "python_buildpack",
            Buildpack::Binary => "binary_buildpack",
        }
    }
}

/// What the image runs: `command:`, else the `web:` line of a Procfile.
pub fn start_command(app: &App, app_dir: &Path) -> anyhow::Result<String> {
    if let Some(c) = &app.command {
        return Ok(c.clone());
    }
    if let Ok(text) = std::fs::read_to_string(app_dir.join("Procfile")) {
        if let Some(web) = text.lines().find_map(|l| l.trim().strip_prefix("web:")) {
            return Ok(web.trim().to_string());
        }
    }
    anyhow::bail!(
        "application {}: no start command; add `command:` to manifest.yml or a Procfile with a `web:` line",
        app.name
    )
}

fn described(name: &str) -> OpMetadata {
    let mut m = OpMetadata::default();
    m.description.insert("llb.customname".into(), name.into());
    m
}

fn source(
    b: &mut Builder,
    identifier: String,
    attrs: BTreeMap<String, String>,
    name: &str,
) -> Input {
    let op = Op {
        inputs: vec![],
        kind: Some(op::Kind::Source(SourceOp { identifier, attrs })),
    };
    b.add(&op, described(name))
}

/// The build: stack image, the app copied to [`APP_DIR`], the buildpack's build step; and the
/// image config that starts `command`.
pub fn compile(
    app: &App,
    bp: Buildpack,
    stack_image: &str,
    app_path: &str,
    command: &str,
) -> (Definition, ImageConfig) {
    let mut b = Builder::default();
    let mut top = upload(&mut b, app, stack_image, app_path);
    let mut history = vec![History {
        created_by: format!("buildpacks: upload {} to {APP_DIR}", app.name),
        ..Default::default()
    }];
    let mut env = vec![format!("PATH={PATH}")];
    if bp == Buildpack::Python {
        top = python_build(&mut b, app, top);
        history.push(History {
            created_by: "python_buildpack: pip install -r requirements.txt".into(),
            ..Default::default()
        });
        env = vec![
            format!("PATH={VENV}/bin:{PATH}"),
            format!("VIRTUAL_ENV={VENV}"),
        ];
    }
    let mut config = image_config(app, bp, env, command);
    config.history = history;
    (b.finish(Some(top)), config)
}

/// The stack image with the app's directory copied to [`APP_DIR`]. Only that directory is read,
/// so only its files are in the cache key.
fn upload(b: &mut Builder, app: &App, stack_image: &str, app_path: &str) -> Input {
    let stack = source(
        b,
        format!("docker-image://{stack_image}"),
        BTreeMap::new(),
        &format!("[stack] {stack_image}"),
    );
    let dir = app_path.trim_matches('/').trim_start_matches("./");
    let dir = if dir == "." { "" } else { dir };
    let include = serde_json::to_string(&[dir]).expect("strings serialize");
    let context = source(
        b,
        "local://context".into(),
        BTreeMap::from([("includepatterns".to_string(), include)]),
        "[internal] load context",
    );
    let copy = FileActionCopy {
        src: format!("/{dir}/").replace("//", "/"),
        dest: format!("{APP_DIR}/"),
        owner: None,
        mode: -1,
        follow_symlink: true,
        dir_copy_contents: true,
        attempt_unpack: false,
        create_dest_path: true,
        allow_wildcard: true,
        allow_empty_wildcard: true,
        timestamp: -1,
    };
    let op = Op {
        inputs: vec![stack, context],
        kind: Some(op::Kind::File(FileOp {
            actions: vec![FileAction {
                input: 0,
                secondary_input: 1,
                output: 0,
                action: Some(file_action::Action::Copy(copy)),
            }],
        })),
    };
    b.add(&op, described(&format!("[{}] upload app", app.name)))
}

/// The Python buildpack's build step on `top`: a virtualenv with requirements.txt installed.
fn python_build(b: &mut Builder, app: &App, top: Input) -> Input {
    // Wheels are kept in the cache mount and installed from there without the index when
    // they satisfy requirements.txt: rebuilds need no downloads (pip's HTTP cache alone
    // depends on the index's cache headers).
    let script = format!(
        "set -e\n\
         echo \"-----> Python Buildpack: $(python3 --version)\"\n\
         python3 -m venv {VENV}\n\
         if [ -f requirements.txt ]; then\n\
           mkdir -p {WHEELS}\n\
           if {VENV}/bin/pip install -q --no-index --find-links {WHEELS} -r requirements.txt 2>/dev/null; then\n\
             echo '-----> Installed dependencies from the pip cache mount'\n\
           else\n\
             echo '-----> Installing dependencies with pip'\n\
             {VENV}/bin/pip wheel --wheel-dir {WHEELS} --find-links {WHEELS} -r requirements.txt\n\
             {VENV}/bin/pip install --no-index --find-links {WHEELS} -r requirements.txt\n\
           fi\n\
         fi\n"
    );
    let root = Mount {
        input: 0,
        dest: "/".into(),
        output: 0,
        ..Default::default()
    };
    let pip_cache = Mount {
        input: llb::NO_INPUT,
        dest: PIP_CACHE.into(),
        output: llb::NO_INPUT,
        mount_type: MountType::Cache as i32,
        cache_opt: Some(CacheOpt {
            id: "buildpacks/pip".into(),
            sharing: CacheSharing::Locked as i32,
            mode: 0o755,
            ..Default::default()
        }),
        ..Default::default()
    };
    let exec = ExecOp {
        meta: Some(Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script],
            env: vec![
                format!("PATH={PATH}"),
                "LANG=C.UTF-8".into(),
                format!("PIP_CACHE_DIR={PIP_CACHE}"),
                "PIP_DISABLE_PIP_VERSION_CHECK=1".into(),
                "PIP_NO_INPUT=1".into(),
            ],
            cwd: APP_DIR.into(),
            user: String::new(),
        }),
        mounts: vec![root, pip_cache],
        network: llb::NetMode::Unset as i32,
        secretenv: vec![],
    };
    let op = Op {
        inputs: vec![top],
        kind: Some(op::Kind::Exec(exec)),
    };
    b.add(
        &op,
        described(&format!("[{}] python_buildpack: build", app.name)),
    )
}

/// The image config Cloud Foundry apps expect: `env` (the buildpack's), then the platform's
/// variables and the app's own; labels naming the app and buildpack; `command` as CMD.
fn image_config(app: &App, bp: Buildpack, mut env: Vec<String>, command: &str) -> ImageConfig {
    let mut config = ImageConfig::default();
    let c = &mut config.config;
    env.push("LANG=C.UTF-8".into());
    env.push("HOME=/home/vcap".into());
    env.push("PORT=8080".into());
    if let Some(m) = &app.memory {
        env.push(format!("MEMORY_LIMIT={}", m.to_ascii_lowercase()));
    }
    let vcap = serde_json::json!({
        "application_name": app.name,
        "name": app.name,
        "limits": { "mem": app.memory, "disk": app.disk_quota },
    });
    env.push(format!("VCAP_APPLICATION={vcap}"));
    env.extend(app.env());
    c.env = env;
    c.cmd = Some(vec!["/bin/sh".into(), "-c".into(), command.into()]);
    c.working_dir = APP_DIR.into();
    let labels = [
        ("org.cloudfoundry.app.name", Some(app.name.clone())),
        ("org.cloudfoundry.app.memory", app.memory.clone()),
        ("org.cloudfoundry.app.disk_quota", app.disk_quota.clone()),
        ("org.cloudfoundry.buildpack", Some(bp.name().into())),
    ];
    for (k, v) in labels {
        if let Some(v) = v {
            c.labels.insert(k.into(), v);
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn app(yaml: &str) -> App {
        Manifest::parse(yaml).unwrap().applications.remove(0)
    }

    #[test]
    fn detects_and_names_buildpacks() {
        let dir = tempfile_dir();
        let a = app("applications:\n- name: x\n");
        assert!(Buildpack::choose(&a, &dir)
            .unwrap_err()
            .to_string()
            .contains("requirements.txt"));
        std::fs::write(dir.join("requirements.txt"), "").unwrap();
        assert_eq!(Buildpack::choose(&a, &dir).unwrap(), Buildpack::Python);
        let url = app("applications:\n- name: x\n  buildpack: https://github.com/cloudfoundry/python-buildpack.git\n");
        assert_eq!(Buildpack::choose(&url, &dir).unwrap(), Buildpack::Python);
        let bad = app("applications:\n- name: x\n  buildpack: go_buildpack\n");
        assert!(Buildpack::choose(&bad, &dir)
            .unwrap_err()
            .to_string()
            .contains("python_buildpack"));
        std::fs::write(dir.join("Procfile"), "web: python3 app.py\n").unwrap();
        assert_eq!(start_command(&a, &dir).unwrap(), "python3 app.py");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn python_build_uses_a_pip_cache_mount_and_sets_cmd() {
        let a = app("applications:\n- name: hello\n  memory: 128M\n  command: python app.py\n");
        let (def, config) = compile(
            &a,
            Buildpack::Python,
            "python:3.12-slim",
            ".",
            "python app.py",
        );
        let g = llb::Graph::from_definition(&def).unwrap();
        let exec = g
            .ops
            .values()
            .find_map(|o| match &o.kind {
                Some(op::Kind::Exec(e)) => Some(e.clone()),
                _ => None,
            })
            .unwrap();
        let cache = exec
            .mounts
            .iter()
            .find(|m| m.mount_type == MountType::Cache as i32)
            .unwrap();
        assert_eq!(cache.dest, PIP_CACHE);
        assert_eq!(config.config.cmd.as_deref().unwrap()[2], "python app.py");
        assert!(config.config.env.iter().any(|e| e == "MEMORY_LIMIT=128m"));
        assert!(config.config.env[0].starts_with("PATH=/home/vcap/deps/python/bin:"));
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("bp-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
