//! The f32 ↔ bf16 conversions: round to nearest even, as the hardware converts, so the AMX and
//! fallback paths multiply the same operands.

/// f32 → bf16 bits, rounding to nearest even (as `VCVTNEPS2BF16` and `half::bf16::from_f32`).
/// NaN stays NaN (quietened, sign kept), ±∞ stays ±∞, finite values beyond bf16's range round to
/// ±∞. Subnormal f32 inputs become ±0, as the hardware conversion does: AMX treats subnormal bf16
/// inputs as zero anyway, so flushing here makes the AMX and fallback paths see the same operands.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    // Branch-free (selects), so that packing loops vectorise.
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    let high = bits >> 16;
    // No overflow: the largest non-NaN pattern is 0xff80_0000 (−∞), and + 0x8000 fits.
    let rounded = bits.wrapping_add(0x7fff + (high & 1)) >> 16;
    let out = if abs > 0x7f80_0000 {
        high | 0x0040 // NaN: keep sign and top payload, set the quiet bit
    } else if abs < 0x0080_0000 {
        high & 0x8000 // ±0 or subnormal: signed zero
    } else {
        rounded
    };
    out as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `x` rounded to the nearest bf16 (see [`f32_to_bf16_bits`]), as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_to_nearest_even_edge_cases() {
        // Exactly representable values are unchanged.
        for x in [0.0f32, 1.0, -2.5, 0.15625, 65280.0, f32::MIN_POSITIVE] {
            assert_eq!(round_bf16(x), x);
        }
        // Ties go to the even significand: 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷.
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2·2⁻⁷ (even): up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(-(1.0 + 3.0 * 2f32.powi(-8))), 0xbf82);
        // Just above and below a tie round to the nearest.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_7fff)), 0x3f81);
        // Infinities stay, NaN stays NaN (quiet, sign kept), even a NaN whose payload is only in
        // the low bits (truncation would make it ∞).
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::NEG_INFINITY), 0xff80);
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan());
        assert!(round_bf16(f32::from_bits(0xff80_0001)).is_nan());
        assert!(round_bf16(f32::from_bits(0xff80_0001)).is_sign_negative());
        // f32::MAX rounds up past bf16's largest finite value to ∞; bf16's largest value stays.
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::MIN), f32::NEG_INFINITY);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f7f_0000)), 0x7f7f);
        // Signed zeros kept; subnormals flush to signed zero (as VCVTNEPS2BF16).
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x0000_0001)), 0x0000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x807f_ffff)), 0x8000);
    }

    /// The rounding agrees with candle's f32 → bf16 conversion (`half::bf16::from_f32`, RNE) on
    /// every normal, infinite and NaN input class, over a sweep of bit patterns that includes the
    /// ties (low 16 bits 0x8000) on both sides.
    #[test]
    fn rounding_matches_candle_bf16() {
        use candle_core::{DType, Device, Tensor};
        let xs: Vec<f32> = (0u32..1 << 20)
            .map(|i| {
                let bits = i.wrapping_mul(4099);
                // Every other one an exact tie (low 16 bits 0x8000).
                f32::from_bits(if i & 1 == 0 {
                    bits
                } else {
                    (bits & 0xffff_0000) | 0x8000
                })
            })
            .filter(|x| !x.is_subnormal())
            .collect();
        let theirs = Tensor::from_slice(&xs, xs.len(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        for (&x, &t) in xs.iter().zip(&theirs) {
            let ours = round_bf16(x);
            assert!(
                ours.to_bits() == t.to_bits() || (ours.is_nan() && t.is_nan()),
                "{x:e} ({:#x}): {ours:e} vs {t:e}",
                x.to_bits()
            );
        }
    }
}
