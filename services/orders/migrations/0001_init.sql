-- Portable across SQLite and PostgreSQL: TEXT and BIGINT only, times in Unix ms.
CREATE TABLE orders (
    order_id           TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    idempotency_key    TEXT NOT NULL,
    -- Canonical form of the request, to tell a repeat from a reused key.
    request_digest     TEXT NOT NULL,
    payment_account_id TEXT NOT NULL,
    currency_code      TEXT NOT NULL,
    total_minor        BIGINT NOT NULL CHECK (total_minor > 0),
    status             TEXT NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    -- The saga step to run next; written before the step is attempted.
    saga_step          TEXT NOT NULL,
    cancel_reason      TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    UNIQUE (user_id, idempotency_key)
);

CREATE INDEX orders_by_user ON orders (user_id, created_at);
CREATE INDEX orders_open ON orders (status, updated_at);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (order_id),
    product_id       TEXT NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    currency_code    TEXT NOT NULL,
    unit_price_minor BIGINT NOT NULL CHECK (unit_price_minor > 0),
    PRIMARY KEY (order_id, product_id)
);
