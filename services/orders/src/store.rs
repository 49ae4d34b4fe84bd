//! The orders database: orders, their items, and each order's saga step.

use shop_api::orders::v1::{Order, OrderItem, OrderStatus};
use shop_kit::{time, validate};
use sqlx::{AnyPool, Row, any::AnyRow};

/// The saga step an order runs next. Forward steps first, then the
/// compensations, which always run to completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Reserve,
    Charge,
    Commit,
    Refund,
    Release,
    Done,
}

impl Step {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Step::Reserve => "reserve",
            Step::Charge => "charge",
            Step::Commit => "commit",
            Step::Refund => "refund",
            Step::Release => "release",
            Step::Done => "done",
        }
    }

    fn parse(name: &str) -> Step {
        match name {
            "reserve" => Step::Reserve,
            "charge" => Step::Charge,
            "commit" => Step::Commit,
            "refund" => Step::Refund,
            "release" => Step::Release,
            _ => Step::Done,
        }
    }
}

pub(crate) fn status_name(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Confirmed => "CONFIRMED",
        OrderStatus::Cancelled => "CANCELLED",
        _ => "PENDING",
    }
}

fn status_from(name: &str) -> OrderStatus {
    match name {
        "CONFIRMED" => OrderStatus::Confirmed,
        "CANCELLED" => OrderStatus::Cancelled,
        _ => OrderStatus::Pending,
    }
}

/// An order as stored, with the step its saga is at.
#[derive(Clone, Debug)]
pub(crate) struct StoredOrder {
    pub(crate) order: Order,
    pub(crate) step: Step,
    pub(crate) request_digest: String,
}

/// A validated order to insert.
pub(crate) struct NewOrder<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) idempotency_key: &'a str,
    pub(crate) request_digest: &'a str,
    pub(crate) payment_account_id: &'a str,
    pub(crate) currency: &'a str,
    pub(crate) total: i64,
    pub(crate) items: &'a [OrderItem],
}

macro_rules! order_columns {
    () => {
        "order_id, user_id, request_digest, payment_account_id, currency_code, total_minor, \
         status, saga_step, cancel_reason, created_at, updated_at"
    };
}

fn order_from_row(row: &AnyRow, items: Vec<OrderItem>) -> Result<StoredOrder, sqlx::Error> {
    let step = Step::parse(row.try_get::<&str, _>("saga_step")?);
    Ok(StoredOrder {
        order: Order {
            order_id: row.try_get("order_id")?,
            user_id: row.try_get("user_id")?,
            items,
            total: Some(validate::money(
                row.try_get::<&str, _>("currency_code")?,
                row.try_get("total_minor")?,
            )),
            payment_account_id: row.try_get("payment_account_id")?,
            status: status_from(row.try_get::<&str, _>("status")?) as i32,
            cancel_reason: row.try_get("cancel_reason")?,
            saga_step: step.as_str().to_owned(),
            created_at: Some(time::timestamp(row.try_get("created_at")?)),
            updated_at: Some(time::timestamp(row.try_get("updated_at")?)),
        },
        step,
        request_digest: row.try_get("request_digest")?,
    })
}

async fn items_of(pool: &AnyPool, order_id: &str) -> Result<Vec<OrderItem>, sqlx::Error> {
    sqlx::query(
        "SELECT product_id, quantity, currency_code, unit_price_minor FROM order_items \
         WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| {
        Ok(OrderItem {
            product_id: row.try_get("product_id")?,
            quantity: row.try_get("quantity")?,
            unit_price: Some(validate::money(
                row.try_get::<&str, _>("currency_code")?,
                row.try_get("unit_price_minor")?,
            )),
        })
    })
    .collect()
}

