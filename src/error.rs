//! The crate's one error type.

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in lowbit. Every public function validates its inputs before
/// launching a kernel and reports bad input with one of these variants, naming the operation
/// (`op`) and the offending argument.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The crate was built without nvcc (or this family failed to compile), so there are no
    /// kernels to launch. Run `scripts/install-cuda-toolchain.sh` and rebuild.
    #[error("kernel family `{family}` was not built into this binary (nvcc missing at build time); run scripts/install-cuda-toolchain.sh and rebuild")]
    KernelsNotBuilt { family: &'static str },
    /// A kernel name was requested that the build did not produce.
    #[error("kernel `{kernel}` is not in the built family `{family}`")]
    KernelMissing { family: &'static str, kernel: String },
    /// The CUDA driver library (`libcuda`) could not be loaded.
    #[error("CUDA driver unavailable: {0}")]
    NoDriver(String),
    /// The driver loaded but no usable GPU was found.
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA error in {op}: {source}")]
    Cuda {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A shape does not satisfy the operation's contract.
    #[error("{op}: bad shape: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A buffer has the wrong number of elements for the declared shape.
    #[error("{op}: `{name}` has {got} elements, expected {expected}")]
    Length { op: &'static str, name: &'static str, expected: usize, got: usize },
    /// A tensor has the wrong element type.
    #[error("{op}: `{name}` has dtype {got}, expected {expected}")]
    DType { op: &'static str, name: String, expected: String, got: String },
    /// A device buffer is not aligned for vectorised access.
    #[error("{op}: `{name}` is not aligned to {align} bytes")]
    Misaligned { op: &'static str, name: &'static str, align: usize },
    /// A buffer lives on another device or context than the one the call runs on.
    #[error("{op}: `{name}` lives on device {got}, the call runs on device {expected}")]
    WrongDevice { op: &'static str, name: &'static str, expected: usize, got: usize },
    /// A weight is NaN or infinite; quantizing it would silently produce a NaN scale.
    #[error("{op}: non-finite weight at row {row}, column {col}")]
    NonFinite { op: &'static str, row: usize, col: usize },
    /// A group's scale does not fit the scale dtype (e.g. f32 weights above 458752 with f16 scales).
    #[error("{op}: the scale of row {row}, group {group} overflows the scale dtype")]
    ScaleOverflow { op: &'static str, row: usize, group: usize },
    /// Any other argument that violates the operation's contract.
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    /// A checkpoint (safetensors / config) is malformed or not of the expected format.
    #[error("{path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Cuda { op, source }
    }

    pub(crate) fn shape(op: &'static str, msg: impl fmt::Display) -> Error {
        Error::Shape { op, msg: msg.to_string() }
    }

    pub(crate) fn invalid(op: &'static str, msg: impl fmt::Display) -> Error {
        Error::InvalidArgument { op, msg: msg.to_string() }
    }

    pub(crate) fn checkpoint(path: impl fmt::Display, msg: impl fmt::Display) -> Error {
        Error::Checkpoint { path: path.to_string(), msg: msg.to_string() }
    }

    pub(crate) fn io(path: impl fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_string();
        move |source| Error::Io { path, source }
    }
}
