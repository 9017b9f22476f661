//! Envoy's retry priority plugin `envoy.retry_priorities.previous_priorities`
//! (`PreviousPrioritiesConfig`, which Istio renders for `retries.retryRemoteLocalities: true`): a
//! retry's priority load leaves out the priority levels earlier attempts went to, so that retries
//! spill to the next levels even while the first one is healthy.
//!
//! Envoy's semantics (`source/extensions/retry/priority/previous_priorities`):
//!
//! * every attempt (the first one included) records the priority of its host;
//! * a retry while fewer than `update_frequency` attempts were recorded uses the unmodified load;
//!   whenever the count is a multiple of `update_frequency` the excluded set is recomputed as the
//!   priorities of all recorded attempts; in between, the last excluded set stays;
//! * the adjusted load redistributes 100% over the levels left, in proportion to their
//!   availability (`min(100, overprovisioning_factor × healthy / hosts)`, likewise for degraded
//!   hosts) — healthy hosts first, then degraded ones, any rounding remainder going round again
//!   from the highest level — with a total availability capped at 100 so that a level able to take
//!   everything leaves nothing to the levels below it;
//! * when no level left has any availability, the recorded attempts are forgotten and the
//!   unmodified load applies (the excluded priorities start over);
//! * panic is not recomputed: a level in panic still sends its share to all its hosts.
//!
//! The load balancer ([`super::lb::HostSet::pick_for_retry`]) applies the excluded set; ring hash
//! and Maglev ignore it, as Envoy's thread-aware balancers never consult the retry priority.

/// The availability (percent) of one priority level, as the load balancer computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelAvailability {
    /// The priority.
    pub priority: u32,
    /// Availability of the level's healthy hosts (0..=100).
    pub healthy: u32,
    /// Availability of the level's degraded hosts (0..=100).
    pub degraded: u32,
}

/// Per-level loads (percent), in the order of the levels they were computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityLoad {
    /// Load sent to each level's healthy hosts.
    pub healthy: Vec<u32>,
    /// Load sent to each level's degraded hosts.
    pub degraded: Vec<u32>,
}

/// Envoy's `adjustForAttemptedPriorities`: the loads of `levels` when the priorities in
/// `excluded` take none; `None` when no other level has any availability (the caller then keeps
/// the unmodified load).
pub fn loads_excluding(levels: &[LevelAvailability], excluded: &[u32]) -> Option<PriorityLoad> {
    let kept = |l: &LevelAvailability| !excluded.contains(&l.priority);
    let total: u32 = levels
        .iter()
        .filter(|l| kept(l))
        .map(|l| l.healthy + l.degraded)
        .sum::<u32>()
        .min(100);
    if total == 0 {
        return None;
    }
    let mut load = PriorityLoad {
        healthy: vec![0; levels.len()],
        degraded: vec![0; levels.len()],
    };
    let share = |avail: u32| avail * 100 / total;
    let mut remaining = 100u32;
    // Each pass hands out at least one percent (a kept level with availability has a share of at
    // least 1, since its availability is at most `total`), so this ends.
    while remaining > 0 {
        for (slot, l) in load.healthy.iter_mut().zip(levels) {
            if kept(l) {
                let delta = remaining.min(share(l.healthy));
                *slot += delta;
                remaining -= delta;
            }
        }
        for (slot, l) in load.degraded.iter_mut().zip(levels) {
            if kept(l) {
                let delta = remaining.min(share(l.degraded));
                *slot += delta;
                remaining -= delta;
            }
        }
    }
    Some(load)
}

/// One request's `previous_priorities` state (Envoy's `PreviousPrioritiesRetryPriority`).
#[derive(Debug, Clone)]
pub struct PreviousPriorities {
    update_frequency: u32,
    /// The priority of each attempt's host since the start (or the last reset).
    attempted: Vec<u32>,
    /// The priorities the retries' picks leave out (sorted, no duplicates).
    excluded: Vec<u32>,
}

impl PreviousPriorities {
    /// A fresh state for a policy with `update_frequency` (at least 1).
    pub fn new(update_frequency: u32) -> Self {
        PreviousPriorities {
            update_frequency: update_frequency.max(1),
            attempted: Vec::new(),
            excluded: Vec::new(),
        }
    }

    /// Records that an attempt went to a host at `priority` (Envoy's `onHostAttempted`).
    pub fn attempted(&mut self, priority: u32) {
        self.attempted.push(priority);
    }

