-- What each ledger entry was, for the account history users read:
-- DEPOSIT, CHARGE or REFUND, with the deposit key or the charge's reference.
-- Entries written before this migration read as UNKNOWN.
ALTER TABLE ledger_entries ADD COLUMN kind TEXT NOT NULL DEFAULT 'UNKNOWN';
ALTER TABLE ledger_entries ADD COLUMN reference TEXT NOT NULL DEFAULT '';

CREATE INDEX accounts_owner ON accounts (owner_id, created_at);
CREATE INDEX ledger_entries_account_time ON ledger_entries (account_id, created_at);
