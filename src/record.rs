//! The records of the contract, and the checks every value passes before it
//! reaches a stream or a handler.
//!
//! The same rules apply to an order coming in over HTTP and to an entry a
//! consumer reads (which may have been written by `redis-cli` or the seed's
//! Java service): a value that fails them can never be handled, so a
//! consumer dead-letters it at once.

use std::fmt;

/// Longest `userId` / `productId` / `paymentProcessId`, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most digits before the decimal point of a price (up to 999,999,999,999).
const MAX_PRICE_INT_DIGITS: usize = 12;
/// Most digits after the decimal point of a price.
const MAX_PRICE_FRAC_DIGITS: usize = 8;

/// A value that breaks the rules; `Display` names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What can be wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Absent.
    Missing,
    /// Present but empty.
    Empty,
    /// Not valid UTF-8.
    NotUtf8,
    /// Longer than allowed.
    TooLong(usize),
    /// Contains a control character.
    ControlCharacter,
    /// Not a non-negative decimal number within bounds.
    NotAPrice,
    /// Not a string (JSON).
    NotAString,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field;
        match &self.problem {
            Problem::Missing => write!(f, "{field} is missing"),
            Problem::Empty => write!(f, "{field} is empty"),
            Problem::NotUtf8 => write!(f, "{field} is not valid UTF-8"),
            Problem::TooLong(max) => write!(f, "{field} is longer than {max} bytes"),
            Problem::ControlCharacter => write!(f, "{field} contains a control character"),
            Problem::NotAPrice => write!(
                f,
                "{field} must be a non-negative decimal number like 100 or 12.50 \
                 (at most {MAX_PRICE_INT_DIGITS} digits before and {MAX_PRICE_FRAC_DIGITS} after the point)"
            ),
            Problem::NotAString => write!(f, "{field} must be a string"),
        }
    }
}

impl std::error::Error for FieldError {}

fn err(field: &'static str, problem: Problem) -> FieldError {
    FieldError { field, problem }
}

/// Checks an identifier-like text field (`userId`, `productId`, ...).
pub fn check_text(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(err(field, Problem::Empty));
    }
    if value.len() > MAX_ID_LEN {
        return Err(err(field, Problem::TooLong(MAX_ID_LEN)));
    }
    if value.chars().any(char::is_control) {
        return Err(err(field, Problem::ControlCharacter));
    }
    Ok(())
}

/// Checks a price: a non-negative decimal, `123` or `123.45`, bounded.
pub fn check_price(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(err(field, Problem::Empty));
    }
    let (int, frac) = match value.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (value, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(int)
        && int.len() <= MAX_PRICE_INT_DIGITS
        && frac.is_none_or(|f| digits(f) && f.len() <= MAX_PRICE_FRAC_DIGITS);
    if ok {
        Ok(())
    } else {
        Err(err(field, Problem::NotAPrice))
    }
}

/// An order, as written to `order-events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Who ordered.
    pub user_id: String,
    /// What.
    pub product_id: String,
    /// For how much, exactly as given (a decimal string).
    pub price: String,
}

impl Order {
    /// Checks all three fields; the first problem found is returned.
    ///
    /// ```
    /// use streamline::record::Order;
    ///
    /// let order = Order::new("u1".into(), "p1".into(), "12.50".into()).unwrap();
    /// assert_eq!(order.fields()[2], ("price", "12.50"));
    ///
    /// let refused = Order::new("u1".into(), "p1".into(), "-1".into()).unwrap_err();
    /// assert!(refused.to_string().starts_with("price must be a non-negative decimal"));
    /// ```
    pub fn new(user_id: String, product_id: String, price: String) -> Result<Order, FieldError> {
        check_text("userId", &user_id)?;
        check_text("productId", &product_id)?;
        check_price("price", &price)?;
        Ok(Order {
            user_id,
            product_id,
            price,
        })
    }

