//! The executable form of a PTX module: kernels with typed instructions over dense registers.

use std::sync::Arc;

use crate::Result;

/// One `.param` of a kernel: where its bytes go in the parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub offset: usize,
    pub size: usize,
    pub align: usize,
}

/// A loaded kernel (`.entry`).
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    /// Size of the parameter buffer (all params laid out with their alignment).
    pub param_bytes: usize,
    /// `.maxntid` (or `.reqntid`), if declared.
    pub maxntid: Option<[u32; 3]>,
    /// Bytes of statically declared `.shared` memory the kernel uses.
    pub static_smem: usize,
}

/// A loaded module.
#[derive(Debug, Default)]
pub struct Module {
    pub kernels: Vec<Arc<Kernel>>,
}

impl Module {
    /// Parses and lowers PTX text. Syntax errors are `CUDA_ERROR_INVALID_PTX`; an instruction the
    /// simulator does not implement fails the launch of the kernel containing it.
    pub fn from_ptx(_text: &str) -> Result<Module> {
        Err(crate::SimError::invalid_ptx("the PTX front end is not built yet"))
    }

    pub fn kernel(&self, name: &str) -> Option<&Arc<Kernel>> {
        self.kernels.iter().find(|k| k.name == name)
    }
}
