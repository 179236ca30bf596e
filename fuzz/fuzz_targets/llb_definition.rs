//! The LLB definition an external frontend writes on stdout (pb.Definition), decoded and checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_solver::llb::{Definition, Graph};

fuzz_target!(|data: &[u8]| {
    if let Ok(def) = Definition::decode(data) {
        if let Ok(g) = Graph::from_definition(&def) {
            let _ = g.cache_ids();
            let _ = g.to_json();
        }
    }
});
