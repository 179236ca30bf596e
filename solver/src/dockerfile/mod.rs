//! The Dockerfile frontend, a pipeline of small stages:
//! `parser` (text → nodes) → `instructions` (nodes → typed instructions) → `convert` (→ LLB and
//! the image config), with `expand` for variables.

pub mod convert;
pub mod expand;
pub mod instructions;
pub mod mounts;
pub mod parser;

/// An error in a Dockerfile, with the line it concerns when known.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("Dockerfile:{l}: ")).unwrap_or_default())]
pub struct DockerfileError {
    pub line: Option<usize>,
    pub message: String,
}

/// A problem in one instruction's words (a variable expansion, a `--mount` value), before the
/// line it is on is attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WordError(pub String);

impl From<String> for WordError {
    fn from(message: String) -> WordError {
        WordError(message)
    }
}

impl From<&str> for WordError {
    fn from(message: &str) -> WordError {
        WordError(message.to_string())
    }
}

impl DockerfileError {
    pub fn at(line: usize, message: impl Into<String>) -> DockerfileError {
        DockerfileError {
            line: Some(line),
            message: message.into(),
        }
    }
}

/// The closest of `candidates` to `word` (edit distance at most 2), for "did you mean" hints.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (distance(&word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

/// Edit distance counting a swap of neighbours as one edit (so `chwon` is closest to `chown`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}
