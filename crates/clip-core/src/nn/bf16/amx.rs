//! The AMX path of [`super::gemm_bf16_into`] (x86-64 Linux): the operand packers, the tile
//! micro-kernel in `asm!` and the GEMM driver over (row panel, column group) tasks.

use super::{f32_to_bf16_bits, pack, MatRef, Scratch};
use crate::nn::vmath::vectorized;
use rayon::prelude::*;

/// Whether the AVX-512 packers ([`pack`]) run: every AMX processor has their instructions.
#[inline]
fn fast_pack() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(pack::usable)
}

/// `dst[i] = bf16(src[i])` (the rest of `dst` is left as is).
#[inline(always)]
fn convert(dst: &mut [u16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_bits(s);
    }
}

/// Rows i0..i0+32 of A (zero past m and k) as 32 × kp bf16, row-major.
///
/// # Safety
/// A readable at (i < m, p < k).
#[inline(always)]
unsafe fn pack_a_panel(dst: &mut [u16], a: MatRef, i0: usize, m: usize, k: usize, kp: usize) {
    let rows = (m - i0).min(32);
    if fast_pack() && (a.cs == 1 || a.rs == 1) {
        if a.cs == 1 {
            for (r, out) in dst.chunks_exact_mut(kp).take(rows).enumerate() {
                // SAFETY: row i0 + r < m has k elements at unit stride; out holds kp ≥ k.
                unsafe { pack::convert(out.as_mut_ptr(), a.ptr.add((i0 + r) * a.rs), k) };
                out[k..].fill(0);
            }
            dst[rows * kp..32 * kp].fill(0);
        } else {
            // SAFETY: the caller's contract; dst holds 32 · kp.
            unsafe { pack::a_panel_transposed(dst, a, i0, m, k, kp) };
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { pack_a_panel_plain(dst, a, i0, m, k, kp) }
}

/// [`pack_a_panel`] in plain loops (no AVX-512 needed).
///
/// # Safety
/// As [`pack_a_panel`].
#[inline(always)]
unsafe fn pack_a_panel_plain(dst: &mut [u16], a: MatRef, i0: usize, m: usize, k: usize, kp: usize) {
    let rows = (m - i0).min(32);
    if a.cs == 1 {
        for (r, out) in dst.chunks_exact_mut(kp).take(rows).enumerate() {
            // SAFETY: row i0 + r < m has k elements at unit stride.
            let src = unsafe { std::slice::from_raw_parts(a.ptr.add((i0 + r) * a.rs), k) };
            convert(&mut out[..k], src);
            out[k..].fill(0);
        }
    } else {
        // A transposed operand (rs = 1) has each column's 32 rows contiguous: convert a block
        // of 32 columns into `block` (column-major, vectorised), then write it transposed.
        let mut block = [[0u16; 32]; 32];
        for p0 in (0..k).step_by(32) {
            let pw = (k - p0).min(32);
            for (pp, col) in block.iter_mut().enumerate().take(pw) {
                if a.rs == 1 {
                    // SAFETY: rows i0..i0 + rows of column p0 + pp are within A.
                    let src = unsafe { std::slice::from_raw_parts(a.ptr.add(i0 + (p0 + pp) * a.cs), rows) };
                    convert(&mut col[..rows], src);
                } else {
                    for (r, c) in col.iter_mut().enumerate().take(rows) {
                        // SAFETY: (i0 + r, p0 + pp) < (m, k).
                        *c = f32_to_bf16_bits(unsafe { a.at(i0 + r, p0 + pp) });
                    }
                }
            }
            for r in 0..rows {
                let out = &mut dst[r * kp + p0..][..pw];
                for (pp, o) in out.iter_mut().enumerate() {
                    *o = block[pp][r];
                }
            }
        }
        for out in dst.chunks_exact_mut(kp).take(rows) {
            out[k..].fill(0);
        }
    }
    dst[rows * kp..32 * kp].fill(0);
}

/// Panel `jb` of B (columns 32jb..32jb+32, zero past n and k) in the VNNI-2 layout: kp/2
/// pair-rows of 32 pairs, a pair one u32 with the even row in the low half (the first bf16
/// in memory): dst[(r/2)·32 + (j − 32jb)] = B[r][j] | B[r+1][j] << 16.
///
/// # Safety
/// B readable at (p < k, j < n).
#[inline(always)]
unsafe fn pack_b_panel(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
    if fast_pack() && b.cs == 1 {
        // SAFETY: the caller's contract.
        return unsafe { pack::b_panel_rows(dst, b, k, n, jb) };
    }
    if fast_pack() && b.rs == 1 {
        // SAFETY: the caller's contract.
        return unsafe { pack::b_panel_transposed(dst, b, k, n, jb) };
    }
    // SAFETY: the caller's contract.
    unsafe { pack_b_panel_plain(dst, b, k, n, jb) }
}

/// [`pack_b_panel`] in plain loops (no AVX-512 needed).
///
/// # Safety
/// As [`pack_b_panel`].
#[inline(always)]
unsafe fn pack_b_panel_plain(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
    let j0 = jb * 32;
    let w = (n - j0).min(32);
    if b.cs == 1 {
        for (pr, out) in dst.chunks_exact_mut(32).enumerate() {
            let r = 2 * pr;
            if r >= k {
                out.fill(0);
                continue;
            }
            // SAFETY: rows r (and r + 1 when < k) have columns j0..j0 + w at unit stride.
            let even = unsafe { std::slice::from_raw_parts(b.ptr.add(r * b.rs + j0), w) };
            if r + 1 < k {
                let odd = unsafe { std::slice::from_raw_parts(b.ptr.add((r + 1) * b.rs + j0), w) };
                for ((o, &x), &y) in out.iter_mut().zip(even).zip(odd) {
                    *o = u32::from(f32_to_bf16_bits(x)) | u32::from(f32_to_bf16_bits(y)) << 16;
                }
            } else {
                for (o, &x) in out.iter_mut().zip(even) {
                    *o = u32::from(f32_to_bf16_bits(x));
                }
            }
            out[w..].fill(0);
        }
    } else {
        let pairs = dst.len() / 32;
        if b.rs == 1 {
            // A transposed operand (a weight W read as Wᵀ): column j is contiguous, and its
            // bf16 values read as u32 are the VNNI pairs (row 2p low, 2p + 1 high) already:
            // convert the column (vectorised), then scatter the pairs.
            let mut col = [0u16; 2 * 256];
            for jj in 0..w {
                for p0 in (0..pairs).step_by(256) {
                    let pn = (pairs - p0).min(256);
                    let r0 = 2 * p0;
                    let rn = if r0 < k { (k - r0).min(2 * pn) } else { 0 };
                    // SAFETY: rows r0..r0 + rn < k of column j0 + jj are contiguous.
                    let src = unsafe { std::slice::from_raw_parts(b.ptr.add(r0 + (j0 + jj) * b.cs), rn) };
                    convert(&mut col[..rn], src);
                    col[rn..2 * pn].fill(0);
                    for (q, pair) in col[..2 * pn].chunks_exact(2).enumerate() {
                        dst[(p0 + q) * 32 + jj] = u32::from(pair[0]) | u32::from(pair[1]) << 16;
                    }
                }
            }
        } else {
            for jj in 0..w {
                for pr in 0..pairs {
                    let r = 2 * pr;
                    // SAFETY: (r, j0 + jj) and (r + 1, j0 + jj) read only when within B.
                    let lo = if r < k {
                        f32_to_bf16_bits(unsafe { b.at(r, j0 + jj) })
                    } else {
                        0
                    };
                    let hi = if r + 1 < k {
                        f32_to_bf16_bits(unsafe { b.at(r + 1, j0 + jj) })
                    } else {
                        0
                    };
                    dst[pr * 32 + jj] = u32::from(lo) | u32::from(hi) << 16;
                }
            }
        }
        for out in dst.chunks_exact_mut(32) {
            out[w..].fill(0);
        }
    }
}

const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
/// XSTATE component number of the tile data (XFEATURE_XTILEDATA).
const XTILEDATA: libc::c_long = 18;

/// Asks Linux for the AMX tile-data state for this process and confirms the grant (oneDNN's
/// sequence: GET, REQ if absent, GET again). Call after the CPUID check only.
pub(super) fn request_permission() -> bool {
    let granted = || {
        let mut mask: u64 = 0;
        // SAFETY: arch_prctl(ARCH_GET_XCOMP_PERM, &mut u64) writes one u64 through the
        // pointer, which points at a live local.
        let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut mask as *mut u64) };
        rc == 0 && mask & (1 << XTILEDATA) != 0
    };
    if granted() {
        return true;
    }
    // SAFETY: ARCH_REQ_XCOMP_PERM takes an integer (the highest XSTATE component wanted) and
    // touches no memory of ours; on failure it returns −1 and changes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA) };
    rc == 0 && granted()
}

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct TileCfg {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Every tile 16 rows × 64 bytes: C 16×16 f32, A 16×32 bf16, B 16 pair-rows × 16 pairs.
const CFG: TileCfg = {
    let mut cfg = TileCfg {
        palette: 1,
        start_row: 0,
        _reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    let mut t = 0;
    while t < 8 {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
        t += 1;
    }
    cfg
};

const fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The start of each 32×32 block of [`kernel_strip`], as one `asm!` template string (the
/// instructions one per line, as separate template strings would be): `{ai}` ← C's row 16, then
/// C's four tiles zeroed (`params[2]` non-zero: the first K block, not accumulating) or loaded.
macro_rules! c_tiles_in {
    () => {
        concat!(
            "lea {ai}, [{c} + {sc}*8]\n",
            "lea {ai}, [{ai} + {sc}*8]\n",
            "cmp qword ptr [{p} + 16], 0\n",
            "je 4f\n",
            "tilezero tmm0\n",
            "tilezero tmm1\n",
            "tilezero tmm2\n",
            "tilezero tmm3\n",
            "jmp 5f\n",
            "4:\n",
            "tileloadd tmm0, [{c} + {sc}*1]\n",
            "tileloadd tmm1, [{c} + {sc}*1 + 64]\n",
            "tileloadd tmm2, [{ai} + {sc}*1]\n",
            "tileloadd tmm3, [{ai} + {sc}*1 + 64]\n",
            "5:"
        )
    };
}

/// The end of each 32×32 block of [`kernel_strip`], as one `asm!` template string: C's four
/// tiles stored (rows 16–31 through `{ai}`).
macro_rules! c_tiles_out {
    () => {
        concat!(
            "tilestored [{c} + {sc}*1], tmm0\n",
            "tilestored [{c} + {sc}*1 + 64], tmm1\n",
            "lea {ai}, [{c} + {sc}*8]\n",
            "lea {ai}, [{ai} + {sc}*8]\n",
            "tilestored [{ai} + {sc}*1], tmm2\n",
            "tilestored [{ai} + {sc}*1 + 64], tmm3"
        )
    };
}

/// The micro-kernel over a strip of `panels` 32×32 blocks of C side by side: for each, C
/// (= 0 first when `zero`) += A·B_j, C_j at `c` + 32·j f32 (row stride `ldc` elements), A 32
/// rows × `kc` bf16 at `a` (row stride `lda` elements), B_j VNNI-2 packed, `kc`/2 pair-rows of
/// 32 pairs (64 u16) at `b` + j·`bpanel` u16, row stride `ldb` u16. Tiles: tmm0–3 the four
/// 16×16 f32 C quadrants, tmm4/5 A rows 0–15 / 16–31, tmm6/7 B columns 0–15 / 16–31; 4
/// `tdpbf16ps` (16×16×32 each) per 32 of K, the loads placed between them (tiles are not
/// renamed: a load waits for the products reading its tile) and the tile configuration set
/// once per strip. Measured on one thread of the 2-core Xeon, operands in L1, K = 256: 672
/// GFLOP/s with all four loads first and one call per block, 779 with the loads interleaved.
///
/// # Safety
/// AMX permission granted ([`request_permission`]); `kc` a non-zero multiple of 32, `panels`
/// ≥ 1; `a` valid for 32 rows of `kc` elements at stride `lda`; each B_j for `kc / 2` rows of
/// 64 u16 at stride `ldb`; `c` valid for reads and writes of 32 rows of 32·`panels` f32 at
/// stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_strip(
    a: *const u16,
    lda: usize,
    b: *const u16,
    bpanel: usize,
    panels: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    zero: bool,
) {
    // Read from memory in the loop (too few registers): K steps, B's jump per block, zero.
    let params: [usize; 3] = [kc / 32, bpanel * 2, usize::from(zero)];
    // SAFETY: the caller guarantees the permission and the extents of A, B and C read and
    // written here. The whole configure / compute / store / release sequence is in this one
    // block (tile state is per thread and not preserved across blocks), and every tile is
    // declared clobbered. B's pair-rows are 128 bytes apart (64 u16), 16 of them 2,048.
    unsafe {
        core::arch::asm!(
            "ldtilecfg [{kb}]",
            "3:",
            c_tiles_in!(),
            "mov {ai}, {a}",
            "lea {a2i}, [{a} + {sa}*8]",
            "lea {a2i}, [{a2i} + {sa}*8]",
            "mov {bi}, {b}",
            "mov {kb}, qword ptr [{p}]",
            "2:",
            "tileloadd tmm4, [{ai} + {sa}*1]",
            "tileloadd tmm6, [{bi} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{bi} + {sb}*1 + 64]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a2i} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {ai}, 64",
            "add {a2i}, 64",
            "add {bi}, 2048",
            "dec {kb}",
            "jnz 2b",
            c_tiles_out!(),
            "add {c}, 128",
            "add {b}, qword ptr [{p} + 8]",
            "dec {pn}",
            "jnz 3b",
            "tilerelease",
            kb = inout(reg) &CFG => _,
            p = in(reg) params.as_ptr(),
            a = in(reg) a,
            ai = out(reg) _,
            a2i = out(reg) _,
            b = inout(reg) b => _,
            bi = out(reg) _,
            c = inout(reg) c => _,
            sc = in(reg) ldc * 4,
            pn = inout(reg) panels => _,
            sa = in(reg) lda * 2,
            sb = in(reg) 128usize,
            out("tmm0") _,
            out("tmm1") _,
            out("tmm2") _,
            out("tmm3") _,
            out("tmm4") _,
            out("tmm5") _,
            out("tmm6") _,
            out("tmm7") _,
            options(nostack),
        );
    }
}

/// K block of the AMX path: a 32×256 bf16 slice of A (16 KiB) stays in L1 while the B panels'
/// 256×32 slices (16 KiB each) stream past it.
pub(super) const KC: usize = 256;

thread_local! {
    static A_PANEL: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    static B_PACK: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static ACC: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Columns per task at most: 8 panels of 32 (a 32×256 f32 accumulator, 32 KiB).
const GROUP: usize = 8;

/// B packed whole (as [`pack_b_panel`], panel after panel), in parallel over panels.
///
/// # Safety
/// B readable at (p < k, j < n).
pub(super) unsafe fn pack_b(dst: &mut [u32], b: MatRef, k: usize, n: usize, parallel: bool) {
    let panel = round_up(k, 32) / 2 * 32;
    let one = |(jb, d): (usize, &mut [u32])| {
        vectorized(
            #[inline(always)]
            // SAFETY: the caller's contract.
            || unsafe { pack_b_panel(d, b, k, n, jb) },
        )
    };
    if parallel && n > 32 {
        dst.par_chunks_mut(panel).enumerate().for_each(one);
    } else {
        dst.chunks_mut(panel).enumerate().for_each(one);
    }
}

/// [`super::gemm_bf16_into`] on AMX with K blocks of `kc` (a non-zero multiple of 32; more
/// than K means one block). B is packed once (VNNI-2 panels of 32 columns), A once (row
/// panels of 32 × kp); then each task — a row panel and a group of up to [`GROUP`] column
/// panels, group-major so that a thread's consecutive tasks share their B columns in L2 —
/// accumulates 32 × 32·g in tiles over the K blocks: a whole block with alpha 1 straight in
/// dst (loaded from it when accumulating), an edge block or alpha ≠ 1 in a scratch
/// accumulator written back as alpha · acc [+ dst].
///
/// # Safety
/// As [`super::gemm_bf16_into`], with AMX usable; m, n, k ≥ 1.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: super::Dst,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    parallel: bool,
    kc: usize,
) {
    assert!(
        kc > 0 && kc.is_multiple_of(32),
        "K block {kc} not a positive multiple of 32"
    );
    let kp = round_up(k, 32);
    let panels = n.div_ceil(32);
    let panel = kp / 2 * 32;
    let mut bp = Scratch::take(&B_PACK, panels * panel);
    let bp = &mut bp.buf[..panels * panel];
    // SAFETY: the caller's contract.
    unsafe { pack_b(bp, b, k, n, parallel) };
    // SAFETY: the caller's contract; `bp` is B packed.
    unsafe { gemm_packed(m, n, k, dst, dst_rs, accumulate, alpha, a, bp, parallel, kc) }
}

/// [`gemm_into`] with B packed already ([`pack_b`] of a k×n operand).
///
/// # Safety
/// As [`gemm_into`]; `bp` is [`pack_b`]'s output for this k and n.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed(
    m: usize,
    n: usize,
    k: usize,
    dst: super::Dst,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    a: MatRef,
    bp: &[u32],
    parallel: bool,
    kc: usize,
) {
    let kp = round_up(k, 32);
    let panels = n.div_ceil(32);
    let panel = kp / 2 * 32;
    assert_eq!(bp.len(), panels * panel, "packed B of another shape");
    let row_panels = m.div_ceil(32);
    // A packed whole too (once, not once per column group), 32 × kp per row panel.
    let mut ap = Scratch::take(&A_PANEL, row_panels * 32 * kp);
    let ap = &mut ap.buf[..row_panels * 32 * kp];
    // SAFETY: the caller's contract.
    unsafe { pack_a(ap, a, m, k, kp, parallel) };
    let ap: &[u16] = ap;
    let group = group_width(panels, row_panels, parallel);
    let tasks = Tasks {
        m,
        n,
        kp,
        kc,
        panel,
        panels,
        row_panels,
        group,
        dst,
        dst_rs,
        accumulate,
        alpha,
        ap,
        bp,
    };
    let task = |t: usize| {
        // SAFETY: the caller's contract; tasks write disjoint rectangles of dst.
        unsafe { tasks.run(t) }
    };
    let tasks = row_panels * panels.div_ceil(group);
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// A packed whole into `ap`, one 32 × kp row panel after another (in parallel over panels with
/// `parallel`).
///
/// # Safety
/// A readable at (i < m, p < k); `ap` holds m.div_ceil(32) panels of 32 × kp.
unsafe fn pack_a(ap: &mut [u16], a: MatRef, m: usize, k: usize, kp: usize, parallel: bool) {
    let row_panels = m.div_ceil(32);
    let pack_a = |(ib, d): (usize, &mut [u16])| {
        vectorized(
            #[inline(always)]
            // SAFETY: the caller's contract (rows 32·ib.. of A).
            || unsafe { pack_a_panel(d, a, ib * 32, m, k, kp) },
        )
    };
    if parallel && row_panels > 1 {
        ap.par_chunks_mut(32 * kp).enumerate().for_each(pack_a);
    } else {
        ap.chunks_mut(32 * kp).enumerate().for_each(pack_a);
    }
}

/// Column panels per task: [`GROUP`], narrower until there are a few tasks per thread (or one
/// panel per group).
fn group_width(panels: usize, row_panels: usize, parallel: bool) -> usize {
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let mut group = GROUP.min(panels);
    while group > 1 && row_panels * panels.div_ceil(group) < 4 * threads {
        group = group.div_ceil(2);
    }
    group
}

/// The tasks of one [`gemm_packed`]: the shapes, A and B packed, and the destination.
struct Tasks<'a> {
    m: usize,
    n: usize,
    kp: usize,
    kc: usize,
    panel: usize,
    panels: usize,
    row_panels: usize,
    group: usize,
    dst: super::Dst,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    ap: &'a [u16],
    bp: &'a [u32],
}

impl Tasks<'_> {
    /// Task `t`: one row panel times one group of column panels, group-major, accumulated in
    /// tiles over the K blocks.
    ///
    /// # Safety
    /// As [`gemm_packed`]; no other call for the same `t` at the same time.
    unsafe fn run(&self, t: usize) {
        let (m, n, kp, kc, panel) = (self.m, self.n, self.kp, self.kc, self.panel);
        let (dst, dst_rs, accumulate, alpha) = (self.dst, self.dst_rs, self.accumulate, self.alpha);
        let (gi, ib) = (t / self.row_panels, t % self.row_panels);
        let (i0, jb0) = (ib * 32, gi * self.group);
        let jbs = self.group.min(self.panels - jb0);
        let w = jbs * 32;
        let ap = &self.ap[ib * 32 * kp..][..32 * kp];
        let b_group = &self.bp[jb0 * panel..][..jbs * panel];
        let (rows, j0) = ((m - i0).min(32), jb0 * 32);
        let cols = (n - j0).min(w);
        // A whole 32 × w block with alpha 1 goes straight from the tiles to dst (loaded from
        // it when accumulating): no scratch accumulator, no copy. Edges and alpha ≠ 1 go
        // through the accumulator.
        let direct = rows == 32 && cols == w && alpha == 1.0;
        let mut acc = Scratch::take(&ACC, if direct { 0 } else { 32 * w });
        let (c, ldc) = if direct {
            // SAFETY: row i0, column j0 of dst, within it (i0 < m, j0 < n).
            (unsafe { dst.at(i0 * dst_rs + j0) }, dst_rs)
        } else {
            (acc.buf.as_mut_ptr(), w)
        };
        for k0 in (0..kp).step_by(kc) {
            let kh = kc.min(kp - k0);
            // SAFETY: permission checked by the caller; kh is a non-zero multiple of 32;
            // from ap[k0..], 32 rows of kh at stride kp (k0 + kh ≤ kp); from each of the jbs
            // panels of b_group (`panel` u32 apart) at k0/2·32, kh/2 rows of 32 u32 = 64 u16
            // (a panel has kp/2); C, 32 rows of w f32 at stride ldc: this task's own
            // rectangle of dst (rows i0..i0 + 32 ≤ m, columns j0..j0 + w ≤ n, the caller's
            // contract; tasks do not overlap), read only after the first K block or when
            // accumulating, or the accumulator (32·w).
            unsafe {
                kernel_strip(
                    ap.as_ptr().add(k0),
                    kp,
                    b_group.as_ptr().add(k0 / 2 * 32).cast::<u16>(),
                    2 * panel,
                    jbs,
                    kh,
                    c,
                    ldc,
                    k0 == 0 && !(direct && accumulate),
                )
            };
        }
        if direct {
            return;
        }
        let acc = &acc.buf[..32 * w];
        for (r, src) in acc.chunks_exact(w).take(rows).enumerate() {
            // SAFETY: row i0 + r < m, columns j0..j0 + cols < n of dst: this task's own
            // rectangle (the caller's contract covers dst; tasks do not overlap).
            let out = unsafe { std::slice::from_raw_parts_mut(dst.at((i0 + r) * dst_rs + j0), cols) };
            if accumulate {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o += alpha * v;
                }
            } else if alpha == 1.0 {
                out.copy_from_slice(&src[..cols]);
            } else {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = alpha * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that exercise rounding: ties, NaN, ±∞, subnormals, ±0, large and small.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let special = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            0.0,
            -0.0,
            f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie, rounds up
            f32::MAX,
        ];
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 7 == 3 {
                    special[(x as usize) % special.len()]
                } else {
                    f32::from_bits(0x3000_0000 + (x % 0x1800_0000)) * if x & 1 == 0 { 1.0 } else { -1.0 }
                }
            })
            .collect()
    }

    /// The micro-kernel alone on L1-resident operands: its ceiling. Not a test.
    #[test]
    #[ignore]
    fn timing_kernel_in_l1() {
        if !super::super::amx_usable() {
            return;
        }
        for kc in [64usize, 256, 1024] {
            let a = vec![0x3f80u16; 32 * kc];
            let b = vec![0x3f80u16; kc * 32];
            let mut c = vec![0f32; 32 * 128];
            let reps = 50_000 * 64 / kc;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                // SAFETY: permission granted (amx_usable); extents as declared.
                unsafe { kernel_strip(a.as_ptr(), kc, b.as_ptr(), 0, 4, kc, c.as_mut_ptr(), 128, false) };
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "kc {kc:5}: {:.1} GFLOP/s one thread",
                2.0 * 32.0 * 128.0 * kc as f64 * reps as f64 / s / 1e9
            );
        }
    }

    /// The AVX-512 packers write exactly what the plain loops write (bit for bit, NaN and
    /// subnormals included), for both layouts of both operands, ragged edges and k = 1.
    #[test]
    fn avx512_packing_equals_the_plain_loops() {
        if !pack::usable() {
            println!("skipped: this processor has no AVX512-BF16");
            return;
        }
        for (m, k) in [(1, 1), (5, 3), (31, 33), (32, 32), (33, 70), (64, 17), (50, 100)] {
            let kp = round_up(k, 32);
            let data = values(m * k, (m * 131 + k) as u32);
            for (rs, cs) in [(k, 1), (1, m)] {
                let a = MatRef::new(data.as_ptr(), rs, cs);
                for i0 in (0..m).step_by(32) {
                    let (mut fast, mut plain) = (vec![7u16; 32 * kp], vec![9u16; 32 * kp]);
                    // SAFETY: A is m×k through (rs, cs); both hold 32·kp.
                    unsafe {
                        pack_a_panel(&mut fast, a, i0, m, k, kp);
                        pack_a_panel_plain(&mut plain, a, i0, m, k, kp);
                    }
                    assert_eq!(fast, plain, "A {m}×{k} strides ({rs}, {cs}) panel at {i0}");
                }
                // The same data as a k'×n' B with k' = m, n' = k.
                let (bk, bn) = (m, k);
                let panel = round_up(bk, 32) / 2 * 32;
                for jb in 0..bn.div_ceil(32) {
                    let (mut fast, mut plain) = (vec![7u32; panel], vec![9u32; panel]);
                    // SAFETY: B is bk×bn through (rs, cs); both hold one panel.
                    unsafe {
                        pack_b_panel(&mut fast, a, bk, bn, jb);
                        pack_b_panel_plain(&mut plain, a, bk, bn, jb);
                    }
                    assert_eq!(fast, plain, "B {bk}×{bn} strides ({rs}, {cs}) panel {jb}");
                }
            }
        }
    }
}
