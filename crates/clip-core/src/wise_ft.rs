//! WiSE-FT (Wortsman et al., 2022): the weights `(1−α)·start + α·fine-tuned`, key by key.
//!
//! Fine-tuning a CLIP on a few hundred pairs trades what it knew for what it learns; averaging
//! the weights of the checkpoint and the fine-tuned model recovers much of the first while keeping
//! most of the second (the paper's `wise_ft.py` `_merge`, here over both towers, the projections,
//! `logit_scale` and BatchNorm statistics). Both models must share one architecture.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// The most α values one sweep may hold: each is a whole evaluation of the blended model, so a
/// sweep of thousands is a mistake (a step typed as `1e-12`), not a request.
pub const MAX_ALPHAS: usize = 201;

/// The α values of `--wise-ft`: one value (`0.5`) or a sweep `FROM:TO:STEP` (`0:1:0.1`, both ends
/// included), each in [0, 1].
pub fn parse_alphas(spec: &str) -> Result<Vec<f64>> {
    let num = |s: &str| -> Result<f64> {
        s.trim()
            .parse::<f64>()
            .with_context(|| format!("--wise-ft {spec:?}: {s:?} is not a number"))
    };
    let alphas = match spec.split(':').collect::<Vec<_>>()[..] {
        [a] => vec![num(a)?],
        [from, to, step] => {
            let (from, to, step) = (num(from)?, num(to)?, num(step)?);
            if step.is_nan() || step <= 0.0 || to < from {
                bail!("--wise-ft {spec:?}: a sweep is FROM:TO:STEP with FROM ≤ TO and STEP > 0, e.g. 0:1:0.1");
            }
            // Counted in f64 before anything is allocated: `0:1:1e-12` would be 10^12 values.
            let steps = ((to - from) / step + 1e-9).floor();
            if !steps.is_finite() || steps + 1.0 > MAX_ALPHAS as f64 {
                bail!(
                    "--wise-ft {spec:?}: that sweep has {} values; at most {MAX_ALPHAS} (each is a full evaluation) — use a larger STEP, e.g. 0:1:0.05",
                    match steps {
                        s if s < 1e15 => format!("{}", s as u64 + 1),
                        s if s.is_finite() => format!("{s:.1e}"),
                        _ => "infinitely many".into(),
                    }
                );
            }
            let n = steps as usize;
            // Rounded to the step's decimals, so 0:1:0.1 gives 0.3, not 0.30000000000000004.
            let round = |x: f64| (x * 1e9).round() / 1e9;
            (0..=n).map(|i| round(from + i as f64 * step)).collect()
        }
        _ => bail!("--wise-ft {spec:?}: give one α (0.5) or a sweep FROM:TO:STEP (0:1:0.1)"),
    };
    if let Some(a) = alphas.iter().find(|a| !(0.0..=1.0).contains(*a)) {
        bail!("--wise-ft {spec:?}: α = {a} is outside [0, 1] (0 is the checkpoint, 1 the fine-tuned model)");
    }
    Ok(alphas)
}

/// `(1−α)·start[k] + α·tuned[k]` for every key: exactly `start` at α = 0 and `tuned` at α = 1.
/// The two must hold the same keys and shapes; the error names the first that differ.
pub fn interpolate(
    start: &BTreeMap<String, Tensor>,
    tuned: &BTreeMap<String, Tensor>,
    alpha: f64,
) -> Result<HashMap<String, Tensor>> {
    if let Some(k) = start.keys().find(|k| !tuned.contains_key(*k)) {
        bail!("WiSE-FT: {k} is in the start model but not in the fine-tuned one");
    }
    if let Some(k) = tuned.keys().find(|k| !start.contains_key(*k)) {
        bail!("WiSE-FT: {k} is in the fine-tuned model but not in the start");
    }
    start
        .iter()
        .map(|(k, a)| {
            let b = &tuned[k];
            if a.dims() != b.dims() {
                bail!(
                    "WiSE-FT: {k} has shape {:?} in the start, {:?} fine-tuned",
                    a.dims(),
                    b.dims()
                );
            }
            // Two products and a sum (not a + α(b − a)), so both ends are exact.
            let mixed = ((a * (1.0 - alpha))? + (b * alpha)?)?;
            Ok((k.clone(), mixed))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn alphas_parse_as_one_value_or_a_sweep() {
        assert_eq!(parse_alphas("0.5").unwrap(), vec![0.5]);
        let s = parse_alphas("0:1:0.1").unwrap();
        assert_eq!(s.len(), 11);
        assert_eq!(s[3], 0.3);
        assert_eq!(s[10], 1.0);
        assert_eq!(parse_alphas("0.2:0.6:0.2").unwrap(), vec![0.2, 0.4, 0.6]);
        for bad in ["1.5", "x", "0:1", "1:0:0.1", "0:1:0", "0:2:1"] {
            assert!(parse_alphas(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sweep_of_more_than_a_few_hundred_points_is_refused_with_its_count() {
        // Before the bound, 0:1:1e-12 tried to allocate 10^12 values (8 TB) and aborted.
        let e = parse_alphas("0:1:1e-12").unwrap_err().to_string();
        assert!(e.contains("1000000000001 values") && e.contains("at most 201"), "{e}");
        let e = parse_alphas("0:1:1e-300").unwrap_err().to_string();
        assert!(e.contains("values; at most"), "{e}");
        assert_eq!(parse_alphas("0:1:0.005").unwrap().len(), 201);
        assert!(parse_alphas("0:1:0.004").is_err());
    }

    #[test]
    fn the_ends_are_exact_and_the_middle_is_the_mean() -> Result<()> {
        let d = &Device::Cpu;
        let start = BTreeMap::from([("w".to_string(), Tensor::new(&[0.1f32, -3.7, 1e-8], d)?)]);
        let tuned = BTreeMap::from([("w".to_string(), Tensor::new(&[0.3f32, 2.2, -5.0], d)?)]);
        let at = |a| -> Result<Vec<f32>> { Ok(interpolate(&start, &tuned, a)?["w"].to_vec1()?) };
        assert_eq!(at(0.0)?, vec![0.1, -3.7, 1e-8]);
        assert_eq!(at(1.0)?, vec![0.3, 2.2, -5.0]);
        let mid = at(0.5)?;
        assert!((mid[0] - 0.2).abs() < 1e-7 && (mid[1] + 0.75).abs() < 1e-6);
        let other = BTreeMap::from([("v".to_string(), Tensor::new(&[0f32], d)?)]);
        let e = interpolate(&start, &other, 0.5).unwrap_err().to_string();
        assert!(e.contains("w is in the start"), "{e}");
        Ok(())
    }
}
