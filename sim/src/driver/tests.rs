//! The driver's state machine through its C entry points (one process-wide driver, so the tests
//! take a lock and each leaves the primary context released).

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::{Arc, Mutex, MutexGuard};

use super::api::*;
use super::state::Driver;
use super::types::*;
use crate::{cuda, SimError};

const AFFINE: &str = include_str!("../../tests/client/affine.ptx");

static LOCK: Mutex<()> = Mutex::new(());

/// Serialises the tests, initialises the driver, and gives a thread with the primary context
/// retained and current; dropping it releases the context (destroying it).
struct Session {
    _g: MutexGuard<'static, ()>,
    ctx: CUcontext,
}

impl Session {
    fn new() -> Session {
        let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain driver calls with valid out-pointers.
        unsafe {
            assert_eq!(cuInit(0), 0);
            let mut ctx = null_mut();
            assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), 0);
            assert_eq!(cuCtxSetCurrent(ctx), 0);
            Session { _g: g, ctx }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        while Driver::get().unwrap().refcount() > 0 {
            // SAFETY: plain driver call.
            assert_eq!(unsafe { cuDevicePrimaryCtxRelease_v2(0) }, 0);
        }
    }
}

fn load(text: &str) -> CUmodule {
    let c = CString::new(text).unwrap();
    let mut m = null_mut();
    // SAFETY: NUL-terminated image, valid out-pointer.
    assert_eq!(unsafe { cuModuleLoadData(&mut m, c.as_ptr().cast()) }, 0);
    m
}

fn function(m: CUmodule, name: &str) -> CUfunction {
    let c = CString::new(name).unwrap();
    let mut f = null_mut();
    // SAFETY: valid pointers.
    assert_eq!(unsafe { cuModuleGetFunction(&mut f, m, c.as_ptr()) }, 0);
    f
}

#[test]
fn error_strings_need_no_init() {
    let mut s: *const std::ffi::c_char = null();
    // SAFETY: valid out-pointers; the strings returned are static and NUL-terminated.
    unsafe {
        assert_eq!(cuGetErrorName(700, &mut s), 0);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "CUDA_ERROR_ILLEGAL_ADDRESS");
        assert_eq!(cuGetErrorString(1, &mut s), 0);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "invalid argument");
        assert_eq!(cuGetErrorString(4242, &mut s), cuda::INVALID_VALUE);
        assert!(s.is_null());
        assert_eq!(cuGetErrorName(0, null_mut()), cuda::INVALID_VALUE);
    }
}

