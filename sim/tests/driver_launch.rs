//! Kernels launched through the driver's C entry points, as a driver-API program would: results,
//! the two ways of passing parameters, concurrent launches from several host threads, and a
//! faulting launch leaving a sticky error.
//!
//! The tests skip (with a note on stderr) while the executor is the placeholder that refuses
//! every launch.

use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use lowbit_sim::cuda;
use lowbit_sim::driver::types::*;
use lowbit_sim::driver::*;

const AFFINE: &str = include_str!("client/affine.ptx");

static LOCK: Mutex<()> = Mutex::new(());

fn executor_ready() -> bool {
    let m = lowbit_sim::Module::from_ptx(AFFINE).expect("affine.ptx parses");
    let k = m.kernel("affine").unwrap();
    let cfg = lowbit_sim::LaunchConfig { grid: [1, 1, 1], block: [32, 1, 1], dynamic_smem: 0 };
    // n = 0: no thread touches memory.
    let params = vec![0u8; k.param_bytes];
    match lowbit_sim::launch(k, &cfg, &params, &lowbit_sim::GlobalMemory::new(), &lowbit_sim::SimConfig::default()) {
        Err(e) if e.message.contains("not built yet") => {
            eprintln!("skipping: {}", e.message);
            false
        }
        _ => true,
    }
}

/// The primary context retained and current on this thread, released (destroyed) on drop.
struct Session {
    _g: MutexGuard<'static, ()>,
}

impl Session {
    fn new() -> Session {
        let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(cuInit(0), 0);
            let mut ctx = null_mut();
            assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), 0);
            assert_eq!(cuCtxSetCurrent(ctx), 0);
        }
        Session { _g: g }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: plain driver call.
        assert_eq!(unsafe { cuDevicePrimaryCtxRelease_v2(0) }, 0);
    }
}

fn affine_function() -> CUfunction {
    let text = CString::new(AFFINE).unwrap();
    let (mut m, mut f) = (null_mut(), null_mut());
    // SAFETY: NUL-terminated image and name, valid out-pointers.
    unsafe {
        assert_eq!(cuModuleLoadData(&mut m, text.as_ptr().cast()), 0);
        assert_eq!(cuModuleGetFunction(&mut f, m, c"affine".as_ptr()), 0);
    }
    f
}

/// y[off + i] = x[i] * a + b for i < n, launched on `stream`; returns y (n + off + 4 long).
fn run_affine(
    f: CUfunction,
    stream: CUstream,
    n: u32,
    a: f32,
    b: f32,
    off: u64,
    use_extra: bool,
) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 7.0).collect();
    let ylen = n as usize + off as usize + 4;
    let (mut dx, mut dy) = (0u64, 0u64);
    // SAFETY: valid pointers and sizes throughout.
    unsafe {
        assert_eq!(cuMemAlloc_v2(&mut dx, x.len().max(1) * 4), 0);
        assert_eq!(cuMemAlloc_v2(&mut dy, ylen * 4), 0);
        assert_eq!(cuMemcpyHtoDAsync_v2(dx, x.as_ptr().cast(), x.len() * 4, stream), 0);
        assert_eq!(cuMemsetD8Async(dy, 0, ylen * 4, stream), 0);
        let block = 128u32;
        let grid = n.div_ceil(block) + 1;
        let r = if use_extra {
            let mut buf = Vec::new();
            buf.extend_from_slice(&dx.to_le_bytes());
            buf.extend_from_slice(&a.to_le_bytes());
            buf.extend_from_slice(&n.to_le_bytes());
            buf.extend_from_slice(&dy.to_le_bytes());
            buf.extend_from_slice(&b.to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&off.to_le_bytes());
            let mut size = buf.len();
            let mut extra: [*mut c_void; 5] = [
                CU_LAUNCH_PARAM_BUFFER_POINTER as *mut c_void,
                buf.as_mut_ptr().cast(),
                CU_LAUNCH_PARAM_BUFFER_SIZE as *mut c_void,
                (&mut size as *mut usize).cast(),
                CU_LAUNCH_PARAM_END as *mut c_void,
            ];
            cuLaunchKernel(f, grid, 1, 1, block, 1, 1, 0, stream, null_mut(), extra.as_mut_ptr())
        } else {
            let (mut pa, mut pn, mut pb, mut po, mut px, mut py) = (a, n, b, off, dx, dy);
            let mut params: [*mut c_void; 6] = [
                (&mut px as *mut u64).cast(),
                (&mut pa as *mut f32).cast(),
                (&mut pn as *mut u32).cast(),
                (&mut py as *mut u64).cast(),
                (&mut pb as *mut f32).cast(),
                (&mut po as *mut u64).cast(),
            ];
            cuLaunchKernel(f, grid, 1, 1, block, 1, 1, 0, stream, params.as_mut_ptr(), null_mut())
        };
        assert_eq!(r, 0);
        assert_eq!(cuStreamSynchronize(stream), 0);
        let mut y = vec![f32::NAN; ylen];
        assert_eq!(cuMemcpyDtoHAsync_v2(y.as_mut_ptr().cast(), dy, ylen * 4, stream), 0);
        assert_eq!(cuMemFree_v2(dx), 0);
        assert_eq!(cuMemFree_v2(dy), 0);
        (x, y)
    }
}

