use shop_api::payments::v1::{
    Account, Charge, ChargeState, CreateChargeRequest, DepositRequest, GetAccountRequest,
    GetChargeRequest, OpenAccountRequest, RefundChargeRequest, payments_service_server,
};
use shop_kit::{db, time, validate};
use sqlx::{Any, AnyPool, Row, Transaction, any::AnyRow};
use tonic::{Request, Response, Status};

use crate::ledger::{EntryKind, MAX_BALANCE_MINOR, SystemAccount, WALLET_MAX_BALANCE_MINOR, post};

/// The payments service's gRPC implementation.
#[derive(Clone, Debug)]
pub struct PaymentsService {
    pool: AnyPool,
}

pub(crate) fn account_from_row(row: &AnyRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        account_id: row.try_get("account_id")?,
        owner_id: row.try_get("owner_id")?,
        balance: Some(validate::money(
            row.try_get::<&str, _>("currency_code")?,
            row.try_get("balance_minor")?,
        )),
        created_at: Some(time::timestamp(row.try_get("created_at")?)),
    })
}

fn charge_state(name: &str) -> ChargeState {
    match name {
        "CAPTURED" => ChargeState::Captured,
        "REFUNDED" => ChargeState::Refunded,
        "DECLINED" => ChargeState::Declined,
        "VOIDED" => ChargeState::Voided,
        _ => ChargeState::Unspecified,
    }
}

fn charge_from_row(row: &AnyRow) -> Result<Charge, sqlx::Error> {
    Ok(Charge {
        charge_id: row.try_get("charge_id")?,
        account_id: row.try_get("account_id")?,
        amount: Some(validate::money(
            row.try_get::<&str, _>("currency_code")?,
            row.try_get("amount_minor")?,
        )),
        idempotency_key: row.try_get("idempotency_key")?,
        state: charge_state(row.try_get::<&str, _>("state")?) as i32,
        reference: row.try_get("reference")?,
        created_at: Some(time::timestamp(row.try_get("created_at")?)),
    })
}

/// The answer a stored charge gives to a repeat of its request.
fn charge_outcome(charge: Charge) -> Result<Charge, Status> {
    match charge.state() {
        ChargeState::Declined => Err(Status::failed_precondition(format!(
            "insufficient funds in account {} for charge {} (this key's first answer)",
            charge.account_id, charge.idempotency_key
        ))),
        ChargeState::Voided => Err(Status::failed_precondition(format!(
            "charge key {} was voided by a refund before it was charged; use a new key",
            charge.idempotency_key
        ))),
        _ => Ok(charge),
    }
}

/// The answer to a charge request whose key is already stored: the first
/// outcome for the same request, ALREADY_EXISTS for a different one (a
/// voided key refuses any request).
fn repeat_outcome(
    first: Charge,
    account_id: &str,
    currency: &str,
    amount: i64,
) -> Result<Charge, Status> {
    let same = first.account_id == account_id
        && first.amount.as_ref() == Some(&validate::money(currency, amount));
    if first.state() != ChargeState::Voided && !same {
        return Err(Status::already_exists(format!(
            "idempotency_key {:?} was already used for a different charge; use a new key",
            first.idempotency_key
        )));
    }
    charge_outcome(first)
}

