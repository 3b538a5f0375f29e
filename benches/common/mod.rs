//! Measurement helpers both benchmarks use. Included as `mod common;`.

use std::{error::Error, fs, path::Path};

/// What a benchmark step returns.
pub(crate) type Res<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn percentile(samples: &[f64], pct: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let idx = (sorted.len().saturating_sub(1) * pct + 50) / 100;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

/// Runs one round of both sides, alternating which goes first so that neither
/// always pays for what the other left behind (dirty pages, a pending journal commit).
pub(crate) fn interleave(
    round: u32,
    ours: impl FnOnce() -> Res<f64>,
    base: impl FnOnce() -> Res<f64>,
) -> Res<(f64, f64)> {
    if round.is_multiple_of(2) {
        let ours = ours()?;
        Ok((ours, base()?))
    } else {
        let base = base()?;
        Ok((ours()?, base))
    }
}

/// The file system type and device of the mount holding `path`.
pub(crate) fn mount_of(path: &Path) -> Option<String> {
    let path = fs::canonicalize(path).ok()?;
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point).then(|| (point.len(), format!("{kind} on {device}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, desc)| desc)
}
