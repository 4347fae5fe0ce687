//! Marlin layout kernels (DESIGN §3): `gptq_marlin_repack` (from GPTQ `qweight`, optionally with
//! the act-order permutation, or directly from compressed-tensors `weight_packed`),
//! `marlin_permute_scales`, and their exact inverses. Every result is bit-identical to
//! [`crate::reference::marlin`], which follows vLLM's / SGLang's layout exactly.
//!
//! [`MarlinWeights`] is the only thing the Marlin GEMM accepts: it can be built only by a repack,
//! by [`crate::marlin::sync::quantize_to_marlin`], or from data explicitly declared to be in
//! Marlin layout, so un-repacked GPTQ / compressed-tensors words cannot reach the GEMM by mistake.
//!
//! All calls validate shapes, lengths, permutations and devices before launching and return
//! freshly allocated outputs.

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::dtype::ScaleFloat;
use crate::error::Result;
use crate::ffi;
use crate::format::{check_len, QuantShape, PACK};
use crate::quant::PackedWeights;
use crate::reference::marlin as refm;

pub(crate) const FAMILY: &str = "marlin";
pub(crate) const THREADS: u32 = 256;

// SAFETY: plain `repr(C)` data (raw device addresses and integers) passed to kernels by value;
// no drop glue, no references.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMarlinLayoutParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMarlinLayoutScalesParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMarlinScaleExpParams {}

/// INT4 weights of one linear layer in the Marlin layout, on the device: what the Marlin GEMM
/// consumes.
///
/// * `qweight`: i32 `[K/16, 2N]` (DESIGN §3 Marlin tiles);
/// * `scales`: `[K/g, N]` in Marlin's permuted order (64-element chunks when `g < K`, 32-element
///   channelwise chunks when `g == K`), dtype `S` (use the activation dtype);
/// * `perm`: the act-order permutation (Marlin K-row `r` holds source row `perm[r]`), when the
///   weights came from an act-order GPTQ checkpoint. Row `r` of the Marlin matrix always belongs
///   to scale group `r / g`.
///
/// Fields are private; construct with [`MarlinWeights::from_gptq`],
/// [`MarlinWeights::from_compressed_tensors`], [`crate::marlin::sync::quantize_to_marlin`],
/// [`MarlinWeights::from_host_marlin`] or [`MarlinWeights::from_marlin_buffers`].
#[derive(Debug)]
pub struct MarlinWeights<S> {
    pub(crate) qweight: CudaSlice<i32>,
    pub(crate) scales: CudaSlice<S>,
    pub(crate) perm: Option<CudaSlice<i32>>,
    /// The inverse of `perm` (`inv[perm[r]] = r`), for the exact restore.
    pub(crate) inv_perm: Option<CudaSlice<i32>>,
    /// The scales' range for the bf16 GEMM (see [`scale_exp_of`]), kept in step with `scales`.
    pub(crate) scale_exp: CudaSlice<u32>,
    pub(crate) shape: QuantShape,
}

/// A new device scalar holding the scale range the bf16 GEMM needs
/// (`LowbitMarlinGemmParams::scale_exp`: the largest biased exponent field among the 16-bit
/// `scales`): a zeroed allocation and one launch queued on lowbit's stream, no synchronisation.
/// Every constructor of [`MarlinWeights`] / [`crate::marlin::gemm::MarlinExperts`] runs it on its
/// final scales; the weight-sync kernels compute the same maximum while they write the scales
/// (`LowbitMarlinSyncParams::scale_exp`), so a sync costs no extra launch.
pub(crate) fn scale_exp_of<S: ScaleFloat>(
    dev: &Device,
    op: &'static str,
    scales: &CudaSlice<S>,
) -> Result<CudaSlice<u32>> {
    dev.check_buffer(op, "scales", scales, scales.len())?;
    let mut out = dev.zeros::<u32>(1)?;
    let func = dev.function(FAMILY, "lowbit_marlin_scale_exp_b16", 0)?;
    {
        let (s, _g1) = dev.ptr(op, "scales", scales, 2)?;
        let (o, _g2) = dev.ptr_mut(op, "scale_exp", &mut out, 4)?;
        let params =
            ffi::LowbitMarlinScaleExpParams { scales: s as *const _, out: o as *mut _, count: scales.len() as i64 };
        let cfg = dev.grid_stride(scales.len(), THREADS, THREADS as usize * 16);
        // SAFETY: `scales` holds `count` 16-bit elements (its own length; `S` is bf16 or f16) and
        // `out` one u32, zeroed at allocation on the same stream; the guards order the accesses
        // on lowbit's stream until after the launch.
        unsafe { dev.launch(&func, cfg, params)? };
    }
    Ok(out)
}

