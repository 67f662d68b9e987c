//! Releasing a graph's session to free its memory, and building it again for the next run.

use ort::session::Session;

use super::{Graph, SessionOptions};
use crate::{Error, Result};

/// Sessions taken out of a graph by [`Graph::release_session`]; dropping them frees their
/// memory.
pub struct ReleasedSession {
    _sessions: Vec<Session>,
}

impl Graph {
    /// Lets [`Graph::release`] drop the session: `options` are kept to build it again, with the
    /// replaced weights it was loaded with (shared with the session, not copied).
    pub fn keep_for_reload(&mut self, options: &SessionOptions) {
        self.reload = Some(Box::new(options.clone()));
    }

    /// Drops the session and its memory (weights, pre-packed kernels, arena) if the graph can
    /// be loaded again ([`Graph::keep_for_reload`]); the next run loads it first. Returns
    /// whether a session was dropped.
    pub fn release(&mut self) -> bool {
        self.release_session().is_some()
    }

    /// [`Graph::release`], handing the session over instead of dropping it: freeing gigabytes
    /// of weights takes a while, which the caller may spend elsewhere.
    pub fn release_session(&mut self) -> Option<ReleasedSession> {
        self.reload.as_ref()?;
        self.binding = None;
        let sessions: Vec<Session> = self
            .session
            .take()
            .into_iter()
            .chain(
                self.segments
                    .iter_mut()
                    .filter_map(|s| s.release_session())
                    .flat_map(|r| r._sessions),
            )
            .collect();
        (!sessions.is_empty()).then_some(ReleasedSession {
            _sessions: sessions,
        })
    }

    /// Whether the session is loaded (for a graph in segments: one of them).
    pub fn is_loaded(&self) -> bool {
        self.session.is_some() || self.segments.iter().any(Graph::is_loaded)
    }

    /// Builds the session again after [`Graph::release`] (through the session cache when it is
    /// on); nothing to do while loaded, nor for a graph in segments, whose runs load them.
    pub fn ensure_loaded(&mut self) -> Result<()> {
        if self.session.is_some() || !self.segments.is_empty() {
            return Ok(());
        }
        let reload = self.reload.as_ref().ok_or_else(|| {
            Error::Runtime(format!("the {} graph was released for good", self.name))
        })?;
        let fresh = Graph::load_prepared(&self.name, &self.path, reload, self.weights.clone())?;
        self.session = fresh.session;
        self.placements = fresh.placements;
        self.assignment = fresh.assignment;
        self.cache = fresh.cache;
        Ok(())
    }
}
