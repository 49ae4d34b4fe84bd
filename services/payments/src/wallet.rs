//! `WalletService`: a signed-in user's own accounts. The owner is always the
//! subject of the caller's token (verified here, in process, with auth's
//! published keys), never a field of the request; another user's account
//! answers `NOT_FOUND` exactly like a missing one.

use shop_api::payments::v1::{
    Account, DepositRequest, EntryKind, GetAccountRequest, LedgerEntry, ListEntriesRequest,
    ListEntriesResponse, ListWalletAccountsRequest, ListWalletAccountsResponse,
    OpenWalletAccountRequest, wallet_service_server,
};
use shop_kit::{db, time, token::UserTokens, validate};
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::service::{PaymentsService, account_from_row};

/// Accounts one user may open (each currency's system accounts and rows
/// are the payments database's, so a user may not make them without end).
pub const MAX_ACCOUNTS_PER_USER: i64 = 10;

/// The wallet's gRPC implementation, over the payments service's accounts.
#[derive(Clone, Debug)]
pub struct WalletService {
    payments: PaymentsService,
    users: UserTokens,
}

impl WalletService {
    /// Users' accounts in `payments`, for callers whose tokens `users` checks.
    pub fn new(payments: PaymentsService, users: UserTokens) -> Self {
        Self { payments, users }
    }
}

fn entry_kind(stored: &str) -> EntryKind {
    match stored {
        "DEPOSIT" => EntryKind::Deposit,
        "CHARGE" => EntryKind::Charge,
        "REFUND" => EntryKind::Refund,
        _ => EntryKind::Unspecified,
    }
}

/// The page token after the last of `rows` when there are more than
/// `limit` (the query asked for one extra row to know).
fn next_page<T>(rows: &mut Vec<T>, limit: i64, key: impl Fn(&T) -> (i64, &str)) -> String {
    if rows.len() as i64 <= limit {
        return String::new();
    }
    rows.truncate(limit as usize);
    rows.last()
        .map(|last| {
            let (millis, id) = key(last);
            validate::page_token(millis, id)
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl wallet_service_server::WalletService for WalletService {
    async fn open_account(
        &self,
        request: Request<OpenWalletAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let owner = self.users.user(request.metadata()).await?;
        let account = self
            .payments
            .open(
                &owner,
                &request.get_ref().currency_code,
                Some(MAX_ACCOUNTS_PER_USER),
            )
            .await?;
        tracing::info!(account_id = %account.account_id, user_id = %owner, "account opened");
        Ok(Response::new(account))
    }

    async fn list_accounts(
        &self,
        request: Request<ListWalletAccountsRequest>,
    ) -> Result<Response<ListWalletAccountsResponse>, Status> {
        let owner = self.users.user(request.metadata()).await?;
        let req = request.into_inner();
        let limit = validate::page_size("page_size", req.page_size)?;
        let (created, id) = validate::page_after("page_token", &req.page_token)?
            .unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(
            "SELECT account_id, owner_id, currency_code, balance_minor, created_at FROM accounts \
             WHERE owner_id = $1 AND kind = 'CUSTOMER' \
             AND (created_at > $2 OR (created_at = $2 AND account_id > $3)) \
             ORDER BY created_at, account_id LIMIT $4",
        )
        .bind(&owner)
        .bind(created)
        .bind(id)
        .bind(limit + 1)
        .fetch_all(self.payments.pool())
        .await
        .map_err(db::status)?;
        let mut accounts = rows
            .iter()
            .map(account_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db::status)?;
        let next_page_token = next_page(&mut accounts, limit, |a| {
            (time::millis(a.created_at.as_ref()), a.account_id.as_str())
        });
        Ok(Response::new(ListWalletAccountsResponse {
            accounts,
            next_page_token,
        }))
    }

    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let owner = self.users.user(request.metadata()).await?;
        let id = validate::uuid("account_id", &request.get_ref().account_id)?;
        self.payments
            .account(&id, Some(&owner))
            .await
            .map(Response::new)
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let owner = self.users.user(request.metadata()).await?;
        let req = request.into_inner();
        let id = validate::uuid("account_id", &req.account_id)?;
        let limit = validate::page_size("page_size", req.page_size)?;
        let (created, after) = validate::page_after("page_token", &req.page_token)?
            .unwrap_or((i64::MAX, "\u{10FFFF}".to_owned()));
        let account = self.payments.account(&id, Some(&owner)).await?;
        let currency = account.balance.map(|b| b.currency_code).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT entry_id, kind, amount_minor, reference, created_at FROM ledger_entries \
             WHERE account_id = $1 AND (created_at < $2 OR (created_at = $2 AND entry_id < $3)) \
             ORDER BY created_at DESC, entry_id DESC LIMIT $4",
        )
        .bind(&id)
        .bind(created)
        .bind(after)
        .bind(limit + 1)
        .fetch_all(self.payments.pool())
        .await
        .map_err(db::status)?;
        let mut entries = rows
            .iter()
            .map(|row| {
                Ok(LedgerEntry {
                    entry_id: row.try_get("entry_id")?,
                    kind: entry_kind(row.try_get::<&str, _>("kind")?) as i32,
                    amount: Some(validate::money(&currency, row.try_get("amount_minor")?)),
                    reference: row.try_get("reference")?,
                    created_at: Some(time::timestamp(row.try_get("created_at")?)),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db::status)?;
        let next_page_token = next_page(&mut entries, limit, |e| {
            (time::millis(e.created_at.as_ref()), e.entry_id.as_str())
        });
        Ok(Response::new(ListEntriesResponse {
            entries,
            next_page_token,
        }))
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<Account>, Status> {
        let owner = self.users.user(request.metadata()).await?;
        self.payments
            .deposit_as(request.into_inner(), Some(&owner))
            .await
            .map(Response::new)
    }
}
