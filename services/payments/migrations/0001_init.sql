-- Portable across SQLite and PostgreSQL: TEXT and BIGINT only, times in Unix ms.
--
-- Double entry: every movement is a transaction of ledger entries that sum
-- to zero, between a customer account and a system account (external money
-- for deposits, revenue for charges). A customer balance is the sum of its
-- entries, kept denormalised in accounts.balance_minor in the same
-- transaction, and can never go negative.
CREATE TABLE accounts (
    account_id    TEXT PRIMARY KEY,
    owner_id      TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('CUSTOMER', 'SYSTEM')),
    currency_code TEXT NOT NULL,
    balance_minor BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    CHECK (kind = 'SYSTEM' OR balance_minor >= 0)
);

CREATE TABLE ledger_entries (
    entry_id     TEXT PRIMARY KEY,
    txn_id       TEXT NOT NULL,
    account_id   TEXT NOT NULL REFERENCES accounts (account_id),
    amount_minor BIGINT NOT NULL CHECK (amount_minor <> 0),
    created_at   BIGINT NOT NULL
);

CREATE INDEX ledger_entries_account ON ledger_entries (account_id);

CREATE TABLE deposits (
    idempotency_key TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    currency_code   TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    created_at      BIGINT NOT NULL
);

-- One row per charge idempotency key, whatever the outcome, so the same key
-- always gets the first answer.
CREATE TABLE charges (
    charge_id       TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    account_id      TEXT NOT NULL,
    currency_code   TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL CHECK (amount_minor >= 0),
    state           TEXT NOT NULL CHECK (state IN ('CAPTURED', 'REFUNDED', 'DECLINED', 'VOIDED')),
    reference       TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
