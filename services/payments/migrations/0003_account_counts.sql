-- How many customer accounts each user holds, raised by a guarded upsert in
-- the transaction that opens an account: concurrent opens by one user
-- serialise on this row. A COUNT(*) then an INSERT let 24 opens at once
-- all pass the cap of 10 (both SQLite and PostgreSQL read the old count).
-- Replicas of an older release still running beside this one open accounts
-- without counting them: upgrade every replica at once, or a user may pass
-- the cap by the accounts opened through old replicas meanwhile.
CREATE TABLE account_counts (
    owner_id TEXT PRIMARY KEY,
    held     BIGINT NOT NULL
);

INSERT INTO account_counts (owner_id, held)
    SELECT owner_id, COUNT(*) FROM accounts WHERE kind = 'CUSTOMER' GROUP BY owner_id;
