//! Strata's build engine.
//!
//! - [`dockerfile`]: the Dockerfile frontend (parser → instructions → LLB).
//! - [`llb`]: the build graph, serialized deterministically; op digest = sha256 of its bytes.
//! - [`pattern`]: path patterns and `.dockerignore` rules.

pub mod dockerfile;
pub mod llb;
pub mod pattern;
