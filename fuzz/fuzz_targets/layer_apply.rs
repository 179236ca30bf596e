//! Layer tar apply into a temporary root: whatever the tar says, nothing lands outside the root
//! (a sentinel beside it stays untouched and nothing else appears next to it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_image::layer;

fuzz_target!(|tar: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("sentinel"), b"s").unwrap();
    let _ = layer::apply(tar, &root);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["root", "sentinel"],
        "an entry escaped the layer root"
    );
    assert_eq!(std::fs::read(dir.path().join("sentinel")).unwrap(), b"s");
    assert!(std::fs::symlink_metadata(&root).unwrap().is_dir());
});
