use std::time::Duration;

use shop_api::inventory::v1::{
    AdjustStockRequest, CommitReservationRequest, CreateProductRequest, GetProductRequest,
    GetReservationRequest, LineItem, ListProductsRequest, ListProductsResponse, Product,
    ReleaseReservationRequest, Reservation, ReservationState, ReserveStockRequest,
    inventory_service_server,
};
use shop_kit::{db, time, validate};
use sqlx::{Any, AnyPool, Row, Transaction, any::AnyRow};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The inventory service's gRPC implementation.
#[derive(Clone, Debug)]
pub struct InventoryService {
    pool: AnyPool,
    reservation_ttl: Duration,
}

macro_rules! product_columns {
    () => {
        "product_id, sku, name, currency_code, price_minor, available, reserved, committed, created_at"
    };
}

fn product_from_row(row: &AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        product_id: row.try_get("product_id")?,
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price: Some(validate::money(
            row.try_get::<&str, _>("currency_code")?,
            row.try_get("price_minor")?,
        )),
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
        committed: row.try_get("committed")?,
        created_at: Some(time::timestamp(row.try_get("created_at")?)),
    })
}

fn sku(value: &str) -> Result<&str, Status> {
    if value.is_empty() {
        return Err(validate::invalid("sku", "is required"));
    }
    let ok = value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(validate::invalid(
            "sku",
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'",
        ));
    }
    Ok(value)
}

/// Validated line items, in lock order.
fn line_items(items: &[LineItem]) -> Result<Vec<(String, i64)>, Status> {
    let items = items.iter().map(|i| (i.product_id.as_str(), i.quantity));
    Ok(validate::line_items(items)?
        .into_iter()
        .map(|(_, id, quantity)| (id, quantity))
        .collect())
}

fn state_name(state: ReservationState) -> &'static str {
    match state {
        ReservationState::Committed => "COMMITTED",
        ReservationState::Released => "RELEASED",
        _ => "RESERVED",
    }
}

/// Why a reservation in `state` cannot be committed.
fn released(reservation_id: &str, state: ReservationState) -> Status {
    Status::failed_precondition(format!(
        "reservation {reservation_id} is {} (released or expired) and cannot be committed",
        state_name(state)
    ))
}

fn state_from(name: &str) -> ReservationState {
    match name {
        "COMMITTED" => ReservationState::Committed,
        "RELEASED" => ReservationState::Released,
        _ => ReservationState::Reserved,
    }
}

impl InventoryService {
    /// The service over `pool`; reservations expire after `reservation_ttl`.
    pub fn new(pool: AnyPool, reservation_ttl: Duration) -> Self {
        Self {
            pool,
            reservation_ttl,
        }
    }

