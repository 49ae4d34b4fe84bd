//! WatchOrder's change feeds and its per-user limit.
//!
//! A watched order has exactly one feed, however many streams watch it: a
//! `tokio::sync::watch` channel holding the order's newest state, fed by
//! this process's saga as it moves the order and by one periodic read of
//! the database (for changes another replica's saga makes). The read stops
//! when the order is final and the feed goes away with its last watcher, so
//! the database sees at most one read per [`WATCH_POLL`] per watched order.
//! Each user may hold [`MAX_WATCHES_PER_USER`] streams at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use shop_api::orders::v1::{Order, OrderStatus};
use sqlx::AnyPool;
use tokio::sync::watch;
use tonic::Status;

use crate::{metrics::metrics, store};

/// How often a feed re-reads its order, to see changes made by another
/// replica's saga driver.
pub const WATCH_POLL: Duration = Duration::from_secs(1);

/// Concurrent WatchOrder streams one user may hold; the next one is
/// refused with `RESOURCE_EXHAUSTED` until one ends.
pub const MAX_WATCHES_PER_USER: usize = 8;

/// How far along its saga an order is. Every transition moves an order to
/// a later step (reserve → charge → commit → done; any of them → refund →
/// release → done), so of two states of one order the later one has the
/// higher rank: a feed never goes back in time when a slow read lands
/// after a newer event.
fn rank(order: &Order) -> u8 {
    match order.saga_step.as_str() {
        "reserve" => 0,
        "charge" => 1,
        "commit" => 2,
        "refund" => 3,
        "release" => 4,
        _ => 5,
    }
}

/// Whether `order` is later than `than`.
pub(crate) fn is_newer(order: &Order, than: &Order) -> bool {
    rank(order) > rank(than)
}

fn is_final(order: &Order) -> bool {
    matches!(
        order.status(),
        OrderStatus::Confirmed | OrderStatus::Cancelled
    )
}

#[derive(Default)]
struct Inner {
    feeds: HashMap<String, watch::Sender<Order>>,
    watches: HashMap<String, usize>,
}

/// The process's change feeds and open watches, shared by the saga (which
/// publishes) and the service (which subscribes).
#[derive(Clone, Default)]
pub(crate) struct Feeds {
    inner: Arc<Mutex<Inner>>,
}

/// One user's open watch; dropping it frees the slot.
pub(crate) struct WatchPermit {
    feeds: Feeds,
    user_id: String,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut inner = self.feeds.lock();
        if let Some(n) = inner.watches.get_mut(&self.user_id) {
            *n -= 1;
            if *n == 0 {
                inner.watches.remove(&self.user_id);
            }
        }
        metrics().watches.dec();
    }
}

impl Feeds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("feeds lock poisoned")
    }

    /// A slot for one more stream of `user_id`, or `RESOURCE_EXHAUSTED`.
    pub(crate) fn permit(&self, user_id: &str) -> Result<WatchPermit, Status> {
        let mut inner = self.lock();
        let open = inner.watches.entry(user_id.to_owned()).or_default();
        if *open >= MAX_WATCHES_PER_USER {
            return Err(Status::resource_exhausted(format!(
                "you already have {MAX_WATCHES_PER_USER} WatchOrder streams open, the most one user may have; close one first"
            )));
        }
        *open += 1;
        metrics().watches.inc();
        Ok(WatchPermit {
            feeds: self.clone(),
            user_id: user_id.to_owned(),
        })
    }

    /// Whether anyone watches `order_id` (so publishing it is worth a read).
    pub(crate) fn is_watched(&self, order_id: &str) -> bool {
        self.lock().feeds.contains_key(order_id)
    }

    /// Tells the watchers of `order` (if any) its new state.
    pub(crate) fn publish(&self, order: &Order) {
        if let Some(feed) = self.lock().feeds.get(&order.order_id) {
            advance(feed, order);
        }
    }

    /// The feed of `order` (as just read), started if nobody watched it.
    pub(crate) fn subscribe(&self, pool: &AnyPool, order: &Order) -> watch::Receiver<Order> {
        let mut inner = self.lock();
        if let Some(feed) = inner.feeds.get(&order.order_id) {
            advance(feed, order);
            return feed.subscribe();
        }
        let (feed, receiver) = watch::channel(order.clone());
        inner.feeds.insert(order.order_id.clone(), feed.clone());
        metrics().watched_orders.inc();
        tokio::spawn(self.clone().poll(pool.clone(), feed));
        receiver
    }

    /// Re-reads the feed's order every [`WATCH_POLL`] until it is final,
    /// and removes the feed once its last watcher is gone.
    async fn poll(self, pool: AnyPool, feed: watch::Sender<Order>) {
        let order_id = feed.borrow().order_id.clone();
        let mut tick = tokio::time::interval(WATCH_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = feed.closed() => {
                    // Subscribing happens under the lock, so no watcher can
                    // join between this check and the removal.
                    let mut inner = self.lock();
                    if feed.receiver_count() == 0 {
                        inner.feeds.remove(&order_id);
                        metrics().watched_orders.dec();
                        return;
                    }
                    continue;
                }
                _ = tick.tick(), if !is_final(&feed.borrow()) => {}
            }
            match store::load(&pool, &order_id).await {
                Ok(Some(stored)) => advance(&feed, &stored.order),
                Ok(None) => {}
                Err(e) => tracing::warn!(%order_id, "watch cannot read the order: {e}"),
            }
        }
    }
}

/// Moves `feed` to `order` if that is later than what it holds.
fn advance(feed: &watch::Sender<Order>, order: &Order) {
    feed.send_if_modified(|current| {
        if is_newer(order, current) {
            *current = order.clone();
            true
        } else {
            false
        }
    });
}
