//! The tenancy-wide request budget: one token bucket for every Core API call of every
//! instance, answering 429 `TooManyRequests` beyond it as OCI does.
use std::time::Instant;

use super::config::RateLimit;

#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket that starts full (the burst is available at once).
    pub fn new(limit: RateLimit) -> Self {
        let tokens = f64::from(limit.burst).max(1.0);
        Self {
            limit,
            tokens,
            last: Instant::now(),
        }
    }

    /// Takes a token if one is there; a refused request takes none.
    pub fn admit(&mut self, now: Instant) -> bool {
        let capacity = f64::from(self.limit.burst).max(1.0);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn message(&self) -> &str {
        &self.limit.message
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_is_admitted_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(RateLimit {
            per_second: 10.0,
            burst: 5,
            ..RateLimit::default()
        });
        let admitted = (0..8).filter(|_| bucket.admit(start)).count();
        assert_eq!(
            admitted, 5,
            "the burst of 5 passes at once, the rest is refused"
        );
        let later = start + Duration::from_secs(1);
        let admitted = (0..20).filter(|_| bucket.admit(later)).count();
        assert_eq!(
            admitted, 5,
            "a second at 10/s refills up to the burst, not beyond"
        );
        let refill = later + Duration::from_millis(100);
        assert!(bucket.admit(refill), "100 ms at 10/s earn one request");
        assert!(!bucket.admit(refill), "and only one");
    }
}
