//! INT4 quantization on the GPU (DESIGN §3): fake quantization for QAT (forward and
//! straight-through backward), quantize + pack to compressed-tensors, dequantize, and the
//! compressed-tensors ↔ GPTQ layout conversions. Every result is bit-identical to
//! [`crate::reference::quant`].
//!
//! Weights are row-major `[N, K]` device buffers of `T` (bf16, f16 or f32); scales are stored in
//! `S` (bf16 or f16; use the activation dtype). Calls validate everything before launching and
//! return freshly allocated outputs, so an error never leaves a half-written result behind.
//! Quantizing calls synchronise once with the stream to read the kernel's status word (so a NaN
//! weight is reported as [`Error::NonFinite`] instead of becoming a NaN scale).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use crate::device::Device;
use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::ffi;
use crate::format::QuantShape;
pub use crate::reference::quant::SteMode;

const FAMILY: &str = "quant";
const THREADS: u32 = 256;

/// Which optional outputs the fake-quant forward pass also writes, and whether it checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeQuantOptions {
    /// Also return the stored scales `[N, K/g]`.
    pub scales: bool,
    /// Also return the compressed-tensors packed codes `[N, K/8]` (export in the same pass).
    pub packed: bool,
    /// Check for non-finite weights and overflowing scales (default `true`). The check reads a
    /// status word back, which waits for the kernel; a trainer that already guards against
    /// non-finite weights can turn it off to keep the call asynchronous, accepting that a NaN
    /// weight then yields unspecified outputs for its group.
    pub check_finite: bool,
}

impl Default for FakeQuantOptions {
    fn default() -> Self {
        FakeQuantOptions { scales: false, packed: false, check_finite: true }
    }
}

/// Outputs of [`fake_quant_fwd`].
#[derive(Debug)]
pub struct FakeQuantOutput<T, S> {
    /// `fake_quant(W)` in W's dtype, `[N, K]`.
    pub weights: CudaSlice<T>,
    /// Stored scales `[N, K/g]`, when requested.
    pub scales: Option<CudaSlice<S>>,
    /// Packed codes `[N, K/8]`, when requested.
    pub packed: Option<CudaSlice<i32>>,
}

/// compressed-tensors `pack-quantized` tensors of one linear layer on the device.
#[derive(Debug)]
pub struct PackedWeights<S> {
    /// `weight_packed` i32 `[N, K/8]`.
    pub packed: CudaSlice<i32>,
    /// `weight_scale` `[N, K/g]`.
    pub scales: CudaSlice<S>,
    pub shape: QuantShape,
}

/// Groups of 32/64/128 go to the warp-per-groups kernel; anything longer (channelwise) to the
/// block-per-group kernel.
fn kernel_name(op: &str, shape: &QuantShape, t: &str, s: &str) -> String {
    let layout = if [32, 64, 128].contains(&shape.group) { "grouped" } else { "rowwise" };
    format!("lowbit_{op}_{layout}_{t}_{s}")
}

/// Vector loads and stores move 16 bytes at a time.
const VEC_ALIGN: usize = 16;

