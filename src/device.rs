//! The device layer: driver probing, the CUDA context and stream, lazy per-family module loading,
//! and the small helpers every launch site uses (buffer validation, raw pointers, launch configs).
//!
//! cudarc loads `libcuda` dynamically and panics when it is missing, so [`probe`] checks for the
//! library first and every driver entry into cudarc here is guarded: no function of this module
//! panics on a machine without a driver or a GPU.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    LaunchConfig, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};

use crate::error::{Error, Result};

/// One kernel family's embedded fatbin (absent when nvcc was missing at build time) and the
/// `extern "C"` kernel names it exports.
#[derive(Debug)]
pub struct FamilyImage {
    pub name: &'static str,
    pub fatbin: Option<&'static [u8]>,
    pub kernels: &'static [&'static str],
}

mod built {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The kernel families compiled into this binary.
pub fn families() -> &'static [FamilyImage] {
    built::FAMILIES
}

/// The SASS targets the kernels were built for (e.g. `["sm_90a", "sm_80"]`).
pub fn built_archs() -> &'static [&'static str] {
    built::ARCHS
}

/// The `nvcc --version` release line of the compiler that built the kernels ("" if none).
pub fn nvcc_version() -> &'static str {
    built::NVCC_VERSION
}

/// Whether every kernel family was compiled into this binary.
pub fn kernels_built() -> bool {
    families().iter().all(|f| f.fatbin.is_some())
}

/// Whether `kernel` exists in the built table of `family` (also true when the family's fatbin is
/// absent: the table comes from the sources, so dispatch can be unit-tested without nvcc).
pub fn kernel_declared(family: &str, kernel: &str) -> bool {
    families().iter().any(|f| f.name == family && f.kernels.contains(&kernel))
}

fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::NoDriver(format!("{what}: {msg}")))
    })
}

/// Checks for the CUDA driver and returns the number of GPUs, without panicking.
pub fn probe() -> Result<usize> {
    // SAFETY: only attempts to dlopen libcuda; no driver function is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDriver("libcuda.so could not be loaded".into()));
    }
    let n = guarded("cuDeviceGetCount", || {
        CudaContext::device_count().map_err(|e| Error::NoDevice(format!("cuInit/cuDeviceGetCount failed: {e}")))
    })?;
    if n <= 0 {
        return Err(Error::NoDevice("the driver reports no CUDA devices".into()));
    }
    Ok(n as usize)
}

/// Static facts about a device that dispatch decisions need.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub max_shared_optin: usize,
    pub total_memory: usize,
}