/// Checks that `shape` fits the Marlin layout (`K % 16 == 0`, `N % 64 == 0`).
pub fn check_shape(op: &'static str, shape: &QuantShape) -> Result<()> {
    refm::check_marlin_shape(op, shape.k, shape.n)
}

/// Whether `shape`'s scales use the channelwise (32-element) permutation: `g == K`.
pub fn channelwise_scales(shape: &QuantShape) -> bool {
    refm::channelwise_scales(shape.k, shape.group)
}

/// i32 words of a Marlin `qweight` for `shape`: `K/16 · 2N`.
pub fn qweight_len(shape: &QuantShape) -> usize {
    shape.k / 16 * 2 * shape.n
}

/// A validated act-order permutation uploaded with its inverse.
pub(crate) struct DevicePerm {
    pub(crate) perm: CudaSlice<i32>,
    pub(crate) inv: CudaSlice<i32>,
}

pub(crate) fn upload_perm(dev: &Device, op: &'static str, perm: &[i32], k: usize) -> Result<DevicePerm> {
    refm::check_perm(op, perm, k)?;
    let mut inv = vec![0i32; k];
    for (r, &p) in perm.iter().enumerate() {
        inv[p as usize] = r as i32;
    }
    Ok(DevicePerm { perm: dev.htod(perm)?, inv: dev.htod(&inv)? })
}

fn layout_params(
    dev: &Device,
    op: &'static str,
    name: &str,
    src: &CudaSlice<i32>,
    perm: Option<&CudaSlice<i32>>,
    dst: &mut CudaSlice<i32>,
    shape: &QuantShape,
) -> Result<()> {
    let func = dev.function(FAMILY, name, 0)?;
    let (s, _g1) = dev.ptr(op, "src", src, 4)?;
    let perm_guard = perm.map(|p| dev.ptr(op, "perm", p, 4)).transpose()?;
    let (d, _g2) = dev.ptr_mut(op, "dst", dst, 4)?;
    let params = ffi::LowbitMarlinLayoutParams {
        src: s as *const _,
        perm: perm_guard.as_ref().map_or(0, |g| g.0) as *const _,
        dst: d as *mut _,
        batch: 1,
        k: shape.k as i64,
        n: shape.n as i64,
    };
    let cfg = if name.ends_with("_perm") {
        dev.grid_stride(shape.packed_len(), THREADS, THREADS as usize)
    } else {
        let units = shape.n / 64 * shape.k.div_ceil(128);
        dev.grid_stride(units, THREADS, 1)
    };
    // SAFETY: the caller validated `src` and `dst` to hold the K·N/8 words of `shape` in the
    // layouts the kernel indexes, and `perm` (when given) to be a permutation of 0..K of length K;
    // the guards order the accesses on lowbit's stream until after the launch.
    unsafe { dev.launch(&func, cfg, params) }
}

/// Repacks words (`from_ct`: compressed-tensors `[N, K/8]`, else GPTQ `[K/8, N]`) to Marlin.
fn repack_words(
    dev: &Device,
    op: &'static str,
    src: &CudaSlice<i32>,
    perm: Option<&CudaSlice<i32>>,
    shape: &QuantShape,
    from_ct: bool,
) -> Result<CudaSlice<i32>> {
    check_shape(op, shape)?;
    dev.check_buffer(op, "src", src, shape.packed_len())?;
    if let Some(p) = perm {
        dev.check_buffer(op, "perm", p, shape.k)?;
    }
    let name = if from_ct { "lowbit_marlin_repack_ct" } else { "lowbit_marlin_repack_gptq" };
    // SAFETY: the repack kernel writes every word of the [K/16, 2N] output; on error it is dropped.
    let mut dst = unsafe { dev.alloc_for_kernel::<i32>(qweight_len(shape))? };
    layout_params(dev, op, name, src, perm, &mut dst, shape)?;
    Ok(dst)
}

/// Marlin → GPTQ / compressed-tensors words; `inv` is the inverse act-order permutation.
pub(crate) fn unrepack_words(
    dev: &Device,
    op: &'static str,
    marlin: &CudaSlice<i32>,
    inv: Option<&CudaSlice<i32>>,
    shape: &QuantShape,
    to_ct: bool,
) -> Result<CudaSlice<i32>> {
    check_shape(op, shape)?;
    dev.check_buffer(op, "marlin", marlin, qweight_len(shape))?;
    if let Some(p) = inv {
        dev.check_buffer(op, "perm", p, shape.k)?;
    }
    let name = match (to_ct, inv.is_some()) {
        (false, false) => "lowbit_marlin_to_gptq",
        (true, false) => "lowbit_marlin_to_ct",
        (false, true) => "lowbit_marlin_to_gptq_perm",
        (true, true) => "lowbit_marlin_to_ct_perm",
    };
    // SAFETY: every variant writes each of the K·N/8 output words once; on error it is dropped.
    let mut dst = unsafe { dev.alloc_for_kernel::<i32>(shape.packed_len())? };
    layout_params(dev, op, name, marlin, inv, &mut dst, shape)?;
    Ok(dst)
}