impl PaymentsService {
    /// The service over `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// The pool, for consistency checks.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn account_in(
        tx: &mut Transaction<'static, Any>,
        account_id: &str,
    ) -> Result<Account, Status> {
        let row = sqlx::query(
            "SELECT account_id, owner_id, currency_code, balance_minor, created_at \
             FROM accounts WHERE account_id = $1 AND kind = 'CUSTOMER'",
        )
        .bind(account_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db::status)?
        .ok_or_else(|| Status::not_found(format!("account {account_id} does not exist")))?;
        account_from_row(&row).map_err(db::status)
    }

    async fn charge_by_key(
        tx: &mut Transaction<'static, Any>,
        key: &str,
    ) -> Result<Option<Charge>, Status> {
        sqlx::query(
            "SELECT charge_id, account_id, currency_code, amount_minor, idempotency_key, state, \
             reference, created_at FROM charges WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db::status)?
        .map(|row| charge_from_row(&row).map_err(db::status))
        .transpose()
    }

    async fn set_charge_state(
        tx: &mut Transaction<'static, Any>,
        charge_id: &str,
        state: &str,
    ) -> Result<(), Status> {
        sqlx::query("UPDATE charges SET state = $1, updated_at = $2 WHERE charge_id = $3")
            .bind(state)
            .bind(time::now_millis())
            .bind(charge_id)
            .execute(&mut **tx)
            .await
            .map_err(db::status)?;
        Ok(())
    }

    fn currency_matches(account: &Account, currency: &str, field: &str) -> Result<(), Status> {
        let account_currency = account
            .balance
            .as_ref()
            .map(|b| b.currency_code.as_str())
            .unwrap_or_default();
        if account_currency != currency {
            return Err(Status::failed_precondition(format!(
                "{field}: account {} holds {account_currency}, not {currency}",
                account.account_id
            )));
        }
        Ok(())
    }

    /// Opens an account for `owner`.
    pub(crate) async fn open(
        &self,
        owner: &str,
        currency: &str,
        cap: Option<i64>,
    ) -> Result<Account, Status> {
        let currency = validate::currency("currency_code", currency)?;
        let account_id = uuid::Uuid::new_v4().to_string();
        let now = time::now_millis();
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        // The owner's count first: its row lock orders concurrent opens,
        // and a count at the cap changes no row.
        let raised = sqlx::query(
            "INSERT INTO account_counts (owner_id, held) VALUES ($1, 1) \
             ON CONFLICT (owner_id) DO UPDATE SET held = account_counts.held + 1 \
             WHERE account_counts.held < $2",
        )
        .bind(owner)
        .bind(cap.unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db::status)?
        .rows_affected();
        if raised == 0 {
            return Err(Status::resource_exhausted(format!(
                "you hold {} accounts or more, the most one user may open",
                cap.unwrap_or(i64::MAX)
            )));
        }
        sqlx::query(
            "INSERT INTO accounts (account_id, owner_id, kind, currency_code, balance_minor, created_at) \
             VALUES ($1, $2, 'CUSTOMER', $3, 0, $4)",
        )
        .bind(&account_id)
        .bind(owner)
        .bind(currency)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db::status)?;
        tx.commit().await.map_err(db::status)?;
        Ok(Account {
            account_id,
            owner_id: owner.to_owned(),
            balance: Some(validate::money(currency, 0)),
            created_at: Some(time::timestamp(now)),
        })
    }

    /// The customer account `id`; with `owner`, only if it is theirs
    /// (another owner's account is `NOT_FOUND` like a missing one).
    pub(crate) async fn account(&self, id: &str, owner: Option<&str>) -> Result<Account, Status> {
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        Self::owned_account_in(&mut tx, id, owner).await
    }

    async fn owned_account_in(
        tx: &mut Transaction<'static, Any>,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Account, Status> {
        let account = Self::account_in(tx, id).await?;
        match owner {
            Some(owner) if account.owner_id != owner => {
                Err(Status::not_found(format!("account {id} does not exist")))
            }
            _ => Ok(account),
        }
    }

    /// A deposit into account `req.account_id`; with `owner`, only into an
    /// account of theirs, and their idempotency keys are theirs alone.
    pub(crate) async fn deposit_as(
        &self,
        req: DepositRequest,
        owner: Option<&str>,
    ) -> Result<Account, Status> {
        let id = validate::uuid("account_id", &req.account_id)?;
        let (currency, amount) = validate::positive_money("amount", req.amount.as_ref())?;
        let key = validate::idempotency_key("idempotency_key", &req.idempotency_key)?;
        // Users' keys live in a namespace of their own, so one user's key
        // can neither collide with nor reveal another's.
        let stored_key = match owner {
            Some(owner) => format!("user:{owner}:{key}"),
            None => key.to_owned(),
        };
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        let account = Self::owned_account_in(&mut tx, &id, owner).await?;
        Self::currency_matches(&account, currency, "amount.currency_code")?;
        let inserted = sqlx::query(
            "INSERT INTO deposits (idempotency_key, account_id, currency_code, amount_minor, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&stored_key)
        .bind(&id)
        .bind(currency)
        .bind(amount)
        .bind(time::now_millis())
        .execute(&mut *tx)
        .await
        .map_err(db::status)?
        .rows_affected();
        if inserted == 0 {
            let first = sqlx::query(
                "SELECT account_id, currency_code, amount_minor FROM deposits WHERE idempotency_key = $1",
            )
            .bind(&stored_key)
            .fetch_one(&mut *tx)
            .await
            .map_err(db::status)?;
            let same = first
                .try_get::<String, _>("account_id")
                .map_err(db::status)?
                == id
                && first
                    .try_get::<String, _>("currency_code")
                    .map_err(db::status)?
                    == currency
                && first
                    .try_get::<i64, _>("amount_minor")
                    .map_err(db::status)?
                    == amount;
            if !same {
                return Err(Status::already_exists(format!(
                    "idempotency_key {key:?} was already used for a different deposit; use a new key"
                )));
            }
            return Ok(account);
        }
        let ceiling = if owner.is_some() {
            WALLET_MAX_BALANCE_MINOR
        } else {
            MAX_BALANCE_MINOR
        };
        let posted = post(
            &mut tx,
            &id,
            SystemAccount::External,
            currency,
            amount,
            (EntryKind::Deposit, key),
            ceiling,
        )
        .await
        .map_err(db::status)?;
        if !posted {
            let balance = account.balance.map(|b| b.amount_minor).unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "amount: the account would hold {} {currency}, over its limit of {ceiling} (balance {balance})",
                balance.saturating_add(amount)
            )));
        }
        let account = Self::account_in(&mut tx, &id).await?;
        tx.commit().await.map_err(db::status)?;
        Ok(account)
    }
}

