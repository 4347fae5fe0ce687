//! The driver's state: one device, its primary context, handle tables, the sticky error.
//!
//! Created lazily by `cuInit` (never by a library constructor: cudarc dlopens and dlcloses the
//! library once before it uses it). Everything lives in one process-wide [`Driver`]; the
//! context's tables sit behind one mutex that is never held while a kernel runs.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::ir::{Kernel, Module};
use crate::{cuda, GlobalMemory, SimConfig, SimError};

/// A CUDA result as an error: `Err(code)`.
pub(crate) type R<T> = Result<T, u32>;

/// Shared memory a block may use without opting in (`cuFuncSetAttribute`).
pub(crate) const DEFAULT_SMEM: u32 = 48 * 1024;

/// Handles are `tag << 48 | serial`: opaque, never null, never 1 or 2 (the special stream
/// handles), never reused, and a handle of one kind is never valid as another.
const TAG_CTX: usize = 0x0c7c;
const TAG_MODULE: usize = 0x0d01;
const TAG_FUNCTION: usize = 0x0f0c;
const TAG_STREAM: usize = 0x057e;
const TAG_EVENT: usize = 0x0e7e;

const fn handle(tag: usize, serial: usize) -> usize {
    (tag << 48) | serial
}

/// The primary context of device 0: the same handle from every retain.
pub(crate) const PRIMARY_CTX: usize = handle(TAG_CTX, 1);

static DRIVER: OnceLock<Driver> = OnceLock::new();

thread_local! {
    /// The calling thread's current context (0: none).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn current() -> usize {
    CURRENT.with(|c| c.get())
}
pub(crate) fn set_current(ctx: usize) {
    CURRENT.with(|c| c.set(ctx))
}

/// Prints a simulator report to stderr, prefixed once with `lowbit-sim:`.
pub(crate) fn report(msg: &str) {
    if msg.starts_with("lowbit-sim") {
        eprintln!("{msg}");
    } else {
        eprintln!("lowbit-sim: {msg}");
    }
}

/// An error with a report: prints it and gives the code.
pub(crate) fn fail(e: &SimError) -> u32 {
    report(&e.message);
    e.code
}

/// Errors that a faulting kernel leaves behind in the context (CUDA's "sticky" errors); every
/// other launch error is returned by `cuLaunchKernel` itself and leaves the context usable.
pub(crate) fn is_sticky(code: u32) -> bool {
    matches!(code, 700 | 702 | 710 | 714 | 715 | 716 | 717 | 718 | 719 | 999)
}

pub(crate) struct ModuleEntry {
    pub module: Arc<Module>,
    /// Function handles already handed out, by kernel name (the same handle every time).
    functions: HashMap<String, usize>,
}

