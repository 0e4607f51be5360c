//! Decimal search values with their implicit precision.
//!
//! FHIR says `5.4` means "5.4 to the precision written", i.e. `[5.35, 5.45)`, and `5.40` means
//! `[5.395, 5.405)`. An `f64` forgets how many digits were written, so the bounds are computed
//! from the decimal text with integer arithmetic and only then converted, which keeps them the
//! nearest doubles to the exact decimal bounds (`5.35`, not `5.3500000000000005`) and therefore
//! comparable with target values that JSON parsing rounded the same way.

use super::Prefix;

/// A parsed decimal and the half-open range its written precision stands for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Decimal {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// More digits than this cannot be represented by an `f64` anyway, and the limit keeps the
/// integer arithmetic below from overflowing.
const MAX_DIGITS: usize = 30;

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Parses a FHIR decimal (`-?digits(.digits)?([eE][+-]?digits)?`). With an exponent, precision
/// follows the last written digit: `1e2` is `[50, 150)` and `1.0e2` is `[95, 105)`. (The R4 spec's
/// own example claims `[95, 105)` for `1e2`, which contradicts its significant-figures rule; the
/// rule is what is implemented.)
pub(super) fn parse_decimal(text: &str) -> Result<Decimal, String> {
    let invalid = || format!("`{text}` is not a decimal number");
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !all_digits(int) || (mantissa.contains('.') && !all_digits(frac)) {
        return Err(invalid());
    }
    let exponent: i32 = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if !all_digits(digits) {
                return Err(invalid());
            }
            if digits.len() > 4 {
                return Err(format!("the exponent of `{text}` is out of range"));
            }
            e.parse().map_err(|_| invalid())?
        }
    };
    let significant = format!("{int}{frac}");
    let significant = significant.trim_start_matches('0');
    if significant.len() > MAX_DIGITS {
        return Err(format!("`{text}` has more than {MAX_DIGITS} significant digits"));
    }
    let magnitude: i128 = if significant.is_empty() { 0 } else { significant.parse().map_err(|_| invalid())? };
    let m = if negative { -magnitude } else { magnitude };
    let scale = i32::try_from(frac.len()).map_err(|_| invalid())? - exponent;
    let to_f64 =
        |mantissa: i128, scale: i32| format!("{mantissa}e{}", -scale).parse::<f64>().ok().filter(|v| v.is_finite());
    let out_of_range = || format!("`{text}` is out of range");
    Ok(Decimal {
        value: to_f64(m, scale).ok_or_else(out_of_range)?,
        low: to_f64(m * 10 - 5, scale + 1).ok_or_else(out_of_range)?,
        high: to_f64(m * 10 + 5, scale + 1).ok_or_else(out_of_range)?,
    })
}

/// The text that [`parse_decimal`] reads back as the same value and precision, so that canonical
/// query strings keep `5.40` distinct from `5.4`. Falls back to the shortest round-tripping text
/// for hand-built values whose bounds no decimal text implies.
pub(super) fn format_decimal(value: f64, low: f64, high: f64) -> String {
    let wanted = Decimal { value, low, high };
    let width = high - low;
    if width.is_finite() && width > 0.0 {
        let scale = -width.log10().round() as i32;
        let text = if scale >= 0 {
            format!("{value:.prec$}", prec = scale as usize)
        } else {
            format!("{:.0}e{}", value / 10f64.powi(-scale), -scale)
        };
        if parse_decimal(&text).is_ok_and(|d| d == wanted) {
            return text;
        }
    }
    format!("{value}")
}