/// Scales between Marlin order and GPTQ (`ct == false`, `[K/g, N]`) or compressed-tensors
/// (`ct == true`, `[N, K/g]`) order.
pub(crate) fn scales_kernel<S: ScaleFloat>(
    dev: &Device,
    op: &'static str,
    src: &CudaSlice<S>,
    shape: &QuantShape,
    inverse: bool,
    ct: bool,
) -> Result<CudaSlice<S>> {
    check_shape(op, shape)?;
    dev.check_buffer(op, "scales", src, shape.scales_len())?;
    let name = if inverse { "lowbit_marlin_unpermute_scales" } else { "lowbit_marlin_permute_scales" };
    let func = dev.function(FAMILY, name, 0)?;
    // SAFETY: the permutation is a bijection on the (K/g)·N positions: every output element is
    // written once; on error the buffer is dropped.
    let mut dst = unsafe { dev.alloc_for_kernel::<S>(shape.scales_len())? };
    {
        let (s, _g1) = dev.ptr(op, "scales", src, 2)?;
        let (d, _g2) = dev.ptr_mut(op, "dst", &mut dst, 2)?;
        let params = ffi::LowbitMarlinLayoutScalesParams {
            src: s as *const _,
            dst: d as *mut _,
            batch: 1,
            groups: shape.groups_per_row() as i64,
            n: shape.n as i64,
            channelwise: channelwise_scales(shape) as i32,
            ct: ct as i32,
        };
        let cfg = dev.grid_stride(shape.scales_len(), THREADS, THREADS as usize);
        // SAFETY: both buffers hold the (K/g)·N 16-bit scales of `shape` (checked above); N is a
        // multiple of 64, so every permutation chunk is complete.
        unsafe { dev.launch(&func, cfg, params)? };
    }
    Ok(dst)
}

/// `gptq_marlin_repack`: GPTQ `qweight` i32 `[K/8, N]` → Marlin i32 `[K/16, 2N]`; with `perm`
/// (act-order, `perm = argsort(g_idx)`), Marlin K-row `r` holds source row `perm[r]`.
/// Bit-identical to vLLM's `gptq_marlin_repack`.
pub fn gptq_marlin_repack(
    dev: &Device,
    qweight: &CudaSlice<i32>,
    perm: Option<&[i32]>,
    shape: &QuantShape,
) -> Result<CudaSlice<i32>> {
    const OP: &str = "gptq_marlin_repack";
    check_shape(OP, shape)?;
    let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
    repack_words(dev, OP, qweight, perm.as_ref().map(|p| &p.perm), shape, false)
}

/// compressed-tensors `weight_packed` i32 `[N, K/8]` → Marlin i32 `[K/16, 2N]` in one pass (the
/// same words as transposing to GPTQ and calling [`gptq_marlin_repack`]).
pub fn ct_marlin_repack(
    dev: &Device,
    packed: &CudaSlice<i32>,
    perm: Option<&[i32]>,
    shape: &QuantShape,
) -> Result<CudaSlice<i32>> {
    const OP: &str = "ct_marlin_repack";
    check_shape(OP, shape)?;
    let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
    repack_words(dev, OP, packed, perm.as_ref().map(|p| &p.perm), shape, true)
}

/// The exact inverse of [`gptq_marlin_repack`] (pass the same `perm`): Marlin → GPTQ `qweight`
/// `[K/8, N]` in source row order.
pub fn marlin_to_gptq(
    dev: &Device,
    marlin: &CudaSlice<i32>,
    perm: Option<&[i32]>,
    shape: &QuantShape,
) -> Result<CudaSlice<i32>> {
    const OP: &str = "marlin_to_gptq";
    check_shape(OP, shape)?;
    let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
    unrepack_words(dev, OP, marlin, perm.as_ref().map(|p| &p.inv), shape, false)
}

