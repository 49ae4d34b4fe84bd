//! Abuse limits: fixed one-minute windows of attempts per key, over which
//! a call is refused with `RESOURCE_EXHAUSTED` and the time left, before any
//! password work.
//!
//! Failed logins count per end client, per (account, end client) and per
//! account over all clients (a high backstop against guessing one password
//! from many addresses); every login, failed or not, counts per end client
//! too (each hashes a password, and the hashing permits are shared: a few
//! addresses logging in correctly in a loop held them all); registrations
//! count per end client. There is no
//! per-process count: any limit every client shares lets fifty addresses
//! lock everybody out of logging in. An attempt is counted *before* its password is hashed, in
//! one step with the check, so parallel guesses cannot all pass a check
//! that none of them has counted yet; a successful login takes its attempt
//! back.
//!
//! Hand-written (a counter map) because a login must be checked against
//! several keys at once and counted in all or none, answer with the time
//! left, and take an attempt back; a general rate-limiting crate brings
//! more than this needs. Memory is bounded by a hard cap on entries: when
//! it is reached the entry whose window started first is dropped. Logins
//! and registrations have a limiter each, and an attempt is only counted
//! (an entry made) while holding a hashing permit, so entries are made no
//! faster than passwords are hashed: with 4 permits, at most a few
//! thousand a minute, far below [`MAX_ENTRIES`], so churn evicts no live
//! window. Hosts with many more permits should expect eviction under a
//! flood from very many addresses.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Login attempts (not succeeded) one end client may make per window,
/// over all accounts.
pub(crate) const LOGINS_PER_CLIENT: u32 = 20;
/// Login attempts (not succeeded) one end client may make per window
/// against one account.
pub(crate) const LOGINS_PER_ACCOUNT: u32 = 5;
/// Login attempts (not succeeded) per window against one account over all
/// clients: a backstop against guessing one password from many addresses.
/// Reaching it locks that account (only) for the rest of the window.
pub(crate) const LOGINS_PER_ACCOUNT_ALL_CLIENTS: u32 = 100;
/// Logins one end client may make per window, succeeded or not: each
/// hashes a password. Two a second, far above what the people behind one
/// address need (a token lasts hours), and with 4 hashing permits (about
/// 80 hashes a second) it takes some forty addresses to keep them all busy.
pub(crate) const HASHED_LOGINS_PER_CLIENT: u32 = 120;
/// Registrations one end client may make per window.
pub(crate) const REGISTRATIONS_PER_CLIENT: u32 = 20;
/// The length of a window.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept at most; beyond this the oldest window is dropped.
pub(crate) const MAX_ENTRIES: usize = 100_000;

struct Window {
    start: Instant,
    count: u32,
    /// Position in `Windows::by_age`.
    seq: u64,
}

#[derive(Default)]
struct Windows {
    map: HashMap<String, Window>,
    /// Keys by the order their windows started, oldest first.
    by_age: BTreeMap<u64, String>,
    next_seq: u64,
}

impl Windows {
    /// The live count of `key` at `now`, and when its window started.
    fn live(&self, key: &str, now: Instant) -> Option<&Window> {
        self.map
            .get(key)
            .filter(|w| now.saturating_duration_since(w.start) < WINDOW)
    }

    /// Drops windows that have ended (the oldest first, so it stops at the
    /// first live one) and, at the cap, the oldest live ones too.
    fn make_room(&mut self, now: Instant, cap: usize) {
        while let Some((&seq, key)) = self.by_age.first_key_value() {
            let ended = self
                .map
                .get(key)
                .is_none_or(|w| now.saturating_duration_since(w.start) >= WINDOW);
            if !ended && self.map.len() < cap {
                break;
            }
            let key = self.by_age.remove(&seq).expect("first key exists");
            self.map.remove(&key);
        }
    }

    /// Counts one attempt for `key`, starting a new window if it has none.
    fn count(&mut self, key: &str, now: Instant, cap: usize) -> Instant {
        if let Some(window) = self.map.get_mut(key)
            && now.saturating_duration_since(window.start) < WINDOW
        {
            window.count += 1;
            return window.start;
        }
        if let Some(old) = self.map.remove(key) {
            self.by_age.remove(&old.seq);
        }
        self.make_room(now, cap);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_age.insert(seq, key.to_owned());
        self.map.insert(
            key.to_owned(),
            Window {
                start: now,
                count: 1,
                seq,
            },
        );
        now
    }
}

/// Attempts counted by [`Limiter::attempt`], to take back with
/// [`Limiter::refund`]: each key with the start of the window it was
/// counted in.
#[must_use = "an attempt may have to be taken back"]
pub(crate) struct Attempt(Vec<(String, Instant)>);

/// Windows of attempts per key with a hard cap on the keys kept.
pub(crate) struct Limiter {
    windows: Mutex<Windows>,
    cap: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::with_cap(MAX_ENTRIES)
    }
}