#[tonic::async_trait]
impl payments_service_server::PaymentsService for PaymentsService {
    async fn open_account(
        &self,
        request: Request<OpenAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let req = request.into_inner();
        let owner = validate::text("owner_id", &req.owner_id, 1, 128)?;
        // Services open accounts for users without the wallet's cap (the
        // count still includes them).
        self.open(owner, &req.currency_code, None)
            .await
            .map(Response::new)
    }

    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let id = validate::uuid("account_id", &request.get_ref().account_id)?;
        self.account(&id, None).await.map(Response::new)
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<Account>, Status> {
        self.deposit_as(request.into_inner(), None)
            .await
            .map(Response::new)
    }

    async fn create_charge(
        &self,
        request: Request<CreateChargeRequest>,
    ) -> Result<Response<Charge>, Status> {
        let req = request.into_inner();
        let id = validate::uuid("account_id", &req.account_id)?;
        let (currency, amount) = validate::positive_money("amount", req.amount.as_ref())?;
        let key = validate::idempotency_key("idempotency_key", &req.idempotency_key)?;
        let reference = validate::text("reference", &req.reference, 0, 200)?;
        let owner = validate::text("expected_owner_id", &req.expected_owner_id, 1, 128)?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;

        // Checked before anything else, the repeat of a key included: money
        // moves only from an account of the user the charge is for, however
        // the caller came by the id. Missing and foreign read the same.
        let account = Self::owned_account_in(&mut tx, &id, Some(owner))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => {
                    tracing::warn!(account_id = %id, "charge refused: the account is not the expected owner's");
                    Status::permission_denied(
                        "account_id: expected_owner_id has no account with this id",
                    )
                }
                _ => status,
            })?;
        if let Some(first) = Self::charge_by_key(&mut tx, key).await? {
            return repeat_outcome(first, &id, currency, amount).map(Response::new);
        }

        Self::currency_matches(&account, currency, "amount.currency_code")?;
        let now = time::now_millis();
        let charge_id = uuid::Uuid::new_v4().to_string();
        // The row goes in first: its unique key makes a concurrent repeat wait
        // for this transaction and then see its outcome.
        let inserted = sqlx::query(
            "INSERT INTO charges (charge_id, idempotency_key, account_id, currency_code, amount_minor, \
             state, reference, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'CAPTURED', $6, $7, $7)",
        )
        .bind(&charge_id)
        .bind(key)
        .bind(&id)
        .bind(currency)
        .bind(amount)
        .bind(reference)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if db::is_unique_violation(&e) {
                // A concurrent charge with this key committed first: answer with its outcome.
                drop(tx);
                let mut tx = self.pool.begin().await.map_err(db::status)?;
                let first = Self::charge_by_key(&mut tx, key).await?.ok_or_else(|| {
                    Status::aborted("a concurrent charge with this key was rolled back; retry")
                })?;
                return repeat_outcome(first, &id, currency, amount).map(Response::new);
            }
            return Err(db::status(e));
        }
        let charged = post(
            &mut tx,
            &id,
            SystemAccount::Revenue,
            currency,
            -amount,
            (EntryKind::Charge, reference),
            MAX_BALANCE_MINOR,
        )
        .await
        .map_err(db::status)?;
        if !charged {
            Self::set_charge_state(&mut tx, &charge_id, "DECLINED").await?;
        }
        let charge = Self::charge_by_key(&mut tx, key)
            .await?
            .ok_or_else(|| Status::internal("internal error"))?;
        tx.commit().await.map_err(db::status)?;
        if !charged {
            let balance = account.balance.map(|b| b.amount_minor).unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "insufficient funds in account {id}: balance {balance} {currency}, charge {amount} {currency}"
            )));
        }
        Ok(Response::new(charge))
    }

    async fn refund_charge(
        &self,
        request: Request<RefundChargeRequest>,
    ) -> Result<Response<Charge>, Status> {
        let req = request.into_inner();
        let key = validate::idempotency_key("charge_idempotency_key", &req.charge_idempotency_key)?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        let Some(charge) = Self::charge_by_key(&mut tx, key).await? else {
            // Never charged: void the key so a late charge cannot take money.
            let now = time::now_millis();
            let charge_id = uuid::Uuid::new_v4().to_string();
            let inserted = sqlx::query(
                "INSERT INTO charges (charge_id, idempotency_key, account_id, currency_code, \
                 amount_minor, state, reference, created_at, updated_at) \
                 VALUES ($1, $2, '', '', 0, 'VOIDED', '', $3, $3)",
            )
            .bind(&charge_id)
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await;
            return match inserted {
                Ok(_) => {
                    let charge = Self::charge_by_key(&mut tx, key)
                        .await?
                        .ok_or_else(|| Status::internal("internal error"))?;
                    tx.commit().await.map_err(db::status)?;
                    Ok(Response::new(charge))
                }
                Err(e) if db::is_unique_violation(&e) => Err(Status::aborted(
                    "a concurrent charge with this key was in progress; retry the refund",
                )),
                Err(e) => Err(db::status(e)),
            };
        };
        if charge.state() != ChargeState::Captured {
            return Ok(Response::new(charge));
        }
        let amount = charge.amount.clone().unwrap_or_default();
        // The state guard makes a concurrent second refund a no-op.
        let claimed = sqlx::query(
            "UPDATE charges SET state = 'REFUNDED', updated_at = $1 \
             WHERE charge_id = $2 AND state = 'CAPTURED'",
        )
        .bind(time::now_millis())
        .bind(&charge.charge_id)
        .execute(&mut *tx)
        .await
        .map_err(db::status)?
        .rows_affected();
        if claimed == 1 {
            post(
                &mut tx,
                &charge.account_id,
                SystemAccount::Revenue,
                &amount.currency_code,
                amount.amount_minor,
                (EntryKind::Refund, &charge.reference),
                // Giving back what was taken may exceed a wallet's deposit
                // limit, never the hard one: a refund always lands.
                MAX_BALANCE_MINOR,
            )
            .await
            .map_err(db::status)?;
        }
        let charge = Self::charge_by_key(&mut tx, key)
            .await?
            .ok_or_else(|| Status::internal("internal error"))?;
        tx.commit().await.map_err(db::status)?;
        Ok(Response::new(charge))
    }

    async fn get_charge(
        &self,
        request: Request<GetChargeRequest>,
    ) -> Result<Response<Charge>, Status> {
        let key = validate::idempotency_key(
            "charge_idempotency_key",
            &request.get_ref().charge_idempotency_key,
        )?;
        let mut tx = self.pool.begin().await.map_err(db::status)?;
        Self::charge_by_key(&mut tx, key)
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no charge with idempotency key {key:?}")))
    }
}
