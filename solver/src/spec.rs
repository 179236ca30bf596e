//! The error of a command-line spec that does not parse (`--output`, `--cache-to`,
//! `--cache-from`, `-t`): its message names the flag, the value and the forms that work.

/// A spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl From<String> for InvalidSpec {
    fn from(message: String) -> InvalidSpec {
        InvalidSpec(message)
    }
}

impl From<&str> for InvalidSpec {
    fn from(message: &str) -> InvalidSpec {
        InvalidSpec(message.to_string())
    }
}
