use std::pin::Pin;

use futures::Stream;
use mesh_client::MeshChannel;
use shop_api::{
    inventory::v1::{GetProductRequest, inventory_service_client::InventoryServiceClient},
    orders::v1::{
        GetOrderRequest, ListOrdersRequest, ListOrdersResponse, Order, OrderItem, OrderStatus,
        PlaceOrderRequest, WatchOrderRequest, orders_service_server,
    },
    payments::v1::{GetAccountRequest, payments_service_client::PaymentsServiceClient},
};
use shop_kit::{db, token::UserTokens, validate};
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::{
    Saga,
    store::{self, NewOrder},
};

/// The orders service's gRPC implementation.
#[derive(Clone)]
pub struct OrdersService {
    pool: AnyPool,
    saga: Saga,
    users: UserTokens,
    inventory: InventoryServiceClient<MeshChannel>,
    payments: PaymentsServiceClient<MeshChannel>,
    draining: CancellationToken,
}

/// Orders one user may have PENDING at once. PlaceOrder reserves stock
/// before it charges, so without a cap a user with an empty account could
/// hold a product's whole stock reserved; the next order is refused with
/// `RESOURCE_EXHAUSTED` until one is confirmed or cancelled. A person has
/// a handful in progress; 10 leaves room for sagas a rolling restart
/// pauses (one client ordering ~100/s through one saw up to 5 pending).
/// Checked before the insert, not with it: concurrent placements of one
/// user can pass it together, at most once each.
pub const MAX_PENDING_ORDERS_PER_USER: i64 = 10;

/// A callee's answer as this service's answer: the callee's own words for
/// caller mistakes, `UNAVAILABLE` naming only the callee for outages.
fn callee_status(callee: &str, status: Status) -> Status {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
            // The mesh's own words name pods, targets and identities: they
            // go to the log, the caller hears which service is down.
            tracing::warn!("{callee} is unavailable: {status}");
            Status::unavailable(format!("{callee} is unavailable; retry shortly"))
        }
        Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented => {
            tracing::error!("{callee} failed: {status}");
            Status::internal("internal error")
        }
        _ => status,
    }
}

impl OrdersService {
    /// The service; `users` checks callers' tokens, `draining` ends watch
    /// streams when the server drains.
    pub fn new(
        pool: AnyPool,
        saga: Saga,
        users: UserTokens,
        inventory: InventoryServiceClient<MeshChannel>,
        payments: PaymentsServiceClient<MeshChannel>,
        draining: CancellationToken,
    ) -> Self {
        Self {
            pool,
            saga,
            users,
            inventory,
            payments,
            draining,
        }
    }

    async fn owned_order(&self, user_id: &str, order_id: &str) -> Result<Order, Status> {
        match store::load(&self.pool, order_id)
            .await
            .map_err(db::status)?
        {
            // Another user's order is reported missing, not forbidden: ids are not to be probed.
            Some(stored) if stored.order.user_id == user_id => Ok(stored.order),
            _ => Err(Status::not_found(format!(
                "order {order_id} does not exist"
            ))),
        }
    }
}

/// The one answer for a payment account that is not the caller's, whether
/// it belongs to another user or does not exist.
fn not_your_account() -> Status {
    Status::permission_denied(
        "payment_account_id: you have no payment account with this id; open one with mesh.payments.v1.WalletService/OpenAccount",
    )
}

fn is_final(order: &Order) -> bool {
    matches!(
        order.status(),
        OrderStatus::Confirmed | OrderStatus::Cancelled
    )
}

fn encode_cursor(order: &Order) -> String {
    validate::page_token(
        shop_kit::time::millis(order.created_at.as_ref()),
        &order.order_id,
    )
}

type OrderStream = Pin<Box<dyn Stream<Item = Result<Order, Status>> + Send>>;

#[tonic::async_trait]
impl orders_service_server::OrdersService for OrdersService {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let user_id = self.users.user(request.metadata()).await?;
        let req = request.into_inner();
        let wanted = validate::line_items(
            req.items
                .iter()
                .map(|i| (i.product_id.as_str(), i.quantity)),
        )?;
        let account_id = validate::uuid("payment_account_id", &req.payment_account_id)?;
        let key = validate::idempotency_key("idempotency_key", &req.idempotency_key)?;
        let digest = std::iter::once(account_id.clone())
            .chain(wanted.iter().map(|(_, id, q)| format!("{id}x{q}")))
            .collect::<Vec<_>>()
            .join(",");

        let repeat = |stored: store::StoredOrder| {
            if stored.request_digest == digest {
                Ok(Response::new(stored.order))
            } else {
                Err(Status::already_exists(format!(
                    "idempotency_key {key:?} was already used for a different order ({}); use a new key",
                    stored.order.order_id
                )))
            }
        };
        if let Some(stored) = store::find_by_key(&self.pool, &user_id, key)
            .await
            .map_err(db::status)?
        {
            return repeat(stored);
        }
        if store::pending_count(&self.pool, &user_id)
            .await
            .map_err(db::status)?
            >= MAX_PENDING_ORDERS_PER_USER
        {
            return Err(Status::resource_exhausted(format!(
                "you have {MAX_PENDING_ORDERS_PER_USER} orders in progress, the most one user may have; wait until one is confirmed or cancelled"
            )));
        }

