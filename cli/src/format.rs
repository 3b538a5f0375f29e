//! Turning sizes, times and rows into text, with std only.

use std::{
    io::{self, Write},
    time::{SystemTime, UNIX_EPOCH},
};

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `bytes` for people: `512 B`, `1.2 KiB`, `3.0 MiB`.
pub(crate) fn size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit: u128 = 1024;
    let mut shown = (0, "B");
    for name in UNITS {
        // Tenths of the unit, rounded to nearest; integer maths keeps it exact.
        shown = ((u128::from(bytes) * 10 + unit / 2) / unit, name);
        // 1023.96 KiB rounds to 1024.0 KiB, which reads better as 1.0 MiB.
        if shown.0 < 10 * 1024 {
            break;
        }
        unit *= 1024;
    }
    let (tenths, name) = shown;
    format!("{}.{} {name}", tenths / 10, tenths % 10)
}

/// `time` in UTC as `YYYY-MM-DD HH:MM:SS`.
pub(crate) fn time(time: SystemTime) -> String {
    let Ok(since) = time.duration_since(UNIX_EPOCH) else {
        return "before 1970".to_owned();
    };
    let secs = since.as_secs();
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}")
}

/// Writes `rows` under `header` as columns separated by two spaces, each as wide
/// as its widest cell; the last column is not padded, so lines have no trailing blanks.
pub(crate) fn table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = header.map(|title| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (idx, (cell, width)) in row.iter().zip(widths).enumerate() {
            if idx + 1 == N {
                line.push_str(cell);
            } else {
                let pad = width - cell.chars().count() + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The proleptic Gregorian date `days` after 1970-01-01: Howard Hinnant's
/// `civil_from_days`, for non-negative days only.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1229), "1.2 KiB");
        assert_eq!(size(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(size(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn times_are_utc_civil_dates() {
        let at = |secs| time(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(at(1_735_689_600), "2025-01-01 00:00:00");
        assert_eq!(at(4_107_542_400), "2100-03-01 00:00:00");
        assert_eq!(time(UNIX_EPOCH - Duration::from_secs(1)), "before 1970");
    }

    #[test]
    fn tables_align_columns() -> io::Result<()> {
        let mut out = Vec::new();
        let rows = [["a".to_owned(), "long value".to_owned(), "x".to_owned()]];
        table(&mut out, ["NAME", "V", "LAST"], &rows)?;
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text, "NAME  V           LAST\na     long value  x\n");
        Ok(())
    }
}
