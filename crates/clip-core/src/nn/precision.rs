//! The precision of the GEMMs: fp32, or bf16 mixed precision as PyTorch's autocast means it.
//!
//! In bf16 every GEMM of the fused CPU kernels — linear layers forward and backward, attention's
//! scores and context, convolutions (im2col GEMMs) — rounds its operands to bf16 as it packs
//! them and accumulates in fp32 on AMX ([`super::bf16`]). Everything else stays fp32: master
//! weights, AdamW's state, the loss, norms, softmax, reductions, the logit scale, and every
//! tensor between the ops (the callers keep fp32 tensors; only the GEMMs' packed operands are
//! bf16). GEMMs too small to gain from AMX (under 2²¹ multiply-adds, or under 32 rows or
//! columns: `bf16::bf16_pays`) stay fp32, as they measured slower in bf16.
//!
//! The choice is process-wide, like autocast's context around a whole training loop and like
//! [`super::dispatch::force_composed`]: set it once at the start of a program
//! ([`set_precision`]), before the first forward pass. [`set_precision`] refuses bf16 on a CPU
//! without AMX, saying why: emulated bf16 is slower than fp32 (PyTorch's bf16 on AVX2-only CPUs
//! is 44–499× slower than its fp32, pytorch#146508), so clipmine never falls back silently.

use std::sync::atomic::{AtomicBool, Ordering};

use super::bf16::{bf16_hardware, Bf16Support};

pub use crate::config::Precision;

static BF16: AtomicBool = AtomicBool::new(false);

/// Sets the precision of every GEMM in this process. bf16 is refused, with the reason, where the
/// processor (or OS) offers no AMX bf16 tiles ([`bf16_refusal`]); fp32 is always accepted.
pub fn set_precision(p: Precision) -> anyhow::Result<()> {
    if p == Precision::Bf16 {
        if let Some(why) = bf16_refusal() {
            anyhow::bail!("--precision bf16 refused: {why}")
        }
        if super::dispatch::composed_forced() {
            anyhow::bail!(
                "--precision bf16 refused: {}=1 forces the composed candle ops, whose GEMMs are fp32 only",
                super::dispatch::COMPOSED_ENV
            )
        }
    }
    BF16.store(p == Precision::Bf16, Ordering::Relaxed);
    Ok(())
}

/// The precision set by [`set_precision`] (fp32 until then).
pub fn precision() -> Precision {
    if bf16_gemms() {
        Precision::Bf16
    } else {
        Precision::Fp32
    }
}

/// Whether the GEMMs run in bf16 (the fast check the kernels make on every call).
#[inline]
pub fn bf16_gemms() -> bool {
    BF16.load(Ordering::Relaxed)
}

static SMALL: AtomicBool = AtomicBool::new(false);

/// Also runs the GEMMs too small to gain from AMX in bf16 (process-wide): for tests, whose tiny
/// models have only small GEMMs, and for measuring what the size rule saves.
pub fn bf16_small_gemms(on: bool) {
    SMALL.store(on, Ordering::Relaxed);
}

/// Whether an m×k · k×n GEMM runs in bf16 now: bf16 precision set, and the GEMM large enough to
/// gain from it (`bf16::bf16_pays`) unless [`bf16_small_gemms`].
#[inline]
pub(crate) fn bf16_gemm(m: usize, n: usize, k: usize) -> bool {
    bf16_gemms() && (super::bf16::bf16_pays(m, n, k) || SMALL.load(Ordering::Relaxed))
}

/// Why `--precision bf16` cannot run here, or `None` where it can (AMX).
pub fn bf16_refusal() -> Option<String> {
    match bf16_hardware() {
        Bf16Support::Amx => None,
        _ if super::bf16::amx_disabled_by_env() => Some(format!(
            "AMX is turned off by {}=1, and clipmine runs bf16 GEMMs on AMX tiles only",
            super::bf16::NO_AMX_ENV
        )),
        Bf16Support::Avx512Bf16 => Some(
            "this CPU has AVX512-BF16 but no AMX tiles, and clipmine's bf16 GEMM needs AMX: measured on a Xeon, \
             VDPBF16PS gives 0.49× the multiply-adds per second of an fp32 FMA, so a kernel on it would be slower \
             than fp32 (use fp32, which is what this CPU runs best)"
                .into(),
        ),
        Bf16Support::None => Some(
            "this CPU has no bf16 arithmetic (neither AMX nor AVX512-BF16; or the OS refused the AMX tile state), so \
             bf16 would be emulated and slower than fp32 (PyTorch's bf16 on AVX2-only CPUs is 44–499× slower than \
             fp32, pytorch#146508)"
                .into(),
        ),
    }
}

/// One line for stage 1: what the CPU offers and what `--precision bf16` would use.
pub fn describe_hardware() -> String {
    match bf16_hardware() {
        Bf16Support::Amx => "CPU bf16: AMX (amx_tile + amx_bf16, tile state granted): --precision bf16 runs every \
                             GEMM on AMX tiles (bf16 operands, fp32 accumulation)"
            .into(),
        Bf16Support::Avx512Bf16 => {
            format!(
                "CPU bf16: AVX512-BF16 only: --precision bf16 is refused ({})",
                bf16_refusal().unwrap_or_default()
            )
        }
        Bf16Support::None => {
            format!(
                "CPU bf16: none: --precision bf16 is refused ({})",
                bf16_refusal().unwrap_or_default()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("BFloat16".parse::<Precision>().unwrap(), Precision::Bf16);
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("fp32 or bf16"), "{e}");
    }

    #[test]
    fn bf16_is_accepted_exactly_where_amx_is() {
        // Only the refusal is checked here (setting it would change the process-wide precision
        // under the other unit tests).
        assert_eq!(bf16_refusal().is_none(), bf16_hardware() == Bf16Support::Amx);
        set_precision(Precision::Fp32).unwrap();
        assert_eq!(precision(), Precision::Fp32);
    }
}
