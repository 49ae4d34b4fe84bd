//! Validation of the shapes every contract shares. Each failure is an
//! `INVALID_ARGUMENT` naming the field and the problem.

use shop_api::common::v1::Money;
use tonic::Status;

/// Largest amount accepted in one operation, in minor units, so that sums
/// of many operations stay far from `i64` overflow.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// Currencies the shop accepts (ISO 4217).
pub const CURRENCIES: &[&str] = &[
    "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "INR", "JPY",
    "KRW", "MXN", "NOK", "NZD", "PLN", "SEK", "SGD", "USD", "ZAR",
];

/// An `INVALID_ARGUMENT` status naming `field`.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// A UUID in canonical lower-case form.
pub fn uuid(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(value)
        .map(|u| u.to_string())
        .map_err(|_| invalid(field, format!("{:?} is not a UUID", truncate(value))))
}

/// Free text of `min..=max` characters without control characters.
pub fn text<'a>(field: &str, value: &'a str, min: usize, max: usize) -> Result<&'a str, Status> {
    let len = value.chars().count();
    if len == 0 && min > 0 {
        return Err(invalid(field, "is required"));
    }
    if len < min || len > max {
        return Err(invalid(
            field,
            format!("must be {min} to {max} characters, got {len}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

/// A caller-chosen key: 1 to 128 printable ASCII characters.
pub fn idempotency_key<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > 128 {
        return Err(invalid(
            field,
            format!("must be at most 128 characters, got {}", value.len()),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(field, "must be printable ASCII without spaces"));
    }
    Ok(value)
}

/// A known ISO 4217 currency code.
pub fn currency(field: &str, code: &str) -> Result<&'static str, Status> {
    if code.is_empty() {
        return Err(invalid(field, "is required"));
    }
    CURRENCIES
        .iter()
        .find(|c| **c == code)
        .copied()
        .ok_or_else(|| {
            invalid(
                field,
                format!(
                    "{:?} is not a supported ISO 4217 currency code (supported: {})",
                    truncate(code),
                    CURRENCIES.join(", ")
                ),
            )
        })
}

/// A positive amount of a known currency: `(currency, amount_minor)`.
pub fn positive_money(field: &str, money: Option<&Money>) -> Result<(&'static str, i64), Status> {
    let money = money.ok_or_else(|| invalid(field, "is required"))?;
    let currency = currency(&format!("{field}.currency_code"), &money.currency_code)?;
    let amount = money.amount_minor;
    if amount <= 0 {
        return Err(invalid(
            &format!("{field}.amount_minor"),
            format!("must be positive, got {amount}"),
        ));
    }
    if amount > MAX_AMOUNT_MINOR {
        return Err(invalid(
            &format!("{field}.amount_minor"),
            format!("must be at most {MAX_AMOUNT_MINOR}, got {amount}"),
        ));
    }
    Ok((currency, amount))
}

/// A quantity of items: 1 to 10000.
pub fn quantity(field: &str, value: i64) -> Result<i64, Status> {
    if !(1..=10_000).contains(&value) {
        return Err(invalid(field, format!("must be 1 to 10000, got {value}")));
    }
    Ok(value)
}

/// Validated line items from `(product_id, quantity)` pairs: 1 to 50 of
/// them, UUID ids, quantities 1 to 10000, each product once. Returns
/// `(position in the request, canonical id, quantity)` sorted by id (a
/// fixed order, so transactions lock rows in the same order).
pub fn line_items<'a>(
    items: impl ExactSizeIterator<Item = (&'a str, i64)>,
) -> Result<Vec<(usize, String, i64)>, Status> {
    if items.len() == 0 {
        return Err(invalid("items", "must hold at least one item"));
    }
    if items.len() > 50 {
        return Err(invalid(
            "items",
            format!("must hold at most 50 items, got {}", items.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, (product_id, quantity)) in items.enumerate() {
        let id = uuid(&format!("items[{i}].product_id"), product_id)?;
        let quantity = self::quantity(&format!("items[{i}].quantity"), quantity)?;
        if !seen.insert(id.clone()) {
            return Err(invalid(
                &format!("items[{i}].product_id"),
                format!("product {id} is listed twice; combine the quantities"),
            ));
        }
        out.push((i, id, quantity));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// A page size: 1 to 100, 0 meaning the default of 50.
pub fn page_size(field: &str, value: i32) -> Result<i64, Status> {
    match value {
        0 => Ok(50),
        1..=100 => Ok(i64::from(value)),
        _ => Err(invalid(field, format!("must be 0 to 100, got {value}"))),
    }
}

/// A page token for the row after which the next page starts: the row's
/// creation time (Unix ms) and its id.
pub fn page_token(created_at_millis: i64, id: &str) -> String {
    format!("{created_at_millis}.{id}")
}

/// The position a `page_token` from [`page_token`] names (`None` for the
/// first page), or `INVALID_ARGUMENT` naming `field`.
pub fn page_after(field: &str, token: &str) -> Result<Option<(i64, String)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid(field, "is not a token from a previous response");
    let (millis, id) = token.split_once('.').ok_or_else(bad)?;
    let millis = millis.parse().map_err(|_| bad())?;
    let id = uuid(field, id).map_err(|_| bad())?;
    Ok(Some((millis, id)))
}

/// Money as the contracts carry it.
pub fn money(currency: &str, amount_minor: i64) -> Money {
    Money {
        currency_code: currency.to_owned(),
        amount_minor,
    }
}

fn truncate(value: &str) -> String {
    value.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_field_and_problem() {
        let err = uuid("order_id", "nope").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "order_id: \"nope\" is not a UUID");
        let err = positive_money("amount", Some(&money("USD", -5))).unwrap_err();
        assert_eq!(
            err.message(),
            "amount.amount_minor: must be positive, got -5"
        );
        let err = positive_money("amount", Some(&money("XXX", 5))).unwrap_err();
        assert!(
            err.message()
                .starts_with("amount.currency_code: \"XXX\" is not a supported")
        );
        assert_eq!(
            text("name", "", 1, 5).unwrap_err().message(),
            "name: is required"
        );
        assert!(text("name", "a\u{0}b", 1, 5).is_err());
        assert_eq!(
            text("name", "'; DROP TABLE x;--", 1, 200).unwrap(),
            "'; DROP TABLE x;--"
        );
        assert!(idempotency_key("k", "has space").is_err());
        assert_eq!(page_size("page_size", 0).unwrap(), 50);
        assert!(page_size("page_size", 101).is_err());
        assert!(quantity("q", 0).is_err());
    }

    proptest::proptest! {
        // Outside input never panics a validator, and what passes obeys the rule.
        #[test]
        fn validators_never_panic_and_accept_only_valid_input(input in "\\PC{0,300}") {
            if let Ok(id) = uuid("f", &input) {
                proptest::prop_assert_eq!(::uuid::Uuid::parse_str(&id).unwrap().to_string(), id);
            }
            if let Ok(t) = text("f", &input, 1, 200) {
                let n = t.chars().count();
                proptest::prop_assert!((1..=200).contains(&n) && !t.chars().any(char::is_control));
            }
            if let Ok(k) = idempotency_key("f", &input) {
                proptest::prop_assert!(k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic()));
            }
            if let Ok(c) = currency("f", &input) {
                proptest::prop_assert!(CURRENCIES.contains(&c));
            }
            let errors = [uuid("f", &input).err(), text("f", &input, 1, 200).err(), idempotency_key("f", &input).err()];
            for status in errors.into_iter().flatten() {
                proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                proptest::prop_assert!(status.message().starts_with("f: "));
            }
        }

        #[test]
        fn money_rules_hold_for_any_amount(amount in proptest::num::i64::ANY, code in "[A-Z]{3}") {
            match positive_money("amount", Some(&money(&code, amount))) {
                Ok((c, a)) => proptest::prop_assert!(a > 0 && a <= MAX_AMOUNT_MINOR && CURRENCIES.contains(&c)),
                Err(status) => proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument),
            }
        }
    }
}
