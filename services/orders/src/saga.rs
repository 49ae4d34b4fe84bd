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

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_client::MeshChannel;
use shop_api::{
    inventory::v1::{
        CommitReservationRequest, LineItem, ReleaseReservationRequest, ReserveStockRequest,
        inventory_service_client::InventoryServiceClient,
    },
    orders::v1::{Order, OrderStatus},
    payments::v1::{
        CreateChargeRequest, RefundChargeRequest, payments_service_client::PaymentsServiceClient,
    },
};
use sqlx::AnyPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::store::{self, Step};

/// Forward-step attempts on transient errors before compensating.
pub const FORWARD_ATTEMPTS: u32 = 6;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
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
    events: broadcast::Sender<Order>,
    /// Orders this process is driving now, so it never drives one twice.
    running: Arc<Mutex<HashSet<String>>>,
}

enum Outcome {
    /// The step took effect.
    Done,
    /// The step cannot succeed; compensate with this reason.
    Failed(String),
}

fn is_transient(status: &Status) -> bool {
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
            events: broadcast::channel(1024).0,
            running: Arc::default(),
        }
    }

    /// Every order change this process makes.
    pub fn subscribe(&self) -> broadcast::Receiver<Order> {
        self.events.subscribe()
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
        if let Some(stored) = store::load(&self.pool, order_id).await? {
            // No subscribers is fine.
            let _ = self.events.send(stored.order);
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
                        let reason = format!(
                            "step {} failed {attempts} times, last: {}: {}",
                            step.as_str(),
                            status.code(),
                            status.message()
                        );
                        (compensation_for(step), OrderStatus::Pending, Some(reason))
                    } else {
                        tracing::info!(%order_id, step = step.as_str(), attempt = attempts, "transient failure, retrying: {status}");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(BACKOFF_CAP);
                        continue;
                    }
                }
            };
            if store::transition(&self.pool, order_id, step, to, status, reason.as_deref()).await? {
                tracing::info!(%order_id, from = step.as_str(), to = to.as_str(), "saga step");
                attempts = 0;
                backoff = BACKOFF_START;
                self.publish(order_id).await?;
            }
        }
    }

    /// Runs one step. `Err` is transient (retry); `Ok(Failed)` is final.
    async fn run_step(&self, step: Step, order: &Order) -> Result<Outcome, Status> {
        let order_id = order.order_id.clone();
        let call = match step {
            Step::Reserve => {
                let items = order
                    .items
                    .iter()
                    .map(|i| LineItem {
                        product_id: i.product_id.clone(),
                        quantity: i.quantity,
                    })
                    .collect();
                self.inventory
                    .clone()
                    .reserve_stock(ReserveStockRequest {
                        reservation_id: order_id,
                        items,
                    })
                    .await
                    .map(drop)
            }
            Step::Charge => self
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
                .await
                .map(drop),
            Step::Commit => self
                .inventory
                .clone()
                .commit_reservation(CommitReservationRequest {
                    reservation_id: order_id,
                })
                .await
                .map(drop),
            Step::Refund => self
                .payments
                .clone()
                .refund_charge(RefundChargeRequest {
                    charge_idempotency_key: charge_key(&order_id),
                })
                .await
                .map(drop),
            Step::Release => self
                .inventory
                .clone()
                .release_reservation(ReleaseReservationRequest {
                    reservation_id: order_id,
                })
                .await
                .map(drop),
            Step::Done => Ok(()),
        };
        match call {
            Ok(()) => Ok(Outcome::Done),
            Err(status) if is_transient(&status) => Err(status),
            Err(status) => match step {
                Step::Reserve | Step::Charge | Step::Commit => Ok(Outcome::Failed(format!(
                    "{} failed: {}",
                    step.as_str(),
                    status.message()
                ))),
                // A compensation refused for good (bad data) must still end the order.
                Step::Refund | Step::Release | Step::Done => {
                    tracing::error!(order_id = %order.order_id, step = step.as_str(), "compensation refused: {status}");
                    Ok(Outcome::Done)
                }
            },
        }
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
