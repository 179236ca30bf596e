//! tar-split data (`tar-split.json.gz`, as the input decompressed or not) read and replayed
//! against an empty layer tree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_tool::tarsplit;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tar-split.json.gz");
    let gz = if data.starts_with(&[0x1f, 0x8b]) {
        data.to_vec()
    } else {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    std::fs::write(&path, gz).unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    if let Ok(entries) = tarsplit::read(&path) {
        let _ = tarsplit::assemble(&entries, &files, &mut std::io::sink());
    }
});
