//! The RL weight-sync path on the GPU (issue 5): BF16/F16/F32 master weights `[N, K]` already on
//! the device → Marlin buffers in one pass ([`quantize_to_marlin`], or
//! [`quantize_to_marlin_into`] for engines that keep their buffers), and the exact way back
//! ([`restore_from_marlin`]).
//!
//! The result is bit-identical to the multi-step path (`quantize_pack` → compressed-tensors →
//! `ct_marlin_repack`, scales transposed and `marlin_permute_scales`d; see
//! [`crate::reference::marlin::quantize_to_marlin`]): the same quantization math as
//! [`crate::quant`] (DESIGN §3, shared in `csrc/common/lowbit_int4.cuh`).
//!
//! Groups of 32/64/128 are quantized in a single read of the weights. Channelwise scales need the
//! whole row's maximum first, so that case reads the weights twice (a row-scale pass, then the
//! tile pass).

use cudarc::driver::{DevicePtr, LaunchConfig};

use crate::device::Device;
use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::ffi;
use crate::format::QuantShape;
use crate::marlin::layout::{
    channelwise_scales, check_shape, qweight_len, scales_kernel, unrepack_words, MarlinWeights, FAMILY, THREADS,
};
use crate::quant::PackedWeights;

// SAFETY: plain `repr(C)` data (raw device addresses and integers) passed to kernels by value;
// no drop glue, no references.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMarlinSyncParams {}

/// Weights are read with 16-byte vector loads.
const VEC_ALIGN: usize = 16;

/// Whether the one-read path (scales computed inside the tile kernel) handles this group size.
fn inline_scales(shape: &QuantShape) -> bool {
    [32, 64, 128].contains(&shape.group)
}

