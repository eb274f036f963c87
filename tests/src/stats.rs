//! What the benchmarks compute of their measurements: samples of one quantity, their
//! median and spread.

use std::time::Duration;

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Samples of one quantity.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    /// Adds one.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// The samples, smallest first.
    pub fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The value at quantile `q` (nearest rank); NaN without samples.
    pub fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    /// The median (of an even count, the upper of the middle two).
    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    /// `median (min–max)`, the one value, or `-` without samples.
    pub fn show_range(&self, decimals: usize) -> String {
        let v = self.sorted();
        match v.len() {
            0 => "-".into(),
            1 => format!("{:.decimals$}", v[0]),
            n => format!(
                "{:.decimals$} ({:.decimals$}–{:.decimals$})",
                self.median(),
                v[0],
                v[n - 1]
            ),
        }
    }

    /// `median (p10–p90)`.
    pub fn show_spread(&self, decimals: usize) -> String {
        let (m, lo, hi) = (self.median(), self.quantile(0.1), self.quantile(0.9));
        format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_or_the_upper_of_the_middle_two() {
        assert_eq!(Samples(vec![3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(Samples(vec![4.0, 1.0, 3.0, 2.0]).median(), 3.0);
        assert!(Samples::default().median().is_nan());
        assert_eq!(Samples(vec![2.0, 1.0]).show_range(1), "2.0 (1.0–2.0)");
        assert_eq!(Samples(vec![1.5]).show_range(1), "1.5");
    }
}
