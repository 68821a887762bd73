//! Sizes and times written with units, as scenario files spell them.
//!
//! Grammar (whitespace around the number and between number and unit is allowed):
//!
//! ```text
//! size   = number [unit]          unit = B | KiB | MiB | GiB | TiB | KB | MB | GB | page | pages
//! time   = number [unit]          unit = ns | us | µs | ms | s           (no unit: nanoseconds)
//! number = digits ["." digits] | "0x" hexdigits
//! ```
//!
//! Binary units are powers of 1024, decimal units powers of 1000, and a page is 4 KiB
//! ([`peerdma_core::PAGE_SIZE`]). A fraction is allowed only when the result is a whole number of bytes
//! (`"1.5KiB"` is 1536) or nanoseconds (`"1.5us"` is 1500). Arithmetic is exact (integers, no floating
//! point), and any result beyond 64 bits is an error rather than a wrap.

use peerdma_core::{PAGE_SIZE, SimDuration};

/// Size units and their value in bytes.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("page", PAGE_SIZE),
    ("pages", PAGE_SIZE),
];

/// Time units and their value in nanoseconds.
const TIME_UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
];

/// The most fractional digits a number may carry (after trailing zeros are dropped).
const MAX_FRACTION_DIGITS: usize = 24;

/// A malformed or out-of-range size, time or number. The message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The text is not a size.
    #[error(
        "expected a size like `4KiB`, `0x1000` or `16 pages` (units: B, KiB, MiB, GiB, TiB, KB, MB, GB, \
         page, pages), found `{0}`"
    )]
    BadSize(String),
    /// The text is not a time.
    #[error(
        "expected a time like `250ns`, `1.5us`, `2ms` or `1s` (units: ns, us, ms, s), found `{0}`"
    )]
    BadTime(String),
    /// The text is not a plain number.
    #[error("expected a number like `4096` or `0x1000`, found `{0}`")]
    BadNumber(String),
    /// A fraction that does not come out as a whole number of bytes.
    #[error("expected a whole number of bytes, found `{0}`")]
    FractionalBytes(String),
    /// A fraction that does not come out as a whole number of nanoseconds.
    #[error("expected a whole number of nanoseconds, found `{0}`")]
    FractionalNanos(String),
    /// The value does not fit in 64 bits.
    #[error("expected a value below 2^64, found `{0}`, which overflows")]
    Overflow(String),
}

/// A number split into its integer part and its (decimal) fractional digits.
struct Number<'a> {
    int: u128,
    /// Decimal fractional digits without trailing zeros (empty for integers and hex).
    frac: &'a str,
}

/// Outcome of scanning a number at the start of a string.
enum Scan<'a> {
    /// A number followed by the rest of the text.
    Ok(Number<'a>, &'a str),
    /// No number at the start.
    NotANumber,
    /// The integer part overflows.
    Overflow,
}

/// Scans a decimal (with optional fraction) or `0x` hexadecimal number at the start of `s`.
fn scan_number(s: &str) -> Scan<'_> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        let (digits, rest) = hex.split_at(end);
        if digits.is_empty() {
            return Scan::NotANumber;
        }
        return match u128::from_str_radix(digits, 16) {
            Ok(int) => Scan::Ok(Number { int, frac: "" }, rest),
            Err(_) => Scan::Overflow,
        };
    }
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, mut rest) = s.split_at(end);
    if digits.is_empty() {
        return Scan::NotANumber;
    }
    let Ok(int) = digits.parse::<u128>() else {
        return Scan::Overflow;
    };
    let mut frac = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let end = after_dot
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after_dot.len());
        if end == 0 {
            return Scan::NotANumber;
        }
        frac = after_dot[..end].trim_end_matches('0');
        rest = &after_dot[end..];
    }
    Scan::Ok(Number { int, frac }, rest)
}

/// Result of scaling a number by a unit.
enum Scaled {
    Whole(u64),
    Fractional,
    Overflow,
}

/// Returns `number * unit`, exactly.
fn scale(number: &Number<'_>, unit: u64) -> Scaled {
    let unit = u128::from(unit);
    let Some(int) = number.int.checked_mul(unit) else {
        return Scaled::Overflow;
    };
    let mut total = int;
    if !number.frac.is_empty() {
        if number.frac.len() > MAX_FRACTION_DIGITS {
            return Scaled::Fractional;
        }
        // frac < 10^24 and unit < 2^41, so the product stays below 2^122.
        let Ok(frac) = number.frac.parse::<u128>() else {
            return Scaled::Fractional;
        };
        let Ok(nr_digits) = u32::try_from(number.frac.len()) else {
            return Scaled::Fractional;
        };
        let denominator = 10u128.pow(nr_digits);
        let Some(numerator) = frac.checked_mul(unit) else {
            return Scaled::Overflow;
        };
        if numerator % denominator != 0 {
            return Scaled::Fractional;
        }
        let Some(sum) = total.checked_add(numerator / denominator) else {
            return Scaled::Overflow;
        };
        total = sum;
    }
    match u64::try_from(total) {
        Ok(v) => Scaled::Whole(v),
        Err(_) => Scaled::Overflow,
    }
}

