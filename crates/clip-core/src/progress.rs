//! Progress of long work (decoding images, embedding a folder), reported without drawing anything.
//!
//! The library says how far it got; programs decide how to show it (a terminal bar, a log line,
//! nothing). `&Silent` is the choice for tests and library users who do not care.

/// Receives progress of one piece of work at a time. Called from worker threads.
pub trait Progress: Sync {
    /// Work called `what` with `total` units starts.
    fn start(&self, _what: &str, _total: u64) {}
    /// `n` more units are done.
    fn inc(&self, _n: u64) {}
    /// The work is over (finished or failed).
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