/// The exact inverse of [`ct_marlin_repack`]: Marlin → compressed-tensors `weight_packed`
/// `[N, K/8]`.
pub fn marlin_to_ct(
    dev: &Device,
    marlin: &CudaSlice<i32>,
    perm: Option<&[i32]>,
    shape: &QuantShape,
) -> Result<CudaSlice<i32>> {
    const OP: &str = "marlin_to_ct";
    check_shape(OP, shape)?;
    let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
    unrepack_words(dev, OP, marlin, perm.as_ref().map(|p| &p.inv), shape, true)
}

/// `marlin_permute_scales`: GPTQ-order scales `[K/g, N]` → Marlin order (grouped: 64-element
/// chunks, 8×8 transpose; channelwise `g == K`: 32-element chunks). Bit-identical to vLLM's.
pub fn marlin_permute_scales<S: ScaleFloat>(
    dev: &Device,
    scales: &CudaSlice<S>,
    shape: &QuantShape,
) -> Result<CudaSlice<S>> {
    scales_kernel(dev, "marlin_permute_scales", scales, shape, false, false)
}

/// The exact inverse of [`marlin_permute_scales`]: Marlin order → GPTQ order `[K/g, N]`.
pub fn marlin_unpermute_scales<S: ScaleFloat>(
    dev: &Device,
    scales: &CudaSlice<S>,
    shape: &QuantShape,
) -> Result<CudaSlice<S>> {
    scales_kernel(dev, "marlin_unpermute_scales", scales, shape, true, false)
}

/// Host copies of Marlin weights: (`qweight` `[K/16, 2N]`, permuted scales `[K/g, N]`, `perm`).
pub type HostMarlin<S> = (Vec<i32>, Vec<S>, Option<Vec<i32>>);

impl<S: ScaleFloat> MarlinWeights<S> {
    /// Repacks a GPTQ checkpoint's `qweight` `[K/8, N]` and `scales` `[K/g, N]`, with the
    /// act-order permutation `perm` (Marlin row `r` ← source row `perm[r]`) when given.
    pub fn from_gptq(
        dev: &Device,
        qweight: &CudaSlice<i32>,
        scales: &CudaSlice<S>,
        perm: Option<&[i32]>,
        shape: &QuantShape,
    ) -> Result<Self> {
        const OP: &str = "MarlinWeights::from_gptq";
        check_shape(OP, shape)?;
        dev.check_buffer(OP, "qweight", qweight, shape.packed_len())?;
        dev.check_buffer(OP, "scales", scales, shape.scales_len())?;
        let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
        let qw = repack_words(dev, OP, qweight, perm.as_ref().map(|p| &p.perm), shape, false)?;
        let sc = scales_kernel(dev, OP, scales, shape, false, false)?;
        Self::assemble(dev, OP, qw, sc, perm, *shape)
    }

    /// As [`MarlinWeights::from_gptq`] from an act-order checkpoint's `g_idx` `[K]`:
    /// `perm = argsort(g_idx)` (stable). Every group must have exactly `g` members.
    pub fn from_gptq_act_order(
        dev: &Device,
        qweight: &CudaSlice<i32>,
        scales: &CudaSlice<S>,
        g_idx: &[i32],
        shape: &QuantShape,
    ) -> Result<Self> {
        let perm = refm::act_order_perm(g_idx, shape.k, shape.group)?;
        Self::from_gptq(dev, qweight, scales, Some(&perm), shape)
    }

    /// Repacks compressed-tensors `weight_packed` `[N, K/8]` and `weight_scale` `[N, K/g]`
    /// directly (no separate transpose pass).
    pub fn from_compressed_tensors(
        dev: &Device,
        packed: &CudaSlice<i32>,
        scales: &CudaSlice<S>,
        shape: &QuantShape,
    ) -> Result<Self> {
        const OP: &str = "MarlinWeights::from_compressed_tensors";
        check_shape(OP, shape)?;
        dev.check_buffer(OP, "weight_packed", packed, shape.packed_len())?;
        dev.check_buffer(OP, "weight_scale", scales, shape.scales_len())?;
        let qw = repack_words(dev, OP, packed, None, shape, true)?;
        let sc = scales_kernel(dev, OP, scales, shape, false, true)?;
        Self::assemble(dev, OP, qw, sc, None, *shape)
    }

    /// From the output of [`crate::quant::quantize_pack`].
    pub fn from_packed(dev: &Device, w: &PackedWeights<S>) -> Result<Self> {
        Self::from_compressed_tensors(dev, &w.packed, &w.scales, &w.shape)
    }

