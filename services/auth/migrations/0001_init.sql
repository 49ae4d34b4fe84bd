-- Portable across SQLite and PostgreSQL: TEXT and BIGINT only, times in Unix ms.
CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- Ed25519 token signing keys. The newest unretired key signs; every key not
-- yet past retired_at + token TTL still verifies.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    private_key TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);
