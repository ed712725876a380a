//! When to retry an OCI call, how long to wait, and how fast to call at all.
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::error::OciError;

/// Retries with exponential backoff and jitter, bounded both in attempts and in total time.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// No call (all attempts and waits together) takes longer than this.
    pub total_budget: Duration,
    /// One attempt that has not answered by then is abandoned (a hung connection).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            total_budget: Duration::from_secs(90),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The Go SDK's default policy: 429, 5xx except 501, 409 `IncorrectState`, and transport
    /// failures (timeouts, refused or reset connections) are transient.
    pub fn is_retryable(error: &OciError) -> bool {
        match error {
            OciError::Service { status, code, .. } => {
                *status == 429
                    || (*status >= 500 && *status != 501)
                    || (*status == 409 && code == "IncorrectState")
            }
            OciError::Timeout { .. } => true,
            OciError::Transport { source, .. } => {
                source.is_timeout() || source.is_connect() || source.is_request()
            }
            _ => false,
        }
    }

    /// The wait before attempt `attempt + 1`: exponential, capped, with "equal jitter"
    /// (half fixed, half random) so synchronised nodes spread out but never retry at once.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
    }
}

/// Client-side rate limit: at most `per_second` calls per second, with bursts of `burst`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 10.0,
            burst: 10,
        }
    }
}

/// A generic cell rate algorithm limiter: one timestamp, no background task.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    tolerance: Duration,
    theoretical_arrival: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let interval = Duration::from_secs_f64(1.0 / limit.per_second.max(0.001));
        Self {
            interval,
            tolerance: interval * limit.burst.saturating_sub(1),
            theoretical_arrival: Mutex::new(Instant::now()),
        }
    }

    /// Waits until a call is allowed.
    pub async fn acquire(&self) {
        let start = {
            let mut tat = self.theoretical_arrival.lock().await;
            let now = Instant::now();
            let allowed = tat.checked_sub(self.tolerance).map_or(now, |t| t.max(now));
            *tat = (*tat).max(allowed) + self.interval;
            allowed
        };
        tokio::time::sleep_until(start).await;
    }

    /// Holds every call back for `pause` from now: OCI throttled one (429), and the whole
    /// node backs off, not only that call, so a tenancy at its limit sees no storm from it.
    pub async fn hold_off(&self, pause: Duration) {
        let mut tat = self.theoretical_arrival.lock().await;
        let resume = Instant::now() + pause + self.tolerance;
        *tat = (*tat).max(resume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(status: u16, code: &str) -> OciError {
        OciError::Service {
            operation: "Test",
            status,
            code: code.into(),
            message: String::new(),
            request_id: None,
        }
    }

    #[test]
    fn retryable_statuses() {
        for (status, code, expected) in [
            (429, "TooManyRequests", true),
            (500, "InternalServerError", true),
            (503, "ServiceUnavailable", true),
            (501, "MethodNotImplemented", false),
            (409, "IncorrectState", true),
            (409, "Conflict", false),
            (400, "LimitExceeded", false),
            (401, "NotAuthenticated", false),
            (404, "NotAuthorizedOrNotFound", false),
        ] {
            assert_eq!(
                RetryPolicy::is_retryable(&service(status, code)),
                expected,
                "{status} {code}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        for attempt in 0..20 {
            let d = policy.backoff(attempt);
            let exp = policy
                .base_delay
                .saturating_mul(1 << attempt.min(16))
                .min(policy.max_delay);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d:?} outside [{:?}, {exp:?}]",
                exp / 2
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_call_holds_back_every_call_of_the_node() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 100.0,
            burst: 10,
        });
        let start = Instant::now();
        limiter.acquire().await;
        limiter.hold_off(Duration::from_secs(2)).await;
        limiter.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "the next call, whichever it is, waits out the 429's backoff: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_calls_after_the_burst() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(1),
            "the burst must pass at once"
        );
        for _ in 0..5 {
            limiter.acquire().await;
        }
        let elapsed = t0.elapsed();
        assert!(
            elapsed >= Duration::from_millis(499) && elapsed < Duration::from_millis(600),
            "5 calls beyond the burst at 10/s should take ~500 ms, took {elapsed:?}"
        );
    }
}
