//! ampd's one retry mechanism: [backon](https://docs.rs/backon)'s exponential backoff inside a
//! wall-clock deadline that counts the attempts as well as the pauses. (A budget that counted only
//! the pauses would let attempts that each wait long — a pool's acquire timeout, a frozen
//! connection — add up to many times the stated bound.) Connecting, the migration lock's wait and
//! the services' database calls all retry through [`Backoff::run`].

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};

/// Exponential backoff from `first`, doubling up to `max` (jittered when `jitter`), for at most
/// `within` from the first attempt.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first pause.
    pub first: Duration,
    /// The longest pause.
    pub max: Duration,
    /// The deadline, from the first attempt: attempts and pauses together.
    pub within: Duration,
    /// Spread the pauses randomly (many clients retrying at once).
    pub jitter: bool,
}

impl Backoff {
    /// Runs `attempt` (given the time left before the deadline, which it should not exceed)
    /// until it succeeds, fails with an error `retry` refuses, or the deadline is reached: then
    /// its last error. No pause runs past the deadline; the last attempt starts when it is
    /// reached. `notify` hears of each retry and the pause before it.
    pub async fn run<T, E, F, Fut>(
        self,
        mut attempt: F,
        mut retry: impl FnMut(&E) -> bool,
        mut notify: impl FnMut(&E, Duration),
    ) -> Result<T, E>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let left = move || self.within.saturating_sub(started.elapsed());
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        (|| attempt(left()))
            .retry(builder)
            .when(|e| !left().is_zero() && retry(e))
            .adjust(|_, pause| pause.map(|p| p.min(left())))
            .notify(|e, pause| notify(e, pause))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn attempts_count_against_the_deadline_and_the_last_error_is_returned() {
        let tries = AtomicU32::new(0);
        let backoff = Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
            within: Duration::from_millis(100),
            jitter: false,
        };
        // Each attempt takes 40 ms (a pool wait): at most three fit in 100 ms with the pauses
        // (a budget counting the pauses only would allow seven).
        let result: Result<(), u32> = backoff
            .run(
                |_left| {
                    let n = tries.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(Duration::from_millis(40)).await;
                        Err(n)
                    }
                },
                |_| true,
                |_, _| {},
            )
            .await;
        let tries = tries.load(Ordering::SeqCst);
        assert!((1..=3).contains(&tries), "{tries} attempts");
        assert_eq!(result, Err(tries - 1), "the last attempt's error");
    }

    #[tokio::test]
    async fn an_error_not_retried_ends_at_once_and_success_ends_the_retries() {
        let backoff = Backoff {
            first: Duration::from_millis(50),
            max: Duration::from_millis(50),
            within: Duration::from_secs(60),
            jitter: false,
        };
        let tries = AtomicU32::new(0);
        let refused: Result<(), &str> = backoff
            .run(
                |_| {
                    tries.fetch_add(1, Ordering::SeqCst);
                    async { Err("fatal") }
                },
                |e| *e != "fatal",
                |_, _| {},
            )
            .await;
        assert_eq!((refused, tries.load(Ordering::SeqCst)), (Err("fatal"), 1));
        let tries = AtomicU32::new(0);
        let passed: Result<u32, &str> = backoff
            .run(
                |_| {
                    let n = tries.fetch_add(1, Ordering::SeqCst);
                    async move { if n < 2 { Err("busy") } else { Ok(n) } }
                },
                |_| true,
                |_, _| {},
            )
            .await;
        assert_eq!(passed, Ok(2));
    }
}