        // Price every item now; the order keeps the prices it was placed at.
        let lookups = wanted.iter().map(|(i, id, _)| {
            let mut inventory = self.inventory.clone();
            let (i, id) = (*i, id.clone());
            async move {
                inventory
                    .get_product(GetProductRequest {
                        product_id: id.clone(),
                    })
                    .await
                    .map(Response::into_inner)
                    .map_err(|status| match status.code() {
                        Code::NotFound => Status::not_found(format!(
                            "items[{i}].product_id: product {id} does not exist"
                        )),
                        _ => callee_status("inventory", status),
                    })
            }
        });
        let products = futures::future::try_join_all(lookups).await?;
        let mut items = Vec::with_capacity(products.len());
        let mut total: i64 = 0;
        let mut currency = String::new();
        for ((i, id, quantity), product) in wanted.iter().zip(products) {
            let price = product.price.unwrap_or_default();
            if currency.is_empty() {
                currency = price.currency_code.clone();
            } else if currency != price.currency_code {
                return Err(validate::invalid(
                    &format!("items[{i}].product_id"),
                    format!(
                        "product {id} is priced in {}, other items in {currency}; one order takes one currency",
                        price.currency_code
                    ),
                ));
            }
            total = price
                .amount_minor
                .checked_mul(*quantity)
                .and_then(|line| total.checked_add(line))
                .filter(|t| *t <= validate::MAX_AMOUNT_MINOR)
                .ok_or_else(|| validate::invalid("items", "the order total is too large"))?;
            items.push(OrderItem {
                product_id: id.clone(),
                quantity: *quantity,
                unit_price: Some(price),
            });
        }

        let account = self
            .payments
            .clone()
            .get_account(GetAccountRequest {
                account_id: account_id.clone(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => not_your_account(),
                _ => callee_status("payments", status),
            })?
            .into_inner();
        // Only the user's own accounts pay; someone else's reads as missing
        // would, so account ids cannot be probed.
        if account.owner_id != user_id {
            tracing::warn!(%user_id, "order refused: the payment account belongs to someone else");
            return Err(not_your_account());
        }
        let account_currency = account.balance.map(|b| b.currency_code).unwrap_or_default();
        if account_currency != currency {
            return Err(Status::failed_precondition(format!(
                "payment_account_id: account {account_id} holds {account_currency} but the items are priced in {currency}"
            )));
        }

        let new = NewOrder {
            user_id: &user_id,
            idempotency_key: key,
            request_digest: &digest,
            payment_account_id: &account_id,
            currency: &currency,
            total,
            items: &items,
        };
        let Some(order_id) = store::insert(&self.pool, new).await.map_err(db::status)? else {
            // A concurrent request with the same key won the insert.
            let stored = store::find_by_key(&self.pool, &user_id, key)
                .await
                .map_err(db::status)?
                .ok_or_else(|| Status::aborted("concurrent order placement; retry"))?;
            return repeat(stored);
        };
        let stored = store::load(&self.pool, &order_id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| Status::internal("internal error"))?;
        tracing::info!(%order_id, %user_id, total, %currency, "order placed");
        self.saga.start(order_id);
        Ok(Response::new(stored.order))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let user_id = self.users.user(request.metadata()).await?;
        let order_id = validate::uuid("order_id", &request.get_ref().order_id)?;
        self.owned_order(&user_id, &order_id)
            .await
            .map(Response::new)
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let user_id = self.users.user(request.metadata()).await?;
        let req = request.into_inner();
        let limit = validate::page_size("page_size", req.page_size)?;
        let after = validate::page_after("page_token", &req.page_token)?;
        let mut orders: Vec<Order> = store::list(&self.pool, &user_id, after, limit + 1)
            .await
            .map_err(db::status)?
            .into_iter()
            .map(|s| s.order)
            .collect();
        let next_page_token = if orders.len() as i64 > limit {
            orders.truncate(limit as usize);
            orders.last().map(encode_cursor).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOrdersResponse {
            orders,
            next_page_token,
        }))
    }

    type WatchOrderStream = OrderStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let user_id = self.users.user(request.metadata()).await?;
        let order_id = validate::uuid("order_id", &request.get_ref().order_id)?;
        let feeds = self.saga.feeds();
        // Taken first, so a refused or failed lookup holds no slot after it.
        let permit = feeds.permit(&user_id)?;
        let first = self.owned_order(&user_id, &order_id).await?;
        // The order's one feed: a change between the read above and this
        // subscription is caught by the feed's first read of the database.
        let mut feed = feeds.subscribe(&self.pool, &first);
        let draining = self.draining.clone();
        let stream = async_stream(move |tx| async move {
            let _permit = permit;
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() || is_final(&last) {
                return;
            }
            loop {
                // Checked before each wait: the feed may already be ahead of
                // the first read (another watcher's feed, a fast saga).
                let order = feed.borrow_and_update().clone();
                if crate::watch::is_newer(&order, &last) {
                    last = order.clone();
                    if tx.send(Ok(order)).await.is_err() || is_final(&last) {
                        return;
                    }
                }
                tokio::select! {
                    _ = draining.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable(
                            "server is shutting down; watch again to continue",
                        ))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    changed = feed.changed() => if changed.is_err() {
                        // Cannot happen while we hold a receiver; end cleanly if it does.
                        let _ = tx.send(Err(Status::unavailable("watch ended; watch again"))).await;
                        return;
                    },
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel; the task ends when the
/// receiver is dropped (the client went away).
fn async_stream<F, Fut>(body: F) -> OrderStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Order, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
