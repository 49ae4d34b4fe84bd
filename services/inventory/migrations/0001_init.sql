-- Portable across SQLite and PostgreSQL: TEXT and BIGINT only, times in Unix ms.
-- Stock lives in three buckets whose sum is everything ever received; the
-- database refuses any write that breaks that or takes a bucket below zero.
CREATE TABLE products (
    product_id    TEXT PRIMARY KEY,
    sku           TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    currency_code TEXT NOT NULL,
    price_minor   BIGINT NOT NULL CHECK (price_minor > 0),
    available     BIGINT NOT NULL CHECK (available >= 0),
    reserved      BIGINT NOT NULL CHECK (reserved >= 0),
    committed     BIGINT NOT NULL CHECK (committed >= 0),
    received      BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    CHECK (received = available + reserved + committed)
);

CREATE TABLE reservations (
    reservation_id TEXT PRIMARY KEY,
    state          TEXT NOT NULL CHECK (state IN ('RESERVED', 'COMMITTED', 'RELEASED')),
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE INDEX reservations_expiry ON reservations (state, expires_at);

CREATE TABLE reservation_items (
    reservation_id TEXT NOT NULL REFERENCES reservations (reservation_id),
    product_id     TEXT NOT NULL REFERENCES products (product_id),
    quantity       BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, product_id)
);
