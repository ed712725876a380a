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

/// The lowest rate a throttled node slows down to: one call every 10 s, the retry policy's
/// longest backoff, so slowing down never makes a node wait longer than retrying would.
pub const MIN_RATE_PER_SECOND: f64 = 0.1;
/// A throttled node's rate after a 429: this fraction of what it was.
const DECREASE: f64 = 0.5;
/// Each call OCI answers without throttling raises a throttled node's rate by this fraction,
/// up to its configured rate: a node halved by one stray 429 is back after 8 answers.
const INCREASE: f64 = 0.1;

/// A generic cell rate algorithm limiter (one timestamp, no background task) whose rate
/// adapts to throttling: multiplicative decrease on a 429, multiplicative increase on an
/// answer, as TCP congestion control and the AWS SDKs' "adaptive" retry mode do. OCI's limits
/// are per tenancy, shared by every node of a cluster: a node told 429 slows down and earns
/// its rate back, so a fleet settles near its share of the budget instead of every node
/// retrying at its own full rate (`a_fleet_that_slows_down_on_429_earns_fewer_of_them`).
///
/// Like TCP, the rate is cut once per round trip: the 429s of calls that were already on their
/// way when the rate was cut say nothing about the new rate, and counting them would cut a
/// node with ten calls in flight to a thousandth of its rate at one stroke
/// (`the_429s_of_calls_in_flight_cut_the_rate_once`).
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    /// The calls per second allowed now, between [`MIN_RATE_PER_SECOND`] and the limit's.
    per_second: f64,
    theoretical_arrival: Instant,
    /// When the rate was last cut: a 429 for a call sent before then does not cut it again.
    cut_at: Option<Instant>,
}

