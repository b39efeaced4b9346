//! Figures for people: durations and quantities to three significant
//! figures, with a unit that keeps them between 1 and 1000 where it can.

use std::time::Duration;

/// `value` to three significant figures (`0.0123`, `1.23`, `123`, `12300`);
/// non-finite values as `-`.
pub fn sig3(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_string();
    }
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    let rounded = format!("{value:.decimals$}");
    // Rounding can carry into the next power of ten (999.5 -> 1000).
    let carried: f64 = rounded.parse().unwrap_or(value);
    if carried.abs() >= 10f64.powi(magnitude + 1) && decimals > 0 {
        return format!("{carried:.prec$}", prec = decimals - 1);
    }
    if decimals == 0 && magnitude > 2 {
        // Keep three significant figures of a large number.
        let scale = 10f64.powi(magnitude - 2);
        return format!("{:.0}", (value / scale).round() * scale);
    }
    rounded
}

/// A duration to three significant figures in ns, us, ms or s
/// (`812 ns`, `64.8 us`, `1.23 ms`, `4.56 s`, `372 s`).
pub fn duration(d: Duration) -> String {
    seconds(d.as_secs_f64())
}

/// A time in seconds as [`duration`] writes it.
pub fn seconds(secs: f64) -> String {
    if !secs.is_finite() {
        return "-".to_string();
    }
    let (value, unit) = if secs == 0.0 {
        (0.0, "s")
    } else if secs < 1e-6 {
        (secs * 1e9, "ns")
    } else if secs < 1e-3 {
        (secs * 1e6, "us")
    } else if secs < 1.0 {
        (secs * 1e3, "ms")
    } else {
        (secs, "s")
    };
    let text = sig3(value);
    // 999.7 us rounds to 1000 us: say 1.00 ms instead.
    match (text.as_str(), unit) {
        ("1000", "ns") => "1.00 us".to_string(),
        ("1000", "us") => "1.00 ms".to_string(),
        ("1000", "ms") => "1.00 s".to_string(),
        _ => format!("{text} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_significant_figures() {
        assert_eq!(sig3(0.0), "0");
        assert_eq!(sig3(1.0), "1.00");
        assert_eq!(sig3(1.23456), "1.23");
        assert_eq!(sig3(12.3456), "12.3");
        assert_eq!(sig3(123.456), "123");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(12345.0), "12300");
        assert_eq!(sig3(-4.5678), "-4.57");
        assert_eq!(sig3(9.996), "10.0");
        assert_eq!(sig3(99.96), "100");
        assert_eq!(sig3(f64::NAN), "-");
    }

    #[test]
    fn durations_pick_a_unit() {
        assert_eq!(duration(Duration::ZERO), "0 s");
        assert_eq!(duration(Duration::from_nanos(812)), "812 ns");
        assert_eq!(duration(Duration::from_nanos(64_812)), "64.8 us");
        assert_eq!(duration(Duration::from_nanos(1_234_567)), "1.23 ms");
        assert_eq!(duration(Duration::from_nanos(4_561_234_567)), "4.56 s");
        assert_eq!(duration(Duration::from_secs(372)), "372 s");
        assert_eq!(duration(Duration::from_nanos(999_700)), "1.00 ms");
        assert_eq!(duration(Duration::from_secs(12_345)), "12300 s");
    }
}
