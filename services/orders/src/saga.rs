//! The PlaceOrder saga: reserve stock → charge → commit the reservation →
//! confirm; on a business failure, compensate (refund, release) and cancel.
//!
//! Each step is written to the database before it runs and is idempotent
//! under a key derived from the order, so any number of drivers (a restart,
//! the recovery sweep, another replica) can push an order forward safely:
//! transitions are compare-and-set on the step.
//!
//! Transient failures (the callee unavailable, a deadline) are retried with
//! backoff. Reserving and charging give up and compensate after
//! [`FORWARD_ATTEMPTS`] transient failures; committing (the money is taken)
//! and the compensations never give up, because an order must end
//! CONFIRMED or CANCELLED with nothing held and nothing owed. The chaos
//! test found the case this guards: a commit that succeeded while its
//! answer was lost, followed by a refund, left stock sold and money
//! returned.
//!
//! - A commit is retried on every error except inventory's word that the
//!   reservation is gone (released or expired: `FAILED_PRECONDITION`,
//!   `NOT_FOUND`, or an answer that is not `COMMITTED`); only then does the
//!   saga compensate, so a confirmed order always has committed stock.
//! - A refund is retried on every error, whatever its code, with backoff
//!   capped at [`BACKOFF_CAP`]: it is idempotent under the charge key, and
//!   an order abandoned here would be CANCELLED with its money taken. It
//!   waits at step `refund` (visible as `saga_step`), counted in
//!   `mesh_orders_refund_failures_total` and logged at error level after
//!   [`REFUND_ALERT_AFTER`] failures in a row.
//! - A release refused for good is logged and the order ends: inventory's
//!   expiry sweep returns the stock.
//!
//! `cancel_reason` holds this service's own words ("insufficient funds",
//! "insufficient stock for product X"), never a callee's message, which can
//! carry another party's data (a balance); the callee's words go to the log.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_client::MeshChannel;
use shop_api::{
    inventory::v1::{
        CommitReservationRequest, LineItem, ReleaseReservationRequest, ReservationState,
        ReserveStockRequest, inventory_service_client::InventoryServiceClient,
    },
    orders::v1::{Order, OrderStatus},
    payments::v1::{
        ChargeState, CreateChargeRequest, GetChargeRequest, RefundChargeRequest,
        payments_service_client::PaymentsServiceClient,
    },
};
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::{
    metrics::metrics,
    store::{self, Step},
    watch::Feeds,
};

/// Forward-step attempts on transient errors before compensating.
pub const FORWARD_ATTEMPTS: u32 = 6;
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between two attempts of a step.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Failed refund attempts in a row after which each further failure is
/// logged at error level (about 10 s of failures with the backoff above).
pub const REFUND_ALERT_AFTER: u32 = 6;

/// `cancel_reason` when the reservation expired or was released before
/// the order could be completed.
const RESERVATION_GONE: &str = "the stock reservation expired before the order could be completed";
/// An unfinished order untouched this long is picked up by the recovery sweep.
const RECOVERY_IDLE: Duration = Duration::from_secs(15);

/// The charge idempotency key of an order.
pub fn charge_key(order_id: &str) -> String {
    format!("order-{order_id}-charge")
}

/// Drives orders through the saga and tells watchers about every change.
#[derive(Clone)]
pub struct Saga {
    pool: AnyPool,
    inventory: InventoryServiceClient<MeshChannel>,
    payments: PaymentsServiceClient<MeshChannel>,
    feeds: Feeds,
    /// Orders this process is driving now, so it never drives one twice.
    running: Arc<Mutex<HashSet<String>>>,
    /// Told about confirmed orders, when configured (an optional dependency).
    recommendations: Option<crate::recommendations::Teller>,
}

enum Outcome {
    /// The step took effect.
    Done,
    /// The step cannot succeed; compensate with this reason (our own words).
    Failed(String),
}