    /// The priorities the next retry's pick leaves out (Envoy's `determinePriorityLoad`).
    /// `has_load_without` tells whether any level outside a set of priorities has availability;
    /// when none has, the recorded attempts are forgotten and nothing is left out.
    pub fn excluded_for_retry(&mut self, has_load_without: impl FnOnce(&[u32]) -> bool) -> &[u32] {
        let n = self.attempted.len();
        let f = self.update_frequency as usize;
        if n < f {
            return &[];
        }
        if n.is_multiple_of(f) {
            let mut excluded = self.attempted.clone();
            excluded.sort_unstable();
            excluded.dedup();
            if has_load_without(&excluded) {
                self.excluded = excluded;
            } else {
                self.attempted.clear();
                self.excluded.clear();
            }
        }
        &self.excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(avail: &[(u32, u32)]) -> Vec<LevelAvailability> {
        avail
            .iter()
            .enumerate()
            .map(|(p, &(healthy, degraded))| LevelAvailability {
                priority: p as u32,
                healthy,
                degraded,
            })
            .collect()
    }

    fn healthy(l: &Option<PriorityLoad>) -> Option<Vec<u32>> {
        l.as_ref().map(|l| l.healthy.clone())
    }

    #[test]
    fn excluding_a_priority_spills_by_relative_health() {
        // Envoy's example: healths {100, 50, 50}; P0 excluded → {0, 50, 50}.
        let l = levels(&[(100, 0), (50, 0), (50, 0)]);
        assert_eq!(healthy(&loads_excluding(&l, &[])), Some(vec![100, 0, 0]));
        assert_eq!(healthy(&loads_excluding(&l, &[0])), Some(vec![0, 50, 50]));
        // A level that can take everything leaves nothing below it (total capped at 100).
        let l = levels(&[(100, 0), (100, 0), (100, 0)]);
        assert_eq!(healthy(&loads_excluding(&l, &[0])), Some(vec![0, 100, 0]));
        assert_eq!(
            healthy(&loads_excluding(&l, &[0, 1])),
            Some(vec![0, 0, 100])
        );
        // Partial availability is normalised over what is left: 28 and 14 of 42.
        let l = levels(&[(100, 0), (28, 0), (14, 0)]);
        assert_eq!(healthy(&loads_excluding(&l, &[0])), Some(vec![0, 67, 33]));
    }

    #[test]
    fn degraded_hosts_take_what_the_healthy_ones_cannot() {
        let l = levels(&[(100, 0), (40, 20), (0, 0)]);
        let load = loads_excluding(&l, &[0]).expect("available");
        // Total 60: healthy 40·100/60 = 66, degraded 20·100/60 = 33, the remainder goes round
        // again from the highest level's healthy hosts.
        assert_eq!(load.healthy, vec![0, 67, 0]);
        assert_eq!(load.degraded, vec![0, 33, 0]);
        assert_eq!(load.healthy.iter().chain(&load.degraded).sum::<u32>(), 100);
    }

    #[test]
    fn rounding_remainders_go_round_from_the_top() {
        // Three levels of 33: 33 each, the last percent to the first level left.
        let l = levels(&[(100, 0), (33, 0), (33, 0), (33, 0)]);
        assert_eq!(
            healthy(&loads_excluding(&l, &[0])),
            Some(vec![0, 34, 33, 33])
        );
        // Shares of 1% with a remainder larger than the first share: several passes.
        let l = levels(&[(1, 0), (1, 0), (1, 0)]);
        let load = loads_excluding(&l, &[]).expect("available");
        assert_eq!(load.healthy.iter().sum::<u32>(), 100);
        assert_eq!(load.healthy, vec![34, 33, 33]);
    }

    #[test]
    fn nothing_left_is_none() {
        let l = levels(&[(100, 0), (0, 0)]);
        assert_eq!(loads_excluding(&l, &[0]), None);
        assert_eq!(loads_excluding(&levels(&[(0, 0), (0, 0)]), &[]), None);
        // Excluding a priority that does not exist changes nothing.
        assert_eq!(healthy(&loads_excluding(&l, &[7])), Some(vec![100, 0]));
    }

    #[test]
    fn exclusions_follow_the_update_frequency() {
        let all = |_: &[u32]| true;
        // update_frequency 1: every retry leaves out every priority tried so far.
        let mut s = PreviousPriorities::new(1);
        s.attempted(0);
        assert_eq!(s.excluded_for_retry(all), &[0]);
        s.attempted(1);
        assert_eq!(s.excluded_for_retry(all), &[0, 1]);

        // update_frequency 2 (Istio's): the first retry keeps the load; the second and third
        // leave out the first two attempts' priorities; the fourth all four.
        let mut s = PreviousPriorities::new(2);
        s.attempted(0);
        assert!(s.excluded_for_retry(all).is_empty());
        s.attempted(0);
        assert_eq!(s.excluded_for_retry(all), &[0]);
        s.attempted(1);
        assert_eq!(s.excluded_for_retry(all), &[0], "kept between updates");
        s.attempted(2);
        assert_eq!(s.excluded_for_retry(all), &[0, 1, 2]);
    }

    #[test]
    fn when_nothing_is_left_the_attempts_start_over() {
        // Envoy's doc example: healths {100, 0, 50}, update_frequency 1 → P0, P2, P0, P2.
        let l = levels(&[(100, 0), (0, 0), (50, 0)]);
        let avail = |ex: &[u32]| loads_excluding(&l, ex).is_some();
        let mut s = PreviousPriorities::new(1);
        s.attempted(0);
        assert_eq!(s.excluded_for_retry(avail), &[0]);
        s.attempted(2);
        assert!(
            s.excluded_for_retry(avail).is_empty(),
            "P0 and P2 tried, P1 has nothing: reset"
        );
        s.attempted(0);
        assert_eq!(s.excluded_for_retry(avail), &[0], "counting again");
        // A zero update frequency (rejected by config) acts as 1.
        let mut s = PreviousPriorities::new(0);
        s.attempted(3);
        assert_eq!(s.excluded_for_retry(|_| true), &[3]);
    }
}
