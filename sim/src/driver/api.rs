//! The exported `cu*` functions.
//!
//! Safety contract of every `unsafe extern "C"` function here: the CUDA driver API's own, as
//! `cuda.h` documents it — out-pointers point to writable memory of their type (null is
//! answered with `CUDA_ERROR_INVALID_VALUE`), host buffers hold the byte counts given, strings
//! are NUL-terminated, `kernelParams` holds one pointer per kernel parameter. Handles are
//! checked against the driver's tables, so a stale or foreign handle is an error, never a
//! dereference.
//!
//! Every function catches panics (an internal error is `CUDA_ERROR_UNKNOWN` with a report on
//! stderr) so that nothing unwinds across the FFI boundary.
#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use super::errors;
use super::state::{current, fail, is_sticky, report, set_current, Driver, DEFAULT_SMEM, PRIMARY_CTX, R};
use super::types::*;
use crate::exec::LaunchConfig;
use crate::ir::{Kernel, Module};
use crate::{cuda, SimError};

/// Runs `body`, turning its result into a `CUresult` (a code `cuda.h` does not define, or a
/// panic, becomes `CUDA_ERROR_UNKNOWN`).
pub(crate) fn guard(name: &str, body: impl FnOnce() -> R<()>) -> CUresult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => cuda::SUCCESS,
        // Only codes `cuda.h` defines: bindings such as cudarc read CUresult as a Rust enum.
        Ok(Err(code)) if errors::name(code).is_some() => code,
        Ok(Err(_)) => cuda::UNKNOWN,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            report(&format!("internal error: {name} panicked: {msg}"));
            cuda::UNKNOWN
        }
    }
}

/// `CUDA_ERROR_INVALID_VALUE` for a null pointer.
fn nonnull<T>(p: *const T) -> R<()> {
    if p.is_null() {
        Err(cuda::INVALID_VALUE)
    } else {
        Ok(())
    }
}

/// Writes an out-parameter (checked non-null beforehand by the caller or here).
///
/// # Safety
/// `p` is null or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, v: T) -> R<()> {
    nonnull(p)?;
    // SAFETY: non-null, and valid for writes by the caller's contract; unaligned-safe.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

fn check_device(dev: CUdevice) -> R<()> {
    if dev == 0 {
        Ok(())
    } else {
        Err(cuda::INVALID_DEVICE)
    }
}

fn h<T>(p: *mut T) -> usize {
    p as usize
}
fn ptr(h: usize) -> *mut c_void {
    h as *mut c_void
}

/// Reports an unimplemented entry point once per name.
fn not_supported(name: &str) -> R<()> {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut s = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if s.get_or_insert_with(HashSet::new).insert(name.to_string()) {
        report(&format!("{name} is not supported by the simulator (CUDA_ERROR_NOT_SUPPORTED)"));
    }
    Err(cuda::NOT_SUPPORTED)
}

