//! Build-cache garbage collection: `strata prune` and the policy applied after every build.
//!
//! Cache records go least recently used first, until what is kept fits the policy; then every
//! result snapshot that no record points at (and that no other snapshot builds on) is removed.

use std::collections::BTreeSet;

use crate::db::now;
use crate::worker::{Worker, WorkerError};

/// What to keep. With neither limit, everything is removed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Keep records used within this many seconds.
    pub keep_duration: Option<u64>,
    /// Keep at most this many bytes of cached results.
    pub keep_storage: Option<u64>,
}

/// The policy after each build: keep up to 10 GB of build cache.
pub const DEFAULT: Policy = Policy {
    keep_duration: None,
    keep_storage: Some(10_000_000_000),
};

/// A `--keep-duration` or `--keep-storage` value that does not parse, with the forms that do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// `--keep-storage`: `10GB`, `500MB`, `1.5TB` (powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, PolicyError> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| PolicyError(format!("size {s:?}: use e.g. 10GB, 500MB")))?;
    let mult = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        _ => {
            return Err(PolicyError(format!(
                "size {s:?}: unit must be B, KB, MB, GB or TB"
            )))
        }
    };
    Ok((n * mult) as u64)
}

/// `--keep-duration`: `48h`, `30m`, `7d`, in seconds.
pub fn parse_duration(s: &str) -> Result<u64, PolicyError> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| PolicyError(format!("duration {s:?}: use e.g. 48h, 30m, 7d")))?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(PolicyError(format!(
                "duration {s:?}: unit must be s, m, h or d"
            )))
        }
    };
    Ok(n * scale)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    pub records: usize,
    pub freed: u64,
}

pub fn prune(w: &Worker, policy: &Policy) -> Result<Report, WorkerError> {
    let mut report = Report::default();
    let mut records: Vec<_> =
        w.db.caches()?
            .into_iter()
            .map(|(k, r)| {
                let size = w
                    .snapshots
                    .usage(&r.snapshot)
                    .map(|u| u.size.max(0) as u64)
                    .unwrap_or(0);
                (k, r, size)
            })
            .collect();
    records.sort_by_key(|(_, r, _)| r.last_used);
    let mut total: u64 = records.iter().map(|(_, _, s)| s).sum();
    let cutoff = policy.keep_duration.map(|d| now().saturating_sub(d));
    let unlimited = policy.keep_duration.is_none() && policy.keep_storage.is_none();
    for (key, rec, size) in records {
        let too_old = cutoff.is_some_and(|c| rec.last_used < c);
        let too_much = policy.keep_storage.is_some_and(|max| total > max);
        if unlimited || too_old || too_much {
            w.db.delete_cache(&key)?;
            report.records += 1;
            total = total.saturating_sub(size);
        }
    }
    loop {
        let used: BTreeSet<String> =
            w.db.caches()?
                .into_iter()
                .map(|(_, r)| r.snapshot)
                .collect();
        let parents: BTreeSet<String> = w
            .snapshots
            .list(&[])?
            .into_iter()
            .map(|s| s.record.parent)
            .collect();
        let doomed: Vec<_> = w
            .snapshots
            .list(&["name~=^result/".to_string()])?
            .into_iter()
            .filter(|s| !used.contains(&s.key) && !parents.contains(&s.key))
            .collect();
        if doomed.is_empty() {
            break;
        }
        for s in doomed {
            report.freed += w
                .snapshots
                .usage(&s.key)
                .map(|u| u.size.max(0) as u64)
                .unwrap_or(0);
            w.snapshots.remove(&s.key)?;
            w.db.delete_layer(&s.key)?;
        }
    }
    Ok(report)
}