#[test]
fn device_queries() {
    let _s = Session::new();
    let d = Driver::get().unwrap();
    // SAFETY: valid out-pointers and buffers.
    unsafe {
        let mut n = 0;
        assert_eq!(cuDeviceGetCount(&mut n), 0);
        assert_eq!(n, 1);
        let mut dev = -1;
        assert_eq!(cuDeviceGet(&mut dev, 0), 0);
        assert_eq!(dev, 0);
        assert_eq!(cuDeviceGet(&mut dev, 1), cuda::INVALID_DEVICE);
        let mut name = [1 as std::ffi::c_char; 128];
        assert_eq!(cuDeviceGetName(name.as_mut_ptr(), 128, 0), 0);
        assert!(CStr::from_ptr(name.as_ptr()).to_str().unwrap().contains("lowbit-sim"));
        // Truncation keeps the NUL.
        assert_eq!(cuDeviceGetName(name.as_mut_ptr(), 4, 0), 0);
        assert_eq!(CStr::from_ptr(name.as_ptr()).to_bytes(), b"low");
        let attr = |a: u32| {
            let mut v = -7;
            let r = cuDeviceGetAttribute(&mut v, a, 0);
            (r, v)
        };
        assert_eq!(attr(dev_attr::COMPUTE_CAPABILITY_MAJOR), (0, d.config.cc.0));
        assert_eq!(attr(dev_attr::COMPUTE_CAPABILITY_MINOR), (0, d.config.cc.1));
        assert_eq!(attr(dev_attr::MULTIPROCESSOR_COUNT), (0, d.config.sm_count as i32));
        assert_eq!(attr(dev_attr::MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), (0, d.config.smem_optin as i32));
        assert_eq!(attr(dev_attr::MAX_SHARED_MEMORY_PER_BLOCK), (0, 49152));
        assert_eq!(attr(dev_attr::MAX_THREADS_PER_BLOCK), (0, 1024));
        assert_eq!(attr(dev_attr::WARP_SIZE), (0, 32));
        assert_eq!(attr(dev_attr::L2_CACHE_SIZE), (0, 50 << 20));
        assert_eq!(attr(dev_attr::MEMORY_POOLS_SUPPORTED), (0, 0));
        assert_eq!(attr(9999).0, cuda::INVALID_VALUE);
        assert_eq!(cuDeviceGetAttribute(null_mut(), dev_attr::WARP_SIZE, 0), cuda::INVALID_VALUE);
        assert_eq!(cuDeviceGetAttribute(&mut n, dev_attr::WARP_SIZE, 3), cuda::INVALID_DEVICE);
        let mut total = 0usize;
        assert_eq!(cuDeviceTotalMem_v2(&mut total, 0), 0);
        assert_eq!(total as u64, d.config.total_mem);
        let mut v = 0;
        assert_eq!(cuDriverGetVersion(&mut v), 0);
        assert!(v >= 12000);
        assert_eq!(cuInit(1), cuda::INVALID_VALUE);
    }
}

#[test]
fn primary_context_is_stable_and_per_thread() {
    let s = Session::new();
    // SAFETY: valid out-pointers.
    unsafe {
        let mut c2 = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut c2, 0), 0);
        assert_eq!(c2, s.ctx);
        assert!(!c2.is_null());
        let mut cur = null_mut();
        assert_eq!(cuCtxGetCurrent(&mut cur), 0);
        assert_eq!(cur, s.ctx);
        assert_eq!(cuCtxSetCurrent(0x1234 as CUcontext), cuda::INVALID_CONTEXT);
        let ctx = s.ctx as usize;
        std::thread::spawn(move || {
            let mut cur = 1 as CUcontext;
            assert_eq!(cuCtxGetCurrent(&mut cur), 0);
            assert!(cur.is_null(), "a new thread has no current context");
            let (mut p, mut st) = (0u64, null_mut());
            assert_eq!(cuMemAlloc_v2(&mut p, 16), cuda::INVALID_CONTEXT);
            assert_eq!(cuStreamCreate(&mut st, 0), cuda::INVALID_CONTEXT);
            assert_eq!(cuCtxSynchronize(), cuda::INVALID_CONTEXT);
            assert_eq!(cuCtxSetCurrent(ctx as CUcontext), 0);
            assert_eq!(cuMemAlloc_v2(&mut p, 16), 0);
            assert_eq!(cuMemFree_v2(p), 0);
        })
        .join()
        .unwrap();
        let (mut flags, mut active) = (9, 9);
        assert_eq!(cuDevicePrimaryCtxGetState(0, &mut flags, &mut active), 0);
        assert_eq!(active, 1);
    }
}

