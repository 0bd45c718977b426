//! Summaries of the kernel's latency histograms (log2 buckets with 4 sub-buckets, in µs).

use breakwater_common::{hist_bucket_low, HIST_BUCKETS};

use super::Histogram;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    /// Midpoints of the buckets the percentiles fall in.
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    /// Upper end of the highest non-empty bucket.
    pub max: u64,
}

/// Low and high end (exclusive) of a bucket, in µs.
pub fn bounds(bucket: u32) -> (u64, u64) {
    let high = if bucket + 1 >= HIST_BUCKETS {
        u64::MAX
    } else {
        hist_bucket_low(bucket + 1)
    };
    (hist_bucket_low(bucket), high)
}

fn mid(bucket: usize) -> u64 {
    let (lo, hi) = bounds(bucket as u32);
    if hi == u64::MAX {
        lo
    } else {
        lo + (hi - lo) / 2
    }
}

pub fn summarize(h: &Histogram) -> Summary {
    let count: u64 = h.iter().sum();
    if count == 0 {
        return Summary::default();
    }
    let quantile = |q: f64| {
        let rank = ((q * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in h.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return mid(b);
            }
        }
        mid(h.len() - 1)
    };
    let top = h.iter().rposition(|&n| n > 0).unwrap_or(0);
    Summary {
        count,
        p50: quantile(0.50),
        p90: quantile(0.90),
        p99: quantile(0.99),
        max: bounds(top as u32).1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_common::hist_bucket;

    #[test]
    fn percentiles_fall_in_the_right_buckets() {
        let mut h = [0u64; HIST_BUCKETS as usize];
        // 90 samples at ~1 ms, 9 at ~10 ms, 1 at ~1 s.
        h[hist_bucket(1_000) as usize] += 90;
        h[hist_bucket(10_000) as usize] += 9;
        h[hist_bucket(1_000_000) as usize] += 1;
        let s = summarize(&h);
        assert_eq!(s.count, 100);
        assert_eq!(hist_bucket(s.p50), hist_bucket(1_000));
        assert_eq!(hist_bucket(s.p90), hist_bucket(1_000));
        assert_eq!(hist_bucket(s.p99), hist_bucket(10_000));
        assert!(s.max > 1_000_000 && s.max <= 1_250_000, "{}", s.max);
        assert_eq!(summarize(&[0; HIST_BUCKETS as usize]), Summary::default());
    }
}