fn check_affine(x: &[f32], y: &[f32], a: f32, b: f32, off: usize) {
    for (j, &v) in y.iter().enumerate() {
        let want = if j >= off && j < off + x.len() { x[j - off].mul_add(a, b) } else { 0.0 };
        assert_eq!(v.to_bits(), want.to_bits(), "y[{j}] = {v}, want {want}");
    }
}

#[test]
fn affine_with_kernel_params_and_extra() {
    if !executor_ready() {
        return;
    }
    let _s = Session::new();
    let f = affine_function();
    let (x, y) = run_affine(f, null_mut(), 1000, 2.0, 0.25, 5, false);
    check_affine(&x, &y, 2.0, 0.25, 5);
    let (x, y) = run_affine(f, null_mut(), 333, -1.5, 3.0, 0, true);
    check_affine(&x, &y, -1.5, 3.0, 0);
}

#[test]
fn concurrent_launches_from_several_threads() {
    if !executor_ready() {
        return;
    }
    let _s = Session::new();
    let f = affine_function() as usize;
    let ctx = {
        let mut c = null_mut();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { cuCtxGetCurrent(&mut c) }, 0);
        c as usize
    };
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                // SAFETY: valid handles and out-pointers.
                unsafe {
                    assert_eq!(cuCtxSetCurrent(ctx as CUcontext), 0);
                    let mut s = null_mut();
                    assert_eq!(cuStreamCreate(&mut s, CU_STREAM_NON_BLOCKING), 0);
                    for i in 0..3 {
                        let (a, b) = (t as f32 + 1.0, i as f32);
                        let (x, y) = run_affine(f as CUfunction, s, 700 + 64 * t, a, b, i as u64, i % 2 == 1);
                        check_affine(&x, &y, a, b, i as usize);
                    }
                    assert_eq!(cuStreamDestroy_v2(s), 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_faulting_launch_leaves_a_sticky_error() {
    if !executor_ready() {
        return;
    }
    let _s = Session::new();
    let f = affine_function();
    // SAFETY: valid pointers; the device pointers in the parameters are bogus on purpose.
    unsafe {
        let (mut px, mut pa, mut pn, mut py, mut pb, mut po) = (0x10u64, 1.0f32, 64u32, 0x20u64, 0.0f32, 0u64);
        let mut params: [*mut c_void; 6] = [
            (&mut px as *mut u64).cast(),
            (&mut pa as *mut f32).cast(),
            (&mut pn as *mut u32).cast(),
            (&mut py as *mut u64).cast(),
            (&mut pb as *mut f32).cast(),
            (&mut po as *mut u64).cast(),
        ];
        assert_eq!(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, null_mut(), params.as_mut_ptr(), null_mut()), 0);
        assert_eq!(cuCtxSynchronize(), cuda::ILLEGAL_ADDRESS);
        let mut p = 0u64;
        assert_eq!(cuMemAlloc_v2(&mut p, 16), cuda::ILLEGAL_ADDRESS);
    }
    // Dropping the session destroys the context, which clears the error for the next test.
}