    /// Uploads host data that is already in Marlin layout (e.g. a Marlin checkpoint written by
    /// this crate): `qweight` `[K/16, 2N]`, permuted `scales` `[K/g, N]`, optional act-order
    /// `perm`. Lengths and the permutation are validated; the words themselves are taken as is.
    pub fn from_host_marlin(
        dev: &Device,
        qweight: &[i32],
        scales: &[S],
        perm: Option<&[i32]>,
        shape: &QuantShape,
    ) -> Result<Self> {
        const OP: &str = "MarlinWeights::from_host_marlin";
        check_shape(OP, shape)?;
        check_len(OP, "qweight", qweight.len(), qweight_len(shape))?;
        check_len(OP, "scales", scales.len(), shape.scales_len())?;
        let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
        Self::assemble(dev, OP, dev.htod(qweight)?, dev.htod(scales)?, perm, *shape)
    }

    /// Takes ownership of device buffers that already hold Marlin-layout data (the caller
    /// asserts the layout; lengths, device and `perm` are validated).
    pub fn from_marlin_buffers(
        dev: &Device,
        qweight: CudaSlice<i32>,
        scales: CudaSlice<S>,
        perm: Option<&[i32]>,
        shape: &QuantShape,
    ) -> Result<Self> {
        const OP: &str = "MarlinWeights::from_marlin_buffers";
        check_shape(OP, shape)?;
        dev.check_buffer(OP, "qweight", &qweight, qweight_len(shape))?;
        dev.check_buffer(OP, "scales", &scales, shape.scales_len())?;
        let perm = perm.map(|p| upload_perm(dev, OP, p, shape.k)).transpose()?;
        Self::assemble(dev, OP, qweight, scales, perm, *shape)
    }

    /// The weights from their final buffers; computes the scale range.
    pub(crate) fn assemble(
        dev: &Device,
        op: &'static str,
        qweight: CudaSlice<i32>,
        scales: CudaSlice<S>,
        perm: Option<DevicePerm>,
        shape: QuantShape,
    ) -> Result<Self> {
        let (perm, inv_perm) = match perm {
            Some(p) => (Some(p.perm), Some(p.inv)),
            None => (None, None),
        };
        let scale_exp = scale_exp_of(dev, op, &scales)?;
        Ok(MarlinWeights { qweight, scales, perm, inv_perm, scale_exp, shape })
    }

    /// Marlin `qweight`, i32 `[K/16, 2N]`.
    pub fn qweight(&self) -> &CudaSlice<i32> {
        &self.qweight
    }
    /// Marlin-permuted scales `[K/g, N]`.
    pub fn scales(&self) -> &CudaSlice<S> {
        &self.scales
    }
    /// The act-order permutation `[K]` (Marlin row `r` holds source row `perm[r]`), if any.
    pub fn perm(&self) -> Option<&CudaSlice<i32>> {
        self.perm.as_ref()
    }
    /// The weight shape `[N, K]` and group size.
    pub fn shape(&self) -> &QuantShape {
        &self.shape
    }
    /// Whether the weights carry an act-order permutation.
    pub fn has_act_order(&self) -> bool {
        self.perm.is_some()
    }
    /// Whether the scales use the channelwise (32-element) permutation (`g == K`).
    pub fn channelwise_scales(&self) -> bool {
        channelwise_scales(&self.shape)
    }

    /// The exact inverse to GPTQ: `qweight` `[K/8, N]` (source row order) and scales `[K/g, N]`.
    pub fn to_gptq(&self, dev: &Device) -> Result<(CudaSlice<i32>, CudaSlice<S>)> {
        const OP: &str = "MarlinWeights::to_gptq";
        let qw = unrepack_words(dev, OP, &self.qweight, self.inv_perm.as_ref(), &self.shape, false)?;
        let sc = scales_kernel(dev, OP, &self.scales, &self.shape, true, false)?;
        Ok((qw, sc))
    }

    /// The exact inverse to compressed-tensors (`weight_packed` `[N, K/8]`, `weight_scale`
    /// `[N, K/g]`); the same as [`crate::marlin::sync::restore_from_marlin`].
    pub fn to_compressed_tensors(&self, dev: &Device) -> Result<PackedWeights<S>> {
        crate::marlin::sync::restore_from_marlin(dev, self)
    }

    /// Copies everything back to the host: (`qweight`, permuted scales, `perm`).
    pub fn to_host(&self, dev: &Device) -> Result<HostMarlin<S>> {
        let perm = self.perm.as_ref().map(|p| dev.dtoh(p)).transpose()?;
        Ok((dev.dtoh(&self.qweight)?, dev.dtoh(&self.scales)?, perm))
    }
}

// The kernels assume eight codes per word and 128-word tiles.
const _: () = assert!(PACK == 8 && refm::TILE_WORDS == 128);