#[test]
fn memory_copies_and_faults() {
    let _s = Session::new();
    // SAFETY: valid pointers and sizes.
    unsafe {
        let mut st = null_mut();
        assert_eq!(cuStreamCreate(&mut st, CU_STREAM_NON_BLOCKING), 0);
        assert_eq!(cuStreamCreate(&mut st, 0x40), cuda::INVALID_VALUE);
        assert_eq!(cuStreamCreate(&mut st, 0), 0);
        let (mut a, mut b) = (0u64, 0u64);
        assert_eq!(cuMemAlloc_v2(&mut a, 64), 0);
        assert_eq!(cuMemAlloc_v2(&mut b, 64), 0);
        assert_eq!(cuMemAlloc_v2(&mut b, 0), cuda::INVALID_VALUE);
        assert_eq!(cuMemAlloc_v2(null_mut(), 8), cuda::INVALID_VALUE);
        assert_eq!(cuMemAlloc_v2(&mut b, 64), 0);
        let src: Vec<u8> = (0..64).collect();
        assert_eq!(cuMemcpyHtoDAsync_v2(a, src.as_ptr().cast(), 64, st), 0);
        assert_eq!(cuMemcpyDtoDAsync_v2(b, a, 32, st), 0);
        assert_eq!(cuMemsetD8Async(b + 32, 0xAB, 32, st), 0);
        let mut out = vec![0u8; 64];
        assert_eq!(cuMemcpyDtoHAsync_v2(out.as_mut_ptr().cast(), b, 64, st), 0);
        assert_eq!(&out[..32], &src[..32]);
        assert!(out[32..].iter().all(|&x| x == 0xAB));
        assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), a, 64), 0);
        assert_eq!(out, src);
        // Overrun, unmapped, null host pointer, bad stream.
        assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), a + 8, 64), cuda::INVALID_VALUE);
        assert_eq!(cuMemcpyHtoD_v2(0x10, src.as_ptr().cast(), 4), cuda::INVALID_VALUE);
        assert_eq!(cuMemcpyHtoD_v2(a, null(), 4), cuda::INVALID_VALUE);
        assert_eq!(cuMemcpyHtoDAsync_v2(a, src.as_ptr().cast(), 4, 0x99 as CUstream), cuda::INVALID_HANDLE);
        assert_eq!(cuMemcpyHtoD_v2(a, null(), 0), 0, "empty copies succeed");
        let (mut free, mut total) = (0usize, 0usize);
        assert_eq!(cuMemGetInfo_v2(&mut free, &mut total), 0);
        assert!(free < total);
        assert_eq!(cuMemFree_v2(a), 0);
        assert_eq!(cuMemFree_v2(a), cuda::INVALID_VALUE, "double free");
        assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), a, 4), cuda::INVALID_VALUE, "use after free");
        assert_eq!(cuStreamSynchronize(st), 0);
        assert_eq!(cuStreamSynchronize(null_mut()), 0);
        assert_eq!(cuStreamDestroy_v2(st), 0);
        assert_eq!(cuStreamDestroy_v2(st), cuda::INVALID_HANDLE);
        assert_eq!(cuStreamSynchronize(st), cuda::INVALID_HANDLE);
    }
}

