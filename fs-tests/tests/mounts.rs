//! RUN --mount (cache, secret, ssh, tmpfs, bind) with real runc, restated from BuildKit's tests.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use strata_fs_tests::strata::Strata;

fn out(b: &strata_fs_tests::strata::Build, needle: &str) -> bool {
    b.progress.lines().any(|l| l.contains(needle))
}

#[test]
fn cache_mounts() {
    let s = Strata::new();
    s.file("v", "1");
    s.dockerfile(
        "FROM busybox\n\
         COPY v /v\n\
         RUN --mount=type=cache,target=/a --mount=type=cache,target=/b echo a > /a/f && test ! -e /b/f && echo runs-before $(cat /a/runs 2>/dev/null | wc -l) && date >> /a/runs\n\
         RUN --mount=type=cache,target=/o,uid=1001,gid=1002,mode=0751 echo owner $(stat -c '%u %g %a' /o)\n",
    );
    let b = s.build_ok(&[]);
    assert!(out(&b, "owner 1001 1002 751"), "{}", b.progress);
    // Bust the RUN (its input changed): the cache mount keeps what the first run wrote.
    s.file("v", "2");
    let b = s.build_ok(&[]);
    assert!(
        out(&b, "runs-before 1"),
        "the second run sees the first run's file: {}",
        b.progress
    );
    // --no-cache reruns the step with its cache mounts reset.
    let b = s.build_ok(&["--no-cache"]);
    assert!(out(&b, "runs-before 0"), "{}", b.progress);
    // strata cache ls / prune.
    let ls = String::from_utf8(s.run(&["cache", "ls"]).stdout).unwrap();
    assert!(
        ls.lines().any(|l| l.starts_with("/a ")) && ls.lines().any(|l| l.starts_with("/o ")),
        "{ls}"
    );
    assert!(s
        .run(&["cache", "prune", "--filter", "id=/a"])
        .status
        .success());
    let ls = String::from_utf8(s.run(&["cache", "ls"]).stdout).unwrap();
    assert!(
        !ls.lines().any(|l| l.starts_with("/a ")) && ls.lines().any(|l| l.starts_with("/o ")),
        "{ls}"
    );
}

#[test]
fn tmpfs_and_bind_mounts() {
    let s = Strata::new();
    s.file("src/data.txt", "from the context");
    s.dockerfile(
        "FROM busybox AS other\nRUN echo from a stage > /made\n\
         FROM busybox\n\
         RUN --mount=type=tmpfs,target=/t,size=128m grep ' /t ' /proc/mounts && echo x > /t/x\n\
         RUN test ! -e /t/x && echo tmpfs gone\n\
         RUN --mount=target=/ctx,source=src cat /ctx/data.txt\n\
         RUN --mount=type=bind,from=other,source=/made,target=/m cat /m\n\
         RUN --mount=type=bind,target=/w,rw echo scribble > /w/new && cat /w/new\n",
    );
    let (b, o) = s.build_local(&[]);
    assert!(out(&b, "size=131072k"), "{}", b.progress);
    assert!(out(&b, "tmpfs gone"), "{}", b.progress);
    assert!(out(&b, "from the context"), "{}", b.progress);
    assert!(out(&b, "from a stage"), "{}", b.progress);
    assert!(out(&b, "scribble"), "{}", b.progress);
    assert!(
        !s.path().join("new").exists(),
        "rw bind writes are discarded, never in the context"
    );
    for stub in ["t", "ctx", "m", "w"] {
        assert!(
            !o.path().join(stub).exists(),
            "mount point /{stub} left in the image"
        );
    }
}

#[test]
fn secrets_never_leak() {
    let s = Strata::new();
    let secret = "Zx9-very-secret-Q7";
    let secret_dir = tempfile::tempdir().unwrap();
    let file = secret_dir.path().join("token");
    fs::write(&file, secret).unwrap();
    s.dockerfile(
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok,mode=0741,uid=100,gid=102 echo meta $(stat -c '%u %g %a' /run/secrets/tok) && cat /run/secrets/tok && echo\n\
         RUN --mount=type=secret,id=tok,env=TOKEN test ! -e /run/secrets/tok && echo \"env $TOKEN\" && echo \"$TOKEN\" | wc -c\n\
         RUN --mount=type=secret,id=absent echo optional secret skipped\n",
    );
    let archive = s.root.path().join("img.tar");
    let spec = format!("type=oci,dest={}", archive.display());
    let src = format!("id=tok,src={}", file.display());
    let b = s.build_ok(&["--secret", &src, "--output", &spec]);
    assert!(out(&b, "meta 100 102 741"), "{}", b.progress);
    assert!(out(&b, "env ****"), "masked: {}", b.progress);
    assert!(out(&b, "optional secret skipped"));
    assert!(
        !b.progress.contains(secret),
        "secret in the progress output"
    );
    // Not in any exported blob (layers, config, manifest), the cache database or the store.
    let mut bytes = Vec::new();
    fs::File::open(&archive)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "secret in the exported image"
    );
    // The whole root: database, content, snapshots, cache volumes, runtime state.
    assert!(assert_no_secret(s.root.path(), secret.as_bytes()) > 10);
    // The stub mount point is not in the layer.
    let (_, o) = s.build_local(&["--secret", &src]);
    assert!(!o.path().join("run/secrets").exists());

    // A required secret that was not given, and a src that does not exist.
    s.dockerfile("FROM busybox\nRUN --mount=type=secret,id=need,required true\n");
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("secret need: not found"),
        "{}",
        b.progress
    );
    let b = s.build(&["--secret", "id=need,src=/nonexistent/file"]);
    assert!(
        !b.ok
            && b.progress
                .contains("secret need: cannot read src /nonexistent/file"),
        "{}",
        b.progress
    );
}

