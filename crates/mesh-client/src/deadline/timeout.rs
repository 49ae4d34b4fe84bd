use std::time::Duration;

/// Encodes a duration as a `grpc-timeout` header value (at most 8 digits),
/// rounding down so the server never believes it has more time than the
/// caller will wait.
pub fn encode_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let micros = timeout.as_micros();
    if micros <= MAX {
        return format!("{}u", micros.max(1));
    }
    let millis = timeout.as_millis();
    if millis <= MAX {
        return format!("{millis}m");
    }
    format!("{}S", u128::from(timeout.as_secs()).min(MAX))
}

/// [`encode_grpc_timeout`] as a header value, formatted on the stack:
/// every call sends one, and a `String` first was an allocation more.
pub(crate) fn grpc_timeout_header(timeout: Duration) -> http::HeaderValue {
    use std::io::Write;
    const MAX: u128 = 99_999_999;
    // At most 8 digits and the unit.
    let mut buf = [0u8; 9];
    let mut out = &mut buf[..];
    let micros = timeout.as_micros();
    let millis = timeout.as_millis();
    let written = if micros <= MAX {
        write!(out, "{}u", micros.max(1))
    } else if millis <= MAX {
        write!(out, "{millis}m")
    } else {
        write!(out, "{}S", u128::from(timeout.as_secs()).min(MAX))
    };
    written.expect("at most 9 bytes");
    let len = 9 - out.len();
    http::HeaderValue::from_bytes(&buf[..len]).expect("an encoded timeout is ASCII")
}

/// The `grpc-timeout` of `headers`, decoded (`None` when absent or malformed).
pub(crate) fn header_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(crate::headers::GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(decode_grpc_timeout)
}

/// Decodes a `grpc-timeout` header value (`1-8 digits` + `H M S m u n`).
pub fn decode_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_encoded_timeout() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(99_999_999),
            Duration::from_micros(100_000_000),
            Duration::from_millis(99_999_999),
            Duration::from_millis(100_000_000),
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(30),
        ] {
            assert_eq!(
                grpc_timeout_header(d).to_str().unwrap(),
                encode_grpc_timeout(d),
                "{d:?}"
            );
        }
    }

    #[test]
    fn round_trips_without_growing() {
        assert_eq!(encode_grpc_timeout(Duration::from_nanos(1)), "1u");
        for d in [
            Duration::from_nanos(1_500),
            Duration::from_millis(1500),
            Duration::from_micros(123_456_789),
            Duration::from_secs(150),
            Duration::from_secs(86_400),
        ] {
            let back = decode_grpc_timeout(&encode_grpc_timeout(d)).unwrap();
            assert!(back <= d, "{d:?} -> {back:?}");
            assert!(d - back < Duration::from_secs(1), "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for v in ["", "5", "5x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(decode_grpc_timeout(v), None, "{v}");
        }
        assert_eq!(decode_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
    }
}