#[test]
fn events_and_timing() {
    let _s = Session::new();
    // SAFETY: valid pointers.
    unsafe {
        let (mut a, mut b, mut n) = (null_mut(), null_mut(), null_mut());
        assert_eq!(cuEventCreate(&mut a, 0), 0);
        assert_eq!(cuEventCreate(&mut b, 0), 0);
        assert_eq!(cuEventCreate(&mut n, CU_EVENT_DISABLE_TIMING), 0);
        assert_eq!(cuEventCreate(&mut n, 0x80), cuda::INVALID_VALUE);
        assert_eq!(cuEventCreate(&mut n, CU_EVENT_DISABLE_TIMING), 0);
        let mut ms = -1.0f32;
        // Never recorded: the CUDA documentation's INVALID_HANDLE.
        assert_eq!(cuEventElapsedTime_v2(&mut ms, a, b), cuda::INVALID_HANDLE);
        // Waiting on a never-recorded event is fine.
        assert_eq!(cuStreamWaitEvent(null_mut(), a, 0), 0);
        assert_eq!(cuEventRecord(a, null_mut()), 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(cuEventRecord(b, null_mut()), 0);
        assert_eq!(cuEventRecord(n, null_mut()), 0);
        assert_eq!(cuEventSynchronize(b), 0);
        assert_eq!(cuEventQuery(b), 0);
        assert_eq!(cuEventElapsedTime_v2(&mut ms, a, b), 0);
        assert!((1.5..1000.0).contains(&ms), "{ms}");
        assert_eq!(cuEventElapsedTime_v2(&mut ms, b, a), 0);
        assert!(ms < 0.0);
        // Timing disabled on either side: INVALID_HANDLE (benches/*.rs's bug on a real GPU).
        assert_eq!(cuEventElapsedTime_v2(&mut ms, a, n), cuda::INVALID_HANDLE);
        assert_eq!(cuEventElapsedTime_v2(&mut ms, n, b), cuda::INVALID_HANDLE);
        assert_eq!(cuEventElapsedTime_v2(null_mut(), a, b), cuda::INVALID_VALUE);
        assert_eq!(cuEventDestroy_v2(n), 0);
        assert_eq!(cuEventDestroy_v2(n), cuda::INVALID_HANDLE);
        assert_eq!(cuEventRecord(n, null_mut()), cuda::INVALID_HANDLE);
        assert_eq!(cuStreamWaitEvent(null_mut(), n, 0), cuda::INVALID_HANDLE);
    }
}

#[test]
fn modules_functions_and_attributes() {
    let _s = Session::new();
    // SAFETY: valid pointers.
    unsafe {
        let m = load(AFFINE);
        let m2 = load(AFFINE);
        assert_ne!(m, m2, "each load is its own module");
        let f = function(m, "affine");
        assert_eq!(function(m, "affine"), f, "the same handle for the same name");
        assert_ne!(function(m2, "affine"), f);
        let mut g = null_mut();
        assert_eq!(cuModuleGetFunction(&mut g, m, c"nope".as_ptr()), cuda::NOT_FOUND);
        assert_eq!(cuModuleGetFunction(&mut g, 0x77 as CUmodule, c"affine".as_ptr()), cuda::INVALID_HANDLE);
        assert_eq!(cuModuleGetFunction(&mut g, m, null()), cuda::INVALID_VALUE);
        let optin = Driver::get().unwrap().config.smem_optin as i32;
        let mut v = 0;
        assert_eq!(cuFuncGetAttribute(&mut v, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, f), 0);
        assert_eq!(v, 49152);
        assert_eq!(cuFuncGetAttribute(&mut v, func_attr::MAX_THREADS_PER_BLOCK, f), 0);
        assert_eq!(v, 256, ".maxntid 256, 1, 1");
        assert_eq!(cuFuncSetAttribute(f, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, 100_000), 0);
        assert_eq!(cuFuncGetAttribute(&mut v, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, f), 0);
        assert_eq!(v, 100_000);
        assert_eq!(cuFuncSetAttribute(f, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, optin + 1), cuda::INVALID_VALUE);
        assert_eq!(cuFuncSetAttribute(f, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, -1), cuda::INVALID_VALUE);
        assert_eq!(cuFuncSetAttribute(f, func_attr::NUM_REGS, 1), cuda::INVALID_VALUE);
        assert_eq!(
            cuFuncSetAttribute(0x55 as CUfunction, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, 1),
            cuda::INVALID_HANDLE
        );
        let mut blocks = 0;
        assert_eq!(cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, f, 256, 0), 0);
        assert_eq!(blocks, 8);
        // Unloading invalidates the module's functions.
        assert_eq!(cuModuleUnload(m), 0);
        assert_eq!(cuModuleUnload(m), cuda::INVALID_HANDLE);
        assert_eq!(cuFuncGetAttribute(&mut v, func_attr::MAX_DYNAMIC_SHARED_SIZE_BYTES, f), cuda::INVALID_HANDLE);
        // Bad images.
        let mut m3 = null_mut();
        assert_eq!(cuModuleLoadData(&mut m3, c"\x7fELF\x02".as_ptr().cast()), cuda::NO_BINARY_FOR_GPU);
        assert_eq!(cuModuleLoadData(&mut m3, c"garbage".as_ptr().cast()), cuda::INVALID_IMAGE);
        assert_eq!(cuModuleLoadData(&mut m3, null()), cuda::INVALID_VALUE);
        assert_eq!(cuModuleLoadData(&mut m3, c".version 9.0\n.target sm_80\n@@@".as_ptr().cast()), cuda::INVALID_PTX);
    }
}

