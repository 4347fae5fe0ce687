//! The CUDA driver API: the `cu*` symbols a drop-in `libcuda.so` exports.
//!
//! One device (ordinal 0) as [`SimConfig`](crate::SimConfig) describes it, one primary context
//! with a stable handle, and every operation done synchronously at call time:
//!
//! * **Streams and events.** Copies, memsets and launches finish before they return, so
//!   `cuStreamWaitEvent` is a no-op, the synchronize calls only validate their handle and report
//!   the sticky error, and events are always complete. `cuEventRecord` takes a timestamp;
//!   `cuEventElapsedTime_v2` is `CUDA_ERROR_INVALID_HANDLE` if either event was created with
//!   `CU_EVENT_DISABLE_TIMING` or never recorded (the CUDA documentation's rule).
//! * **Launches.** `cuLaunchKernel` checks the configuration as a real driver does (grid and block
//!   limits, `.maxntid`, 48 KiB of shared memory without `cuFuncSetAttribute`, the opt-in limit),
//!   builds the parameter buffer from `kernelParams` (or `extra`), and runs the kernel on the
//!   calling thread without holding any driver lock. When the kernel faults (illegal address,
//!   trap, a checker's report, a hang: CUDA error codes 700–719 and 999) the report goes to
//!   stderr, the code becomes the context's **sticky error** and `cuLaunchKernel` returns
//!   `CUDA_SUCCESS`: the error surfaces at the next call, as on a GPU. Other launch errors (an
//!   unsupported instruction, a bad configuration) are returned by `cuLaunchKernel` itself.
//! * **Sticky errors** are returned by every later call that uses the context (memory, streams,
//!   events, modules, launches, synchronisation); device queries, `cuCtxGetCurrent` /
//!   `cuCtxSetCurrent`, primary-context retain/release and the error-string calls still work.
//!   Releasing the last reference to the primary context destroys it (its modules, streams,
//!   events and allocations go) and clears the sticky error; the next retain gets a fresh
//!   context under the same handle.
//! * **Modules.** `cuModuleLoadData` takes a fatbin (its PTX entry, see [`crate::fatbin`]), a
//!   `__nv_fatbin` wrapper or PTX text; parsed modules are cached by their PTX text for the life
//!   of the process, so reloading the same module (one context per test) costs one parse.
//! * **Device attributes.** Known attributes get realistic values (an A100/H100-like sm_80 device
//!   with the configured SM count, CC and shared-memory limits; `MEMORY_POOLS_SUPPORTED` = 0, so
//!   cudarc uses `cuMemAlloc_v2`/`cuMemFree_v2`); capabilities the simulator lacks (textures,
//!   managed memory, clusters, IPC, ...) are 0; attribute numbers CUDA 13.0 does not define are
//!   `CUDA_ERROR_INVALID_VALUE`.
//! * Every call before `cuInit` is `CUDA_ERROR_NOT_INITIALIZED` (except the error-string calls
//!   and `cuDriverGetVersion`); null out-pointers are `CUDA_ERROR_INVALID_VALUE`; unknown or
//!   stale handles are `CUDA_ERROR_INVALID_HANDLE`; a panic inside the simulator is reported and
//!   returned as `CUDA_ERROR_UNKNOWN`, never unwound into the caller.

mod api;
mod errors;
mod state;
pub mod types;

pub use api::*;

#[cfg(test)]
mod tests;
