//! Fixed-bucket histograms: one atomic per bucket, so recording never takes a lock. Prometheus
//! output is cumulative (`le` buckets, `_sum`, `_count`), as Envoy renders its histograms.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// Envoy's default bucket bounds (`HistogramSettingsImpl::defaultBuckets`), used for durations in
/// milliseconds and sizes in bytes alike unless the bootstrap's `histogram_bucket_settings` say
/// otherwise.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Arc<[f64]>,
    /// Bounds by magnitude, for up to 255 bounds: entry `k` is the number of bounds below
    /// `2^(k-1)` (entry 0: below 0). A value of bit length `k` lies in `[2^(k-1), 2^k]` once
    /// converted to `f64`, so its bucket is among bounds `octaves[k]..octaves[k + 1]`: the
    /// two or three of its power of two, not all of them (Envoy's are about 2.5x apart).
    octaves: Option<[u8; 66]>,
    /// One count per bound plus the overflow (`+Inf`) bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: Arc<[f64]>) -> Histogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        let below = |x: f64| u8::try_from(bounds.partition_point(|b| *b < x)).ok();
        let mut octaves = Some([0u8; 66]);
        for k in 0..66 {
            let edge = if k == 0 { 0.0 } else { 2f64.powi(k - 1) };
            match (below(edge), octaves.as_mut()) {
                (Some(n), Some(o)) => o[k as usize] = n,
                // More bounds than a byte counts: every value searches all of them.
                _ => octaves = None,
            }
        }
        Histogram {
            bounds,
            octaves,
            counts,
            sum: AtomicU64::new(0),
        }
    }

    /// The bucket of `value`: the first whose bound is at least the value (as `f64`).
    fn bucket(&self, value: u64) -> usize {
        let v = value as f64;
        let k = (u64::BITS - value.leading_zeros()) as usize;
        if let Some(o) = &self.octaves
            && let (Some(&lo), Some(&hi)) = (o.get(k), o.get(k + 1))
            && let Some(range) = self.bounds.get(usize::from(lo)..usize::from(hi))
        {
            return usize::from(lo) + range.partition_point(|b| *b < v);
        }
        self.bounds.partition_point(|b| *b < v)
    }

    /// Records one value: it lands in the first bucket whose bound is at least the value.
    pub fn record(&self, value: u64) {
        if let Some(c) = self.counts.get(self.bucket(value)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds.
    pub bounds: Arc<[f64]>,
    /// Per-bucket counts (not cumulative), the last one for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of the recorded values.
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other` (same bounds) into this one; series with other bounds are not mixed.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if self.bounds != other.bounds {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// `(le, cumulative count)` pairs, ending with `+Inf`.
    pub fn cumulative(&self) -> Vec<(String, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c;
            let le = match self.bounds.get(i) {
                Some(b) => format_bound(*b),
                None => "+Inf".to_owned(),
            };
            out.push((le, total));
        }
        out
    }
}

/// A bucket bound as Envoy prints it (`0.5`, `1`, `3600000`).
pub fn format_bound(b: f64) -> String {
    if b.fract() == 0.0 && b.abs() < 1e15 {
        format!("{}", b as i64)
    } else {
        format!("{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_at_least_as_large() {
        let h = Histogram::new(Arc::from(&[1.0, 5.0, 10.0][..]));
        for v in [0, 1, 2, 5, 6, 10, 11, 1000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.sum, 1035);
        assert_eq!(s.count(), 8);
        assert_eq!(
            s.cumulative(),
            vec![
                ("1".to_owned(), 2),
                ("5".to_owned(), 4),
                ("10".to_owned(), 6),
                ("+Inf".to_owned(), 8)
            ]
        );
    }

    #[test]
    fn the_octave_index_finds_the_bucket_a_full_search_finds() {
        let mut many: Vec<f64> = (1..=300).map(|i| f64::from(i) * 3.5).collect();
        many.insert(0, 0.25);
        for bounds in [
            DEFAULT_BUCKETS.to_vec(),
            vec![1.0, 5.0, 10.0],
            vec![0.1, 0.2, 0.3, 0.9, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 1e300],
            vec![-3.0, 0.0, 7.0],
            // Too many for the index: searched in full.
            many,
            Vec::new(),
        ] {
            let h = Histogram::new(Arc::from(bounds.as_slice()));
            let mut values: Vec<u64> = (0..2100).collect();
            for k in 0..64u32 {
                let p = 1u64 << k;
                values.extend([p - 1, p, p + 1, p.saturating_mul(3) / 2]);
            }
            values.extend([u64::MAX, u64::MAX - 1, (1 << 53) + 1]);
            for v in values {
                let full = bounds.partition_point(|b| *b < v as f64);
                assert_eq!(h.bucket(v), full, "value {v} over {bounds:?}");
            }
        }
    }

    #[test]
    fn merge_adds_only_same_bounds() {
        let a = Histogram::new(Arc::from(DEFAULT_BUCKETS));
        let b = Histogram::new(Arc::from(DEFAULT_BUCKETS));
        a.record(3);
        b.record(3);
        b.record(4000);
        let mut s = a.snapshot();
        s.merge(&b.snapshot());
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum, 4006);
        let other = Histogram::new(Arc::from(&[1.0][..]));
        other.record(1);
        s.merge(&other.snapshot());
        assert_eq!(s.count(), 3, "different bounds are not mixed");
        assert_eq!(format_bound(0.5), "0.5");
        assert_eq!(format_bound(3600000.0), "3600000");
    }
}