#[test]
fn module_cache_parses_once() {
    let _s = Session::new();
    let d = Driver::get().unwrap();
    let a = d.parse_cached(AFFINE).unwrap();
    let copy = String::from(AFFINE);
    let b = d.parse_cached(copy.as_str()).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = d.parse_cached(&format!("{AFFINE}\n// another text\n")).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
}

/// A fatbin holding an ELF entry and the PTX entry, as nvcc lays them out.
fn fatbin_of(ptx: &str) -> Vec<u8> {
    let mut payload = ptx.as_bytes().to_vec();
    payload.push(0);
    while payload.len() % 8 != 0 {
        payload.push(0);
    }
    let mut e = vec![0u8; 0x70];
    e[0..2].copy_from_slice(&1u16.to_le_bytes());
    e[4..8].copy_from_slice(&0x70u32.to_le_bytes());
    e[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    e[0x1C..0x20].copy_from_slice(&80u32.to_le_bytes());
    e[0x28..0x30].copy_from_slice(&0x11u64.to_le_bytes());
    e.extend_from_slice(&payload);
    let mut f = Vec::new();
    f.extend_from_slice(&crate::fatbin::FATBIN_MAGIC.to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&16u16.to_le_bytes());
    f.extend_from_slice(&(e.len() as u64).to_le_bytes());
    f.extend_from_slice(&e);
    f
}

#[test]
fn fatbin_images_load() {
    let _s = Session::new();
    let f = fatbin_of(AFFINE);
    let mut m = null_mut();
    // SAFETY: a complete fatbin.
    unsafe {
        assert_eq!(cuModuleLoadData(&mut m, f.as_ptr().cast()), 0);
    }
    function(m, "affine");
}

#[test]
fn launch_validation() {
    let _s = Session::new();
    let m = load(AFFINE);
    let f = function(m, "affine");
    let d = Driver::get().unwrap();
    let k = d.lock().functions.get(&(f as usize)).unwrap().kernel.clone();
    assert_eq!(k.param_bytes, 40);
    let optin = d.config.smem_optin;
    let v = |dyn_limit: u32, grid: [u32; 3], block: [u32; 3], smem: u32| {
        validate_launch(&k, dyn_limit, optin, grid, block, smem).map_err(|e| {
            assert!(e.message.contains("affine"), "{}", e.message);
            e.code
        })
    };
    assert_eq!(v(49152, [4, 1, 1], [256, 1, 1], 0), Ok(()));
    assert_eq!(v(49152, [4, 1, 1], [16, 16, 1], 0), Ok(()), ".maxntid bounds the thread count");
    assert_eq!(v(49152, [4, 1, 1], [257, 1, 1], 0), Err(cuda::INVALID_VALUE), "beyond .maxntid");
    assert_eq!(v(49152, [0, 1, 1], [32, 1, 1], 0), Err(cuda::INVALID_VALUE));
    assert_eq!(v(49152, [1, 65536, 1], [32, 1, 1], 0), Err(cuda::INVALID_VALUE));
    assert_eq!(v(49152, [1, 1, 1], [32, 1, 65], 0), Err(cuda::INVALID_VALUE));
    assert_eq!(v(49152, [1, 1, 1], [32, 1, 1], 49152), Ok(()));
    assert_eq!(v(49152, [1, 1, 1], [32, 1, 1], 49153), Err(cuda::INVALID_VALUE), "no opt-in");
    assert_eq!(v(100_000, [1, 1, 1], [32, 1, 1], 100_000), Ok(()));
    assert_eq!(v(u32::MAX, [1, 1, 1], [32, 1, 1], optin + 1), Err(cuda::INVALID_VALUE), "beyond opt-in");
    // Through cuLaunchKernel: rejected before the executor runs, and not sticky.
    let (mut x, n, a) = (0u64, 8u32, 2.0f32);
    // SAFETY: valid pointers; kernelParams has one pointer per parameter.
    unsafe {
        let mut params: [*mut c_void; 6] = [
            (&mut x as *mut u64).cast(),
            (&a as *const f32).cast_mut().cast(),
            (&n as *const u32).cast_mut().cast(),
            (&mut x as *mut u64).cast(),
            (&a as *const f32).cast_mut().cast(),
            (&mut x as *mut u64).cast(),
        ];
        let pp = params.as_mut_ptr();
        assert_eq!(cuLaunchKernel(f, 1, 1, 1, 512, 1, 1, 0, null_mut(), pp, null_mut()), cuda::INVALID_VALUE);
        assert_eq!(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 60_000, null_mut(), pp, null_mut()), cuda::INVALID_VALUE);
        assert_eq!(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, null_mut(), null_mut(), null_mut()), cuda::INVALID_VALUE);
        assert_eq!(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, null_mut(), pp, pp), cuda::INVALID_VALUE);
        assert_eq!(
            cuLaunchKernel(0x3 as CUfunction, 1, 1, 1, 32, 1, 1, 0, null_mut(), pp, null_mut()),
            cuda::INVALID_HANDLE
        );
        assert_eq!(cuCtxSynchronize(), 0);
    }
}

