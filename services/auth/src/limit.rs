//! Login brute-force limits: failed logins are counted per caller and per
//! (account, caller); over the limit a login is refused with
//! `RESOURCE_EXHAUSTED` and a retry hint, before any password work.
//!
//! Hand-written (a fixed-window counter map) because the limit must key on
//! the account *and* the caller, answer with the time left, and stay
//! bounded in memory; a general rate-limiting crate brings more than this
//! needs.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Failed logins one caller may make per window, over all accounts.
pub(crate) const PER_CALLER: u32 = 20;
/// Failed logins one caller may make per window against one account.
pub(crate) const PER_ACCOUNT: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept at most; beyond this the oldest windows are dropped.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub(crate) struct LoginLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl LoginLimiter {
    fn keys(caller: &str, username: &str) -> [(String, u32); 2] {
        [
            (format!("caller:{caller}"), PER_CALLER),
            (format!("account:{username}:{caller}"), PER_ACCOUNT),
        ]
    }

    /// `Err(retry_after)` if this caller may not try this account now.
    pub(crate) fn check(&self, caller: &str, username: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let windows = self.windows.lock().expect("limiter lock");
        for (key, limit) in Self::keys(caller, username) {
            if let Some((start, count)) = windows.get(&key) {
                let elapsed = now.duration_since(*start);
                if elapsed < WINDOW && *count >= limit {
                    return Err(WINDOW - elapsed);
                }
            }
        }
        Ok(())
    }

    /// Counts a failed login.
    pub(crate) fn failed(&self, caller: &str, username: &str) {
        let now = Instant::now();
        let mut windows = self.windows.lock().expect("limiter lock");
        if windows.len() >= MAX_ENTRIES {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        for (key, _) in Self::keys(caller, username) {
            let entry = windows.entry(key).or_insert((now, 0));
            if now.duration_since(entry.0) >= WINDOW {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }

    /// A successful login clears the (account, caller) count.
    pub(crate) fn succeeded(&self, caller: &str, username: &str) {
        let [_, (account_key, _)] = Self::keys(caller, username);
        self.windows
            .lock()
            .expect("limiter lock")
            .remove(&account_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_account_and_per_caller() {
        let limiter = LoginLimiter::default();
        for _ in 0..PER_ACCOUNT {
            assert!(limiter.check("1.2.3.4", "ann").is_ok());
            limiter.failed("1.2.3.4", "ann");
        }
        let wait = limiter.check("1.2.3.4", "ann").unwrap_err();
        assert!(wait <= WINDOW && wait > Duration::from_secs(50));
        assert!(
            limiter.check("5.6.7.8", "ann").is_ok(),
            "another caller may still log in"
        );
        assert!(
            limiter.check("1.2.3.4", "bob").is_ok(),
            "another account from the same caller"
        );
        for i in 0..PER_CALLER {
            limiter.failed("1.2.3.4", &format!("user{i}"));
        }
        assert!(
            limiter.check("1.2.3.4", "carol").is_err(),
            "the caller is limited over all accounts"
        );
    }
}
