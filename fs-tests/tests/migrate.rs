//! migrate-tool against a real Docker data root: dockerd 20.10 with the overlay (v1) driver.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::strata::Strata;

/// Every entry under `root` with its size, mode and mtime: to prove a command wrote nothing.
fn listing(root: &Path) -> BTreeMap<String, (u64, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.insert(p.display().to_string(), (m.len(), m.mode(), m.mtime()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn plan(root: &Path) -> (bool, serde_json::Value, String) {
    let out = Command::new(strata_fs_tests::workspace_bin("migrate-tool"))
        .args(["plan", "--json", "--data-root"])
        .arg(root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn problems(v: &serde_json::Value, severity: &str) -> Vec<String> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["severity"] == severity)
        .map(|p| p["what"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plan_reads_an_overlay_v1_data_root_and_writes_nothing() {
    // Images built by strata, loaded into a dockerd on the overlay (v1) driver.
    let s = Strata::new();
    let archive = s.root.path().join("images.tar");
    s.dockerfile("FROM busybox\nRUN rm /etc/group && mkdir /data && echo kept > /data/f\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=app:1", archive.display()),
    ]);
    let base = s.root.path().join("busybox.tar");
    s.dockerfile("FROM busybox\n");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=busybox:latest", base.display()),
    ]);

    let mut d = Dockerd::start("overlay", &[]);
    d.load(&base);
    d.load(&archive);
    d.docker(&[
        "create",
        "--name",
        "written",
        "--network",
        "none",
        "app:1",
        "sh",
        "-c",
        "echo hi > /w",
    ]);
    d.docker(&["start", "-a", "written"]);
    d.docker(&[
        "create",
        "--name",
        "fresh",
        "--network",
        "none",
        "busybox:latest",
        "true",
    ]);
    d.docker(&[
        "run",
        "-d",
        "--name",
        "busy",
        "--network",
        "none",
        "busybox:latest",
        "sleep",
        "1000",
    ]);
    let root = d.data_root();

    let (ok, v, text) = plan(&root);
    assert!(ok, "{text}");
    assert_eq!(v["driver"], "overlay", "{text}");
    let blockers = problems(&v, "blocker");
    assert!(
        blockers.iter().any(|b| b.contains("dockerd")),
        "{blockers:?}"
    );
    assert!(
        blockers
            .iter()
            .any(|b| b.contains("container busy is running")),
        "{blockers:?}"
    );

    d.stop();
    let before = listing(&root);
    let (ok, v, text) = plan(&root);
    assert!(ok, "{text}");
    assert_eq!(listing(&root), before, "plan must not write anything");
    assert_eq!(v["images"], 2, "{text}");
    assert_eq!(v["tags"], 2, "{text}");
    assert_eq!(v["layers"], 2, "busybox and app's RUN layer: {text}");
    assert_eq!(v["containers"], 3, "{text}");
    assert_eq!(
        v["bytes_to_write"], 0,
        "overlay layers are hard-linked: {text}"
    );
    assert!(problems(&v, "blocker").is_empty(), "{text}");

    // A layer whose driver directory is gone is a blocker that names it.
    let layer = std::fs::read_dir(root.join("image/overlay/layerdb/sha256"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let cache_id = std::fs::read_to_string(layer.join("cache-id")).unwrap();
    std::fs::rename(
        root.join("overlay").join(cache_id.trim()),
        root.join("moved-away"),
    )
    .unwrap();
    let (_, v, _) = plan(&root);
    assert!(
        problems(&v, "blocker")
            .iter()
            .any(|b| b.contains("is missing") && b.contains(cache_id.trim())),
        "{v}"
    );

    // Not a data root at all.
    let (ok, _, text) = plan(s.path());
    assert!(!ok && text.contains("is not a Docker data root"), "{text}");
}