impl Limiter {
    /// A limiter keeping at most `cap` keys.
    pub(crate) fn with_cap(cap: usize) -> Self {
        Self {
            windows: Mutex::default(),
            cap: cap.max(1),
        }
    }

    /// Counts one attempt against every `(key, limit)` if each has room,
    /// else counts none and says how long until the fullest frees up.
    pub(crate) fn attempt(&self, limits: &[(String, u32)]) -> Result<Attempt, Duration> {
        self.attempt_at(limits, Instant::now())
    }

    fn attempt_at(&self, limits: &[(String, u32)], now: Instant) -> Result<Attempt, Duration> {
        let mut windows = self.windows.lock().expect("limiter lock");
        let wait = limits
            .iter()
            .filter_map(|(key, limit)| {
                windows
                    .live(key, now)
                    .filter(|w| w.count >= *limit)
                    .map(|w| WINDOW.saturating_sub(now.saturating_duration_since(w.start)))
            })
            .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        Ok(Attempt(
            limits
                .iter()
                .map(|(key, _)| (key.clone(), windows.count(key, now, self.cap)))
                .collect(),
        ))
    }

    /// Takes back the attempt on the keys for which `keep` is false (a
    /// login that succeeded, or a password that was never tried).
    pub(crate) fn refund(&self, attempt: Attempt, keep: impl Fn(&str) -> bool) {
        let mut windows = self.windows.lock().expect("limiter lock");
        for (key, start) in attempt.0 {
            if keep(&key) {
                continue;
            }
            // Only from the window it was counted in; a new one owes nothing.
            if let Some(window) = windows.map.get_mut(&key)
                && window.start == start
            {
                window.count = window.count.saturating_sub(1);
            }
        }
    }

