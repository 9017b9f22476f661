//! Capped exponential backoff with jitter, for reconnects and retries.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff: `base * factor^n`, capped at `max`, each delay jittered by ±`jitter`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    factor: f64,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, doubling up to `max`, with ±10 % jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            factor: 2.0,
            jitter: 0.1,
            attempt: 0,
        }
    }

    /// Sets the jitter ratio (0 disables it; clamped to [0, 1]).
    pub fn with_jitter(mut self, ratio: f64) -> Self {
        self.jitter = ratio.clamp(0.0, 1.0);
        self
    }

    /// The next delay; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.factor.powi(self.attempt.min(62) as i32);
        self.attempt = self.attempt.saturating_add(1);
        let raw = self.base.as_secs_f64() * exp;
        let capped = raw.min(self.max.as_secs_f64());
        let jittered = if self.jitter > 0.0 {
            let r = rand::rng().random_range(-self.jitter..=self.jitter);
            capped * (1.0 + r)
        } else {
            capped
        };
        Duration::from_secs_f64(jittered.clamp(0.0, self.max.as_secs_f64()))
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let mut b =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).with_jitter(0.0);
        let got: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_bounds_and_under_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(150));
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(90) && d <= Duration::from_millis(150),
                "{d:?}"
            );
        }
    }
}
