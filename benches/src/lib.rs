//! What the benches share: each comparison they print is also appended, as one tab-separated
//! line, to the file `STRATA_BENCH_REPORT` names (set by `scripts/bench`), so that one run
//! regenerates the README's performance table (`bench-report`).

use std::io::Write;

/// One measured comparison: Strata's value against its peer's, in the same run and unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub bench: String,
    pub case: String,
    pub unit: String,
    pub strata: f64,
    pub peer: String,
    /// `None` where the row has no peer (a figure reported for itself, e.g. bytes written).
    pub peer_value: Option<f64>,
}

impl Row {
    pub fn new(bench: &str, case: &str, unit: &str, strata: f64) -> Row {
        Row {
            bench: bench.into(),
            case: case.into(),
            unit: unit.into(),
            strata,
            peer: String::new(),
            peer_value: None,
        }
    }

    pub fn against(mut self, peer: &str, value: f64) -> Row {
        self.peer = peer.into();
        self.peer_value = Some(value);
        self
    }

    /// Strata / peer: below 1 Strata takes less (time, bytes) than its peer.
    pub fn ratio(&self) -> Option<f64> {
        self.peer_value
            .filter(|v| *v != 0.0)
            .map(|v| self.strata / v)
    }

    fn to_line(&self) -> String {
        let peer = self.peer_value.map(|v| v.to_string()).unwrap_or_default();
        let clean = |s: &str| s.replace(['\t', '\n'], " ");
        let fields = [
            clean(&self.bench),
            clean(&self.case),
            clean(&self.unit),
            self.strata.to_string(),
            clean(&self.peer),
            peer,
        ];
        fields.join("\t")
    }

    pub fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split('\t').collect();
        let [bench, case, unit, strata, peer, value] = f[..] else {
            return None;
        };
        Some(Row {
            bench: bench.into(),
            case: case.into(),
            unit: unit.into(),
            strata: strata.parse().ok()?,
            peer: peer.into(),
            peer_value: if value.is_empty() {
                None
            } else {
                Some(value.parse().ok()?)
            },
        })
    }

    /// Appends the row to `STRATA_BENCH_REPORT` when it is set; a bench run by hand only prints.
    pub fn report(self) {
        let Some(path) = std::env::var_os("STRATA_BENCH_REPORT") else {
            return;
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening the bench report {path:?}: {e}"));
        writeln!(f, "{}", self.to_line()).expect("writing the bench report");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_their_line() {
        let r = Row::new("build", "4 CPU\tstages", "s", 3.5).against("BuildKit", 3.0);
        let back = Row::parse(&r.to_line()).unwrap();
        assert_eq!(back.case, "4 CPU stages");
        assert_eq!((back.strata, back.peer_value), (3.5, Some(3.0)));
        let alone = Row::new("migrate", "written", "%", 104.0);
        assert_eq!(Row::parse(&alone.to_line()), Some(alone));
        assert_eq!(Row::parse("too\tfew"), None);
    }
}
