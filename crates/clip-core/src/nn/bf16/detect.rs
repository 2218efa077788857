//! Which bf16 hardware this process may use: AMX (with the OS's permission for its tile state),
//! AVX512-BF16, or none.

use super::amx;

/// What this processor (and OS) offers for bf16 GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Support {
    /// AMX tiles with bf16 (`amx_tile` + `amx_bf16`) and the OS's permission to use them.
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`) only: refused for `--precision bf16`. Measured on this
    /// project's Sapphire Rapids (`pack::tests::timing_vdpbf16ps_against_fma`, one thread, 12
    /// register accumulators): 49 G bf16 multiply-adds/s against 100 G/s for fp32's
    /// `VFMADD231PS` (0.49×), so a kernel on it would be slower than fp32, not faster.
    Avx512Bf16,
    /// No bf16 arithmetic in hardware.
    None,
}

/// The environment variable that turns AMX off (`CLIPMINE_NO_AMX=1`), to exercise the fallback.
pub const NO_AMX_ENV: &str = "CLIPMINE_NO_AMX";

/// The best bf16 hardware this process may use: [`Bf16Support::Amx`] when CPUID reports
/// `amx_tile` and `amx_bf16` and Linux granted the tile-data permission (asked for once per
/// process, confirmed with `ARCH_GET_XCOMP_PERM`), unless `CLIPMINE_NO_AMX=1`; else
/// [`Bf16Support::Avx512Bf16`] when the CPU has it; else [`Bf16Support::None`] (also on every
/// target other than x86-64 Linux for AMX, and other than x86-64 for AVX512-BF16).
pub fn bf16_hardware() -> Bf16Support {
    if amx_usable() && !amx_disabled_by_env() {
        Bf16Support::Amx
    } else if avx512_bf16() {
        Bf16Support::Avx512Bf16
    } else {
        Bf16Support::None
    }
}

pub(crate) fn amx_disabled_by_env() -> bool {
    std::env::var(NO_AMX_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16() -> bool {
    std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16() -> bool {
    false
}

/// CPUID reports AMX-TILE and AMX-BF16 and the OS granted this process the tile state (cached:
/// the permission request runs once per process, and permission is per process).
pub(super) fn amx_usable() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| amx_cpuid() && amx::request_permission())
}

#[cfg(target_arch = "x86_64")]
fn amx_cpuid() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaf 7 exists on every x86-64 processor with AMX; check the maximum leaf first.
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_cpuid() -> bool {
    false
}
