//! The gRPC `grpc-timeout` header: how long a client will wait, which bounds
//! how long the activator holds its call, and what is left of it when the
//! call is forwarded.

use std::time::Duration;

/// The header's name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`,
/// `S`, `m` for milliseconds, `u`, `n`). `None` when malformed: the
/// activator then holds the call up to its own limit and forwards the header
/// unchanged, for the server to judge.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Writes `remaining` as a `grpc-timeout` value (milliseconds, rounded up
/// so a call never gets less than it has; at least 1 ms; the unit grows
/// when 8 digits do not suffice).
pub fn format_grpc_timeout(remaining: Duration) -> String {
    let millis = remaining.as_nanos().div_ceil(1_000_000).max(1);
    if millis < 100_000_000 {
        return format!("{millis}m");
    }
    let seconds = remaining.as_secs().max(1);
    if seconds < 100_000_000 {
        format!("{seconds}S")
    } else {
        format!("{}H", (seconds / 3600).min(99_999_999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("15S"), Some(Duration::from_secs(15)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("1000n"), Some(Duration::from_micros(1)));
        assert_eq!(parse_grpc_timeout("0m"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_not_timeouts() {
        for bad in ["", "m", "10", "10x", "123456789S", "-5S", "1.5S", "5 S", "5s", "éS"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatting_rounds_up_and_parses_back() {
        assert_eq!(format_grpc_timeout(Duration::from_micros(1500)), "2m");
        assert_eq!(format_grpc_timeout(Duration::ZERO), "1m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(300)), "300000m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        for d in [Duration::from_millis(7), Duration::from_secs(42), Duration::from_secs(3 * 86_400 * 365)] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(back >= d.min(Duration::from_secs(99_999_999 * 3600)), "{d:?} -> {back:?}");
        }
    }
}
