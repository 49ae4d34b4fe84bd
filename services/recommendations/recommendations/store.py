"""The service's own database: which products were bought together.

SQLite by default (`sqlite://PATH`), PostgreSQL by URL (`postgres://` or
`postgresql://`, with psycopg), with the same statements. Migrations are
numbered and applied once each, recorded in `schema_migrations`. Nothing
here reads another service's database: orders are learned from
`RecordOrder` calls.
"""

import os
import sqlite3
import threading
import time

MIGRATIONS = [
    """
    CREATE TABLE recorded_orders (
        order_id TEXT PRIMARY KEY,
        recorded_at BIGINT NOT NULL
    );
    CREATE TABLE bought_together (
        product_id TEXT NOT NULL,
        other_id TEXT NOT NULL,
        times BIGINT NOT NULL CHECK (times > 0),
        PRIMARY KEY (product_id, other_id)
    );
    """,
]


class Unavailable(Exception):
    """The database cannot be reached; the call may succeed later."""


class Store:
    """One connection, used by one thread at a time (calls run in worker
    threads, so the event loop never waits on the database)."""

    def __init__(self, url):
        self.url = url
        self.postgres = url.startswith(("postgres://", "postgresql://"))
        self._lock = threading.Lock()
        self._conn = None
        with self._lock:
            self._migrate(self._connect())

    def _connect(self):
        if self._conn is not None:
            return self._conn
        try:
            if self.postgres:
                import psycopg

                # Bounded on a silent network too: TCP keepalives and a
                # user timeout end a blackholed connection in seconds (not
                # the kernel's ~15 min of retransmissions), and no statement
                # runs past 2 s, so health turns NOT_SERVING instead of
                # every call hanging until its deadline.
                self._conn = psycopg.connect(
                    self.url,
                    connect_timeout=5,
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=2,
                    tcp_user_timeout=5000,
                    options="-c statement_timeout=2000",
                )
            else:
                path = self.url
                for prefix in ("sqlite://", "sqlite:"):
                    if path.startswith(prefix):
                        path = path[len(prefix) :]
                        break
                path = path.split("?", 1)[0]
                # Only its owner reads the data (SQLite gives its -wal and
                # -shm files the database file's mode).
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
                conn = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._conn = conn
        except Exception as e:  # noqa: BLE001 - any driver's connection error
            raise Unavailable(f"cannot connect to the database: {e}") from e
        return self._conn

    def _sql(self, statement):
        return statement.replace("?", "%s") if self.postgres else statement

    def _transaction(self, work):
        """Runs `work(cursor)` in one transaction; a lost connection is
        reopened on the next call."""
        with self._lock:
            conn = self._connect()
            try:
                if self.postgres:
                    with conn.transaction():
                        with conn.cursor() as cur:
                            return work(cur)
                cur = conn.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    result = work(cur)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
                return result
            except Exception as e:
                if self._is_connection_error(e):
                    self._drop()
                    raise Unavailable(f"the database is unavailable: {e}") from e
                raise

    def _is_connection_error(self, e):
        if self.postgres:
            import psycopg

            # OperationalError covers lost connections and statement
            # timeouts (QueryCanceled): both mean the database cannot serve.
            return isinstance(e, psycopg.OperationalError)
        return isinstance(e, sqlite3.OperationalError)

    def _drop(self):
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
        self._conn = None

    def _migrate(self, conn):
        def run(cur):
            cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    cur.execute(statement)
                cur.execute(self._sql("INSERT INTO schema_migrations (version) VALUES (?)"), (version,))

        self._conn = conn
        if self.postgres:
            # One migrator at a time across replicas.
            def locked(cur):
                cur.execute("SELECT pg_advisory_xact_lock(20262020)")
                run(cur)

            with conn.transaction():
                with conn.cursor() as cur:
                    locked(cur)
        else:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                run(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def record_order(self, order_id, product_ids):
        """Counts every pair of the order's products once; False when the
        order was recorded before (nothing changes)."""
        products = sorted(set(product_ids))

        def work(cur):
            cur.execute(
                self._sql("INSERT INTO recorded_orders (order_id, recorded_at) VALUES (?, ?) ON CONFLICT DO NOTHING"),
                (order_id, int(time.time())),
            )
            if cur.rowcount == 0:
                return False
            # One batch, not a round trip per pair: a 50-item order is
            # 2,450 pairs, and every Recommend waits behind this lock.
            pairs = [(a, b) for a in products for b in products if a != b]
            if pairs:
                cur.executemany(
                    self._sql(
                        "INSERT INTO bought_together (product_id, other_id, times) VALUES (?, ?, 1) "
                        "ON CONFLICT (product_id, other_id) DO UPDATE SET times = bought_together.times + 1"
                    ),
                    pairs,
                )
            return True

        return self._transaction(work)

    def recommend(self, product_ids, limit):
        """Products bought most often with `product_ids`, not among them."""
        products = sorted(set(product_ids))
        if not products:
            return []
        marks = ", ".join("?" for _ in products)

        def work(cur):
            cur.execute(
                self._sql(
                    f"SELECT other_id, SUM(times) AS score FROM bought_together "
                    f"WHERE product_id IN ({marks}) AND other_id NOT IN ({marks}) "
                    f"GROUP BY other_id ORDER BY score DESC, other_id LIMIT ?"
                ),
                (*products, *products, limit),
            )
            return [row[0] for row in cur.fetchall()]

        return self._transaction(work)

    def ping(self):
        self._transaction(lambda cur: cur.execute("SELECT 1"))
