//! The bandwidth limit (`relay.max_rate_bytes_per_second`): one token
//! bucket shared by every response body, so the site's link sees at most
//! the configured rate in total, however many agents download at once.
//!
//! A body takes tokens for each chunk before it is sent; tokens may go
//! negative (a debt), and the taker waits until the debt is paid back at
//! the configured rate. Concurrent bodies queue behind one another's
//! debt, so the total stays at the rate. The bucket holds at most one
//! chunk, so an idle link does not save up a burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct RateLimiter {
    bytes_per_second: f64,
    chunk_bytes: usize,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes that may be sent now (negative: owed).
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> Self {
        // About 16 chunks a second: smooth at low rates, few wake-ups at high ones.
        let chunk_bytes = (bytes_per_second / 16).clamp(1024, 64 * 1024) as usize;
        Self {
            bytes_per_second: bytes_per_second as f64,
            chunk_bytes,
            bucket: Mutex::new(Bucket { tokens: chunk_bytes as f64, refilled_at: Instant::now() }),
        }
    }

    /// How many bytes a body reads and sends at a time.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: usize) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let earned = now.duration_since(bucket.refilled_at).as_secs_f64() * self.bytes_per_second;
            bucket.tokens = (bucket.tokens + earned).min(self.chunk_bytes as f64) - bytes as f64;
            bucket.refilled_at = now;
            if bucket.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-bucket.tokens / self.bytes_per_second)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: the time is exact, the test instant.
    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_the_rate() {
        let limiter = std::sync::Arc::new(RateLimiter::new(10_000));
        assert_eq!(limiter.chunk_bytes(), 1024);
        let started = Instant::now();
        let mut takers = Vec::new();
        for _ in 0..4 {
            let limiter = limiter.clone();
            takers.push(tokio::spawn(async move {
                for _ in 0..25 {
                    limiter.take(1_000).await;
                }
            }));
        }
        for taker in takers {
            taker.await.unwrap();
        }
        // 100,000 bytes at 10,000 B/s, less the first chunk's worth.
        let elapsed = started.elapsed().as_secs_f64();
        assert!((9.8..=10.1).contains(&elapsed), "{elapsed} s");
    }
}
