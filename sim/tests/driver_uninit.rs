//! Before `cuInit`, every driver call is `CUDA_ERROR_NOT_INITIALIZED` (own test binary: the
//! driver is process-wide, and any other test would initialise it).

use std::ptr::null_mut;

use lowbit_sim::cuda;
use lowbit_sim::driver::*;

#[test]
fn calls_before_cuinit_fail_then_work() {
    // SAFETY: valid out-pointers throughout.
    unsafe {
        let (mut n, mut dev, mut ctx, mut p) = (0, 0, null_mut(), 0u64);
        assert_eq!(cuDeviceGetCount(&mut n), cuda::NOT_INITIALIZED);
        assert_eq!(cuDeviceGet(&mut dev, 0), cuda::NOT_INITIALIZED);
        assert_eq!(cuDeviceGetAttribute(&mut n, 16, 0), cuda::NOT_INITIALIZED);
        assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), cuda::NOT_INITIALIZED);
        assert_eq!(cuCtxGetCurrent(&mut ctx), cuda::NOT_INITIALIZED);
        assert_eq!(cuMemAlloc_v2(&mut p, 16), cuda::NOT_INITIALIZED);
        assert_eq!(cuCtxSynchronize(), cuda::NOT_INITIALIZED);
        assert_eq!(cuModuleLoadData(&mut ctx, c"//".as_ptr().cast()), cuda::NOT_INITIALIZED);
        // The error strings work without it.
        let mut s = std::ptr::null();
        assert_eq!(cuGetErrorName(cuda::NOT_INITIALIZED, &mut s), 0);
        assert_eq!(std::ffi::CStr::from_ptr(s).to_str().unwrap(), "CUDA_ERROR_NOT_INITIALIZED");

        assert_eq!(cuInit(0), 0);
        assert_eq!(cuInit(0), 0, "cuInit is idempotent");
        assert_eq!(cuDeviceGetCount(&mut n), 0);
        assert_eq!(n, 1);
        assert_eq!(cuCtxGetCurrent(&mut ctx), 0);
        assert!(ctx.is_null());
        assert_eq!(cuMemAlloc_v2(&mut p, 16), cuda::INVALID_CONTEXT, "no current context yet");
    }
}