impl LimiterState {
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second.max(MIN_RATE_PER_SECOND))
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let limit = RateLimit {
            per_second: limit.per_second.max(MIN_RATE_PER_SECOND),
            burst: limit.burst.max(1),
        };
        Self {
            limit,
            state: Mutex::new(LimiterState {
                per_second: limit.per_second,
                theoretical_arrival: Instant::now(),
                cut_at: None,
            }),
        }
    }

    /// Waits until a call is allowed; returns the moment it was, to hand to [`Self::throttled`]
    /// if OCI answers 429.
    pub async fn acquire(&self) -> Instant {
        let far = Instant::now() + Duration::from_hours(24 * 365);
        // Nothing is held back until a year from now.
        self.acquire_by(far).await.unwrap_or(far)
    }

    /// Waits until a call is allowed, if that is no later than `latest`, and returns the
    /// moment it was; otherwise takes no slot, waits not at all and returns how long the wait
    /// would have been.
    pub async fn acquire_by(&self, latest: Instant) -> Result<Instant, Duration> {
        let start = {
            let mut state = self.state.lock().await;
            let interval = state.interval();
            // The burst is the configured rate's; a throttled node has none to spend.
            let tolerance = if state.per_second < self.limit.per_second {
                Duration::ZERO
            } else {
                interval * (self.limit.burst - 1)
            };
            let now = Instant::now();
            let tat = state.theoretical_arrival;
            let allowed = tat.checked_sub(tolerance).map_or(now, |t| t.max(now));
            if allowed > latest {
                return Err(allowed - now);
            }
            state.theoretical_arrival = tat.max(allowed) + interval;
            allowed
        };
        tokio::time::sleep_until(start).await;
        Ok(start)
    }

    /// OCI throttled (429) the call [`Self::acquire`] let go at `sent`. Unless that call was
    /// on its way before the last cut, the node's rate is halved and every call of the node is
    /// held back for `pause` (that call's retry backoff) from now, not only that call's retry.
    /// A call that was on its way only waits its own retry. Returns the rate now allowed.
    pub async fn throttled(&self, sent: Instant, pause: Duration) -> f64 {
        let mut state = self.state.lock().await;
        if state.cut_at.is_some_and(|cut| sent <= cut) {
            return state.per_second;
        }
        let now = Instant::now();
        state.per_second = (state.per_second * DECREASE).max(MIN_RATE_PER_SECOND);
        state.cut_at = Some(now);
        // The next call, the retry included, comes no sooner than the new rate allows, at a
        // random point of that interval: nodes throttled together must not return together.
        let spread = state
            .interval()
            .mul_f64(0.5 + rand::thread_rng().r#gen::<f64>());
        let resume = now + pause.max(spread);
        state.theoretical_arrival = state.theoretical_arrival.max(resume);
        state.per_second
    }

    /// OCI answered a call without throttling it: the rate earns back a step towards the
    /// configured one. Returns the rate now allowed.
    pub async fn answered(&self) -> f64 {
        let mut state = self.state.lock().await;
        if state.per_second < self.limit.per_second {
            state.per_second = (state.per_second * (1.0 + INCREASE)).min(self.limit.per_second);
        }
        state.per_second
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
        limiter
            .throttled(Instant::now(), Duration::from_secs(2))
            .await;
        limiter.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "the next call, whichever it is, waits out the 429's backoff: {:?}",
            start.elapsed()
        );
    }

    /// A call that could go out only after `latest` takes no slot: the calls behind it are
    /// not delayed by a call that was never made.
    #[tokio::test(start_paused = true)]
    async fn a_call_held_back_past_its_latest_start_takes_no_slot() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 1,
        });
        let start = Instant::now();
        limiter.acquire().await;
        let wait = limiter
            .acquire_by(start + Duration::from_millis(500))
            .await
            .expect_err("the next slot is 1 s away");
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a held-back call does not wait"
        );
        limiter.acquire().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "the next call gets the slot the held-back one did not take"
        );
    }

    /// Time for `n` calls through `limiter`.
    async fn time_of(limiter: &RateLimiter, n: usize) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            limiter.acquire().await;
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn each_429_halves_the_rate_and_answers_earn_it_back() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 1,
        });
        limiter.acquire().await;
        let rate = limiter.throttled(Instant::now(), Duration::ZERO).await;
        assert!((rate - 5.0).abs() < 1e-9, "{rate}");
        // The retry waits 0.5 to 1.5 intervals at the new rate (100–300 ms), then calls are
        // spaced at 5/s.
        let took = time_of(&limiter, 11).await;
        assert!(
            took >= Duration::from_millis(2099) && took <= Duration::from_millis(2301),
            "ten intervals at 5 calls/s after the spread retry, not at 10/s: {took:?}"
        );
        let rate = limiter.throttled(Instant::now(), Duration::ZERO).await;
        assert!((rate - 2.5).abs() < 1e-9, "{rate}");
        let mut last = 0.0;
        for _ in 0..15 {
            last = limiter.answered().await;
        }
        assert!(
            (last - 10.0).abs() < 1e-9,
            "15 answers bring 2.5/s back to 10/s, never above: {last}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_429s_of_calls_in_flight_cut_the_rate_once() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 10,
        });
        let mut sent = Vec::new();
        for _ in 0..10 {
            sent.push(limiter.acquire().await);
        }
        let mut rate = 0.0;
        for at in sent {
            rate = limiter.throttled(at, Duration::ZERO).await;
        }
        assert!(
            (rate - 5.0).abs() < 1e-9,
            "ten calls sent together and all answered 429 halve the rate once: {rate}"
        );
        let after = limiter.acquire().await;
        let rate = limiter.throttled(after, Duration::ZERO).await;
        assert!(
            (rate - 2.5).abs() < 1e-9,
            "a call sent at the new rate and throttled halves it again: {rate}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_node_never_stops_calling_and_spends_no_burst() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 10,
        });
        for _ in 0..40 {
            let sent = limiter.acquire().await;
            limiter.throttled(sent, Duration::ZERO).await;
        }
        tokio::time::sleep(Duration::from_mins(10)).await;
        let took = time_of(&limiter, 3).await;
        let interval = Duration::from_secs_f64(1.0 / MIN_RATE_PER_SECOND);
        assert!(
            took + Duration::from_millis(1) >= interval * 2
                && took <= interval * 2 + Duration::from_millis(10),
            "at the floor, three calls after a long idle are two floor intervals apart: {took:?}"
        );
    }

    /// A fleet model: `nodes` clients each wanting `calls` calls, against one tenancy bucket
    /// of 20 calls/s (burst 20), every call 50 ms. Returns (429s, calls answered).
    async fn fleet(nodes: usize, calls: usize, adaptive: bool) -> (usize, usize) {
        use std::sync::Arc;
        struct Bucket {
            tokens: f64,
            at: Instant,
        }
        let bucket = Arc::new(std::sync::Mutex::new(Bucket {
            tokens: 20.0,
            at: Instant::now(),
        }));
        let throttled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..nodes {
            let (bucket, throttled) = (bucket.clone(), throttled.clone());
            tasks.push(tokio::spawn(async move {
                let limiter = RateLimiter::new(RateLimit::default());
                let policy = RetryPolicy::default();
                let mut done = 0;
                let mut attempt = 0;
                while done < calls {
                    let sent = limiter.acquire().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let granted = {
                        let mut b = bucket.lock().unwrap();
                        let now = Instant::now();
                        b.tokens = (b.tokens + 20.0 * (now - b.at).as_secs_f64()).min(20.0);
                        b.at = now;
                        let granted = b.tokens >= 1.0;
                        if granted {
                            b.tokens -= 1.0;
                        }
                        granted
                    };
                    if granted {
                        done += 1;
                        attempt = 0;
                        if adaptive {
                            limiter.answered().await;
                        }
                    } else {
                        throttled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let delay = policy.backoff(attempt);
                        attempt += 1;
                        if adaptive {
                            limiter.throttled(sent, delay).await;
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            throttled.load(std::sync::atomic::Ordering::Relaxed),
            nodes * calls,
        )
    }

    /// 200 nodes of 10 calls each against a tenancy of 20 calls/s: a fixed rate with the
    /// retry policy's backoff (the client before this limiter adapted) earns about 1.6 429s
    /// per call; slowing down on 429 earns under half as many, and the fleet still finishes
    /// within a third more time than the fixed rate's, which already runs at the tenancy's
    /// limit.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_that_slows_down_on_429_earns_fewer_of_them() {
        let t0 = Instant::now();
        let (fixed, calls) = fleet(200, 10, false).await;
        let fixed_took = t0.elapsed();
        let t1 = Instant::now();
        let (adaptive, _) = fleet(200, 10, true).await;
        let adaptive_took = t1.elapsed();
        let figures = format!(
            "{calls} calls: fixed rate {fixed} 429s in {fixed_took:?}, adaptive {adaptive} 429s in {adaptive_took:?}"
        );
        assert!(adaptive * 2 < fixed, "{figures}");
        assert!(adaptive_took < fixed_took.mul_f64(1.5), "{figures}");
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