/// Quantity prefixes: `eq`/`ne` use the precision range, the orderings compare against the value
/// itself (a range would make `gt 5.4` exclude 5.41, which nobody means), `sa`/`eb` are `gt`/`lt`
/// since a number has no extent, and `ap` accepts within 10% of the value or within the precision
/// range (so that `ap0` is not reduced to exactly zero).
pub(super) fn compare(prefix: Prefix, search: &Decimal, target: f64) -> bool {
    let in_range = search.low <= target && target < search.high;
    match prefix {
        Prefix::Eq => in_range,
        Prefix::Ne => !in_range,
        Prefix::Gt | Prefix::Sa => target > search.value,
        Prefix::Lt | Prefix::Eb => target < search.value,
        Prefix::Ge => target >= search.value,
        Prefix::Le => target <= search.value,
        Prefix::Ap => in_range || (target - search.value).abs() <= search.value.abs() * 0.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        parse_decimal(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn precision_follows_the_digits_written() {
        assert_eq!(d("5.4"), Decimal { value: 5.4, low: 5.35, high: 5.45 });
        assert_eq!(d("5.40"), Decimal { value: 5.4, low: 5.395, high: 5.405 });
        assert_eq!(d("100"), Decimal { value: 100.0, low: 99.5, high: 100.5 });
        assert_eq!(d("0"), Decimal { value: 0.0, low: -0.5, high: 0.5 });
        assert_eq!(d("0.001"), Decimal { value: 0.001, low: 0.0005, high: 0.0015 });
        assert_eq!(d("-5.4"), Decimal { value: -5.4, low: -5.45, high: -5.35 });
        assert_eq!(d("007"), Decimal { value: 7.0, low: 6.5, high: 7.5 });
    }

    #[test]
    fn exponents_move_the_precision() {
        assert_eq!(d("1e2"), Decimal { value: 100.0, low: 50.0, high: 150.0 });
        assert_eq!(d("1.0e2"), Decimal { value: 100.0, low: 95.0, high: 105.0 });
        assert_eq!(d("5.4E-1"), Decimal { value: 0.54, low: 0.535, high: 0.545 });
        assert_eq!(d("5.4e+1"), Decimal { value: 54.0, low: 53.5, high: 54.5 });
    }

    #[test]
    fn malformed_numbers_are_refused() {
        for bad in [
            "", "-", "abc", "5,4", "5.", ".5", "+5", "5.4.1", "5e", "5e+", "1e99999", "0x10", "5 ", "NaN", "inf",
            "1e400",
        ] {
            assert!(parse_decimal(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_decimal("1234567890123456789012345678901").is_err());
    }

    #[test]
    fn eq_and_ne_use_the_precision_range() {
        let s = d("5.4");
        assert!(compare(Prefix::Eq, &s, 5.35));
        assert!(compare(Prefix::Eq, &s, 5.449));
        assert!(!compare(Prefix::Eq, &s, 5.45));
        assert!(!compare(Prefix::Eq, &s, 5.349));
        assert!(compare(Prefix::Ne, &s, 5.45));
        assert!(!compare(Prefix::Ne, &s, 5.4));
        assert!(!compare(Prefix::Eq, &d("5.40"), 5.41));
    }

    #[test]
    fn orderings_compare_with_the_value_itself() {
        let s = d("5.4");
        assert!(compare(Prefix::Gt, &s, 5.41) && !compare(Prefix::Gt, &s, 5.4));
        assert!(compare(Prefix::Sa, &s, 5.41) && !compare(Prefix::Sa, &s, 5.4));
        assert!(compare(Prefix::Lt, &s, 5.39) && !compare(Prefix::Lt, &s, 5.4));
        assert!(compare(Prefix::Eb, &s, 5.39) && !compare(Prefix::Eb, &s, 5.4));
        assert!(compare(Prefix::Ge, &s, 5.4) && !compare(Prefix::Ge, &s, 5.39));
        assert!(compare(Prefix::Le, &s, 5.4) && !compare(Prefix::Le, &s, 5.41));
    }

    #[test]
    fn ap_is_within_ten_percent() {
        let s = d("100");
        assert!(compare(Prefix::Ap, &s, 90.0) && compare(Prefix::Ap, &s, 110.0));
        assert!(!compare(Prefix::Ap, &s, 89.9) && !compare(Prefix::Ap, &s, 110.1));
        assert!(compare(Prefix::Ap, &d("0"), 0.4) && !compare(Prefix::Ap, &d("0"), 0.6));
        assert!(compare(Prefix::Ap, &d("-10"), -10.9) && !compare(Prefix::Ap, &d("-10"), -11.1));
    }

    #[test]
    fn format_decimal_keeps_the_precision() {
        for text in ["5.4", "5.40", "100", "0", "0.001", "-5.4", "1e2", "1.0e2", "123.456", "97"] {
            let v = d(text);
            let back = format_decimal(v.value, v.low, v.high);
            assert_eq!(d(&back), v, "{text} -> {back}");
        }
        assert_eq!(format_decimal(5.4, 5.395, 5.405), "5.40");
        assert_eq!(format_decimal(100.0, 50.0, 150.0), "1e2");
        // Bounds no text implies: the value survives, at its own shortest precision.
        assert_eq!(format_decimal(5.4, 5.0, 6.0), "5.4");
    }
}