#[test]
fn parameter_buffers() {
    let _s = Session::new();
    let m = load(AFFINE);
    let f = function(m, "affine");
    let k = Driver::get().unwrap().lock().functions.get(&(f as usize)).unwrap().kernel.clone();
    let offs: Vec<(usize, usize)> = k.params.iter().map(|p| (p.offset, p.size)).collect();
    assert_eq!(offs, [(0, 8), (8, 4), (12, 4), (16, 8), (24, 4), (32, 8)]);
    let (x, a, n, y, b, off) = (0x1111_2222_3333_4444u64, 1.5f32, 77u32, 0x5555u64, -2.0f32, 9u64);
    let mut expect = Vec::new();
    expect.extend_from_slice(&x.to_le_bytes());
    expect.extend_from_slice(&a.to_le_bytes());
    expect.extend_from_slice(&n.to_le_bytes());
    expect.extend_from_slice(&y.to_le_bytes());
    expect.extend_from_slice(&b.to_le_bytes());
    expect.extend_from_slice(&[0; 4]);
    expect.extend_from_slice(&off.to_le_bytes());
    let mut params: [*mut c_void; 6] = [
        (&x as *const u64).cast_mut().cast(),
        (&a as *const f32).cast_mut().cast(),
        (&n as *const u32).cast_mut().cast(),
        (&y as *const u64).cast_mut().cast(),
        (&b as *const f32).cast_mut().cast(),
        (&off as *const u64).cast_mut().cast(),
    ];
    // SAFETY: one pointer per parameter.
    let buf = unsafe { super::api::param_buffer_for_tests(&k, params.as_mut_ptr(), null_mut()) }.unwrap();
    assert_eq!(buf, expect);
    // The same bytes through `extra`.
    let mut size = expect.len();
    let mut extra: [*mut c_void; 5] = [
        CU_LAUNCH_PARAM_BUFFER_POINTER as *mut c_void,
        expect.as_ptr().cast_mut().cast(),
        CU_LAUNCH_PARAM_BUFFER_SIZE as *mut c_void,
        (&mut size as *mut usize).cast(),
        CU_LAUNCH_PARAM_END as *mut c_void,
    ];
    // SAFETY: a well-formed extra list.
    let buf = unsafe { super::api::param_buffer_for_tests(&k, null_mut(), extra.as_mut_ptr()) }.unwrap();
    assert_eq!(buf, expect);
    // SAFETY: extra[3] points at `size`.
    unsafe { *extra[3].cast::<usize>() = 16 };
    // SAFETY: as above, with a too-small size.
    let r = unsafe { super::api::param_buffer_for_tests(&k, null_mut(), extra.as_mut_ptr()) };
    assert_eq!(r, Err(cuda::INVALID_VALUE));
    params[2] = null_mut();
    // SAFETY: one (null) pointer per parameter.
    let r = unsafe { super::api::param_buffer_for_tests(&k, params.as_mut_ptr(), null_mut()) };
    assert_eq!(r, Err(cuda::INVALID_VALUE));
}