// --- init / device -------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", || {
        if flags != 0 {
            return Err(cuda::INVALID_VALUE);
        }
        Driver::init();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // SAFETY: out-pointer (contract above).
    guard("cuDriverGetVersion", || unsafe { put(version, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", || {
        Driver::get()?;
        // SAFETY: out-pointer.
        unsafe { put(count, 1) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", || {
        Driver::get()?;
        nonnull(device)?;
        check_device(ordinal)?;
        // SAFETY: out-pointer.
        unsafe { put(device, 0) }
    })
}

/// The value of a device attribute, or `None` for one the simulator does not know (answered
/// with `CUDA_ERROR_INVALID_VALUE`). Capabilities the simulator lacks (textures, managed memory,
/// memory pools, clusters, cooperative launch, peer access, ...) are known and reported as 0.
pub fn device_attribute(cfg: &crate::SimConfig, attr: u32) -> Option<i64> {
    use dev_attr::*;
    let v: i64 = match attr {
        MAX_THREADS_PER_BLOCK => 1024,
        MAX_BLOCK_DIM_X | MAX_BLOCK_DIM_Y => 1024,
        MAX_BLOCK_DIM_Z => 64,
        MAX_GRID_DIM_X => i32::MAX as i64,
        MAX_GRID_DIM_Y | MAX_GRID_DIM_Z => 65535,
        MAX_SHARED_MEMORY_PER_BLOCK => DEFAULT_SMEM as i64,
        TOTAL_CONSTANT_MEMORY => 65536,
        WARP_SIZE => 32,
        MAX_PITCH => i32::MAX as i64,
        MAX_REGISTERS_PER_BLOCK | MAX_REGISTERS_PER_MULTIPROCESSOR => 65536,
        CLOCK_RATE => 1_410_000,
        TEXTURE_ALIGNMENT | SURFACE_ALIGNMENT => 512,
        TEXTURE_PITCH_ALIGNMENT => 32,
        GPU_OVERLAP | CONCURRENT_KERNELS | GLOBAL_L1_CACHE_SUPPORTED | LOCAL_L1_CACHE_SUPPORTED => 1,
        MULTIPROCESSOR_COUNT => cfg.sm_count as i64,
        KERNEL_EXEC_TIMEOUT | INTEGRATED | CAN_MAP_HOST_MEMORY | COMPUTE_MODE | ECC_ENABLED | TCC_DRIVER => 0,
        PCI_BUS_ID | PCI_DEVICE_ID | PCI_DOMAIN_ID => 0,
        MEMORY_CLOCK_RATE => 1_215_000,
        GLOBAL_MEMORY_BUS_WIDTH => 5120,
        L2_CACHE_SIZE => 50 << 20,
        MAX_THREADS_PER_MULTIPROCESSOR => 2048,
        ASYNC_ENGINE_COUNT => 2,
        // Device addresses are not unified with host addresses.
        UNIFIED_ADDRESSING => 0,
        COMPUTE_CAPABILITY_MAJOR => cfg.cc.0 as i64,
        COMPUTE_CAPABILITY_MINOR => cfg.cc.1 as i64,
        STREAM_PRIORITIES_SUPPORTED => 0,
        MAX_SHARED_MEMORY_PER_MULTIPROCESSOR => cfg.smem_per_sm as i64,
        MANAGED_MEMORY | MULTI_GPU_BOARD | MULTI_GPU_BOARD_GROUP_ID => 0,
        SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO => 2,
        COOPERATIVE_LAUNCH => 0,
        MAX_SHARED_MEMORY_PER_BLOCK_OPTIN => cfg.smem_optin as i64,
        MAX_BLOCKS_PER_MULTIPROCESSOR => 32,
        RESERVED_SHARED_MEMORY_PER_BLOCK => 1024,
        // cudarc uses cuMemAllocAsync/cuMemFreeAsync when this is non-zero; the simulator
        // keeps to cuMemAlloc/cuMemFree.
        MEMORY_POOLS_SUPPORTED => 0,
        // Texture and surface limits (21..=29, 42..=49, 52..=74, 77): no textures.
        21..=29 | 42..=49 | 52..=74 | 77 => 0,
        // Host-memory, stream-memory-op, IPC, VMM, RDMA, NUMA, ... capabilities: none.
        86 | 88..=94 | 96 | 98..=105 | 107..=110 | 112..=114 | 116..=119 => 0,
        CLUSTER_LAUNCH..=LAST_KNOWN => 0,
        _ => return None,
    };
    Some(v)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: CUdevice_attribute, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetAttribute", || {
        let d = Driver::get()?;
        nonnull(pi)?;
        check_device(dev)?;
        let v = device_attribute(&d.config, attrib).ok_or(cuda::INVALID_VALUE)?;
        // SAFETY: out-pointer.
        unsafe { put(pi, v.clamp(i32::MIN as i64, i32::MAX as i64) as c_int) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetName", || {
        let d = Driver::get()?;
        nonnull(name)?;
        check_device(dev)?;
        if len <= 0 {
            return Err(cuda::INVALID_VALUE);
        }
        let s = d.config.name.as_bytes();
        let n = s.len().min(len as usize - 1);
        // SAFETY: `name` holds `len` bytes (contract); n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), name.cast::<u8>(), n);
            name.add(n).write(0);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem_v2", || {
        let d = Driver::get()?;
        nonnull(bytes)?;
        check_device(dev)?;
        // SAFETY: out-pointer.
        unsafe { put(bytes, d.config.total_mem as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetUuid_v2", || {
        Driver::get()?;
        nonnull(uuid)?;
        check_device(dev)?;
        let mut bytes = [0u8; 16];
        bytes[..10].copy_from_slice(b"lowbit-sim");
        // SAFETY: out-pointer.
        unsafe { put(uuid, CUuuid { bytes }) }
    })
}

// --- context -------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", || {
        let d = Driver::get()?;
        nonnull(pctx)?;
        check_device(dev)?;
        let c = d.retain();
        // SAFETY: out-pointer.
        unsafe { put(pctx, ptr(c)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease_v2", || {
        let d = Driver::get()?;
        check_device(dev)?;
        d.release()
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(dev: CUdevice, flags: *mut c_uint, active: *mut c_int) -> CUresult {
    guard("cuDevicePrimaryCtxGetState", || {
        let d = Driver::get()?;
        nonnull(flags)?;
        nonnull(active)?;
        check_device(dev)?;
        let a = (d.refcount() > 0) as c_int;
        // SAFETY: out-pointers.
        unsafe {
            put(flags, 0)?;
            put(active, a)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", || {
        Driver::get()?;
        // SAFETY: out-pointer.
        unsafe { put(pctx, ptr(current())) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", || {
        Driver::get()?;
        match h(ctx) {
            0 => set_current(0),
            PRIMARY_CTX => set_current(PRIMARY_CTX),
            _ => return Err(cuda::INVALID_CONTEXT),
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", || {
        let d = Driver::get()?;
        nonnull(device)?;
        d.require_current(&d.lock())?;
        // SAFETY: out-pointer.
        unsafe { put(device, 0) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", || {
        let d = Driver::get()?;
        d.require_current(&d.lock())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetFlags(_flags: c_uint) -> CUresult {
    guard("cuCtxSetFlags", || {
        Driver::get()?;
        not_supported("cuCtxSetFlags")
    })
}

// --- streams and events --------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(phStream: *mut CUstream, flags: c_uint) -> CUresult {
    guard("cuStreamCreate", || {
        let d = Driver::get()?;
        nonnull(phStream)?;
        if flags & !CU_STREAM_NON_BLOCKING != 0 {
            return Err(cuda::INVALID_VALUE);
        }
        let s = d.create_stream(flags)?;
        // SAFETY: out-pointer.
        unsafe { put(phStream, ptr(s)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(hStream: CUstream) -> CUresult {
    guard("cuStreamDestroy_v2", || Driver::get()?.destroy_stream(h(hStream)))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(hStream: CUstream) -> CUresult {
    guard("cuStreamSynchronize", || Driver::get()?.sync_stream(h(hStream)))
}

/// Work is done at call time, so a stream is always idle.
#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(hStream: CUstream) -> CUresult {
    guard("cuStreamQuery", || Driver::get()?.sync_stream(h(hStream)))
}

/// A no-op once validated: the event's work is already complete (a never-recorded event is
/// also accepted, as by CUDA).
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(hStream: CUstream, hEvent: CUevent, flags: c_uint) -> CUresult {
    guard("cuStreamWaitEvent", || {
        let d = Driver::get()?;
        if flags & !1 != 0 {
            return Err(cuda::INVALID_VALUE);
        }
        d.wait_event(h(hStream), h(hEvent))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(phEvent: *mut CUevent, flags: c_uint) -> CUresult {
    guard("cuEventCreate", || {
        let d = Driver::get()?;
        nonnull(phEvent)?;
        if flags & !(CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS) != 0 {
            return Err(cuda::INVALID_VALUE);
        }
        if flags & CU_EVENT_INTERPROCESS != 0 && flags & CU_EVENT_DISABLE_TIMING == 0 {
            return Err(cuda::INVALID_VALUE);
        }
        let e = d.create_event(flags)?;
        // SAFETY: out-pointer.
        unsafe { put(phEvent, ptr(e)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(hEvent: CUevent) -> CUresult {
    guard("cuEventDestroy_v2", || Driver::get()?.destroy_event(h(hEvent)))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(hEvent: CUevent, hStream: CUstream) -> CUresult {
    guard("cuEventRecord", || Driver::get()?.record_event(h(hEvent), h(hStream)))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(hEvent: CUevent) -> CUresult {
    guard("cuEventSynchronize", || Driver::get()?.check_event(h(hEvent)))
}

/// Always complete: launches and copies finish before they return.
#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(hEvent: CUevent) -> CUresult {
    guard("cuEventQuery", || Driver::get()?.check_event(h(hEvent)))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(pMilliseconds: *mut f32, hStart: CUevent, hEnd: CUevent) -> CUresult {
    guard("cuEventElapsedTime_v2", || {
        let d = Driver::get()?;
        nonnull(pMilliseconds)?;
        let ms = d.elapsed(h(hStart), h(hEnd))?;
        // SAFETY: out-pointer.
        unsafe { put(pMilliseconds, ms) }
    })
}

/// The pre-CUDA-12.8 name; same semantics.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(pMilliseconds: *mut f32, hStart: CUevent, hEnd: CUevent) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuEventElapsedTime_v2(pMilliseconds, hStart, hEnd) }
}

/// Runs the callback at once: everything queued before it on the stream is already done.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(hStream: CUstream, f: CUhostFn, userData: *mut c_void) -> CUresult {
    guard("cuLaunchHostFunc", || {
        let d = Driver::get()?;
        let f = f.ok_or(cuda::INVALID_VALUE)?;
        d.sync_stream(h(hStream))?;
        // SAFETY: the caller's callback and its argument (contract).
        unsafe { f(userData) };
        Ok(())
    })
}

// --- memory --------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    guard("cuMemAlloc_v2", || {
        let d = Driver::get()?;
        nonnull(dptr)?;
        let p = d.alloc(bytesize)?;
        // SAFETY: out-pointer.
        unsafe { put(dptr, p) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard("cuMemFree_v2", || Driver::get()?.free(dptr))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard("cuMemGetInfo_v2", || {
        let d = Driver::get()?;
        nonnull(free)?;
        nonnull(total)?;
        d.require_current(&d.lock())?;
        let (f, t) = d.free_bytes();
        // SAFETY: out-pointers.
        unsafe {
            put(free, f as usize)?;
            put(total, t as usize)
        }
    })
}

/// A copy or memset, done at once on the calling thread (stream-ordered semantics hold
/// trivially because every earlier operation is already complete).
fn mem_op(stream: usize, len: usize, op: impl FnOnce(&Driver) -> crate::Result<()>) -> R<()> {
    let d = Driver::get()?;
    d.check_stream(&d.lock(), stream)?;
    if len == 0 {
        return Ok(());
    }
    op(d).map_err(|e| fail(&e))
}

/// # Safety
/// `src` holds `n` readable bytes.
unsafe fn htod(dst: CUdeviceptr, src: *const c_void, n: usize, stream: usize) -> R<()> {
    if n > 0 {
        nonnull(src)?;
    }
    mem_op(stream, n, |d| {
        // SAFETY: `src` holds `n` bytes (contract), non-null.
        let s = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), n) };
        d.mem.copy_in(dst, s)
    })
}

/// # Safety
/// `dst` holds `n` writable bytes.
unsafe fn dtoh(dst: *mut c_void, src: CUdeviceptr, n: usize, stream: usize) -> R<()> {
    if n > 0 {
        nonnull(dst)?;
    }
    mem_op(stream, n, |d| {
        // SAFETY: `dst` holds `n` writable bytes (contract), non-null.
        let s = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), n) };
        d.mem.copy_out(src, s)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    hStream: CUstream,
) -> CUresult {
    // SAFETY: contract.
    guard("cuMemcpyHtoDAsync_v2", || unsafe { htod(dst, src, n, h(hStream)) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, n: usize) -> CUresult {
    // SAFETY: contract.
    guard("cuMemcpyHtoD_v2", || unsafe { htod(dst, src, n, 0) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    hStream: CUstream,
) -> CUresult {
    // SAFETY: contract.
    guard("cuMemcpyDtoHAsync_v2", || unsafe { dtoh(dst, src, n, h(hStream)) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    // SAFETY: contract.
    guard("cuMemcpyDtoH_v2", || unsafe { dtoh(dst, src, n, 0) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    hStream: CUstream,
) -> CUresult {
    guard("cuMemcpyDtoDAsync_v2", || mem_op(h(hStream), n, |d| d.mem.copy_within(dst, src, n)))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    guard("cuMemcpyDtoD_v2", || mem_op(0, n, |d| d.mem.copy_within(dst, src, n)))
}

/// One device, one context: a peer copy is a device-to-device copy.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: CUdeviceptr,
    dstContext: CUcontext,
    src: CUdeviceptr,
    srcContext: CUcontext,
    n: usize,
    hStream: CUstream,
) -> CUresult {
    guard("cuMemcpyPeerAsync", || {
        if h(dstContext) != PRIMARY_CTX || h(srcContext) != PRIMARY_CTX {
            Driver::get()?;
            return Err(cuda::INVALID_CONTEXT);
        }
        mem_op(h(hStream), n, |d| d.mem.copy_within(dst, src, n))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, uc: u8, n: usize, hStream: CUstream) -> CUresult {
    guard("cuMemsetD8Async", || mem_op(h(hStream), n, |d| d.mem.memset(dst, uc, n)))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, uc: u8, n: usize) -> CUresult {
    guard("cuMemsetD8_v2", || mem_op(0, n, |d| d.mem.memset(dst, uc, n)))
}

// --- modules and functions -----------------------------------------------------------------

/// Loads an already parsed module into the current context (the rlib's way in, for tests that
/// build kernels without PTX).
pub fn load_module_ir(module: Arc<Module>) -> Result<CUmodule, CUresult> {
    Driver::get()?.add_module(module).map(ptr)
}

/// The PTX text of an image, parsed (cached by text) and added to the context.
///
/// # Safety
/// `image` as `cuModuleLoadData` defines it.
unsafe fn load_image(image: *const c_void) -> R<usize> {
    let d = Driver::get()?;
    nonnull(image)?;
    d.require_current(&d.lock())?;
    // SAFETY: contract.
    let text = unsafe { crate::fatbin::ptx_from_ptr(image.cast(), d.config.cc) }.map_err(|e| fail(&e))?;
    let m = d.parse_cached(&text).map_err(|e| fail(&e))?;
    d.add_module(m)
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    guard("cuModuleLoadData", || {
        nonnull(module)?;
        // SAFETY: contract.
        let m = unsafe { load_image(image) }?;
        // SAFETY: out-pointer.
        unsafe { put(module, ptr(m)) }
    })
}

/// Options are ignored (they tune the JIT and its logs).
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _numOptions: c_uint,
    _options: *mut c_int,
    _optionValues: *mut *mut c_void,
) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuModuleLoadData(module, image) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    guard("cuModuleUnload", || Driver::get()?.unload_module(h(hmod)))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(hfunc: *mut CUfunction, hmod: CUmodule, name: *const c_char) -> CUresult {
    guard("cuModuleGetFunction", || {
        let d = Driver::get()?;
        nonnull(hfunc)?;
        nonnull(name)?;
        // SAFETY: NUL-terminated (contract).
        let name = unsafe { CStr::from_ptr(name) }.to_str().map_err(|_| cuda::NOT_FOUND)?;
        let f = d.get_function(h(hmod), name)?;
        // SAFETY: out-pointer.
        unsafe { put(hfunc, ptr(f)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    _dptr: *mut CUdeviceptr,
    _bytes: *mut usize,
    _hmod: CUmodule,
    _name: *const c_char,
) -> CUresult {
    guard("cuModuleGetGlobal_v2", || {
        Driver::get()?;
        not_supported("cuModuleGetGlobal_v2")
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(hfunc: CUfunction, attrib: CUfunction_attribute, value: c_int) -> CUresult {
    guard("cuFuncSetAttribute", || {
        let d = Driver::get()?;
        let optin = d.config.smem_optin;
        d.with_function(h(hfunc), |f| match attrib {
            func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                let limit = optin.saturating_sub(f.kernel.static_smem.min(u32::MAX as usize) as u32);
                if value < 0 || value as u32 > limit {
                    report(&format!(
                        "cuFuncSetAttribute({}): MAX_DYNAMIC_SHARED_SIZE_BYTES = {value} exceeds the opt-in limit \
                         {optin} minus {} bytes of static shared memory",
                        f.kernel.name, f.kernel.static_smem
                    ));
                    return Err(cuda::INVALID_VALUE);
                }
                f.max_dynamic_smem = value as u32;
                Ok(())
            }
            func_attr::PREFERRED_SHARED_MEMORY_CARVEOUT => {
                if !(-1..=100).contains(&value) {
                    return Err(cuda::INVALID_VALUE);
                }
                f.carveout = value;
                Ok(())
            }
            _ => Err(cuda::INVALID_VALUE),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: CUfunction_attribute,
    hfunc: CUfunction,
) -> CUresult {
    guard("cuFuncGetAttribute", || {
        let d = Driver::get()?;
        nonnull(pi)?;
        let v = d.with_function(h(hfunc), |f| {
            Ok(match attrib {
                func_attr::MAX_THREADS_PER_BLOCK => max_threads(&f.kernel) as i64,
                func_attr::SHARED_SIZE_BYTES => f.kernel.static_smem as i64,
                func_attr::CONST_SIZE_BYTES | func_attr::LOCAL_SIZE_BYTES | func_attr::CACHE_MODE_CA => 0,
                func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES => f.max_dynamic_smem as i64,
                func_attr::PREFERRED_SHARED_MEMORY_CARVEOUT => f.carveout as i64,
                func_attr::PTX_VERSION | func_attr::BINARY_VERSION => (d.config.cc.0 * 10 + d.config.cc.1) as i64,
                // Register counts are the assembler's; the interpreter has none to report.
                func_attr::NUM_REGS => return not_supported("cuFuncGetAttribute(NUM_REGS)").map(|_| 0),
                _ => return Err(cuda::INVALID_VALUE),
            })
        })?;
        // SAFETY: out-pointer.
        unsafe { put(pi, v.clamp(0, i32::MAX as i64) as c_int) }
    })
}

/// Threads per block a kernel accepts: the product of `.maxntid`/`.reqntid`, at most 1024.
fn max_threads(k: &Kernel) -> u64 {
    k.maxntid.map_or(1024, |m| m.iter().map(|&x| x.max(1) as u64).product::<u64>().min(1024))
}

/// The launch checks a real driver makes, with a one-line report of what failed.
pub(crate) fn validate_launch(
    k: &Kernel,
    max_dynamic_smem: u32,
    optin: u32,
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
) -> Result<(), SimError> {
    let bad = |msg: String| Err(SimError::invalid_value(format!("cuLaunchKernel({}): {msg}", k.name)));
    if grid.contains(&0) || grid[0] > i32::MAX as u32 || grid[1] > 65535 || grid[2] > 65535 {
        return bad(format!("grid {grid:?} is outside [1, 2^31-1] x [1, 65535] x [1, 65535]"));
    }
    if block.contains(&0) || block[0] > 1024 || block[1] > 1024 || block[2] > 64 {
        return bad(format!("block {block:?} is outside [1, 1024] x [1, 1024] x [1, 64]"));
    }
    let threads = block.iter().map(|&x| x as u64).product::<u64>();
    if threads > 1024 {
        return bad(format!("block {block:?} has {threads} threads, more than 1024"));
    }
    if threads > max_threads(k) {
        return bad(format!(
            "block {block:?} has {threads} threads, more than the kernel's .maxntid {:?} allows ({})",
            k.maxntid.unwrap_or([1024, 1, 1]),
            max_threads(k)
        ));
    }
    let total = smem as u64 + k.static_smem as u64;
    if smem > max_dynamic_smem {
        return bad(format!(
            "{smem} bytes of dynamic shared memory (+ {} static = {total}) exceed the function's limit of {max_dynamic_smem} \
             (raise it with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES))",
            k.static_smem
        ));
    }
    if total > optin as u64 {
        return bad(format!(
            "{smem} bytes of dynamic + {} static shared memory = {total} exceed the device's opt-in limit of {optin}",
            k.static_smem
        ));
    }
    Ok(())
}

/// The parameter buffer from `kernelParams` (one pointer per parameter) or from `extra`
/// (`CU_LAUNCH_PARAM_BUFFER_POINTER` / `_SIZE` / `_END`).
///
/// # Safety
/// As `cuLaunchKernel` requires of its two arguments.
unsafe fn param_buffer(k: &Kernel, kernel_params: *mut *mut c_void, extra: *mut *mut c_void) -> R<Vec<u8>> {
    let mut buf = vec![0u8; k.param_bytes];
    let bad = |msg: String| fail(&SimError::invalid_value(format!("cuLaunchKernel({}): {msg}", k.name)));
    match (kernel_params.is_null(), extra.is_null()) {
        (false, false) => return Err(bad("both kernelParams and extra are given".into())),
        (true, true) if !k.params.is_empty() => {
            return Err(bad(format!("{} parameters expected, kernelParams and extra are null", k.params.len())))
        }
        (true, true) => {}
        (false, true) => {
            for (i, p) in k.params.iter().enumerate() {
                // SAFETY: kernelParams holds one pointer per parameter (contract).
                let src = unsafe { kernel_params.add(i).read() };
                if src.is_null() {
                    return Err(bad(format!("kernelParams[{i}] is null")));
                }
                if p.offset + p.size > buf.len() {
                    return Err(bad(format!("parameter {i} [{}, +{}) lies outside the buffer", p.offset, p.size)));
                }
                // SAFETY: the parameter's value holds `p.size` bytes (contract).
                unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), buf.as_mut_ptr().add(p.offset), p.size) };
            }
        }
        (true, false) => {
            let (mut data, mut size): (*const u8, Option<usize>) = (std::ptr::null(), None);
            let mut i = 0;
            loop {
                if i >= 64 {
                    return Err(bad("extra is not terminated by CU_LAUNCH_PARAM_END".into()));
                }
                // SAFETY: extra is a key/value list ending with CU_LAUNCH_PARAM_END (contract).
                let key = unsafe { extra.add(i).read() } as usize;
                match key {
                    CU_LAUNCH_PARAM_END => break,
                    // SAFETY: a value follows each key.
                    CU_LAUNCH_PARAM_BUFFER_POINTER => data = unsafe { extra.add(i + 1).read() }.cast::<u8>(),
                    CU_LAUNCH_PARAM_BUFFER_SIZE => {
                        // SAFETY: the value is a pointer to a size_t.
                        let sp = unsafe { extra.add(i + 1).read() }.cast::<usize>();
                        nonnull(sp).map_err(|_| bad("CU_LAUNCH_PARAM_BUFFER_SIZE points at null".into()))?;
                        // SAFETY: non-null pointer to a size_t.
                        size = Some(unsafe { sp.read_unaligned() });
                    }
                    other => return Err(bad(format!("unknown extra key {other:#x}"))),
                }
                i += 2;
            }
            let size = size.ok_or_else(|| bad("extra lacks CU_LAUNCH_PARAM_BUFFER_SIZE".into()))?;
            if data.is_null() && k.param_bytes > 0 {
                return Err(bad("extra lacks CU_LAUNCH_PARAM_BUFFER_POINTER".into()));
            }
            if size < k.param_bytes {
                return Err(bad(format!(
                    "the parameter buffer holds {size} bytes, the kernel takes {}",
                    k.param_bytes
                )));
            }
            if k.param_bytes > 0 {
                // SAFETY: the buffer holds `size >= param_bytes` bytes (contract).
                unsafe { std::ptr::copy_nonoverlapping(data, buf.as_mut_ptr(), k.param_bytes) };
            }
        }
    }
    Ok(buf)
}

/// [`param_buffer`] for the unit tests.
///
/// # Safety
/// As [`param_buffer`].
#[cfg(test)]
pub(crate) unsafe fn param_buffer_for_tests(k: &Kernel, kp: *mut *mut c_void, extra: *mut *mut c_void) -> R<Vec<u8>> {
    // SAFETY: forwarded contract.
    unsafe { param_buffer(k, kp, extra) }
}

/// A launch's outcome as the caller sees it: execution faults become the context's sticky
/// error and the launch itself reports success (they surface at the next call, as on a GPU);
/// other errors (an unsupported instruction, a bad configuration) are returned at once.
pub(crate) fn finish_launch(d: &Driver, r: crate::Result<crate::LaunchStats>) -> R<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            let code = fail(&e);
            if is_sticky(code) {
                d.set_sticky(code);
                Ok(())
            } else {
                Err(code)
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    guard("cuLaunchKernel", || {
        let d = Driver::get()?;
        let (kernel, max_dyn) = {
            let c = d.lock();
            d.check_stream(&c, h(hStream))?;
            let fe = c.functions.get(&h(f)).ok_or(cuda::INVALID_HANDLE)?;
            (fe.kernel.clone(), fe.max_dynamic_smem)
        };
        let cfg = LaunchConfig {
            grid: [gridDimX, gridDimY, gridDimZ],
            block: [blockDimX, blockDimY, blockDimZ],
            dynamic_smem: sharedMemBytes,
        };
        validate_launch(&kernel, max_dyn, d.config.smem_optin, cfg.grid, cfg.block, sharedMemBytes)
            .map_err(|e| fail(&e))?;
        // SAFETY: contract.
        let params = unsafe { param_buffer(&kernel, kernelParams, extra) }?;
        // No lock is held while the kernel runs: other host threads launch concurrently.
        let r = catch_unwind(AssertUnwindSafe(|| crate::exec::launch(&kernel, &cfg, &params, &d.mem, &d.config)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(SimError::new(
                    cuda::UNKNOWN,
                    format!("internal error: the executor panicked in {}: {msg}", kernel.name),
                ))
            });
        finish_launch(d, r)
    })
}

// --- occupancy -----------------------------------------------------------------------------

/// Blocks of `block_size` threads and `dyn_smem` bytes that fit on one SM (threads, blocks and
/// shared memory; registers are not modelled).
fn active_blocks(d: &Driver, f: usize, block_size: c_int, dyn_smem: usize) -> R<c_int> {
    if block_size <= 0 {
        return Err(cuda::INVALID_VALUE);
    }
    d.with_function(f, |fe| {
        if block_size as u64 > max_threads(&fe.kernel) {
            return Ok(0);
        }
        let by_threads = 2048 / block_size as u64;
        let smem = dyn_smem as u64 + fe.kernel.static_smem as u64;
        let by_smem = if smem == 0 { u64::MAX } else { d.config.smem_per_sm as u64 / (smem + 1024) };
        Ok(by_threads.min(by_smem).min(32) as c_int)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
) -> CUresult {
    guard("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        let d = Driver::get()?;
        nonnull(numBlocks)?;
        let n = active_blocks(d, h(func), blockSize, dynamicSMemSize)?;
        // SAFETY: out-pointer.
        unsafe { put(numBlocks, n) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, func, blockSize, dynamicSMemSize) }
}

macro_rules! unsupported {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            $(let _ = $arg;)*
            guard(stringify!($name), || {
                Driver::get()?;
                not_supported(stringify!($name))
            })
        }
    )*};
}

unsupported! {
    cuOccupancyMaxPotentialBlockSize(minGridSize: *mut c_int, blockSize: *mut c_int, func: CUfunction,
        b2d: CUoccupancyB2DSize, dynamicSMemSize: usize, blockSizeLimit: c_int);
    cuOccupancyMaxPotentialBlockSizeWithFlags(minGridSize: *mut c_int, blockSize: *mut c_int, func: CUfunction,
        b2d: CUoccupancyB2DSize, dynamicSMemSize: usize, blockSizeLimit: c_int, flags: c_uint);
    cuOccupancyAvailableDynamicSMemPerBlock(dynamicSmemSize: *mut usize, func: CUfunction, numBlocks: c_int,
        blockSize: c_int);
    cuOccupancyMaxPotentialClusterSize(clusterSize: *mut c_int, func: CUfunction, config: *const c_void);
    cuOccupancyMaxActiveClusters(numClusters: *mut c_int, func: CUfunction, config: *const c_void);
    cuMemAllocAsync(dptr: *mut CUdeviceptr, bytesize: usize, hStream: CUstream);
    cuMemFreeAsync(dptr: CUdeviceptr, hStream: CUstream);
}

// --- errors --------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, pStr: *mut *const c_char) -> CUresult {
    guard("cuGetErrorString", || {
        nonnull(pStr)?;
        let s = errors::description(error);
        // SAFETY: out-pointer; the strings are static and NUL-terminated.
        unsafe { put(pStr, s.map_or(std::ptr::null(), |s| s.as_ptr().cast()))? };
        s.map(|_| ()).ok_or(cuda::INVALID_VALUE)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, pStr: *mut *const c_char) -> CUresult {
    guard("cuGetErrorName", || {
        nonnull(pStr)?;
        let s = errors::name(error);
        // SAFETY: out-pointer; the strings are static and NUL-terminated.
        unsafe { put(pStr, s.map_or(std::ptr::null(), |s| s.as_ptr().cast()))? };
        s.map(|_| ()).ok_or(cuda::INVALID_VALUE)
    })
}