/// Which kind of quantity is being parsed, for the unit table and the error variants.
#[derive(Clone, Copy)]
enum Quantity {
    Size,
    Time,
}

fn parse_quantity(text: &str, quantity: Quantity) -> Result<u64, UnitError> {
    let (units, default_unit): (&[(&str, u64)], u64) = match quantity {
        Quantity::Size => (SIZE_UNITS, 1),
        Quantity::Time => (TIME_UNITS, 1),
    };
    let bad = || match quantity {
        Quantity::Size => UnitError::BadSize(text.to_owned()),
        Quantity::Time => UnitError::BadTime(text.to_owned()),
    };
    let trimmed = text.trim();
    let (number, rest) = match scan_number(trimmed) {
        Scan::Ok(number, rest) => (number, rest),
        Scan::NotANumber => return Err(bad()),
        Scan::Overflow => return Err(UnitError::Overflow(text.to_owned())),
    };
    let unit_name = rest.trim_start();
    let unit = if unit_name.is_empty() {
        default_unit
    } else {
        units
            .iter()
            .find(|(name, _)| *name == unit_name)
            .map(|&(_, value)| value)
            .ok_or_else(bad)?
    };
    match scale(&number, unit) {
        Scaled::Whole(v) => Ok(v),
        Scaled::Overflow => Err(UnitError::Overflow(text.to_owned())),
        Scaled::Fractional => Err(match quantity {
            Quantity::Size => UnitError::FractionalBytes(text.to_owned()),
            Quantity::Time => UnitError::FractionalNanos(text.to_owned()),
        }),
    }
}

/// Spells `bytes` the way a scenario writes a size: in the largest binary unit that divides it (`"256KiB"`,
/// `"2MiB"`), else in bytes (`"1000B"`); [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    for (unit, n) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(n) {
            return format!("{}{unit}", bytes / n);
        }
    }
    format!("{bytes}B")
}

/// Returns the size in bytes that `text` spells (`"4KiB"`, `"0x1000"`, `"16 pages"`, `"1.5KiB"`).
///
/// # Errors
/// Returns a [`UnitError`] when the text is not a size, is not a whole number of bytes or overflows `u64`.
///
/// # Examples
/// ```
/// use peerdma_scenario::units::parse_size;
/// assert_eq!(parse_size("2MiB"), Ok(2 << 20));
/// assert_eq!(parse_size("3 pages"), Ok(3 * 4096));
/// assert!(parse_size("4 KB B").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    parse_quantity(text, Quantity::Size)
}

/// Returns the duration that `text` spells (`"250ns"`, `"1.5us"`, `"2ms"`, `"1s"`; no unit is nanoseconds).
///
/// # Errors
/// Returns a [`UnitError`] when the text is not a time, is not a whole number of nanoseconds or overflows.
///
/// # Examples
/// ```
/// use peerdma_core::SimDuration;
/// use peerdma_scenario::units::parse_time;
/// assert_eq!(parse_time("1.5us"), Ok(SimDuration::from_nanos(1_500)));
/// ```
pub fn parse_time(text: &str) -> Result<SimDuration, UnitError> {
    parse_quantity(text, Quantity::Time).map(SimDuration::from_nanos)
}

