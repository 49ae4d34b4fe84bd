//! Times are stored as Unix milliseconds (portable across SQLite and
//! PostgreSQL) and sent as `google.protobuf.Timestamp`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as a protobuf timestamp.
pub fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as Unix milliseconds (none reads as 0).
pub fn millis(ts: Option<&prost_types::Timestamp>) -> i64 {
    ts.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or_default()
}