/// A failing step's summary ("last lines of its output") and every progress mode mask every line
/// of a multi-line secret, given as a file and read through env=; the build's own error too.
#[test]
fn a_failing_step_never_prints_its_secrets() {
    let s = Strata::new();
    let lines = ["Zx9-first-secret-line", "Q7-second-secret-line"];
    let file = s.root.path().join("token");
    fs::write(&file, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    s.dockerfile(
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok,env=TOK --mount=type=secret,id=tok,target=/t echo \"val=$TOK\"; cat /t; exit 3\n",
    );
    let src = format!("id=tok,src={}", file.display());
    let ctx = s.ctx.path().to_str().unwrap().to_string();
    for mode in ["plain", "tty", "quiet", "rawjson"] {
        let o = s.run(&["build", "--progress", mode, "--secret", &src, &ctx]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.status.success(), "{mode}: the step exits 3:\n{text}");
        assert!(text.contains("exit code: 3"), "{mode}: {text}");
        for l in lines {
            assert!(
                !text.contains(l),
                "{mode}: secret line {l} printed:\n{text}"
            );
        }
        assert!(
            text.contains("val=****"),
            "{mode}: masked value shown:\n{text}"
        );
    }
    let big = s.run(&["build", "--secret", "id=big,src=/dev/zero", &ctx]);
    let err = String::from_utf8_lossy(&big.stderr);
    assert!(
        !big.status.success() && err.contains("secret big: src /dev/zero is larger than 500 KiB"),
        "{err}"
    );
    let nameless = s.run(&["build", "--secret", "id=,src=/etc/hostname", &ctx]);
    let err = String::from_utf8_lossy(&nameless.stderr);
    assert!(err.contains("the id is empty"), "{err}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts no regular file under `dir` holds `secret`; returns how many files were read.
fn assert_no_secret(dir: &std::path::Path, secret: &[u8]) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            n += assert_no_secret(&e.path(), secret);
        } else if ft.is_file() {
            let data = fs::read(e.path()).unwrap();
            assert!(
                !contains(&data, secret),
                "secret found in {}",
                e.path().display()
            );
            n += 1;
        }
    }
    n
}

/// Talking to the forwarded agent (ssh-add -l, signing) is proven with OpenSSH's own tools in
/// `ssh.rs`; here: a required ssh mount without an agent is refused with the fix.
#[test]
fn a_required_ssh_mount_without_an_agent_is_a_clear_error() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN --mount=type=ssh,required true\n");
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("pass --ssh default=$SSH_AUTH_SOCK"),
        "{}",
        b.progress
    );
}

/// (enter, leave) host uptimes of each step that printed `#N ... ENTER t` and `#N ... LEAVE t`.
fn spans_of(progress: &str, enter_word: &str, leave_word: &str) -> Vec<(f64, f64)> {
    let mut spans = Vec::new();
    let mut enter = std::collections::HashMap::new();
    for l in progress.lines() {
        let p: Vec<&str> = l.split_whitespace().collect();
        if p.len() == 4 && p[2] == enter_word {
            enter.insert(p[0].to_string(), p[3].parse::<f64>().unwrap());
        }
        if p.len() == 4 && p[2] == leave_word {
            spans.push((enter[p[0]], p[3].parse::<f64>().unwrap()));
        }
    }
    spans
}

