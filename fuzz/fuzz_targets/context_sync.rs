//! A hostile client's context stats and files on a shared builder: any message gives an updated
//! copy or an error, never a panic, and nothing is written outside the copy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_solver::service::context::Copy;
use strata_solver::service::proto::{ContextStats, FileChunk};

fuzz_target!(|data: &[u8]| {
    let Ok(stats) = ContextStats::decode(data) else {
        return;
    };
    if stats.entries.len() > 64 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = Copy::new(&dir.path().join("contexts"), "client", "/ctx");
    // Every entry's "content" is its path; ids past the list are the client lying.
    let chunks: Vec<FileChunk> = (0..stats.entries.len() as u32 + 2)
        .map(|id| FileChunk {
            id,
            data: vec![b'x'; (id as usize) % 7],
            eof: id % 3 != 1,
            error: String::new(),
        })
        .collect();
    let mut fetch = |_ids: Vec<u32>| Ok(());
    let _ = copy.sync(
        stats.entries,
        stats.walk_started_ns,
        &mut fetch,
        &mut chunks.into_iter(),
    );
    // Only the copy's own names: its tree and its index.
    let names = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(p).map_or(Vec::new(), |rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
    };
    let top = names(dir.path());
    assert!(
        top.iter().all(|n| n == "contexts"),
        "written outside the copy: {top:?}"
    );
    let copies = names(&dir.path().join("contexts"));
    assert!(copies.len() <= 1, "written beside the copy: {copies:?}");
    for n in copies
        .iter()
        .flat_map(|c| names(&dir.path().join("contexts").join(c)))
    {
        assert!(
            ["tree", "index.json"].contains(&n.as_str()),
            "written beside the tree: {n}"
        );
    }
});
