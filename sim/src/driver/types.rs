//! The C types and constants of the driver API (`cuda.h`), the subset the simulator exports.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

pub type CUresult = u32;
pub type CUdevice = i32;
pub type CUdeviceptr = u64;
pub type CUcontext = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUdevice_attribute = u32;
pub type CUfunction_attribute = u32;
/// `void (*)(void *userData)`.
pub type CUhostFn = Option<unsafe extern "C" fn(*mut c_void)>;
/// `size_t (*)(int blockSize)`.
pub type CUoccupancyB2DSize = Option<unsafe extern "C" fn(i32) -> usize>;

/// `CUuuid`: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUuuid {
    pub bytes: [u8; 16],
}

/// `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD`: special stream handles.
pub const CU_STREAM_LEGACY: usize = 0x1;
pub const CU_STREAM_PER_THREAD: usize = 0x2;
/// `cuStreamCreate` flags.
pub const CU_STREAM_NON_BLOCKING: u32 = 0x1;
/// `cuEventCreate` flags: `BLOCKING_SYNC`, `DISABLE_TIMING`, `INTERPROCESS`.
pub const CU_EVENT_BLOCKING_SYNC: u32 = 0x1;
pub const CU_EVENT_DISABLE_TIMING: u32 = 0x2;
pub const CU_EVENT_INTERPROCESS: u32 = 0x4;

/// `extra` keys of `cuLaunchKernel` (they are `(void *)1`, `(void *)2`, `(void *)0`).
pub const CU_LAUNCH_PARAM_END: usize = 0x0;
pub const CU_LAUNCH_PARAM_BUFFER_POINTER: usize = 0x1;
pub const CU_LAUNCH_PARAM_BUFFER_SIZE: usize = 0x2;

/// `CUfunction_attribute` values.
pub mod func_attr {
    pub const MAX_THREADS_PER_BLOCK: u32 = 0;
    pub const SHARED_SIZE_BYTES: u32 = 1;
    pub const CONST_SIZE_BYTES: u32 = 2;
    pub const LOCAL_SIZE_BYTES: u32 = 3;
    pub const NUM_REGS: u32 = 4;
    pub const PTX_VERSION: u32 = 5;
    pub const BINARY_VERSION: u32 = 6;
    pub const CACHE_MODE_CA: u32 = 7;
    pub const MAX_DYNAMIC_SHARED_SIZE_BYTES: u32 = 8;
    pub const PREFERRED_SHARED_MEMORY_CARVEOUT: u32 = 9;
}

/// `CUdevice_attribute` values the simulator answers.
pub mod dev_attr {
    pub const MAX_THREADS_PER_BLOCK: u32 = 1;
    pub const MAX_BLOCK_DIM_X: u32 = 2;
    pub const MAX_BLOCK_DIM_Y: u32 = 3;
    pub const MAX_BLOCK_DIM_Z: u32 = 4;
    pub const MAX_GRID_DIM_X: u32 = 5;
    pub const MAX_GRID_DIM_Y: u32 = 6;
    pub const MAX_GRID_DIM_Z: u32 = 7;
    pub const MAX_SHARED_MEMORY_PER_BLOCK: u32 = 8;
    pub const TOTAL_CONSTANT_MEMORY: u32 = 9;
    pub const WARP_SIZE: u32 = 10;
    pub const MAX_PITCH: u32 = 11;
    pub const MAX_REGISTERS_PER_BLOCK: u32 = 12;
    pub const CLOCK_RATE: u32 = 13;
    pub const TEXTURE_ALIGNMENT: u32 = 14;
    pub const GPU_OVERLAP: u32 = 15;
    pub const MULTIPROCESSOR_COUNT: u32 = 16;
    pub const KERNEL_EXEC_TIMEOUT: u32 = 17;
    pub const INTEGRATED: u32 = 18;
    pub const CAN_MAP_HOST_MEMORY: u32 = 19;
    pub const COMPUTE_MODE: u32 = 20;
    pub const SURFACE_ALIGNMENT: u32 = 30;
    pub const CONCURRENT_KERNELS: u32 = 31;
    pub const ECC_ENABLED: u32 = 32;
    pub const PCI_BUS_ID: u32 = 33;
    pub const PCI_DEVICE_ID: u32 = 34;
    pub const TCC_DRIVER: u32 = 35;
    pub const MEMORY_CLOCK_RATE: u32 = 36;
    pub const GLOBAL_MEMORY_BUS_WIDTH: u32 = 37;
    pub const L2_CACHE_SIZE: u32 = 38;
    pub const MAX_THREADS_PER_MULTIPROCESSOR: u32 = 39;
    pub const ASYNC_ENGINE_COUNT: u32 = 40;
    pub const UNIFIED_ADDRESSING: u32 = 41;
    pub const PCI_DOMAIN_ID: u32 = 50;
    pub const TEXTURE_PITCH_ALIGNMENT: u32 = 51;
    pub const COMPUTE_CAPABILITY_MAJOR: u32 = 75;
    pub const COMPUTE_CAPABILITY_MINOR: u32 = 76;
    pub const STREAM_PRIORITIES_SUPPORTED: u32 = 78;
    pub const GLOBAL_L1_CACHE_SUPPORTED: u32 = 79;
    pub const LOCAL_L1_CACHE_SUPPORTED: u32 = 80;
    pub const MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: u32 = 81;
    pub const MAX_REGISTERS_PER_MULTIPROCESSOR: u32 = 82;
    pub const MANAGED_MEMORY: u32 = 83;
    pub const MULTI_GPU_BOARD: u32 = 84;
    pub const MULTI_GPU_BOARD_GROUP_ID: u32 = 85;
    pub const SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: u32 = 87;
    pub const COOPERATIVE_LAUNCH: u32 = 95;
    pub const MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: u32 = 97;
    pub const MAX_BLOCKS_PER_MULTIPROCESSOR: u32 = 106;
    pub const RESERVED_SHARED_MEMORY_PER_BLOCK: u32 = 111;
    pub const MEMORY_POOLS_SUPPORTED: u32 = 115;
    pub const CLUSTER_LAUNCH: u32 = 120;
    /// Highest attribute number CUDA 13.0 defines.
    pub const LAST_KNOWN: u32 = 161;
}
