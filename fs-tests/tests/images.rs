//! `strata images load` refuses hostile or broken archives whole: nothing stored, nothing printed
//! that could drive a terminal.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use strata_fs_tests::image::{busybox_layer, write_oci_archive};
use strata_fs_tests::strata::Strata;

/// An archive's entries by path.
type Entries = BTreeMap<String, Vec<u8>>;

fn entries(archive: &Path) -> Entries {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(e.path().unwrap().display().to_string(), data);
    }
    out
}

fn write(archive: &Path, entries: &Entries) {
    let mut b = tar::Builder::new(std::fs::File::create(archive).unwrap());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.finish().unwrap();
}

fn blob_count(s: &Strata) -> usize {
    std::fs::read_dir(s.root.path().join("build/content/blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn broken_or_hostile_archives_are_refused_and_store_nothing() {
    let s = Strata::new();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.tar");
    let mut layer = busybox_layer();
    layer.file("only-here", 0o644, b"a file no other test image has");
    write_oci_archive(&good, "localhost/load/good:1", &[layer.finish()], &["sh"]);
    let base = entries(&good);
    let index: serde_json::Value = serde_json::from_slice(&base["index.json"]).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&base[&format!("blobs/sha256/{manifest_hex}")]).unwrap();
    let layer_hex = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();

    let with_index = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut e = base.clone();
        let mut i = index.clone();
        edit(&mut i);
        e.insert("index.json".into(), serde_json::to_vec(&i).unwrap());
        e
    };
    let name = |n: &'static str| {
        with_index(&move |i| {
            i["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = n.into();
            i["manifests"][0]["annotations"]["io.containerd.image.name"] = n.into();
        })
    };
    let mut missing = base.clone();
    missing.remove(&format!("blobs/sha256/{layer_hex}"));
    let cases: Vec<(&str, Entries, String)> = vec![
        (
            "missing-blob",
            missing,
            format!("names blob sha256:{layer_hex}"),
        ),
        (
            "wrong-size",
            with_index(&|i| {
                let n = i["manifests"][0]["size"].as_u64().unwrap();
                i["manifests"][0]["size"] = (n + 1).into();
            }),
            "bytes, the blob has".into(),
        ),
        (
            "dotdot-name",
            name("../../evil:1"),
            "not a valid image reference".into(),
        ),
        (
            "newline-name",
            name("localhost/app\nevil:1"),
            "not a valid image reference".into(),
        ),
        (
            "escape-name",
            name("localhost/app:\u{1b}[2J"),
            "not a valid image reference".into(),
        ),
        (
            "non-hex-digest",
            with_index(&|i| {
                i["manifests"][0]["digest"] = format!("sha256:{}", "Z".repeat(64)).into();
            }),
            "is not a sha256 digest".into(),
        ),
    ];
    let before = blob_count(&s);
    for (what, e, message) in cases {
        let archive = dir.path().join(format!("{what}.tar"));
        write(&archive, &e);
        let out = s.run(&["images", "load", archive.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: loaded");
        assert!(err.contains(&message), "{what}: {err}");
        assert!(!err.contains('\u{1b}'), "{what}: escape printed: {err:?}");
        assert_eq!(blob_count(&s), before, "{what}: blobs kept after refusal");
    }
    let ls = s.run(&["images", "ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(!ls.contains("evil") && !ls.contains("good"), "{ls}");
    // The intact archive still loads.
    let out = s.run(&["images", "load", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
