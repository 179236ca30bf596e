//! The snapshotter's error type, one variant per gRPC code containerd maps back to its `errdefs`.

use tonic::{Code, Status};

/// Errors of snapshot operations. Messages name the snapshot key and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt metadata record {key:?}: {reason}; the metadata database under <root>/metadata is damaged: restore it from a backup")]
    Corrupt { key: String, reason: String },
}

impl Error {
    /// Wraps an I/O error with the path or action it concerns.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Store(_) | Error::Io { .. } | Error::Corrupt { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