#[test]
fn sticky_errors_until_the_context_is_destroyed() {
    let s = Session::new();
    let d = Driver::get().unwrap();
    let m = load(AFFINE);
    let mut p = 0u64;
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(cuMemAlloc_v2(&mut p, 64), 0);
        // A non-sticky launch error is returned at once and leaves the context usable.
        assert_eq!(
            finish_launch(d, Err(SimError::new(cuda::NOT_SUPPORTED, "test: unsupported"))),
            Err(cuda::NOT_SUPPORTED)
        );
        assert_eq!(cuCtxSynchronize(), 0);
        // A fault: the launch "succeeds", then everything that uses the context fails.
        assert_eq!(finish_launch(d, Err(SimError::new(cuda::ILLEGAL_ADDRESS, "test: illegal address"))), Ok(()));
        assert_eq!(finish_launch(d, Err(SimError::new(cuda::LAUNCH_FAILED, "test: second fault"))), Ok(()));
        assert_eq!(cuCtxSynchronize(), cuda::ILLEGAL_ADDRESS, "the first fault wins");
        assert_eq!(cuStreamSynchronize(null_mut()), cuda::ILLEGAL_ADDRESS);
        let mut q = 0u64;
        assert_eq!(cuMemAlloc_v2(&mut q, 64), cuda::ILLEGAL_ADDRESS);
        assert_eq!(cuMemFree_v2(p), cuda::ILLEGAL_ADDRESS);
        let mut f = null_mut();
        assert_eq!(cuModuleGetFunction(&mut f, m, c"affine".as_ptr()), cuda::ILLEGAL_ADDRESS);
        // Device queries still answer.
        let mut v = 0;
        assert_eq!(cuDeviceGetAttribute(&mut v, dev_attr::WARP_SIZE, 0), 0);
        // Releasing the last reference destroys the context; the next retain is clean, under
        // the same handle, with none of the old handles valid.
        assert_eq!(cuDevicePrimaryCtxRelease_v2(0), 0);
        assert_eq!(d.refcount(), 0);
        assert_eq!(cuCtxSynchronize(), cuda::INVALID_CONTEXT);
        assert_eq!(cuDevicePrimaryCtxRelease_v2(0), cuda::INVALID_CONTEXT);
        let mut c = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut c, 0), 0);
        assert_eq!(c, s.ctx);
        assert_eq!(cuCtxSynchronize(), 0);
        assert_eq!(cuModuleGetFunction(&mut f, m, c"affine".as_ptr()), cuda::INVALID_HANDLE);
        assert_eq!(cuMemFree_v2(p), cuda::INVALID_VALUE, "the old allocation went with the context");
    }
}

#[test]
fn panics_do_not_unwind() {
    let _s = Session::new();
    assert_eq!(super::api::guard("test", || panic!("boom")), cuda::UNKNOWN);
    assert_eq!(super::api::guard("test", || Err(4242)), cuda::UNKNOWN, "codes cuda.h lacks are not passed on");
    // SAFETY: valid out-pointers; the callback takes a pointer to an i32.
    unsafe {
        let mut b = 0;
        assert_eq!(cuOccupancyMaxPotentialBlockSize(&mut b, &mut b, null_mut(), None, 0, 0), cuda::NOT_SUPPORTED);
        assert_eq!(cuLaunchHostFunc(null_mut(), None, null_mut()), cuda::INVALID_VALUE);
        extern "C" fn bump(p: *mut c_void) {
            // SAFETY: the test passes a pointer to an i32.
            unsafe { *p.cast::<i32>() += 1 };
        }
        let mut n = 0i32;
        assert_eq!(cuLaunchHostFunc(null_mut(), Some(bump), (&mut n as *mut i32).cast()), 0);
        assert_eq!(n, 1);
    }
}