fn is_transient(status: &Status) -> bool {
    // The mesh refusing orders itself (a policy being edited) says nothing
    // of the order: retried like an outage, never taken as the callee's no.
    if status
        .metadata()
        .get(mesh_client::authz::REFUSED_BY_HEADER)
        .is_some()
    {
        tracing::error!("the mesh refused orders' own call (authorization policy?): {status}");
        return true;
    }
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

impl Saga {
    /// A saga driver over the orders database and the two callees.
    pub fn new(
        pool: AnyPool,
        inventory: InventoryServiceClient<MeshChannel>,
        payments: PaymentsServiceClient<MeshChannel>,
    ) -> Self {
        Self {
            pool,
            inventory,
            payments,
            feeds: Feeds::default(),
            running: Arc::default(),
            recommendations: None,
        }
    }

    /// Tells `teller` about every order this saga confirms.
    pub fn with_recommendations(mut self, teller: crate::recommendations::Teller) -> Self {
        self.recommendations = Some(teller);
        self
    }

    /// The change feeds watchers of orders subscribe to.
    pub(crate) fn feeds(&self) -> &Feeds {
        &self.feeds
    }

    /// Drives `order_id` to CONFIRMED or CANCELLED in the background.
    pub fn start(&self, order_id: String) {
        if !self
            .running
            .lock()
            .expect("saga lock poisoned")
            .insert(order_id.clone())
        {
            return;
        }
        let saga = self.clone();
        // The saga's calls belong to the trace of the call that started it.
        tokio::spawn(
            async move {
                if let Err(e) = saga.drive(&order_id).await {
                    tracing::warn!(%order_id, "saga paused, the recovery sweep resumes it: {e}");
                }
                saga.running
                    .lock()
                    .expect("saga lock poisoned")
                    .remove(&order_id);
            }
            .in_current_span(),
        );
    }

    /// Waits until no saga runs in this process, for at most `limit`;
    /// whether none is left.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.running.lock().expect("saga lock poisoned").is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resumes unfinished orders now and then periodically, until `stop`.
    pub async fn recover_forever(self, stop: CancellationToken) {
        let mut first = true;
        let mut tick = tokio::time::interval(RECOVERY_IDLE / 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // On start every unfinished order is ours to resume; later only idle ones.
            let idle_since = if first {
                i64::MAX
            } else {
                shop_kit::time::now_millis() - RECOVERY_IDLE.as_millis() as i64
            };
            match store::unfinished(&self.pool, idle_since).await {
                Ok(ids) => {
                    first = false;
                    for id in ids {
                        tracing::info!(order_id = %id, "resuming unfinished saga");
                        self.start(id);
                    }
                }
                Err(e) => tracing::warn!("recovery sweep cannot read orders: {e}"),
            }
        }
    }

    async fn publish(&self, order_id: &str) -> Result<(), sqlx::Error> {
        // Read the order back only for its watchers.
        if self.feeds.is_watched(order_id)
            && let Some(stored) = store::load(&self.pool, order_id).await?
        {
            self.feeds.publish(&stored.order);
        }
        Ok(())
    }

    async fn drive(&self, order_id: &str) -> Result<(), sqlx::Error> {
        let mut backoff = BACKOFF_START;
        let mut attempts = 0;
        loop {
            let Some(stored) = store::load(&self.pool, order_id).await? else {
                return Ok(());
            };
            let step = stored.step;
            if step == Step::Done {
                return Ok(());
            }
            let result = self.run_step(step, &stored.order).await;
            let (to, status, reason) = match result {
                Ok(Outcome::Done) => match step {
                    Step::Reserve => (Step::Charge, OrderStatus::Pending, None),
                    Step::Charge => (Step::Commit, OrderStatus::Pending, None),
                    Step::Commit => (Step::Done, OrderStatus::Confirmed, None),
                    Step::Refund => (Step::Release, OrderStatus::Pending, None),
                    Step::Release | Step::Done => (Step::Done, OrderStatus::Cancelled, None),
                },
                Ok(Outcome::Failed(reason)) => {
                    (compensation_for(step), OrderStatus::Pending, Some(reason))
                }
                Err(status) => {
                    attempts += 1;
                    // Once charged, the commit is retried until it succeeds or the
                    // reservation is gone for good: giving up would refund an order
                    // whose stock may already be committed.
                    let forward = matches!(step, Step::Reserve | Step::Charge);
                    if forward && attempts >= FORWARD_ATTEMPTS {
                        tracing::warn!(%order_id, step = step.as_str(), "giving up after {attempts} attempts, compensating; last: {status}");
                        let reason = match step {
                            Step::Reserve => "inventory did not answer; no stock was reserved",
                            _ => "payments did not answer; any charge is refunded",
                        };
                        (
                            compensation_for(step),
                            OrderStatus::Pending,
                            Some(reason.to_owned()),
                        )
                    } else {
                        if step == Step::Refund {
                            metrics().refund_failed(status.code());
                            if attempts >= REFUND_ALERT_AFTER {
                                tracing::error!(%order_id, attempt = attempts, "refund keeps failing; the order's money stays taken until it succeeds: {status}");
                            } else {
                                tracing::warn!(%order_id, attempt = attempts, "refund failed, retrying: {status}");
                            }
                        }
                        tracing::info!(%order_id, step = step.as_str(), attempt = attempts, "step failed, retrying: {status}");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(BACKOFF_CAP);
                        continue;
                    }
                }
            };
            if store::transition(&self.pool, order_id, step, to, status, reason.as_deref()).await? {
                tracing::info!(%order_id, from = step.as_str(), to = to.as_str(), "saga step");
                if status == OrderStatus::Confirmed
                    && let Some(teller) = &self.recommendations
                {
                    teller.tell(&stored.order);
                }
                attempts = 0;
                backoff = BACKOFF_START;
                self.publish(order_id).await?;
            }
        }
    }

    /// Runs one step. `Err` is retried (with backoff); `Ok(Failed)` is
    /// final and starts the compensation.
    async fn run_step(&self, step: Step, order: &Order) -> Result<Outcome, Status> {
        let order_id = order.order_id.clone();
        match step {
            Step::Reserve => {
                let items = order
                    .items
                    .iter()
                    .map(|i| LineItem {
                        product_id: i.product_id.clone(),
                        quantity: i.quantity,
                    })
                    .collect();
                let reserved = self
                    .inventory
                    .clone()
                    .reserve_stock(ReserveStockRequest {
                        reservation_id: order_id,
                        items,
                    })
                    .await;
                match reserved {
                    // A tombstone: the reservation was released before (an
                    // expiry); charging for it would only be refunded.
                    Ok(r) if r.get_ref().state() == ReservationState::Released => {
                        Ok(Outcome::Failed(RESERVATION_GONE.to_owned()))
                    }
                    Ok(_) => Ok(Outcome::Done),
                    Err(status) if is_transient(&status) => Err(status),
                    Err(status) => {
                        tracing::info!(order_id = %order.order_id, "reservation refused: {status}");
                        Ok(Outcome::Failed(stock_reason(order, &status)))
                    }
                }
            }
            Step::Charge => {
                let charged = self
                    .payments
                    .clone()
                    .create_charge(CreateChargeRequest {
                        account_id: order.payment_account_id.clone(),
                        amount: order.total.clone(),
                        idempotency_key: charge_key(&order_id),
                        reference: format!("order {order_id}"),
                        // Payments checks the account is the user's again.
                        expected_owner_id: order.user_id.clone(),
                    })
                    .await;
                match charged {
                    Ok(_) => Ok(Outcome::Done),
                    Err(status) if is_transient(&status) => Err(status),
                    Err(status) => {
                        tracing::info!(%order_id, "charge refused: {status}");
                        Ok(Outcome::Failed(
                            self.charge_reason(&order_id, &status).await,
                        ))
                    }
                }
            }
            Step::Commit => {
                let committed = self
                    .inventory
                    .clone()
                    .commit_reservation(CommitReservationRequest {
                        reservation_id: order_id.clone(),
                    })
                    .await;
                match committed {
                    Ok(r) if r.get_ref().state() == ReservationState::Committed => {
                        Ok(Outcome::Done)
                    }
                    Ok(r) => {
                        tracing::warn!(%order_id, state = ?r.get_ref().state(), "commit answered a reservation that is not committed");
                        Ok(Outcome::Failed(RESERVATION_GONE.to_owned()))
                    }
                    Err(status)
                        if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) =>
                    {
                        tracing::info!(%order_id, "reservation gone before commit: {status}");
                        Ok(Outcome::Failed(RESERVATION_GONE.to_owned()))
                    }
                    // The money is taken: anything else is retried, never compensated.
                    Err(status) => Err(status),
                }
            }
            // Every refund error is retried: the key makes a repeat harmless,
            // and giving up would leave a cancelled order's money taken.
            Step::Refund => self
                .payments
                .clone()
                .refund_charge(RefundChargeRequest {
                    charge_idempotency_key: charge_key(&order_id),
                })
                .await
                .map(|_| Outcome::Done),
            Step::Release => {
                let released = self
                    .inventory
                    .clone()
                    .release_reservation(ReleaseReservationRequest {
                        reservation_id: order_id,
                    })
                    .await;
                match released {
                    Ok(_) => Ok(Outcome::Done),
                    Err(status) if is_transient(&status) => Err(status),
                    // Refused for good (bad data): the order still ends, and
                    // inventory's expiry sweep returns any stock held.
                    Err(status) => {
                        tracing::error!(order_id = %order.order_id, "release refused: {status}");
                        Ok(Outcome::Done)
                    }
                }
            }
            Step::Done => Ok(Outcome::Done),
        }
    }

    /// Why a charge was refused, in our words: payments' own message names
    /// balances, so the stored charge's state tells a decline apart.
    async fn charge_reason(&self, order_id: &str, status: &Status) -> String {
        if status.code() == Code::NotFound {
            return "the payment account does not exist".to_owned();
        }
        let charge = self
            .payments
            .clone()
            .get_charge(GetChargeRequest {
                charge_idempotency_key: charge_key(order_id),
            })
            .await;
        match charge {
            Ok(c) if c.get_ref().state() == ChargeState::Declined => {
                "insufficient funds".to_owned()
            }
            _ => "payment refused".to_owned(),
        }
    }
}

/// Why stock could not be reserved, in our words. The product named is
/// one of the order's own (found in inventory's message), never the
/// message itself.
fn stock_reason(order: &Order, status: &Status) -> String {
    let product = order
        .items
        .iter()
        .find(|i| status.message().contains(&i.product_id));
    match (status.code(), product) {
        (Code::FailedPrecondition, Some(item)) => {
            format!("insufficient stock for product {}", item.product_id)
        }
        (Code::FailedPrecondition, None) => "insufficient stock".to_owned(),
        (Code::NotFound, Some(item)) => format!("product {} does not exist", item.product_id),
        (Code::NotFound, None) => "a product of the order does not exist".to_owned(),
        _ => "stock reservation refused".to_owned(),
    }
}

/// Where compensation starts when `step` fails: undo everything that may
/// have happened before it (refunding a key never charged voids it).
fn compensation_for(step: Step) -> Step {
    match step {
        Step::Reserve => Step::Release,
        _ => Step::Refund,
    }
}

fn jitter(base: Duration) -> Duration {
    // ±20% so retries of many orders do not march in step.
    let factor = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(factor)
}
