//! The retry budget: retries may add at most `retry_ratio` of requests plus
//! `min_retries_per_second`, with a reserve of `min_retries_per_second × ttl`.
//!
//! Written here instead of using `tower::retry::budget::TpsBudget`, whose
//! `deposit` takes a mutex on every request: at tens of thousands of calls
//! per second across worker threads that lock was contended (seen in perf).
//! This keeps the same policy with atomics, in thousandths of a retry.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

const UNIT: i64 = 1000;

/// A lock-free retry budget.
#[derive(Debug)]
pub(crate) struct Budget {
    per_request: i64,
    per_second: i64,
    cap: i64,
    tokens: AtomicI64,
    refilled_ms: AtomicU64,
    start: Instant,
}

impl Budget {
    pub(crate) fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Self {
        let per_second = i64::from(min_per_sec) * UNIT;
        let per_request = (f64::from(ratio) * UNIT as f64) as i64;
        let reserve = per_second * ttl.as_secs().max(1) as i64;
        Self {
            per_request,
            per_second,
            // At most the reserve plus a thousand requests' worth can be banked,
            // so a long quiet period cannot fund a retry storm.
            cap: reserve + per_request * 1000,
            tokens: AtomicI64::new(reserve),
            refilled_ms: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn add(&self, amount: i64) {
        let after = self.tokens.fetch_add(amount, Ordering::Relaxed) + amount;
        if after > self.cap {
            self.tokens.fetch_min(self.cap, Ordering::Relaxed);
        }
    }

    /// Counts one request.
    pub(crate) fn deposit(&self) {
        // A full budget (the steady state: no retries) stays full without
        // a write, so the counter's line is not pulled back and forth
        // between the cores on every call; a deposit it skips would have
        // been cut to the cap anyway.
        if self.tokens.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        self.add(self.per_request);
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn withdraw(&self) -> bool {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let last = self.refilled_ms.load(Ordering::Relaxed);
        if now_ms > last
            && self
                .refilled_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.add(self.per_second * (now_ms - last) as i64 / 1000);
        }
        let mut current = self.tokens.load(Ordering::Relaxed);
        while current >= UNIT {
            match self.tokens.compare_exchange_weak(
                current,
                current - UNIT,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_ratio_plus_the_reserve_and_refills_over_time() {
        let budget = Budget::new(Duration::from_secs(10), 1, 0.2);
        for _ in 0..100 {
            budget.deposit();
        }
        // Reserve 10 + 20 % of 100.
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 30);
        tokio::time::advance(Duration::from_secs(5)).await;
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 5, "one per second");
    }

    #[tokio::test(start_paused = true)]
    async fn banked_tokens_are_capped() {
        let budget = Budget::new(Duration::from_secs(1), 0, 0.5);
        for _ in 0..100_000 {
            budget.deposit();
        }
        let granted = (0..10_000).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 500);
    }
}
