//! The SecretManager: gets the workload certificate, rotates it at `SECRET_GRACE_PERIOD_RATIO` of its
//! lifetime (± jitter), retries failures with capped exponential backoff, and keeps serving the
//! current certificate while renewal fails (reference/istio-facts.md §1.9).
//!
//! The current secret is published on a `watch` channel; the SDS server pushes every change to its
//! streams.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use waypoint_shared::{backoff::Backoff, identity::SpiffeId};

use crate::{
    ca::{IssuedIdentity, Signer, issue},
    config::{AgentConfig, KeyKind},
    metrics::AgentMetrics,
};

/// A certificate as served over SDS, with a version that changes on every rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSecret {
    /// The certificate, key and root.
    pub identity: IssuedIdentity,
    /// Increases with every new certificate.
    pub generation: u64,
}

/// Rotation and retry settings.
#[derive(Debug, Clone)]
pub struct RotationPolicy {
    /// Fraction of the lifetime left when we renew (0.5: renew half way).
    pub grace_ratio: f64,
    /// ± jitter on the ratio.
    pub grace_jitter: f64,
    /// First retry delay after a failure.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl RotationPolicy {
    /// pilot-agent's settings from the agent configuration; retries from 200 ms up to 30 s.
    pub fn from_agent(cfg: &AgentConfig) -> Self {
        RotationPolicy {
            grace_ratio: cfg.grace_period_ratio,
            grace_jitter: cfg.grace_period_ratio_jitter,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds), seen at `now`:
/// at `not_after - ratio × lifetime`, with ratio = `grace_ratio ± jitter × unit` (unit in [-1, 1]),
/// clamped to [0, 1]. Returns how long to wait from `now` (zero if already due).
pub fn rotation_delay(
    not_before: i64,
    not_after: i64,
    now: SystemTime,
    grace_ratio: f64,
    jitter: f64,
    unit: f64,
) -> Duration {
    let ratio = (grace_ratio + jitter * unit.clamp(-1.0, 1.0)).clamp(0.0, 1.0);
    let lifetime = (not_after - not_before).max(0) as f64;
    let renew_at = not_after as f64 - ratio * lifetime;
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    Duration::from_secs_f64((renew_at - now_s).max(0.0))
}

/// Owns the workload secret.
pub struct SecretManager<S> {
    signer: S,
    key_kind: KeyKind,
    identity: SpiffeId,
    policy: RotationPolicy,
    metrics: Arc<AgentMetrics>,
    tx: watch::Sender<Option<Arc<WorkloadSecret>>>,
}

impl<S: Signer> SecretManager<S> {
    /// A manager that signs with `signer`; nothing is requested until [`SecretManager::run`].
    pub fn new(
        signer: S,
        key_kind: KeyKind,
        identity: SpiffeId,
        policy: RotationPolicy,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let (tx, _) = watch::channel(None);
        SecretManager {
            signer,
            key_kind,
            identity,
            policy,
            metrics,
            tx,
        }
    }

    /// Follows the current secret (`None` until the first certificate arrives).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<WorkloadSecret>>> {
        self.tx.subscribe()
    }

    /// Gets a certificate, then renews it forever. Never returns; cancel the task to stop.
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.policy.retry_base, self.policy.retry_max);
        let mut generation = 0u64;
        loop {
            self.metrics.csr_requests.inc();
            match issue(&self.signer, self.key_kind, &self.identity).await {
                Ok(identity) => {
                    backoff.reset();
                    generation += 1;
                    let leaf = identity.leaf.clone();
                    let root_changed = self
                        .tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|s| s.identity.root_pem != identity.root_pem);
                    self.metrics.cert_expiry_timestamp.set(leaf.not_after);
                    self.tx.send_replace(Some(Arc::new(WorkloadSecret {
                        identity,
                        generation,
                    })));
                    let unit = rand::random::<f64>() * 2.0 - 1.0;
                    let delay = rotation_delay(
                        leaf.not_before,
                        leaf.not_after,
                        SystemTime::now(),
                        self.policy.grace_ratio,
                        self.policy.grace_jitter,
                        unit,
                    );
                    tracing::info!(
                        target: "ca",
                        identity = %self.identity,
                        serial = %leaf.serial,
                        not_after = leaf.not_after,
                        rotate_in_s = delay.as_secs(),
                        root_changed,
                        "workload certificate ready"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    self.metrics.csr_failures.inc();
                    let delay = backoff.next_delay();
                    let serving = self
                        .tx
                        .borrow()
                        .as_ref()
                        .map(|s| s.identity.leaf.serial.clone());
                    match serving {
                        Some(serial) => tracing::warn!(
                            target: "ca",
                            attempt = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64,
                            keep_serving = %serial,
                            "certificate renewal failed, still serving the current one: {err}"
                        ),
                        None => tracing::warn!(
                            target: "ca",
                            attempt = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64,
                            "certificate request failed: {err}"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    #[test]
    fn rotation_point_follows_ratio_and_jitter() {
        // 24h certificate issued at t=1000: renew half way.
        let day = 86_400;
        assert_eq!(
            rotation_delay(1000, 1000 + day, at(1000), 0.5, 0.01, 0.0),
            Duration::from_secs(43_200)
        );
        // Jitter moves it by at most 1 % of the lifetime.
        let early = rotation_delay(1000, 1000 + day, at(1000), 0.5, 0.01, 1.0);
        let late = rotation_delay(1000, 1000 + day, at(1000), 0.5, 0.01, -1.0);
        assert_eq!(early, Duration::from_secs_f64(43_200.0 - 864.0));
        assert_eq!(late, Duration::from_secs_f64(43_200.0 + 864.0));
        // Already past the point: renew now.
        assert_eq!(
            rotation_delay(1000, 1000 + day, at(1000 + day), 0.5, 0.0, 0.0),
            Duration::ZERO
        );
        // Ratio is clamped.
        assert_eq!(rotation_delay(0, 100, at(0), 2.0, 0.0, 0.0), Duration::ZERO);
    }

    /// A signer backed by an in-memory CA, failing on the calls listed in `fail`.
    struct TestCa {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        root_pem: String,
        ttl: Duration,
        calls: Arc<AtomicUsize>,
        fail: Vec<usize>,
    }

    impl TestCa {
        fn new(ttl: Duration, fail: Vec<usize>) -> Self {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let root = params.self_signed(&key).expect("root");
            TestCa {
                issuer: rcgen::Issuer::new(params, key),
                root_pem: root.pem(),
                ttl,
                calls: Arc::new(AtomicUsize::new(0)),
                fail,
            }
        }
    }

    impl Signer for TestCa {
        async fn sign(&self, csr_pem: String) -> Result<Vec<String>, CaError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.contains(&n) {
                return Err(CaError::Connect {
                    addr: "test".into(),
                    reason: "down".into(),
                });
            }
            let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).expect("csr");
            let mut params = csr.params;
            let now = time::OffsetDateTime::from(SystemTime::now());
            params.not_before = now;
            params.not_after = now + self.ttl;
            let cert = params
                .signed_by(&csr.public_key, &self.issuer)
                .expect("sign");
            Ok(vec![cert.pem(), self.root_pem.clone()])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_keeps_serving_through_failures() {
        // Paused tokio time drives the schedule; the certificates' own validity uses the wall clock,
        // so keep the TTL long compared to the real time the test takes.
        let ca = TestCa::new(Duration::from_secs(1000), vec![1, 2]);
        let calls = ca.calls.clone();
        let metrics = Arc::new(AgentMetrics::default());
        let policy = RotationPolicy {
            grace_ratio: 0.5,
            grace_jitter: 0.0,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
        };
        let mgr = SecretManager::new(
            ca,
            KeyKind::EcdsaP256,
            SpiffeId::new("cluster.local", "default", "waypoint"),
            policy,
            metrics.clone(),
        );
        let mut rx = mgr.subscribe();
        let task = tokio::spawn(mgr.run());
        rx.changed().await.expect("first");
        let first = rx.borrow_and_update().clone().expect("secret");
        assert_eq!(first.generation, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let start = tokio::time::Instant::now();
        // Just before half-life nothing happens.
        tokio::time::sleep(Duration::from_secs(490)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // At half-life it renews; calls 1 and 2 fail; the first cert stays served meanwhile.
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            rx.borrow().as_ref().map(|s| s.generation),
            Some(1),
            "old cert still served"
        );
        rx.changed().await.expect("renewed");
        let second = rx.borrow_and_update().clone().expect("secret");
        assert_eq!(second.generation, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 4, "two failures then success");
        // Renewal at 500 s, then retries after ~200 ms and ~400 ms (±10 % jitter).
        let elapsed = start.elapsed().as_secs_f64();
        // (Certificate times have one-second resolution, hence the window.)
        assert!(
            (499.0..=501.5).contains(&elapsed),
            "renewed after {elapsed} s"
        );
        assert_ne!(first.identity.leaf.serial, second.identity.leaf.serial);
        assert_eq!(metrics.csr_failures.get(), 2);
        task.abort();
    }
}