    /// The stream fields, in the seed's names.
    pub fn fields(&self) -> [(&'static str, &str); 3] {
        [
            ("userId", &self.user_id),
            ("productId", &self.product_id),
            ("price", &self.price),
        ]
    }

    /// Reads and checks an `order-events` entry.
    pub fn from_fields(fields: &Fields) -> Result<Order, FieldError> {
        Order::new(
            fields.text("userId")?,
            fields.text("productId")?,
            fields.text("price")?,
        )
    }
}

/// A payment, as written to `payment-events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// Who paid.
    pub user_id: String,
    /// For what.
    pub product_id: String,
    /// How much.
    pub price: String,
    /// The payment's unique ID.
    pub payment_process_id: String,
    /// The `order-events` entry paid; absent in entries the seed's Java
    /// payment service writes.
    pub order_id: Option<String>,
}

impl Payment {
    /// Reads and checks a `payment-events` entry.
    pub fn from_fields(fields: &Fields) -> Result<Payment, FieldError> {
        let order = Order::from_fields(fields)?;
        let payment_process_id = fields.text("paymentProcessId")?;
        check_text("paymentProcessId", &payment_process_id)?;
        let order_id = match fields.get("orderId") {
            None => None,
            Some(_) => {
                let id = fields.text("orderId")?;
                check_text("orderId", &id)?;
                Some(id)
            }
        };
        Ok(Payment {
            user_id: order.user_id,
            product_id: order.product_id,
            price: order.price,
            payment_process_id,
            order_id,
        })
    }
}

/// The raw field/value pairs of a stream entry, bytes as Redis keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<(Vec<u8>, Vec<u8>)>);

impl Fields {
    /// The raw value of `name` (the first, if repeated).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The value of `name` as text: missing and non-UTF-8 are errors.
    pub fn text(&self, name: &'static str) -> Result<String, FieldError> {
        let raw = self.get(name).ok_or(err(name, Problem::Missing))?;
        String::from_utf8(raw.to_vec()).map_err(|_| err(name, Problem::NotUtf8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> Fields {
        Fields(
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
                .collect(),
        )
    }

    #[test]
    fn prices() {
        for ok in ["0", "100", "12.50", "999999999999.12345678"] {
            assert!(check_price("price", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-1",
            "abc",
            "1.2.3",
            "1e5",
            ".5",
            "5.",
            " 5",
            "+5",
            "1000000000000",
            "1.123456789",
        ] {
            assert!(check_price("price", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = Order::new("u".into(), "".into(), "1".into()).unwrap_err();
        assert_eq!(e.to_string(), "productId is empty");
        let e = Order::new("u\n".into(), "p".into(), "1".into()).unwrap_err();
        assert!(e.to_string().starts_with("userId"), "{e}");
        let e = Order::new("u".into(), "p".into(), "x".into()).unwrap_err();
        assert!(e.to_string().starts_with("price"), "{e}");
    }

    #[test]
    fn decodes_seed_entries() {
        let o = Order::from_fields(&fields(&[
            ("userId", b"u1"),
            ("productId", b"p1"),
            ("price", b"100"),
        ]))
        .unwrap();
        assert_eq!(o.price, "100");
        let p = Payment::from_fields(&fields(&[
            ("userId", b"u1"),
            ("productId", b"p1"),
            ("price", b"100"),
            ("paymentProcessId", b"0"),
        ]))
        .unwrap();
        assert_eq!(p.order_id, None);
    }

    #[test]
    fn poison_entries_are_refused_with_a_reason() {
        let e = Order::from_fields(&fields(&[("userId", b"u1"), ("price", b"1")])).unwrap_err();
        assert_eq!(e.to_string(), "productId is missing");
        let e = Order::from_fields(&fields(&[
            ("userId", b"\xff"),
            ("productId", b"p"),
            ("price", b"1"),
        ]))
        .unwrap_err();
        assert_eq!(e.to_string(), "userId is not valid UTF-8");
    }
}