/// (family, kernel name) → the loaded function and the dynamic shared-memory limit set on it.
type FunctionCache = HashMap<(&'static str, String), (CudaFunction, usize)>;

/// A GPU, its context, the stream lowbit launches on, and the loaded kernel modules.
///
/// Cheap to share behind an `Arc`; all methods take `&self`. Modules are loaded on first use of
/// a family.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded functions and the dynamic shared-memory limit set on each.
    functions: Mutex<FunctionCache>,
    /// Kernels launched through this device so far.
    launches: AtomicU64,
    /// Device allocations made through this device's helpers so far.
    allocations: AtomicU64,
    /// Host↔device copies made through this device's helpers so far.
    host_copies: AtomicU64,
    /// Host waits on the stream (explicit, or inside a device-to-host copy) so far.
    syncs: AtomicU64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

impl Device {
    /// Opens device `ordinal` on its primary context with a new non-default stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(Error::NoDevice(format!("device {ordinal} requested, {count} present")));
        }
        guarded("opening the device", || {
            let ctx = CudaContext::new(ordinal).map_err(Error::cuda("cuCtxCreate"))?;
            let stream = ctx.new_stream().map_err(Error::cuda("cuStreamCreate"))?;
            Self::with_stream(ctx, stream)
        })
    }

    /// Wraps an existing context and stream (an engine's own), so lowbit launches in its order.
    pub fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let attr = |a| ctx.attribute(a).map_err(Error::cuda("cuDeviceGetAttribute"));
        let info = DeviceInfo {
            ordinal: ctx.ordinal(),
            name: ctx.name().map_err(Error::cuda("cuDeviceGetName"))?,
            compute_capability: ctx.compute_capability().map_err(Error::cuda("cuDeviceComputeCapability"))?,
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            max_shared_optin: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
            total_memory: ctx.total_mem().map_err(Error::cuda("cuDeviceTotalMem"))?,
        };
        Ok(Device {
            ctx,
            stream,
            info,
            modules: Mutex::default(),
            functions: Mutex::default(),
            launches: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            host_copies: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// Opens the first GPU if one is usable: `Err` says why not (no driver, no device, ...).
    pub fn first() -> Result<Self> {
        Self::new(0)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// How many kernels lowbit has launched through this device (every lowbit kernel launch
    /// goes through it): the difference across a call is that call's launch count.
    pub fn launch_count(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// How many device allocations lowbit has made through this device ([`Device::zeros`],
    /// [`Device::htod`] and the kernels' output buffers).
    pub fn alloc_count(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// How many host↔device copies lowbit has made through this device ([`Device::htod`],
    /// [`Device::dtoh`]).
    pub fn host_copy_count(&self) -> u64 {
        self.host_copies.load(Ordering::Relaxed)
    }

    /// How many times lowbit has made the host wait for its stream ([`Device::synchronize`], and
    /// the wait inside every [`Device::dtoh`]).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Waits for all work lowbit queued on its stream.
    pub fn synchronize(&self) -> Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.stream.synchronize().map_err(Error::cuda("cuStreamSynchronize"))
    }

    /// Copies a host slice to a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.host_copies.fetch_add(1, Ordering::Relaxed);
        self.stream.clone_htod(data).map_err(Error::cuda("memcpy host to device"))
    }

    /// Copies a device buffer (or view) back to the host (synchronising).
    pub fn dtoh<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        self.host_copies.fetch_add(1, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.stream.clone_dtoh(src).map_err(Error::cuda("memcpy device to host"))
    }

    /// A zero-filled device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.stream.alloc_zeros(len.max(1)).map_err(Error::cuda("cuMemAlloc"))
    }

    /// A device buffer whose every element the caller's next kernel writes.
    ///
    /// # Safety
    /// The contents are uninitialised: the caller must fully overwrite the buffer before it is read
    /// or returned, and must not return it on an error path.
    pub(crate) unsafe fn alloc_for_kernel<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded to the caller's contract above.
        unsafe { self.stream.alloc(len.max(1)) }.map_err(Error::cuda("cuMemAlloc"))
    }

    fn module(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(family) {
            return Ok(m.clone());
        }
        let image = families()
            .iter()
            .find(|f| f.name == family)
            .and_then(|f| f.fatbin)
            .ok_or(Error::KernelsNotBuilt { family })?;
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
            .map_err(Error::cuda("cuModuleLoadData"))?;
        modules.insert(family, m.clone());
        Ok(m)
    }

    /// The kernel `name` of `family`, loading the family's module on first use; `dynamic_smem`
    /// above 48 KiB raises the function's dynamic shared-memory limit (remembered per function, so
    /// a later call that needs more raises it again).
    pub(crate) fn function(&self, family: &'static str, name: &str, dynamic_smem: usize) -> Result<CudaFunction> {
        if !kernel_declared(family, name) {
            return Err(Error::KernelMissing { family, kernel: name.to_string() });
        }
        if dynamic_smem > self.info.max_shared_optin {
            return Err(Error::invalid(
                "launch",
                format!(
                    "{name} needs {dynamic_smem} bytes of shared memory; the device allows {}",
                    self.info.max_shared_optin
                ),
            ));
        }
        let key = (family, name.to_string());
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        let (f, smem_limit) = match functions.get(&key) {
            Some(entry) => entry.clone(),
            None => {
                let f = self.module(family)?.load_function(name).map_err(Error::cuda("cuModuleGetFunction"))?;
                (f, 48 * 1024)
            }
        };
        let smem_limit = if dynamic_smem > smem_limit {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_smem as i32)
                .map_err(Error::cuda("cuFuncSetAttribute"))?;
            dynamic_smem
        } else {
            smem_limit
        };
        functions.insert(key, (f.clone(), smem_limit));
        Ok(f)
    }

    /// Launches `f` with a single by-value parameter struct.
    ///
    /// # Safety
    /// `params` must describe device buffers that are valid, large enough and live for the
    /// kernel's whole execution (hold their [`SyncOnDrop`] guards until after this call), and
    /// `cfg` must match what the kernel expects.
    pub(crate) unsafe fn launch<P: DeviceRepr>(&self, f: &CudaFunction, cfg: LaunchConfig, params: P) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        b.arg(&params);
        self.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded to the caller's contract above.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(Error::cuda("cuLaunchKernel"))
    }

    /// Checks that a buffer belongs to this device's context and has `expected` elements.
    pub(crate) fn check_buffer<T, S: DeviceSlice<T>>(
        &self,
        op: &'static str,
        name: &'static str,
        buf: &S,
        expected: usize,
    ) -> Result<()> {
        let ctx = buf.stream().context();
        if ctx.cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::WrongDevice { op, name, expected: self.info.ordinal, got: ctx.ordinal() });
        }
        if buf.len() != expected {
            return Err(Error::Length { op, name, expected, got: buf.len() });
        }
        Ok(())
    }

    /// The raw device address of a buffer for a parameter struct, with the guard that orders
    /// the access on lowbit's stream; checks alignment.
    pub(crate) fn ptr<'a, T, S: DevicePtr<T>>(
        &'a self,
        op: &'static str,
        name: &'static str,
        buf: &'a S,
        align: usize,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        let (p, guard) = buf.device_ptr(&self.stream);
        if p % align as u64 != 0 {
            return Err(Error::Misaligned { op, name, align });
        }
        Ok((p, guard))
    }

    /// As [`Device::ptr`], for a buffer the kernel writes.
    pub(crate) fn ptr_mut<'a, T, S: DevicePtrMut<T>>(
        &'a self,
        op: &'static str,
        name: &'static str,
        buf: &'a mut S,
        align: usize,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        let (p, guard) = buf.device_ptr_mut(&self.stream);
        if p % align as u64 != 0 {
            return Err(Error::Misaligned { op, name, align });
        }
        Ok((p, guard))
    }

    /// A grid-stride launch configuration: enough blocks to cover `work` items of
    /// `per_block` each, capped at a few waves of the device.
    pub(crate) fn grid_stride(&self, work: usize, threads: u32, per_block: usize) -> LaunchConfig {
        let blocks = work.div_ceil(per_block.max(1)).clamp(1, self.info.sm_count.max(1) * 32);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // On a machine without a driver this is an error; with one, a count. Never a panic.
        match probe() {
            Ok(n) => assert!(n > 0),
            Err(e) => assert!(matches!(e, Error::NoDriver(_) | Error::NoDevice(_)), "{e}"),
        }
    }

    #[test]
    fn kernel_table_lists_quant_family() {
        assert!(kernel_declared("quant", "lowbit_fq_fwd_grouped_bf16_bf16"));
        assert!(!kernel_declared("quant", "no_such_kernel"));
    }
}