#[test]
fn cache_sharing_between_parallel_steps() {
    let s = Strata::new();
    let mut df = String::new();
    for i in 0..4 {
        // Host uptime before and after, from inside the locked section.
        df.push_str(&format!("FROM busybox AS l{i}\nRUN --mount=type=cache,id=lk,target=/c,sharing=locked echo enter $(cut -d' ' -f1 /proc/uptime) && sleep 0.5 && echo leave $(cut -d' ' -f1 /proc/uptime) # {i}\n"));
    }
    for i in 0..2 {
        // Write, then look after the other has surely written (the spans below must overlap):
        // a shared instance shows both files, a private one only its own.
        df.push_str(&format!("FROM busybox AS p{i}\nRUN --mount=type=cache,id=pv,target=/c,sharing=private touch /c/mine-{i} && echo penter $(cut -d' ' -f1 /proc/uptime) && sleep 1.5 && echo pleave $(cut -d' ' -f1 /proc/uptime) && ls /c | grep -c mine > /seen && echo private saw $(cat /seen) # {i}\n"));
    }
    df.push_str("FROM busybox\n");
    for i in 0..4 {
        df.push_str(&format!("COPY --from=l{i} /etc/passwd /l{i}\n"));
    }
    for i in 0..2 {
        df.push_str(&format!("COPY --from=p{i} /seen /p{i}\n"));
    }
    s.dockerfile(&df);
    let b = s.build_ok(&["--max-parallelism", "8"]);
    let spans = spans_of(&b.progress, "enter", "leave");
    assert_eq!(spans.len(), 4, "{}", b.progress);
    for (i, a) in spans.iter().enumerate() {
        for c in &spans[i + 1..] {
            assert!(
                a.1 <= c.0 || c.1 <= a.0,
                "locked users overlapped: {a:?} {c:?}"
            );
        }
    }
    let private = spans_of(&b.progress, "penter", "pleave");
    assert_eq!(private.len(), 2, "{}", b.progress);
    let (a, c) = (private[0], private[1]);
    assert!(
        a.0 < c.1 && c.0 < a.1,
        "the private users did not run at once, so sharing was not tested: {a:?} {c:?}"
    );
    assert_eq!(
        b.progress.matches("private saw 1").count(),
        2,
        "each private user sees only its own file: {}",
        b.progress
    );
}

#[test]
fn sixteen_steps_with_nested_cache_mounts_do_not_deadlock() {
    let s = Strata::new();
    let mut df = String::new();
    for i in 0..16 {
        let (x, y) = if i % 2 == 0 { ("x", "y") } else { ("y", "x") };
        df.push_str(&format!("FROM busybox AS s{i}\nRUN --mount=type=cache,id={x},target=/c,sharing=locked --mount=type=cache,id={y},target=/c/inner,sharing=locked echo {i} >> /c/log\n"));
    }
    df.push_str("FROM busybox\n");
    for i in 0..16 {
        df.push_str(&format!("COPY --from=s{i} /etc/passwd /h{i}\n"));
    }
    s.dockerfile(&df);
    let b = s.build_or_hang(
        &["--max-parallelism", "16"],
        std::time::Duration::from_secs(300),
    );
    assert!(b.ok, "{}", b.progress);
}

#[test]
fn bad_mounts_are_refused_with_clear_messages() {
    let s = Strata::new();
    s.file("a", "a");
    let cases = [
        (
            "RUN --mount=type=secret,id=a,source=b true",
            "conflicting id=a and source=b",
        ),
        (
            "RUN --mount=type=bind,target=/x,mode=0644 true",
            "\"mode\" is not allowed",
        ),
        (
            "RUN --mount=type=bind,target=/x,from=$V true",
            "does not expand variables",
        ),
        (
            "RUN --mount=type=cahce,target=/x true",
            "did you mean cache?",
        ),
        (
            "RUN --mount=type=cache,target=/x,sharing=lockd true",
            "did you mean locked?",
        ),
    ];
    for (run, want) in cases {
        s.dockerfile(&format!("FROM busybox\n{run}\n"));
        let b = s.build(&[]);
        assert!(
            !b.ok && b.progress.contains(want),
            "{run}: expected {want:?}:\n{}",
            b.progress
        );
    }
    // A cache source= that would leave the volume through a symlink.
    s.dockerfile("FROM busybox\nRUN --mount=type=cache,id=esc,target=/c ln -s / /c/out\nRUN --mount=type=cache,id=esc,source=out,target=/c ls /c\n");
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("is a symlink"),
        "{}",
        b.progress
    );
    let _ = MetadataExt::uid(&fs::metadata(s.path()).unwrap());
}

/// Inputs that used to get runc's or a misleading message get one naming the problem and the fix.
#[test]
fn mistakes_get_messages_that_name_the_fix() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN --mount=type=cache,target=/ true\n");
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("cannot replace the root filesystem"),
        "{}",
        b.progress
    );
    fs::write(
        s.ctx.path().join("Dockerfile"),
        b"FROM busybox\nRUN echo \xff\xfe\n",
    )
    .unwrap();
    let b = s.build(&[]);
    assert!(
        !b.ok
            && b.progress.contains(":2: not UTF-8 text")
            && !b.progress.contains("add a Dockerfile"),
        "{}",
        b.progress
    );
}
