//! Frontends chosen by `# syntax = NAME`: the buildpacks frontend of this workspace as a local
//! executable (`--frontend-path`) and as an image, and broken or hostile frontends.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::Daemon;
use strata_fs_tests::strata::Strata;
use strata_fs_tests::{image, workspace_bin};

const STACK: &str = "localhost/strata-test/debian-python:bookworm";

/// A root with the Debian python stack loaded.
fn with_stack() -> Strata {
    Strata::with_image(&image::debian("python"))
}

/// Imports `archive` into containerd on strata and runs `image`'s CMD.
fn run_cmd(archive: &std::path::Path, image: &str) -> String {
    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    c.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "strata",
        archive.to_str().unwrap(),
    ]);
    c.ctr(&["run", "--rm", "--snapshotter", "strata", image, "app"])
}

#[test]
fn buildpacks_manifest_builds_with_a_pip_cache_and_its_cmd_runs() {
    let s = with_stack();
    // The example of examples/buildpacks-python, as a user would build it.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/buildpacks-python");
    for f in ["manifest.yml", "app.py", "requirements.txt"] {
        fs::copy(example.join(f), s.path().join(f)).unwrap();
    }
    let fe = format!(
        "strata/buildpacks={}",
        workspace_bin("strata-frontend-buildpacks").display()
    );
    let manifest = s.path().join("manifest.yml");
    let archive = s.root.path().join("app.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    let stack = format!("STACK_IMAGE={STACK}");
    let args = |out: &str| {
        vec![
            "-f".to_string(),
            manifest.display().to_string(),
            "--frontend-path".into(),
            fe.clone(),
            "--build-arg".into(),
            stack.clone(),
            "-t".into(),
            "docker.io/strata/hello:1".into(),
            "--output".into(),
            out.to_string(),
        ]
    };
    let a = args(&dest);
    let b = s.build_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        b.progress.contains("[internal] frontend strata/buildpacks"),
        "{}",
        b.progress
    );
    assert!(
        b.progress.contains("Installing dependencies with pip"),
        "{}",
        b.progress
    );
    assert_eq!(
        run_cmd(&archive, "docker.io/strata/hello:1").trim(),
        "Hello from hello (six 1.16.0, memory 128M)"
    );

    // A source change reruns the build step; pip's downloads come from the cache mount.
    s.file("app.py", "import six\nprint('v2', six.__version__)\n");
    let b = s.build_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        b.progress
            .contains("Installed dependencies from the pip cache mount"),
        "pip reuses its cache mount:\n{}",
        b.progress
    );
    let ls = String::from_utf8(s.run(&["cache", "ls"]).stdout).unwrap();
    assert!(ls.contains("buildpacks/pip"), "{ls}");
}

