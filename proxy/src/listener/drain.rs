//! Filter chain drains, as Envoy's listener manager runs them on an LDS update.
//!
//! Every compiled filter chain carries a [`ChainDrain`]; each connection accepted on the chain
//! holds a [`ChainWatch`] of it. When a published listener no longer contains a chain (its config
//! changed, it was removed, or the whole listener was replaced or removed), the listener manager
//! starts the chain's drain: the HTTP connection manager sends GOAWAY / `Connection: close` and its
//! connections end once their streams finish; once `--drain-time-s` has passed, every connection
//! still open on the chain is closed. A chain whose config did not change keeps running: the
//! recompiled chain of the new listener version [adopts](ChainDrain::adopt) the signal of the
//! serving one, so connections on either version drain together when the chain changes later.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::{sync::watch, time::Instant};

/// The shared signal: `None` while the chain serves, then the instant its connections are closed.
type Signal = watch::Sender<Option<Instant>>;

/// The drain signal of one filter chain (shared by the versions of an unchanged chain).
#[derive(Debug, Clone)]
pub struct ChainDrain(Arc<ArcSwap<Signal>>);

impl Default for ChainDrain {
    fn default() -> Self {
        ChainDrain::new()
    }
}

impl ChainDrain {
    /// A fresh signal: not draining.
    pub fn new() -> ChainDrain {
        let (tx, _) = watch::channel(None);
        ChainDrain(Arc::new(ArcSwap::from_pointee(tx)))
    }

    /// What a connection on the chain waits on.
    pub fn watch(&self) -> ChainWatch {
        ChainWatch(Some(self.0.load().subscribe()))
    }

    /// Shares `serving`'s signal: this chain's config equals that of `serving`, the chain of the
    /// version being replaced, so Envoy keeps its connections (the chain is not drained) and a
    /// later drain of this version must reach them too. Called before this version serves, so
    /// no connection watches the signal being replaced.
    pub fn adopt(&self, serving: &ChainDrain) {
        if !Arc::ptr_eq(&self.0, &serving.0) {
            self.0.store(serving.0.load_full());
        }
    }

    /// Starts draining the chain's connections; they are closed at `close_at`. `false` when it
    /// was draining already (the first deadline stands).
    pub fn start(&self, close_at: Instant) -> bool {
        self.0.load().send_if_modified(|state| match state {
            Some(_) => false,
            None => {
                *state = Some(close_at);
                true
            }
        })
    }

    /// Whether the chain drains.
    pub fn draining(&self) -> bool {
        self.0.load().borrow().is_some()
    }

    /// Whether `self` and `other` share one signal (an unchanged chain across versions).
    pub fn shares(&self, other: &ChainDrain) -> bool {
        Arc::ptr_eq(&self.0.load(), &other.0.load())
    }
}

/// One connection's view of its chain's drain.
#[derive(Debug, Clone, Default)]
pub struct ChainWatch(Option<watch::Receiver<Option<Instant>>>);

impl ChainWatch {
    /// A watch that never fires (a connection no listener chain owns).
    pub fn never() -> ChainWatch {
        ChainWatch(None)
    }

    /// When the drain started, the instant the connection must be closed by.
    pub fn close_at(&self) -> Option<Instant> {
        self.0.as_ref().and_then(|rx| *rx.borrow())
    }

    /// Resolves once the chain drains, with the instant its connections are closed; never when
    /// it does not (a chain dropped undrained served no connection that could wait here).
    pub async fn draining(&mut self) -> Instant {
        if let Some(rx) = self.0.as_mut()
            && let Ok(state) = rx.wait_for(Option::is_some).await
            && let Some(at) = *state
        {
            return at;
        }
        std::future::pending().await
    }

    /// Resolves when the drain time is over: the connection must close now, streams or not.
    pub async fn closed(&mut self) {
        let at = self.draining().await;
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_started_drain_reaches_watchers_before_and_after_it() {
        let drain = ChainDrain::new();
        let mut before = drain.watch();
        let at = Instant::now() + Duration::from_secs(5);
        assert!(drain.start(at));
        assert!(
            !drain.start(at + Duration::from_secs(1)),
            "the first deadline stands"
        );
        assert_eq!(before.draining().await, at);
        let mut after = drain.watch();
        assert_eq!(after.close_at(), Some(at));
        let started = Instant::now();
        after.closed().await;
        assert_eq!(Instant::now() - started, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_signal_drains_both_versions() {
        let v1 = ChainDrain::new();
        let mut on_v1 = v1.watch();
        let v2 = ChainDrain::new();
        v2.adopt(&v1);
        assert!(v2.shares(&v1));
        let mut on_v2 = v2.watch();
        let v3 = ChainDrain::new();
        v3.adopt(&v2);
        assert!(v3.shares(&v1));
        // The chain changes in a fourth version: draining v3's signal reaches everyone.
        let at = Instant::now();
        assert!(v3.start(at));
        assert_eq!(on_v1.draining().await, at);
        assert_eq!(on_v2.draining().await, at);
        assert!(v1.draining() && v2.draining());
    }

    #[tokio::test(start_paused = true)]
    async fn an_undrained_chain_never_fires() {
        let drain = ChainDrain::new();
        let mut w = drain.watch();
        let fired = tokio::time::timeout(Duration::from_secs(3600), w.draining()).await;
        assert!(fired.is_err());
        drop(drain);
        let fired = tokio::time::timeout(Duration::from_secs(3600), w.draining()).await;
        assert!(
            fired.is_err(),
            "a dropped, undrained chain does not drain its watchers"
        );
        let fired =
            tokio::time::timeout(Duration::from_secs(1), ChainWatch::never().closed()).await;
        assert!(fired.is_err());
    }
}