    /// Forgets `key` (a login that succeeded clears its account's count).
    pub(crate) fn clear(&self, key: &str) {
        let mut windows = self.windows.lock().expect("limiter lock");
        if let Some(old) = windows.map.remove(key) {
            windows.by_age.remove(&old.seq);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let windows = self.windows.lock().expect("limiter lock");
        assert_eq!(windows.map.len(), windows.by_age.len(), "index in step");
        windows.map.len()
    }
}

/// The limiter key of a login's account count (cleared on success).
pub(crate) fn account_key(client: &str, username: &str) -> String {
    format!("login-account {username} {client}")
}

/// The limiter keys of a login of `username` by `client`: per account over
/// all clients, per client, per (account, client).
pub(crate) fn login_limits(client: &str, username: &str) -> [(String, u32); 3] {
    [
        (
            format!("login-user {username}"),
            LOGINS_PER_ACCOUNT_ALL_CLIENTS,
        ),
        (format!("login-client {client}"), LOGINS_PER_CLIENT),
        (account_key(client, username), LOGINS_PER_ACCOUNT),
    ]
}

/// The count of every login `client` makes, kept whatever its outcome
/// once its password is hashed (taken back only for a login refused or
/// failed before hashing).
pub(crate) fn hashed_login_limits(client: &str) -> [(String, u32); 1] {
    [(format!("login-hashed {client}"), HASHED_LOGINS_PER_CLIENT)]
}

/// The limiter key of a registration by `client`.
pub(crate) fn register_limits(client: &str) -> [(String, u32); 1] {
    [(format!("registrations {client}"), REGISTRATIONS_PER_CLIENT)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` failed logins of `username` by `client`.
    fn fail(limiter: &Limiter, client: &str, username: &str, n: u32, now: Instant) {
        for i in 0..n {
            let counted = limiter
                .attempt_at(&login_limits(client, username), now)
                .unwrap_or_else(|_| panic!("attempt {i} of {client} on {username}"));
            drop(counted);
        }
    }

    #[test]
    fn limits_per_account_and_per_client() {
        let limiter = Limiter::default();
        let now = Instant::now();
        fail(&limiter, "1.2.3.4", "ann", LOGINS_PER_ACCOUNT, now);
        let wait = limiter
            .attempt_at(
                &login_limits("1.2.3.4", "ann"),
                now + Duration::from_secs(5),
            )
            .err()
            .expect("the account is limited for this client");
        assert_eq!(wait, Duration::from_secs(55));
        assert!(
            limiter
                .attempt_at(&login_limits("5.6.7.8", "ann"), now)
                .is_ok(),
            "another client may still log in"
        );
        fail(&limiter, "1.2.3.4", "bob", 1, now);
        for i in 0..LOGINS_PER_CLIENT - LOGINS_PER_ACCOUNT - 1 {
            fail(&limiter, "1.2.3.4", &format!("user{i}"), 1, now);
        }
        assert!(
            limiter
                .attempt_at(&login_limits("1.2.3.4", "carol"), now)
                .is_err(),
            "the client is limited over all accounts"
        );
        assert!(
            limiter
                .attempt_at(&login_limits("1.2.3.4", "carol"), now + WINDOW)
                .is_ok(),
            "a new window starts afresh"
        );
    }

    #[test]
    fn a_refused_attempt_counts_nowhere() {
        let limiter = Limiter::default();
        let now = Instant::now();
        fail(&limiter, "c", "ann", LOGINS_PER_ACCOUNT, now);
        for _ in 0..100 {
            assert!(limiter.attempt_at(&login_limits("c", "ann"), now).is_err());
        }
        // The refused ones did not spend the client's allowance.
        for i in 0..LOGINS_PER_CLIENT - LOGINS_PER_ACCOUNT {
            fail(&limiter, "c", &format!("user{i}"), 1, now);
        }
    }

    #[test]
    fn every_login_counts_per_client_whatever_its_outcome() {
        let limiter = Limiter::default();
        let now = Instant::now();
        for _ in 0..HASHED_LOGINS_PER_CLIENT {
            // What a successful login does: its login counts are taken back.
            let attempt = limiter.attempt_at(&login_limits("c", "ann"), now).unwrap();
            drop(limiter.attempt_at(&hashed_login_limits("c"), now).unwrap());
            limiter.refund(attempt, |_| false);
        }
        assert!(
            limiter.attempt_at(&hashed_login_limits("c"), now).is_err(),
            "the client's logins are at their limit"
        );
        assert!(limiter.attempt_at(&hashed_login_limits("d"), now).is_ok());
        assert!(
            limiter
                .attempt_at(&hashed_login_limits("c"), now + WINDOW)
                .is_ok()
        );
    }

    #[test]
    fn refunds_give_back_only_what_they_are_told_to() {
        let limiter = Limiter::default();
        let now = Instant::now();
        for _ in 0..LOGINS_PER_CLIENT * 3 {
            let attempt = limiter.attempt_at(&login_limits("c", "ann"), now).unwrap();
            limiter.refund(attempt, |_| false);
        }
        fail(&limiter, "c", "ann", LOGINS_PER_ACCOUNT, now);
        let attempt = limiter.attempt_at(&login_limits("c", "bob"), now).unwrap();
        limiter.refund(attempt, |key| key.contains("bob"));
        limiter.clear(&account_key("c", "ann"));
        fail(&limiter, "c", "ann", LOGINS_PER_ACCOUNT, now);
    }

    #[test]
    fn guessing_one_account_from_many_clients_locks_that_account_only() {
        let limiter = Limiter::default();
        let now = Instant::now();
        for i in 0..LOGINS_PER_ACCOUNT_ALL_CLIENTS {
            fail(&limiter, &format!("client{i}"), "ann", 1, now);
        }
        assert!(
            limiter
                .attempt_at(&login_limits("fresh", "ann"), now)
                .is_err()
        );
        // Failures spread over many accounts and clients lock out nobody
        // else: no count is shared by every client.
        for i in 0..2_000 {
            fail(&limiter, &format!("other{i}"), &format!("user{i}"), 1, now);
        }
        assert!(
            limiter
                .attempt_at(&login_limits("fresh", "bob"), now)
                .is_ok()
        );
    }

    #[test]
    fn inserting_ten_times_the_cap_keeps_it_at_the_cap() {
        let cap = 1_000;
        let limiter = Limiter::with_cap(cap);
        let now = Instant::now();
        // Every window live (one instant), every key new: the churn that
        // grew the old map without bound.
        for i in 0..10 * cap {
            let counted = limiter
                .attempt_at(&[(format!("k{i}"), 5)], now)
                .expect("a new key has room");
            drop(counted);
            assert!(limiter.len() <= cap, "{} keys after {i}", limiter.len());
        }
        assert_eq!(limiter.len(), cap);
        // The newest survive, the oldest went first.
        let windows = limiter.windows.lock().unwrap();
        assert!(windows.map.contains_key(&format!("k{}", 10 * cap - 1)));
        assert!(!windows.map.contains_key("k0"));
    }

    #[test]
    fn ended_windows_are_dropped_before_live_ones() {
        let limiter = Limiter::with_cap(10);
        let now = Instant::now();
        let mut counted = vec![limiter.attempt_at(&[("old".into(), 5)], now).unwrap()];
        for i in 0..5 {
            counted.push(
                limiter
                    .attempt_at(&[(format!("live{i}"), 5)], now + WINDOW / 2)
                    .unwrap(),
            );
        }
        counted.push(
            limiter
                .attempt_at(&[("new".into(), 5)], now + WINDOW)
                .unwrap(),
        );
        let windows = limiter.windows.lock().unwrap();
        assert!(!windows.map.contains_key("old"), "ended window dropped");
        assert_eq!(windows.map.len(), 6);
    }
}