#[test]
fn a_frontend_image_named_by_syntax_builds() {
    let s = with_stack();
    // The frontend image: the stack plus this workspace's frontend executable.
    fs::copy(
        workspace_bin("strata-frontend-buildpacks"),
        s.path().join("fe"),
    )
    .unwrap();
    s.dockerfile(&format!(
        "FROM {STACK}\nCOPY fe /usr/local/bin/strata-frontend-buildpacks\nENTRYPOINT [\"/usr/local/bin/strata-frontend-buildpacks\"]\n"
    ));
    s.build_ok(&["-t", "localhost/strata/buildpacks:test"]);
    fs::remove_file(s.path().join("fe")).unwrap();
    fs::remove_file(s.path().join("Dockerfile")).unwrap();

    s.file(
        "manifest.yml",
        &format!("# syntax = localhost/strata/buildpacks:test\napplications:\n- name: tool\n  buildpack: binary_buildpack\n  command: sh hello.sh\n  stack: {STACK}\n"),
    );
    s.file("hello.sh", "echo binary app ran in $PWD\n");
    let archive = s.root.path().join("tool.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    let manifest = s.path().join("manifest.yml");
    let b = s.build_ok(&[
        "-f",
        manifest.to_str().unwrap(),
        "-t",
        "docker.io/strata/tool:1",
        "--output",
        &dest,
    ]);
    assert!(b.progress.contains("binary_buildpack"), "{}", b.progress);
    assert_eq!(
        run_cmd(&archive, "docker.io/strata/tool:1").trim(),
        "binary app ran in /home/vcap/app"
    );
}

/// Writes an executable script into the context's parent and returns its path.
fn script(s: &Strata, name: &str, body: &str) -> String {
    let p = s.root.path().join(name);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

#[test]
fn broken_and_hostile_frontends_get_clear_errors() {
    let s = Strata::new();
    s.dockerfile("# syntax = example/fe\nanything\n");
    let build = |fe: &str| s.build(&["--frontend-path", &format!("example/fe={fe}")]);

    let b = build(&script(
        &s,
        "garbage",
        "#!/bin/sh\nprintf 'not protobuf \\377\\377\\377'\n",
    ));
    assert!(
        !b.ok && b.progress.contains("is not an LLB definition"),
        "{}",
        b.progress
    );

    let b = build(&script(&s, "silent", "#!/bin/sh\nexit 0\n"));
    assert!(
        !b.ok && b.progress.contains("wrote nothing on stdout"),
        "{}",
        b.progress
    );

    // The sandbox: a read-only root, no network, no capabilities, the context read-only.
    let probe = script(
        &s,
        "probe",
        "#!/bin/sh\n\
         touch /usr/strata-frontend-was-here 2>/dev/null && echo WROTE-USR >&2\n\
         touch $STRATA_FRONTEND_CONTEXT/x 2>/dev/null && echo WROTE-CONTEXT >&2\n\
         echo interfaces $(tail -n +3 /proc/net/dev | grep -vc ' lo:') >&2\n\
         grep CapEff /proc/self/status >&2\n\
         head -1 $STRATA_FRONTEND_SOURCE >&2\n\
         echo boom >&2; exit 3\n",
    );
    let b = build(&probe);
    assert!(!b.ok, "{}", b.progress);
    assert!(
        b.progress
            .contains("frontend example/fe failed (exit code 3)"),
        "{}",
        b.progress
    );
    assert!(b.progress.contains("boom"), "{}", b.progress);
    assert!(b.progress.contains("interfaces 0"), "{}", b.progress);
    assert!(
        b.progress.contains("CapEff:\t0000000000000000"),
        "{}",
        b.progress
    );
    assert!(
        b.progress.contains("# syntax = example/fe"),
        "{}",
        b.progress
    );
    assert!(!b.progress.contains("WROTE"), "{}", b.progress);
    assert!(!std::path::Path::new("/usr/strata-frontend-was-here").exists());
    assert!(!s.path().join("x").exists());

    // Without --frontend-path the name is an image: not in the store, not pullable.
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("frontend image example/fe"),
        "{}",
        b.progress
    );

    // The buildpacks frontend refuses what it cannot build, naming the fix.
    s.file(
        "manifest.yml",
        "# syntax = strata/buildpacks\napplications:\n- name: app\n",
    );
    let fe = format!(
        "strata/buildpacks={}",
        workspace_bin("strata-frontend-buildpacks").display()
    );
    let manifest = s.path().join("manifest.yml");
    let b = s.build(&["-f", manifest.to_str().unwrap(), "--frontend-path", &fe]);
    assert!(
        !b.ok && b.progress.contains("no buildpack detected"),
        "{}",
        b.progress
    );
    s.file("manifest.yml", "# syntax = strata/buildpacks\napplications:\n- name: app\n  path: ../..\n  buildpack: binary_buildpack\n");
    let b = s.build(&["-f", manifest.to_str().unwrap(), "--frontend-path", &fe]);
    assert!(
        !b.ok && b.progress.contains("leaves the build context"),
        "{}",
        b.progress
    );
}
