//! Failures inside a fetch, before the URI is attached: a message and
//! whether another try may succeed.

use std::path::Path;

/// A failure inside a fetch.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    /// Worth another try (a connection error, a 5xx, a body cut short).
    pub(crate) transient: bool,
    /// A cap (`--max-bytes`, `--max-files`) was reached: what this fetch
    /// wrote is removed.
    pub(crate) over_limit: bool,
}

impl Failure {
    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Failure { message: message.into(), transient: false, over_limit: false }
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        Failure { message: message.into(), transient: true, over_limit: false }
    }

    pub(crate) fn over_limit(message: impl Into<String>) -> Self {
        Failure { message: message.into(), transient: false, over_limit: true }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::permanent(message)
    }
}

/// An error and its sources on one line, without repeating a source that
/// the message above it already quotes.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

pub(crate) fn io_failure(what: &str, path: &Path, error: std::io::Error) -> Failure {
    Failure::permanent(format!("{what} {}: {error}", path.display()))
}