pub(crate) struct FuncEntry {
    pub kernel: Arc<Kernel>,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`: 48 KiB minus the static shared memory
    /// until raised.
    pub max_dynamic_smem: u32,
    /// `CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT` (accepted and reported, no effect).
    pub carveout: i32,
}

pub(crate) struct EventEntry {
    pub flags: u32,
    pub recorded: Option<Instant>,
}

/// The primary context's tables.
#[derive(Default)]
pub(crate) struct Ctx {
    pub refcount: u32,
    pub modules: HashMap<usize, ModuleEntry>,
    pub functions: HashMap<usize, FuncEntry>,
    pub streams: HashMap<usize, u32>,
    pub events: HashMap<usize, EventEntry>,
    /// Live allocations, freed when the context is destroyed.
    pub allocations: HashSet<u64>,
}

type CachedModule = Arc<OnceLock<Result<Arc<Module>, SimError>>>;

pub(crate) struct Driver {
    pub config: SimConfig,
    pub mem: GlobalMemory,
    ctx: Mutex<Ctx>,
    /// The context's sticky error (0: none).
    sticky: AtomicU32,
    /// Parsed modules by PTX text, across contexts: tests reload the same module many times.
    cache: Mutex<HashMap<Box<str>, CachedModule>>,
    next_serial: AtomicUsize,
}

impl Driver {
    /// The driver, created by the first `cuInit`.
    pub fn init() -> &'static Driver {
        DRIVER.get_or_init(|| Driver {
            config: SimConfig::from_env(),
            mem: GlobalMemory::new(),
            ctx: Mutex::new(Ctx::default()),
            sticky: AtomicU32::new(0),
            cache: Mutex::new(HashMap::new()),
            next_serial: AtomicUsize::new(1),
        })
    }

    /// The driver, or `CUDA_ERROR_NOT_INITIALIZED` before `cuInit`.
    pub fn get() -> R<&'static Driver> {
        DRIVER.get().ok_or(cuda::NOT_INITIALIZED)
    }

    pub fn lock(&self) -> MutexGuard<'_, Ctx> {
        self.ctx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serial(&self) -> usize {
        self.next_serial.fetch_add(1, Ordering::Relaxed)
    }

    /// The sticky error, if a kernel has faulted.
    pub fn check_sticky(&self) -> R<()> {
        match self.sticky.load(Ordering::Acquire) {
            0 => Ok(()),
            c => Err(c),
        }
    }

    pub fn set_sticky(&self, code: u32) {
        // The first fault wins, as on a GPU.
        let _ = self.sticky.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// `CUDA_ERROR_INVALID_CONTEXT` unless the calling thread has the (active) primary context
    /// current; then the sticky error, if any.
    pub fn require_current(&self, ctx: &Ctx) -> R<()> {
        if current() != PRIMARY_CTX || ctx.refcount == 0 {
            return Err(cuda::INVALID_CONTEXT);
        }
        self.check_sticky()
    }

    /// Validates a stream handle: 0 and the special handles mean the current context's default
    /// stream; any other must be live. Then the sticky error.
    pub fn check_stream(&self, ctx: &Ctx, stream: usize) -> R<()> {
        match stream {
            0 | super::types::CU_STREAM_LEGACY | super::types::CU_STREAM_PER_THREAD => self.require_current(ctx),
            s if ctx.streams.contains_key(&s) => self.check_sticky(),
            _ => Err(cuda::INVALID_HANDLE),
        }
    }

    // --- context -------------------------------------------------------------------------

    pub fn retain(&self) -> usize {
        self.lock().refcount += 1;
        PRIMARY_CTX
    }

    /// Drops one reference; the last one destroys the context: its modules, streams, events and
    /// memory go, and so does its sticky error (a later retain gets a fresh context under the
    /// same handle, as with CUDA's primary context).
    pub fn release(&self) -> R<()> {
        let mut c = self.lock();
        if c.refcount == 0 {
            return Err(cuda::INVALID_CONTEXT);
        }
        c.refcount -= 1;
        if c.refcount == 0 {
            let old = std::mem::take(&mut *c);
            for p in old.allocations {
                let _ = self.mem.free(p);
            }
            self.sticky.store(0, Ordering::Release);
        }
        Ok(())
    }

    pub fn refcount(&self) -> u32 {
        self.lock().refcount
    }

    // --- modules and functions -----------------------------------------------------------

    /// Parses PTX text once per distinct text (other threads loading the same text wait for
    /// the first parse; different texts parse in parallel).
    pub fn parse_cached(&self, text: &str) -> Result<Arc<Module>, SimError> {
        let cell = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(text) {
                Some(c) => c.clone(),
                None => cache.entry(text.into()).or_default().clone(),
            }
        };
        cell.get_or_init(|| Module::from_ptx(text).map(Arc::new)).clone()
    }

    /// Adds a parsed module to the context and returns its handle.
    pub fn add_module(&self, module: Arc<Module>) -> R<usize> {
        let mut c = self.lock();
        self.require_current(&c)?;
        let h = handle(TAG_MODULE, self.serial());
        c.modules.insert(h, ModuleEntry { module, functions: HashMap::new() });
        Ok(h)
    }

    pub fn unload_module(&self, h: usize) -> R<()> {
        let mut c = self.lock();
        self.check_sticky()?;
        let m = c.modules.remove(&h).ok_or(cuda::INVALID_HANDLE)?;
        for f in m.functions.values() {
            c.functions.remove(f);
        }
        Ok(())
    }

    pub fn get_function(&self, module: usize, name: &str) -> R<usize> {
        let mut c = self.lock();
        self.check_sticky()?;
        let serial = self.serial();
        let m = c.modules.get_mut(&module).ok_or(cuda::INVALID_HANDLE)?;
        if let Some(&f) = m.functions.get(name) {
            return Ok(f);
        }
        let kernel = m.module.kernel(name).ok_or(cuda::NOT_FOUND)?.clone();
        let f = handle(TAG_FUNCTION, serial);
        m.functions.insert(name.to_string(), f);
        let max_dynamic_smem = DEFAULT_SMEM.saturating_sub(kernel.static_smem.min(u32::MAX as usize) as u32);
        c.functions.insert(f, FuncEntry { kernel, max_dynamic_smem, carveout: -1 });
        Ok(f)
    }

    /// Runs `op` on a function entry (sticky error and handle checked).
    pub fn with_function<T>(&self, f: usize, op: impl FnOnce(&mut FuncEntry) -> R<T>) -> R<T> {
        let mut c = self.lock();
        self.check_sticky()?;
        op(c.functions.get_mut(&f).ok_or(cuda::INVALID_HANDLE)?)
    }

    // --- streams and events --------------------------------------------------------------

    pub fn create_stream(&self, flags: u32) -> R<usize> {
        let mut c = self.lock();
        self.require_current(&c)?;
        let h = handle(TAG_STREAM, self.serial());
        c.streams.insert(h, flags);
        Ok(h)
    }

    pub fn destroy_stream(&self, s: usize) -> R<()> {
        let mut c = self.lock();
        self.check_sticky()?;
        c.streams.remove(&s).map(|_| ()).ok_or(cuda::INVALID_HANDLE)
    }

    /// Stream-ordered work is done at call time, so synchronising only validates and reports
    /// the sticky error.
    pub fn sync_stream(&self, s: usize) -> R<()> {
        let c = self.lock();
        self.check_stream(&c, s)
    }

    pub fn create_event(&self, flags: u32) -> R<usize> {
        let mut c = self.lock();
        self.require_current(&c)?;
        let h = handle(TAG_EVENT, self.serial());
        c.events.insert(h, EventEntry { flags, recorded: None });
        Ok(h)
    }

    pub fn destroy_event(&self, e: usize) -> R<()> {
        let mut c = self.lock();
        self.check_sticky()?;
        c.events.remove(&e).map(|_| ()).ok_or(cuda::INVALID_HANDLE)
    }

    pub fn record_event(&self, e: usize, s: usize) -> R<()> {
        let mut c = self.lock();
        self.check_stream(&c, s)?;
        c.events.get_mut(&e).ok_or(cuda::INVALID_HANDLE)?.recorded = Some(Instant::now());
        Ok(())
    }

    /// Validates an event (for synchronize / query / wait: all work is already complete).
    pub fn check_event(&self, e: usize) -> R<()> {
        let c = self.lock();
        self.check_sticky()?;
        c.events.contains_key(&e).then_some(()).ok_or(cuda::INVALID_HANDLE)
    }

    pub fn wait_event(&self, s: usize, e: usize) -> R<()> {
        let c = self.lock();
        self.check_stream(&c, s)?;
        c.events.contains_key(&e).then_some(()).ok_or(cuda::INVALID_HANDLE)
    }

    /// Milliseconds from `a`'s record to `b`'s (CUDA driver documentation, cuEventElapsedTime:
    /// `CUDA_ERROR_INVALID_HANDLE` if either event has timing disabled or was never recorded).
    pub fn elapsed(&self, a: usize, b: usize) -> R<f32> {
        let c = self.lock();
        self.check_sticky()?;
        let (ea, eb) = (c.events.get(&a).ok_or(cuda::INVALID_HANDLE)?, c.events.get(&b).ok_or(cuda::INVALID_HANDLE)?);
        if (ea.flags | eb.flags) & super::types::CU_EVENT_DISABLE_TIMING != 0 {
            return Err(cuda::INVALID_HANDLE);
        }
        let (Some(ta), Some(tb)) = (ea.recorded, eb.recorded) else {
            return Err(cuda::INVALID_HANDLE);
        };
        let ms = if tb >= ta { (tb - ta).as_secs_f64() * 1e3 } else { -((ta - tb).as_secs_f64() * 1e3) };
        Ok(ms as f32)
    }

    // --- memory --------------------------------------------------------------------------

    pub fn alloc(&self, size: usize) -> R<u64> {
        {
            let c = self.lock();
            self.require_current(&c)?;
        }
        if size == 0 {
            return Err(cuda::INVALID_VALUE);
        }
        if self.mem.allocated_bytes().saturating_add(size as u64) > self.config.total_mem {
            return Err(cuda::OUT_OF_MEMORY);
        }
        // Allocating (and poisoning) happens outside the context lock.
        let p = self.mem.alloc(size).map_err(|e| fail(&e))?;
        self.lock().allocations.insert(p);
        Ok(p)
    }

    pub fn free(&self, p: u64) -> R<()> {
        let mut c = self.lock();
        self.require_current(&c)?;
        if p == 0 {
            return Ok(());
        }
        if !c.allocations.remove(&p) {
            return Err(fail(&SimError::invalid_value(format!(
                "cuMemFree: {p:#x} is not the start of a live allocation (double free, or a pointer into one)"
            ))));
        }
        drop(c);
        self.mem.free(p).map_err(|e| fail(&e))
    }

    pub fn free_bytes(&self) -> (u64, u64) {
        let total = self.config.total_mem;
        (total.saturating_sub(self.mem.allocated_bytes()), total)
    }
}
