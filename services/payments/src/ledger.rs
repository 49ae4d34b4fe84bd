//! Ledger postings and the consistency check over them.

use shop_kit::time;
use sqlx::{Any, AnyPool, Row, Transaction};

/// Which system account is the other side of a posting.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SystemAccount {
    /// Money entering from outside the shop (deposits).
    External,
    /// The shop's takings (charges, refunds).
    Revenue,
}

impl SystemAccount {
    fn id(self, currency: &str) -> String {
        match self {
            SystemAccount::External => format!("system:external:{currency}"),
            SystemAccount::Revenue => format!("system:revenue:{currency}"),
        }
    }
}

/// The most any customer account may hold, in minor units: far enough from
/// `i64::MAX` that no sum of balances or movements can overflow (on SQLite
/// an overflowing integer would silently become a float).
pub(crate) const MAX_BALANCE_MINOR: i64 = 1_000_000_000_000_000;

/// The most a user's own wallet account may hold after a deposit (the
/// shop's stand-in for a card payment), in minor units.
pub const WALLET_MAX_BALANCE_MINOR: i64 = 1_000_000_000;

/// What a posting is, as the account history shows it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EntryKind {
    Deposit,
    Charge,
    Refund,
}

impl EntryKind {
    fn stored(self) -> &'static str {
        match self {
            EntryKind::Deposit => "DEPOSIT",
            EntryKind::Charge => "CHARGE",
            EntryKind::Refund => "REFUND",
        }
    }
}

/// Moves `amount` from `system` to the customer `account` (negative moves it
/// back): two entries summing to zero, recorded as `kind` with `reference`,
/// and both balances, in `tx`.
///
/// Returns `false`, writing nothing, if the customer balance would go
/// negative or above `ceiling` (at most [`MAX_BALANCE_MINOR`]).
pub(crate) async fn post(
    tx: &mut Transaction<'static, Any>,
    account: &str,
    system: SystemAccount,
    currency: &str,
    amount: i64,
    (kind, reference): (EntryKind, &str),
    ceiling: i64,
) -> Result<bool, sqlx::Error> {
    let now = time::now_millis();
    let moved = sqlx::query(
        "UPDATE accounts SET balance_minor = balance_minor + $1 \
         WHERE account_id = $2 AND balance_minor + $1 >= 0 AND balance_minor + $1 <= $3",
    )
    .bind(amount)
    .bind(account)
    .bind(ceiling.min(MAX_BALANCE_MINOR))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    let system_id = system.id(currency);
    sqlx::query(
        "INSERT INTO accounts (account_id, owner_id, kind, currency_code, balance_minor, created_at) \
         VALUES ($1, 'system', 'SYSTEM', $2, 0, $3) ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(&system_id)
    .bind(currency)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE accounts SET balance_minor = balance_minor - $1 WHERE account_id = $2")
        .bind(amount)
        .bind(&system_id)
        .execute(&mut **tx)
        .await?;
    let txn_id = uuid::Uuid::new_v4().to_string();
    for (who, value) in [(account, amount), (system_id.as_str(), -amount)] {
        sqlx::query(
            "INSERT INTO ledger_entries (entry_id, txn_id, account_id, amount_minor, created_at, kind, reference) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(&txn_id)
        .bind(who)
        .bind(value)
        .bind(now)
        .bind(kind.stored())
        .bind(reference)
        .execute(&mut **tx)
        .await?;
    }
    Ok(true)
}

/// The result of checking the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerCheck {
    /// Accounts checked.
    pub accounts: usize,
    /// Accounts whose stored balance differs from the sum of their entries.
    pub mismatched: Vec<String>,
    /// Transactions whose entries do not sum to zero.
    pub unbalanced_txns: Vec<String>,
}

/// Recomputes every balance from the ledger and checks each transaction sums
/// to zero.
pub async fn check_ledger(pool: &AnyPool) -> Result<LedgerCheck, sqlx::Error> {
    let accounts = sqlx::query(
        "SELECT a.account_id, a.balance_minor, \
         CAST(COALESCE(SUM(e.amount_minor), 0) AS BIGINT) AS ledger_sum \
         FROM accounts a LEFT JOIN ledger_entries e ON e.account_id = a.account_id \
         GROUP BY a.account_id, a.balance_minor",
    )
    .fetch_all(pool)
    .await?;
    let mut check = LedgerCheck {
        accounts: accounts.len(),
        ..LedgerCheck::default()
    };
    for row in accounts {
        let balance: i64 = row.try_get("balance_minor")?;
        let sum: i64 = row.try_get("ledger_sum")?;
        if balance != sum {
            check.mismatched.push(row.try_get("account_id")?);
        }
    }
    for row in sqlx::query(
        "SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING SUM(amount_minor) <> 0",
    )
    .fetch_all(pool)
    .await?
    {
        check.unbalanced_txns.push(row.try_get("txn_id")?);
    }
    Ok(check)
}