/// Inserts a new order whose saga starts at [`Step::Reserve`]; `Ok(None)`
/// if the user already placed one with this idempotency key.
pub(crate) async fn insert(
    pool: &AnyPool,
    new: NewOrder<'_>,
) -> Result<Option<String>, sqlx::Error> {
    let order_id = uuid::Uuid::new_v4().to_string();
    let now = time::now_millis();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (order_id, user_id, idempotency_key, request_digest, payment_account_id, \
         currency_code, total_minor, status, saga_step, cancel_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'PENDING', 'reserve', '', $8, $8)",
    )
    .bind(&order_id)
    .bind(new.user_id)
    .bind(new.idempotency_key)
    .bind(new.request_digest)
    .bind(new.payment_account_id)
    .bind(new.currency)
    .bind(new.total)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if shop_kit::db::is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    for item in new.items {
        let price = item.unit_price.clone().unwrap_or_default();
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, quantity, currency_code, unit_price_minor) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&order_id)
        .bind(&item.product_id)
        .bind(item.quantity)
        .bind(&price.currency_code)
        .bind(price.amount_minor)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Some(order_id))
}

/// The order with this id.
pub(crate) async fn load(
    pool: &AnyPool,
    order_id: &str,
) -> Result<Option<StoredOrder>, sqlx::Error> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let items = items_of(pool, order_id).await?;
    order_from_row(&row, items).map(Some)
}

/// The order a user placed with this idempotency key.
pub(crate) async fn find_by_key(
    pool: &AnyPool,
    user_id: &str,
    key: &str,
) -> Result<Option<StoredOrder>, sqlx::Error> {
    let id: Option<String> =
        sqlx::query("SELECT order_id FROM orders WHERE user_id = $1 AND idempotency_key = $2")
            .bind(user_id)
            .bind(key)
            .fetch_optional(pool)
            .await?
            .map(|row| row.try_get("order_id"))
            .transpose()?;
    match id {
        Some(id) => load(pool, &id).await,
        None => Ok(None),
    }
}

/// Moves an order from step `from` to `to` (and to `status`), only if it is
/// still at `from`: a second driver of the same order cannot move it twice.
pub(crate) async fn transition(
    pool: &AnyPool,
    order_id: &str,
    from: Step,
    to: Step,
    status: OrderStatus,
    cancel_reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE orders SET saga_step = $1, status = $2, \
         cancel_reason = CASE WHEN $3 = '' THEN cancel_reason ELSE $3 END, updated_at = $4 \
         WHERE order_id = $5 AND saga_step = $6",
    )
    .bind(to.as_str())
    .bind(status_name(status))
    .bind(cancel_reason.unwrap_or(""))
    .bind(time::now_millis())
    .bind(order_id)
    .bind(from.as_str())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

/// How many of a user's orders are not final yet (PENDING: their saga
/// still runs, so their stock may be reserved).
pub(crate) async fn pending_count(pool: &AnyPool, user_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE user_id = $1 AND status = 'PENDING'")
        .bind(user_id)
        .fetch_one(pool)
        .await?
        .try_get("n")
}

/// Orders whose saga has not finished and that nobody touched since
/// `idle_since` (Unix ms).
pub(crate) async fn unfinished(
    pool: &AnyPool,
    idle_since: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query(
        "SELECT order_id FROM orders WHERE saga_step <> 'done' AND updated_at <= $1 \
         ORDER BY updated_at LIMIT 500",
    )
    .bind(idle_since)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| row.try_get("order_id"))
    .collect()
}

/// A page of a user's orders, newest first, after the `(created_at,
/// order_id)` cursor.
pub(crate) async fn list(
    pool: &AnyPool,
    user_id: &str,
    after: Option<(i64, String)>,
    limit: i64,
) -> Result<Vec<StoredOrder>, sqlx::Error> {
    let (created, id) = after.unwrap_or((i64::MAX, String::new()));
    let rows = sqlx::query(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE user_id = $1 AND (created_at < $2 OR (created_at = $2 AND order_id < $3)) \
         ORDER BY created_at DESC, order_id DESC LIMIT $4"
    ))
    .bind(user_id)
    .bind(created)
    .bind(if id.is_empty() { "\u{10FFFF}".to_owned() } else { id })
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut orders = Vec::with_capacity(rows.len());
    for row in rows {
        let order_id: String = row.try_get("order_id")?;
        let items = items_of(pool, &order_id).await?;
        orders.push(order_from_row(&row, items)?);
    }
    Ok(orders)
}