    async fn product(&self, product_id: &str) -> Result<Product, Status> {
        let row = sqlx::query(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products WHERE product_id = $1"
        ))
        .bind(product_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db::status)?;
        match row {
            Some(row) => product_from_row(&row).map_err(db::status),
            None => Err(Status::not_found(format!(
                "product {product_id} does not exist"
            ))),
        }
    }

    async fn load_reservation(
        tx: &mut Transaction<'static, Any>,
        reservation_id: &str,
    ) -> Result<Option<Reservation>, sqlx::Error> {
        let Some(row) = sqlx::query(
            "SELECT reservation_id, state, created_at FROM reservations WHERE reservation_id = $1",
        )
        .bind(reservation_id)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(None);
        };
        let items = sqlx::query(
            "SELECT product_id, quantity FROM reservation_items \
             WHERE reservation_id = $1 ORDER BY product_id",
        )
        .bind(reservation_id)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            Ok(LineItem {
                product_id: r.try_get("product_id")?,
                quantity: r.try_get("quantity")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(Reservation {
            reservation_id: row.try_get("reservation_id")?,
            state: state_from(row.try_get::<&str, _>("state")?) as i32,
            items,
            created_at: Some(time::timestamp(row.try_get("created_at")?)),
        }))
    }

    /// Moves a live reservation's stock back to available, or commits it.
    /// Returns `false` if the reservation was not `RESERVED` any more (the
    /// caller must then answer with its real state, not the one it asked for).
    async fn finish(
        tx: &mut Transaction<'static, Any>,
        reservation: &Reservation,
        to: ReservationState,
    ) -> Result<bool, sqlx::Error> {
        // The state guard makes a concurrent second finish a no-op.
        let moved = sqlx::query(
            "UPDATE reservations SET state = $1, updated_at = $2 \
             WHERE reservation_id = $3 AND state = 'RESERVED'",
        )
        .bind(state_name(to))
        .bind(time::now_millis())
        .bind(&reservation.reservation_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        let update = match to {
            ReservationState::Committed => {
                "UPDATE products SET reserved = reserved - $1, committed = committed + $1 \
                 WHERE product_id = $2"
            }
            _ => {
                "UPDATE products SET reserved = reserved - $1, available = available + $1 \
                 WHERE product_id = $2"
            }
        };
        for item in &reservation.items {
            sqlx::query(update)
                .bind(item.quantity)
                .bind(&item.product_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(true)
    }

    async fn release(&self, reservation_id: &str) -> Result<Reservation, Status> {
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        let reservation = match Self::load_reservation(&mut tx, reservation_id)
            .await
            .map_err(db::status)?
        {
            Some(r) => r,
            None => {
                // A tombstone: a reserve that arrives after its release must not hold stock.
                let now = time::now_millis();
                sqlx::query(
                    "INSERT INTO reservations (reservation_id, state, created_at, expires_at, updated_at) \
                     VALUES ($1, 'RELEASED', $2, $2, $2)",
                )
                .bind(reservation_id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db::status)?;
                tx.commit().await.map_err(db::status)?;
                return Ok(Reservation {
                    reservation_id: reservation_id.to_owned(),
                    state: ReservationState::Released as i32,
                    items: vec![],
                    created_at: Some(time::timestamp(now)),
                });
            }
        };
        match reservation.state() {
            ReservationState::Released => return Ok(reservation),
            ReservationState::Committed => {
                return Err(Status::failed_precondition(format!(
                    "reservation {reservation_id} was committed; committed stock cannot be released"
                )));
            }
            _ => {}
        }
        if !Self::finish(&mut tx, &reservation, ReservationState::Released)
            .await
            .map_err(db::status)?
        {
            // Finished by someone else between our read and our write.
            return match Self::current(&mut tx, reservation_id).await? {
                current if current.state() == ReservationState::Released => Ok(current),
                current => Err(Status::failed_precondition(format!(
                    "reservation {reservation_id} was {} meanwhile; committed stock cannot be released",
                    state_name(current.state())
                ))),
            };
        }
        tx.commit().await.map_err(db::status)?;
        Ok(Reservation {
            state: ReservationState::Released as i32,
            ..reservation
        })
    }

    /// The reservation as committed now: after a guarded update matched no
    /// row, a new statement sees the transaction that won (PostgreSQL's
    /// READ COMMITTED; SQLite serializes writers, so it never gets here
    /// with a stale read).
    async fn current(
        tx: &mut Transaction<'static, Any>,
        reservation_id: &str,
    ) -> Result<Reservation, Status> {
        Self::load_reservation(tx, reservation_id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| {
                Status::not_found(format!("reservation {reservation_id} does not exist"))
            })
    }

    /// Releases reservations past their expiry until `stop` is cancelled.
    pub async fn release_expired_forever(self, stop: CancellationToken) {
        // Check twice per TTL, between every 100 ms and every 5 s.
        let every =
            (self.reservation_ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.release_expired().await {
                tracing::warn!("releasing expired reservations failed: {}", e.message());
            }
        }
    }

    /// Releases every reservation past its expiry; returns how many.
    pub async fn release_expired(&self) -> Result<usize, Status> {
        let ids: Vec<String> = sqlx::query(
            "SELECT reservation_id FROM reservations WHERE state = 'RESERVED' AND expires_at < $1 \
             ORDER BY expires_at LIMIT 100",
        )
        .bind(time::now_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(db::status)?
        .iter()
        .map(|row| row.try_get("reservation_id"))
        .collect::<Result<_, _>>()
        .map_err(db::status)?;
        let mut released = 0;
        for id in &ids {
            tracing::info!(reservation_id = %id, "releasing expired reservation");
            match self.release(id).await {
                Ok(_) => released += 1,
                // Committed since it was listed: not expired any more; the rest still are.
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(reservation_id = %id, "not released: {}", status.message());
                }
                Err(status) => return Err(status),
            }
        }
        Ok(released)
    }
}

#[tonic::async_trait]
impl inventory_service_server::InventoryService for InventoryService {
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let req = request.into_inner();
        let sku = sku(&req.sku)?;
        let name = validate::text("name", &req.name, 1, 200)?;
        let (currency, price) = validate::positive_money("price", req.price.as_ref())?;
        if !(0..=1_000_000_000).contains(&req.initial_stock) {
            return Err(validate::invalid(
                "initial_stock",
                format!("must be 0 to 1000000000, got {}", req.initial_stock),
            ));
        }
        let product_id = uuid::Uuid::new_v4().to_string();
        let now = time::now_millis();
        let inserted = sqlx::query(
            "INSERT INTO products (product_id, sku, name, currency_code, price_minor, available, \
             reserved, committed, received, created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $6, $7)",
        )
        .bind(&product_id)
        .bind(sku)
        .bind(name)
        .bind(currency)
        .bind(price)
        .bind(req.initial_stock)
        .bind(now)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(Response::new(Product {
                product_id,
                sku: sku.to_owned(),
                name: name.to_owned(),
                price: Some(validate::money(currency, price)),
                available: req.initial_stock,
                reserved: 0,
                committed: 0,
                created_at: Some(time::timestamp(now)),
            })),
            Err(e) if db::is_unique_violation(&e) => Err(Status::already_exists(format!(
                "a product with sku {sku:?} already exists"
            ))),
            Err(e) => Err(db::status(e)),
        }
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let id = validate::uuid("product_id", &request.get_ref().product_id)?;
        self.product(&id).await.map(Response::new)
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let req = request.into_inner();
        let limit = validate::page_size("page_size", req.page_size)?;
        let after = if req.page_token.is_empty() {
            ""
        } else {
            sku(&req.page_token).map_err(|_| {
                validate::invalid("page_token", "is not a token from a previous response")
            })?
        };
        // One extra row tells whether another page exists.
        let rows = sqlx::query(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products WHERE sku > $1 ORDER BY sku LIMIT $2"
        ))
        .bind(after)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db::status)?;
        let mut products = rows
            .iter()
            .map(product_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db::status)?;
        let next_page_token = if products.len() as i64 > limit {
            products.truncate(limit as usize);
            products.last().map(|p| p.sku.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListProductsResponse {
            products,
            next_page_token,
        }))
    }

    async fn adjust_stock(
        &self,
        request: Request<AdjustStockRequest>,
    ) -> Result<Response<Product>, Status> {
        let req = request.into_inner();
        let id = validate::uuid("product_id", &req.product_id)?;
        if req.delta == 0 || req.delta.abs() > 1_000_000_000 {
            return Err(validate::invalid(
                "delta",
                format!(
                    "must be non-zero and at most 1000000000 in size, got {}",
                    req.delta
                ),
            ));
        }
        let updated = sqlx::query(
            "UPDATE products SET available = available + $1, received = received + $1 \
             WHERE product_id = $2 AND available + $1 >= 0",
        )
        .bind(req.delta)
        .bind(&id)
        .execute(&self.pool)
        .await
        .map_err(db::status)?
        .rows_affected();
        let product = self.product(&id).await?;
        if updated == 0 {
            return Err(Status::failed_precondition(format!(
                "cannot remove {} from product {id}: only {} available",
                -req.delta, product.available
            )));
        }
        Ok(Response::new(product))
    }

    async fn reserve_stock(
        &self,
        request: Request<ReserveStockRequest>,
    ) -> Result<Response<Reservation>, Status> {
        let req = request.into_inner();
        let reservation_id = validate::uuid("reservation_id", &req.reservation_id)?;
        let items = line_items(&req.items)?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        if let Some(existing) = Self::load_reservation(&mut tx, &reservation_id)
            .await
            .map_err(db::status)?
        {
            let same = existing.state() == ReservationState::Released && existing.items.is_empty()
                || existing
                    .items
                    .iter()
                    .map(|i| (i.product_id.clone(), i.quantity))
                    .eq(items.iter().cloned());
            if !same {
                return Err(Status::already_exists(format!(
                    "reservation {reservation_id} already exists with different items"
                )));
            }
            return Ok(Response::new(existing));
        }
        let now = time::now_millis();
        let expires = now + self.reservation_ttl.as_millis() as i64;
        let inserted = sqlx::query(
            "INSERT INTO reservations (reservation_id, state, created_at, expires_at, updated_at) \
             VALUES ($1, 'RESERVED', $2, $3, $2)",
        )
        .bind(&reservation_id)
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if db::is_unique_violation(&e) {
                // A concurrent reserve with the same id won; answer with its result.
                drop(tx);
                let mut tx = self.pool.begin().await.map_err(db::status)?;
                let existing = Self::load_reservation(&mut tx, &reservation_id)
                    .await
                    .map_err(db::status)?;
                return existing
                    .map(Response::new)
                    .ok_or_else(|| Status::aborted("concurrent reservation; retry"));
            }
            return Err(db::status(e));
        }
        for (product_id, quantity) in &items {
            let moved = sqlx::query(
                "UPDATE products SET available = available - $1, reserved = reserved + $1 \
                 WHERE product_id = $2 AND available >= $1",
            )
            .bind(quantity)
            .bind(product_id)
            .execute(&mut *tx)
            .await
            .map_err(db::status)?
            .rows_affected();
            if moved == 0 {
                let available: Option<i64> =
                    sqlx::query("SELECT available FROM products WHERE product_id = $1")
                        .bind(product_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db::status)?
                        .map(|row| row.try_get("available"))
                        .transpose()
                        .map_err(db::status)?;
                // Dropping the transaction rolls back what was reserved so far.
                return Err(match available {
                    None => Status::not_found(format!("product {product_id} does not exist")),
                    Some(available) => Status::failed_precondition(format!(
                        "insufficient stock for product {product_id}: requested {quantity}, available {available}"
                    )),
                });
            }
            sqlx::query(
                "INSERT INTO reservation_items (reservation_id, product_id, quantity) VALUES ($1, $2, $3)",
            )
            .bind(&reservation_id)
            .bind(product_id)
            .bind(quantity)
            .execute(&mut *tx)
            .await
            .map_err(db::status)?;
        }
        tx.commit().await.map_err(db::status)?;
        Ok(Response::new(Reservation {
            reservation_id,
            state: ReservationState::Reserved as i32,
            items: items
                .into_iter()
                .map(|(product_id, quantity)| LineItem {
                    product_id,
                    quantity,
                })
                .collect(),
            created_at: Some(time::timestamp(now)),
        }))
    }

    async fn commit_reservation(
        &self,
        request: Request<CommitReservationRequest>,
    ) -> Result<Response<Reservation>, Status> {
        let id = validate::uuid("reservation_id", &request.get_ref().reservation_id)?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        let reservation = Self::load_reservation(&mut tx, &id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| Status::not_found(format!("reservation {id} does not exist")))?;
        match reservation.state() {
            ReservationState::Committed => return Ok(Response::new(reservation)),
            ReservationState::Released => return Err(released(&id, ReservationState::Released)),
            _ => {}
        }
        // The guard can miss: the expiry sweeper (or a release) may finish the
        // reservation between the read above and this write. Answering
        // COMMITTED then would sell stock that is available again.
        if !Self::finish(&mut tx, &reservation, ReservationState::Committed)
            .await
            .map_err(db::status)?
        {
            let current = Self::current(&mut tx, &id).await?;
            return match current.state() {
                ReservationState::Committed => Ok(Response::new(current)),
                state => {
                    tracing::warn!(reservation_id = %id, state = state_name(state), "commit lost the race with a release");
                    Err(released(&id, state))
                }
            };
        }
        tx.commit().await.map_err(db::status)?;
        Ok(Response::new(Reservation {
            state: ReservationState::Committed as i32,
            ..reservation
        }))
    }

    async fn release_reservation(
        &self,
        request: Request<ReleaseReservationRequest>,
    ) -> Result<Response<Reservation>, Status> {
        let id = validate::uuid("reservation_id", &request.get_ref().reservation_id)?;
        self.release(&id).await.map(Response::new)
    }

    async fn get_reservation(
        &self,
        request: Request<GetReservationRequest>,
    ) -> Result<Response<Reservation>, Status> {
        let id = validate::uuid("reservation_id", &request.get_ref().reservation_id)?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        Self::load_reservation(&mut tx, &id)
            .await
            .map_err(db::status)?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("reservation {id} does not exist")))
    }
}