/// Returns the value of a plain unsigned number, decimal or `0x` hexadecimal, with no unit and no fraction.
///
/// # Errors
/// Returns [`UnitError::BadNumber`] for anything else and [`UnitError::Overflow`] beyond `u64`.
pub fn parse_number(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    match scan_number(trimmed) {
        Scan::Ok(number, "") if number.frac.is_empty() && !trimmed.contains('.') => {
            u64::try_from(number.int).map_err(|_| UnitError::Overflow(text.to_owned()))
        }
        Scan::Overflow => Err(UnitError::Overflow(text.to_owned())),
        Scan::Ok(..) | Scan::NotANumber => Err(UnitError::BadNumber(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_size_spells_what_parse_size_reads_back() {
        for (n, text) in [
            (0, "0B"),
            (1000, "1000B"),
            (4096, "4KiB"),
            (256 << 10, "256KiB"),
            (3 << 20, "3MiB"),
            ((1 << 30) + 4096, "1048580KiB"),
            (1 << 40, "1TiB"),
        ] {
            assert_eq!(format_size(n), text);
            assert_eq!(parse_size(text), Ok(n));
        }
    }

    #[test]
    fn plain_integers_are_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 12 "), Ok(12));
    }

    #[test]
    fn every_size_unit_scales() {
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("3TiB"), Ok(3 << 40));
        assert_eq!(parse_size("5KB"), Ok(5_000));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("1 page"), Ok(4096));
        assert_eq!(parse_size("16 pages"), Ok(16 * 4096));
    }

    #[test]
    fn space_between_number_and_unit_is_allowed() {
        assert_eq!(parse_size("4 KiB"), Ok(4096));
        assert_eq!(parse_size("16pages"), Ok(16 * 4096));
    }

    #[test]
    fn fractions_must_give_whole_bytes() {
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("0.5 pages"), Ok(2048));
        assert_eq!(parse_size("2.50MB"), Ok(2_500_000));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(
            parse_size("0.3B"),
            Err(UnitError::FractionalBytes("0.3B".into()))
        );
        assert_eq!(
            parse_size("1.0000001KiB"),
            Err(UnitError::FractionalBytes("1.0000001KiB".into()))
        );
    }

    #[test]
    fn hex_sizes_are_accepted() {
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size("0X10 pages"), Ok(0x10 * 4096));
        assert_eq!(parse_size("0xffffffffffffffff"), Ok(u64::MAX));
    }

    #[test]
    fn sizes_beyond_64_bits_overflow() {
        assert_eq!(
            parse_size("0x10000000000000000"),
            Err(UnitError::Overflow("0x10000000000000000".into()))
        );
        assert_eq!(
            parse_size("16777216TiB"),
            Err(UnitError::Overflow("16777216TiB".into()))
        );
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999999999"),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn garbage_sizes_are_rejected() {
        for bad in [
            "", "KiB", "4 KB B", "4kib", "-4KiB", "4 K", "1.KiB", ".5KiB", "0x", "0xg", "4KiB4",
            "1e3",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(UnitError::BadSize(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn size_error_message_names_what_was_expected() {
        let msg = parse_size("4 KB B").unwrap_err().to_string();
        assert!(msg.starts_with("expected a size like `4KiB`"), "{msg}");
        assert!(msg.ends_with("found `4 KB B`"), "{msg}");
    }

    #[test]
    fn every_time_unit_scales() {
        assert_eq!(parse_time("0ns"), Ok(SimDuration::ZERO));
        assert_eq!(parse_time("250ns"), Ok(SimDuration::from_nanos(250)));
        assert_eq!(parse_time("3us"), Ok(SimDuration::from_nanos(3_000)));
        assert_eq!(parse_time("3µs"), Ok(SimDuration::from_nanos(3_000)));
        assert_eq!(parse_time("2ms"), Ok(SimDuration::from_millis(2)));
        assert_eq!(parse_time("1s"), Ok(SimDuration::from_nanos(1_000_000_000)));
        assert_eq!(parse_time("42"), Ok(SimDuration::from_nanos(42)));
    }

    #[test]
    fn time_fractions_must_give_whole_nanoseconds() {
        assert_eq!(parse_time("1.5us"), Ok(SimDuration::from_nanos(1_500)));
        assert_eq!(parse_time("0.25s"), Ok(SimDuration::from_millis(250)));
        assert_eq!(
            parse_time("1.5ns"),
            Err(UnitError::FractionalNanos("1.5ns".into()))
        );
    }

    #[test]
    fn garbage_times_are_rejected() {
        for bad in ["", "ms", "1 sec", "1KiB", "-1s", "1h"] {
            assert_eq!(
                parse_time(bad),
                Err(UnitError::BadTime(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse_time("18446744074s"),
            Err(UnitError::Overflow("18446744074s".into()))
        );
    }

    #[test]
    fn plain_numbers_take_no_unit_or_fraction() {
        assert_eq!(parse_number("0x7f0000000000"), Ok(0x7f00_0000_0000));
        assert_eq!(parse_number("17"), Ok(17));
        assert_eq!(parse_number("1.0"), Err(UnitError::BadNumber("1.0".into())));
        assert_eq!(
            parse_number("1KiB"),
            Err(UnitError::BadNumber("1KiB".into()))
        );
        assert_eq!(
            parse_number("18446744073709551616"),
            Err(UnitError::Overflow("18446744073709551616".into()))
        );
    }
}