/// Launches the fused quantization kernel (forward or ClipMask backward) and checks its status.
/// `outputs` are written only if it succeeds; the caller drops them on error.
#[allow(clippy::too_many_arguments)]
fn run_quant<T: Float, S: ScaleFloat>(
    dev: &Device,
    op: &'static str,
    bwd: bool,
    check: bool,
    w: &impl DevicePtr<T>,
    grad: Option<&CudaSlice<T>>,
    out: Option<&mut CudaSlice<T>>,
    scales: Option<&mut CudaSlice<S>>,
    packed: Option<&mut CudaSlice<i32>>,
    shape: &QuantShape,
) -> Result<()> {
    let name = kernel_name(if bwd { "fq_bwd" } else { "fq_fwd" }, shape, T::DTYPE.name(), S::DTYPE.name());
    let func = dev.function(FAMILY, &name, 0)?;
    let align = VEC_ALIGN;
    let mut status = if check { Some(new_status(dev)?) } else { None };
    {
        let (w_ptr, _g1) = dev.ptr(op, "weights", w, align)?;
        let grad_guard = grad.map(|g| dev.ptr(op, "grad", g, align)).transpose()?;
        let out_guard = match out {
            Some(o) => Some(dev.ptr_mut(op, "out", o, align)?),
            None => None,
        };
        let scales_guard = match scales {
            Some(s) => Some(dev.ptr_mut(op, "scales", s, 2)?),
            None => None,
        };
        let packed_guard = match packed {
            Some(p) => Some(dev.ptr_mut(op, "packed", p, 4)?),
            None => None,
        };
        let status_guard = match status.as_mut() {
            Some(s) => Some(dev.ptr_mut(op, "status", s, 8)?),
            None => None,
        };
        let params = ffi::LowbitQuantParams {
            w: w_ptr as *const _,
            grad_in: grad_guard.as_ref().map_or(0, |g| g.0) as *const _,
            out: out_guard.as_ref().map_or(0, |g| g.0) as *mut _,
            scales: scales_guard.as_ref().map_or(0, |g| g.0) as *mut _,
            packed: packed_guard.as_ref().map_or(0, |g| g.0) as *mut _,
            status: status_guard.as_ref().map_or(0, |g| g.0) as *mut _,
            rows: shape.n as i64,
            k: shape.k as i64,
            group: shape.group as i64,
        };
        let cfg = if name.contains("_grouped_") {
            dev.grid_stride(shape.packed_len(), THREADS, THREADS as usize)
        } else {
            let groups = shape.n * shape.groups_per_row();
            LaunchConfig {
                grid_dim: (groups.clamp(1, dev.info().sm_count.max(1) * 64) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        // SAFETY: every pointer in `params` comes from a buffer validated above to hold exactly
        // the [N, K] / [N, K/g] / [N, K/8] elements the kernel indexes, aligned for its vector
        // accesses; the guards keep them ordered on the stream until after the launch.
        unsafe { dev.launch(&func, cfg, params)? };
    }
    match status {
        Some(status) => check_status(dev, op, &status, shape),
        None => Ok(()),
    }
}

/// A fresh status array for a quantizing kernel: every word all ones ("nothing to report").
pub(crate) fn new_status(dev: &Device) -> Result<CudaSlice<u64>> {
    dev.htod(&[u64::MAX; ffi::LOWBIT_STATUS_WORDS as usize])
}

/// Reads a quantizing kernel's status words back (waiting for it) and turns a report into the
/// typed error: the first non-finite weight, or the first group whose scale overflowed.
pub(crate) fn check_status(dev: &Device, op: &'static str, status: &CudaSlice<u64>, shape: &QuantShape) -> Result<()> {
    let st = dev.dtoh(status)?;
    let (nonfinite, overflow) =
        (st[ffi::LOWBIT_STATUS_NONFINITE as usize], st[ffi::LOWBIT_STATUS_SCALE_OVERFLOW as usize]);
    // Report what the reference reports: the first offending group in (row, group) order, and
    // within one group a non-finite weight before its (then also non-finite) scale.
    let nonfinite_group = if nonfinite == u64::MAX { u64::MAX } else { nonfinite / shape.group as u64 };
    if nonfinite != u64::MAX && nonfinite_group <= overflow {
        let e = nonfinite as usize;
        return Err(Error::NonFinite { op, row: e / shape.k, col: e % shape.k });
    }
    if overflow != u64::MAX {
        let g = overflow as usize;
        let gpr = shape.groups_per_row();
        return Err(Error::ScaleOverflow { op, row: g / gpr, group: g % gpr });
    }
    Ok(())
}

/// `fake_quant(W)`: weights rounded to the INT4 grid, in W's dtype, plus optionally the scales
/// and the packed codes from the same pass.
pub fn fake_quant_fwd<T: Float, S: ScaleFloat>(
    dev: &Device,
    w: &CudaSlice<T>,
    shape: &QuantShape,
    opts: FakeQuantOptions,
) -> Result<FakeQuantOutput<T, S>> {
    const OP: &str = "fake_quant_fwd";
    dev.check_buffer(OP, "weights", w, shape.numel())?;
    // SAFETY: the kernel writes every element of each requested output; on error they are dropped.
    let mut weights = unsafe { dev.alloc_for_kernel::<T>(shape.numel())? };
    let mut scales = if opts.scales { Some(unsafe { dev.alloc_for_kernel::<S>(shape.scales_len())? }) } else { None };
    let mut packed = if opts.packed { Some(unsafe { dev.alloc_for_kernel::<i32>(shape.packed_len())? }) } else { None };
    run_quant::<T, S>(
        dev,
        OP,
        false,
        opts.check_finite,
        w,
        None,
        Some(&mut weights),
        scales.as_mut(),
        packed.as_mut(),
        shape,
    )?;
    Ok(FakeQuantOutput { weights, scales, packed })
}

/// The straight-through backward pass: `dW` from `dY` (`grad`, `[N, K]`). `Identity` copies;
/// `ClipMask` zeroes the gradient where the weight's code was clipped to `[-7, 7]`.
pub fn fake_quant_bwd<T: Float, S: ScaleFloat>(
    dev: &Device,
    grad: &CudaSlice<T>,
    w: &CudaSlice<T>,
    shape: &QuantShape,
    mode: SteMode,
) -> Result<CudaSlice<T>> {
    const OP: &str = "fake_quant_bwd";
    dev.check_buffer(OP, "grad", grad, shape.numel())?;
    dev.check_buffer(OP, "weights", w, shape.numel())?;
    match mode {
        SteMode::Identity => {
            // SAFETY: fully overwritten by the copy below before it is returned.
            let mut dw = unsafe { dev.alloc_for_kernel::<T>(shape.numel())? };
            dev.stream().memcpy_dtod(grad, &mut dw).map_err(Error::cuda("memcpy device to device"))?;
            Ok(dw)
        }
        SteMode::ClipMask => {
            // SAFETY: the kernel writes every element; on error the buffer is dropped.
            let mut dw = unsafe { dev.alloc_for_kernel::<T>(shape.numel())? };
            run_quant::<T, S>(dev, OP, true, true, w, Some(grad), Some(&mut dw), None, None, shape)?;
            Ok(dw)
        }
    }
}

/// Real quantization for export: compressed-tensors `weight_packed` and `weight_scale`.
pub fn quantize_pack<T: Float, S: ScaleFloat>(
    dev: &Device,
    w: &CudaSlice<T>,
    shape: &QuantShape,
) -> Result<PackedWeights<S>> {
    const OP: &str = "quantize_pack";
    dev.check_buffer(OP, "weights", w, shape.numel())?;
    // SAFETY: the kernel writes every element of both outputs; on error they are dropped.
    let mut scales = unsafe { dev.alloc_for_kernel::<S>(shape.scales_len())? };
    let mut packed = unsafe { dev.alloc_for_kernel::<i32>(shape.packed_len())? };
    run_quant::<T, S>(dev, OP, false, true, w, None, None, Some(&mut scales), Some(&mut packed), shape)?;
    Ok(PackedWeights { packed, scales, shape: *shape })
}

/// `T(q · s)` for every weight of packed codes and their scales.
pub fn dequantize<T: Float, S: ScaleFloat>(dev: &Device, weights: &PackedWeights<S>) -> Result<CudaSlice<T>> {
    const OP: &str = "dequantize";
    let shape = &weights.shape;
    dev.check_buffer(OP, "packed", &weights.packed, shape.packed_len())?;
    dev.check_buffer(OP, "scales", &weights.scales, shape.scales_len())?;
    let name = format!("lowbit_dequant_{}_{}", T::DTYPE.name(), S::DTYPE.name());
    let func = dev.function(FAMILY, &name, 0)?;
    // SAFETY: the kernel writes all N·K elements.
    let mut out = unsafe { dev.alloc_for_kernel::<T>(shape.numel())? };
    {
        let (p, _g1) = dev.ptr(OP, "packed", &weights.packed, 4)?;
        let (s, _g2) = dev.ptr(OP, "scales", &weights.scales, 2)?;
        let (o, _g3) = dev.ptr_mut(OP, "out", &mut out, VEC_ALIGN)?;
        let params = ffi::LowbitDequantParams {
            packed: p as *const _,
            scales: s as *const _,
            out: o as *mut _,
            rows: shape.n as i64,
            k: shape.k as i64,
            group: shape.group as i64,
        };
        // SAFETY: buffers validated above against the shape the kernel indexes.
        unsafe { dev.launch(&func, dev.grid_stride(shape.packed_len(), THREADS, THREADS as usize), params)? };
    }
    Ok(out)
}

fn transpose_words<E: cudarc::driver::DeviceRepr>(
    dev: &Device,
    op: &'static str,
    src: &CudaSlice<E>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<E>> {
    let len = rows
        .checked_mul(cols)
        .filter(|&len| len > 0 && len <= i64::MAX as usize / 4)
        .ok_or_else(|| Error::shape(op, format!("[{rows}, {cols}] must be non-empty and fit the address space")))?;
    dev.check_buffer(op, "src", src, len)?;
    let name = match std::mem::size_of::<E>() {
        2 => "lowbit_transpose_b16",
        4 => "lowbit_transpose_b32",
        n => return Err(Error::invalid(op, format!("{n}-byte elements cannot be transposed"))),
    };
    let func = dev.function(FAMILY, name, 0)?;
    // SAFETY: the transpose writes every element of the [cols, rows] output.
    let mut dst = unsafe { dev.alloc_for_kernel::<E>(len)? };
    {
        let (s, _g1) = dev.ptr(op, "src", src, 1)?;
        let (d, _g2) = dev.ptr_mut(op, "dst", &mut dst, 1)?;
        let params =
            ffi::LowbitTransposeParams { src: s as *const _, dst: d as *mut _, rows: rows as i64, cols: cols as i64 };
        let tiles = rows.div_ceil(32) * cols.div_ceil(32);
        let cfg = LaunchConfig {
            grid_dim: (tiles.clamp(1, dev.info().sm_count.max(1) * 32) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: src and dst hold rows·cols elements, as the kernel indexes.
        unsafe { dev.launch(&func, cfg, params)? };
    }
    Ok(dst)
}

/// compressed-tensors `weight_packed` `[N, K/8]` → GPTQ `qweight` `[K/8, N]`.
pub fn ct_to_gptq(dev: &Device, packed: &CudaSlice<i32>, shape: &QuantShape) -> Result<CudaSlice<i32>> {
    transpose_words(dev, "ct_to_gptq", packed, shape.n, shape.k / 8)
}

/// GPTQ `qweight` `[K/8, N]` → compressed-tensors `weight_packed` `[N, K/8]`.
pub fn gptq_to_ct(dev: &Device, qweight: &CudaSlice<i32>, shape: &QuantShape) -> Result<CudaSlice<i32>> {
    transpose_words(dev, "gptq_to_ct", qweight, shape.k / 8, shape.n)
}

/// Scales between compressed-tensors `[N, K/g]` and GPTQ `[K/g, N]` (either direction:
/// pass the source's `rows, cols`).
pub fn transpose_scales<S: ScaleFloat>(
    dev: &Device,
    scales: &CudaSlice<S>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<S>> {
    transpose_words(dev, "transpose_scales", scales, rows, cols)
}