/// Launches the sync kernels writing into `qweight` / `scales` (and the scale range into
/// `scale_exp`, zeroed first), then reads the status words.
/// On error the outputs hold garbage; the caller drops or zeroes them.
#[allow(clippy::too_many_arguments)]
fn run_sync<T: Float, S: ScaleFloat>(
    dev: &Device,
    op: &'static str,
    w: &impl DevicePtr<T>,
    qweight: &mut cudarc::driver::CudaSlice<i32>,
    scales: &mut cudarc::driver::CudaSlice<S>,
    scale_exp: &mut cudarc::driver::CudaSlice<u32>,
    shape: &QuantShape,
    check: bool,
) -> Result<()> {
    let (t, s) = (T::DTYPE.name(), S::DTYPE.name());
    let inline = inline_scales(shape);
    let tile =
        dev.function(FAMILY, &format!("lowbit_marlin_sync_{}_{t}_{s}", if inline { "inline" } else { "staged" }), 0)?;
    let pre =
        if inline { None } else { Some(dev.function(FAMILY, &format!("lowbit_marlin_sync_scales_{t}_{s}"), 0)?) };
    let mut status = if check { Some(crate::quant::new_status(dev)?) } else { None };
    // The scale range (the GEMM's `scale_exp`) is max-ed in by the kernels that write scales.
    dev.check_buffer(op, "scale_exp", scale_exp, 1)?;
    dev.stream().memset_zeros(scale_exp).map_err(Error::cuda("cuMemsetD8"))?;
    {
        let (w_ptr, _g1) = dev.ptr(op, "weights", w, VEC_ALIGN)?;
        let (q_ptr, _g2) = dev.ptr_mut(op, "qweight", qweight, 4)?;
        let (s_ptr, _g3) = dev.ptr_mut(op, "scales", scales, 2)?;
        let (e_ptr, _g4) = dev.ptr_mut(op, "scale_exp", scale_exp, 4)?;
        let status_guard = match status.as_mut() {
            Some(st) => Some(dev.ptr_mut(op, "status", st, 8)?),
            None => None,
        };
        let params = ffi::LowbitMarlinSyncParams {
            w: w_ptr as *const _,
            qweight: q_ptr as *mut _,
            scales: s_ptr as *mut _,
            status: status_guard.as_ref().map_or(0, |g| g.0) as *mut _,
            scale_exp: e_ptr as *mut _,
            batch: 1,
            n: shape.n as i64,
            k: shape.k as i64,
            group: shape.group as i64,
            channelwise: channelwise_scales(shape) as i32,
            pad_: 0,
        };
        if let Some(pre) = pre {
            let groups = shape.scales_len();
            let cfg = LaunchConfig {
                grid_dim: (groups.clamp(1, dev.info().sm_count.max(1) * 64) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `w` holds the N·K weights and `scales` the (K/g)·N scales of `shape`
            // (validated by the caller), aligned for the kernel's vector loads; the row-scale
            // pass writes every scale once. The guards order the accesses on lowbit's stream.
            unsafe { dev.launch(&pre, cfg, params)? };
        }
        let units = shape.n / 64 * shape.k.div_ceil(128);
        // SAFETY: as above; `qweight` holds the K/16·2N Marlin words, every one of which the tile
        // pass writes (and, on the inline path, every scale). N % 64 == 0 and K % 16 == 0 were
        // checked, so every tile and scale chunk is complete.
        unsafe { dev.launch(&tile, dev.grid_stride(units, THREADS, 1), params)? };
    }
    match status {
        Some(status) => crate::quant::check_status(dev, op, &status, shape),
        None => Ok(()),
    }
}

/// One pass from master weights `w` (`[N, K]` row-major, the Hugging Face `[out, in]` layout) to
/// Marlin: quantize (DESIGN §3 grid), pack, lay out and permute the scales. Bit-identical to
/// `quantize_pack` followed by the compressed-tensors repack. `w` may be a view (e.g. one expert
/// of a stacked tensor); it must be 16-byte aligned.
///
/// A non-finite weight is [`Error::NonFinite`]; a scale that does not fit `S` is
/// [`Error::ScaleOverflow`]. Synchronises once with lowbit's stream to read the status.
pub fn quantize_to_marlin<T: Float, S: ScaleFloat>(
    dev: &Device,
    w: &impl DevicePtr<T>,
    shape: &QuantShape,
) -> Result<MarlinWeights<S>> {
    const OP: &str = "quantize_to_marlin";
    check_shape(OP, shape)?;
    dev.check_buffer(OP, "weights", w, shape.numel())?;
    // SAFETY: the sync kernels write every element of both outputs; on error they are dropped.
    let mut qweight = unsafe { dev.alloc_for_kernel::<i32>(qweight_len(shape))? };
    let mut scales = unsafe { dev.alloc_for_kernel::<S>(shape.scales_len())? };
    let mut scale_exp = dev.zeros::<u32>(1)?;
    run_sync::<T, S>(dev, OP, w, &mut qweight, &mut scales, &mut scale_exp, shape, true)?;
    Ok(MarlinWeights { qweight, scales, perm: None, inv_perm: None, scale_exp, shape: *shape })
}

/// Checks that `w` can be quantized into `dst`'s buffers; returns the shape.
fn validate_into<T: Float, S: ScaleFloat>(
    dev: &Device,
    op: &'static str,
    dst: &MarlinWeights<S>,
    w: &impl DevicePtr<T>,
) -> Result<QuantShape> {
    let shape = dst.shape;
    check_shape(op, &shape)?;
    if dst.perm.is_some() {
        return Err(Error::invalid(
            op,
            "the destination carries an act-order permutation; weights quantized in one pass have none",
        ));
    }
    dev.check_buffer(op, "weights", w, shape.numel())?;
    dev.check_buffer(op, "qweight", &dst.qweight, qweight_len(&shape))?;
    dev.check_buffer(op, "scales", &dst.scales, shape.scales_len())?;
    Ok(shape)
}

/// [`quantize_to_marlin`] into existing Marlin buffers (an engine's weights, e.g. captured in a
/// CUDA graph): `w` must have `dst`'s shape, and `dst` must not carry an act-order permutation
/// (weights quantized from `w` have none). On any error after validation the buffers are zeroed,
/// so nothing half-written remains.
pub fn quantize_to_marlin_into<T: Float, S: ScaleFloat>(
    dev: &Device,
    dst: &mut MarlinWeights<S>,
    w: &impl DevicePtr<T>,
) -> Result<()> {
    const OP: &str = "quantize_to_marlin_into";
    let shape = validate_into(dev, OP, dst, w)?;
    let result = run_sync::<T, S>(dev, OP, w, &mut dst.qweight, &mut dst.scales, &mut dst.scale_exp, &shape, true);
    if result.is_err() {
        let zero_q = dev.stream().memset_zeros(&mut dst.qweight);
        let zero_s = dev.stream().memset_zeros(&mut dst.scales);
        let zero_e = dev.stream().memset_zeros(&mut dst.scale_exp); // the range of all-zero scales
        zero_q.and(zero_s).and(zero_e).map_err(Error::cuda("cuMemsetD8"))?;
    }
    result
}

/// [`quantize_to_marlin_into`] without reading the status back: no synchronisation with the
/// stream, so thousands of tensors can be queued back to back (and captured in CUDA graphs).
/// Every output word and scale is still written, but a non-finite weight or an overflowing scale
/// is not reported: those groups get unspecified in-grid codes and a non-finite scale. Use it
/// when the weights are known to be finite (e.g. checked by the trainer).
pub fn quantize_to_marlin_into_unchecked<T: Float, S: ScaleFloat>(
    dev: &Device,
    dst: &mut MarlinWeights<S>,
    w: &impl DevicePtr<T>,
) -> Result<()> {
    const OP: &str = "quantize_to_marlin_into_unchecked";
    let shape = validate_into(dev, OP, dst, w)?;
    run_sync::<T, S>(dev, OP, w, &mut dst.qweight, &mut dst.scales, &mut dst.scale_exp, &shape, false)
}

/// The exact inverse of the sync path: Marlin weights → compressed-tensors `weight_packed`
/// `[N, K/8]` (source row order, also for act-order weights) and `weight_scale` `[N, K/g]`.
pub fn restore_from_marlin<S: ScaleFloat>(dev: &Device, w: &MarlinWeights<S>) -> Result<PackedWeights<S>> {
    const OP: &str = "restore_from_marlin";
    let shape = w.shape;
    let packed = unrepack_words(dev, OP, &w.qweight, w.inv_perm.as_ref(), &shape, true)?;
    let scales = scales_kernel(dev, OP, &w.scales, &shape, true, true)?;
    Ok(PackedWeights { packed, scales, shape })
}
