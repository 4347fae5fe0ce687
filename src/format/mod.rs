//! Host-side weight formats (DESIGN §3): group sizes, quantized shapes and their validation,
//! and the nibble packing of compressed-tensors `pack-quantized` / GPTQ `uint4b8`.

use crate::error::{Error, Result};

/// Largest code magnitude: codes are `q ∈ [-7, 7]`.
pub const QMAX: i32 = crate::ffi::LOWBIT_QMAX as i32;
/// Offset of the stored unsigned nibble: `u = q + 8`.
pub const QZERO: i32 = crate::ffi::LOWBIT_QZERO as i32;
/// Lower bound of the f32 scale before it is rounded to the scale dtype.
pub const MIN_SCALE: f32 = crate::ffi::LOWBIT_MIN_SCALE as f32;
/// INT4 codes per packed i32 word.
pub const PACK: usize = crate::ffi::LOWBIT_PACK as usize;

/// How many consecutive weights along K share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupSize {
    /// Groups of 32, 64 or 128 weights.
    Group(usize),
    /// One scale per output row (`g = K`).
    Channelwise,
}

impl GroupSize {
    /// The group sizes the kernels support besides channelwise.
    pub const SUPPORTED: [usize; 3] = [32, 64, 128];

    /// From a checkpoint's `group_size` field: 32/64/128, or -1 / 0 for channelwise.
    pub fn from_checkpoint(g: i64) -> Result<Self> {
        match g {
            -1 | 0 => Ok(GroupSize::Channelwise),
            32 | 64 | 128 => Ok(GroupSize::Group(g as usize)),
            _ => Err(Error::invalid(
                "group_size",
                format!("group size {g} is not supported (32, 64, 128, or -1/0 for channelwise)"),
            )),
        }
    }

    /// The checkpoint encoding: the group size, or -1 for channelwise.
    pub fn to_checkpoint(self) -> i64 {
        match self {
            GroupSize::Group(g) => g as i64,
            GroupSize::Channelwise => -1,
        }
    }

    /// The number of weights per group for a row of length `k`, validated.
    pub fn resolve(self, op: &'static str, k: usize) -> Result<usize> {
        if k == 0 || k % PACK != 0 {
            return Err(Error::shape(op, format!("K = {k} must be a positive multiple of {PACK}")));
        }
        match self {
            GroupSize::Channelwise => Ok(k),
            GroupSize::Group(g) if Self::SUPPORTED.contains(&g) => {
                if k % g != 0 {
                    return Err(Error::shape(op, format!("K = {k} is not a multiple of the group size {g}")));
                }
                Ok(g)
            }
            GroupSize::Group(g) => {
                Err(Error::invalid(op, format!("group size {g} is not supported (32, 64, 128 or channelwise)")))
            }
        }
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSize::Group(g) => write!(f, "{g}"),
            GroupSize::Channelwise => f.write_str("channelwise"),
        }
    }
}

/// A validated `[N, K]` weight shape with its group size: the shape every quantized tensor of one
/// linear layer is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantShape {
    /// Output features (rows of `W`).
    pub n: usize,
    /// Input features (columns of `W`, the reduction dimension).
    pub k: usize,
    /// Weights per group (equal to `k` when channelwise).
    pub group: usize,
    /// The group size as requested.
    pub group_size: GroupSize,
}

impl QuantShape {
    /// Validates `n ≥ 1`, `K % 8 == 0`, `K % g == 0`, and that the sizes fit 64-bit indexing.
    pub fn new(n: usize, k: usize, group_size: GroupSize) -> Result<Self> {
        const OP: &str = "QuantShape::new";
        if n == 0 {
            return Err(Error::shape(OP, "N must be at least 1"));
        }
        let group = group_size.resolve(OP, k)?;
        if n.checked_mul(k).and_then(|e| e.checked_mul(4)).is_none_or(|b| b > i64::MAX as usize) {
            return Err(Error::shape(OP, format!("[{n}, {k}] is too large")));
        }
        Ok(QuantShape { n, k, group, group_size })
    }

    /// Elements of the weight matrix, `N·K`.
    pub fn numel(&self) -> usize {
        self.n * self.k
    }
    /// Groups per row, `K / g`.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }
    /// Elements of the scale matrix `[N, K/g]`.
    pub fn scales_len(&self) -> usize {
        self.n * self.groups_per_row()
    }
    /// i32 words of the packed matrix `[N, K/8]`.
    pub fn packed_len(&self) -> usize {
        self.n * (self.k / PACK)
    }
}

/// Packs eight codes `q ∈ [-7, 7]` (consecutive along K) into one word: nibble `i` holds `q[i] + 8`.
pub fn pack8(q: &[i8; 8]) -> i32 {
    let mut w = 0u32;
    for (i, &v) in q.iter().enumerate() {
        w |= ((v as i32 + QZERO) as u32 & 0xF) << (4 * i);
    }
    w as i32
}

/// Unpacks a word into eight codes `q = u − 8` (the inverse of [`pack8`] on the 15-level grid;
/// a stored nibble 0 decodes to −8, which this crate never writes).
pub fn unpack8(w: i32) -> [i8; 8] {
    let w = w as u32;
    std::array::from_fn(|i| ((w >> (4 * i)) & 0xF) as i8 - QZERO as i8)
}

/// Unpacks compressed-tensors `weight_packed` `[N, K/8]` into codes `[N, K]`.
pub fn unpack(packed: &[i32], shape: &QuantShape) -> Result<Vec<i8>> {
    check_len("unpack", "packed", packed.len(), shape.packed_len())?;
    Ok(packed.iter().flat_map(|&w| unpack8(w)).collect())
}

/// Packs codes `[N, K]` into compressed-tensors `weight_packed` `[N, K/8]`.
pub fn pack(codes: &[i8], shape: &QuantShape) -> Result<Vec<i32>> {
    const OP: &str = "pack";
    check_len(OP, "codes", codes.len(), shape.numel())?;
    if let Some(i) = codes.iter().position(|&q| !(-QMAX..=QMAX).contains(&(q as i32))) {
        return Err(Error::invalid(OP, format!("code {} at index {i} is outside [-7, 7]", codes[i])));
    }
    Ok(codes.chunks_exact(PACK).map(|c| pack8(c.try_into().expect("chunks of 8"))).collect())
}

pub(crate) fn check_len(op: &'static str, name: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Length { op, name, expected, got });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_size_validation() {
        assert_eq!(GroupSize::Group(32).resolve("t", 64).unwrap(), 32);
        assert_eq!(GroupSize::Channelwise.resolve("t", 72).unwrap(), 72);
        assert!(GroupSize::Group(128).resolve("t", 192).is_err());
        assert!(GroupSize::Group(48).resolve("t", 96).is_err());
        assert!(GroupSize::Channelwise.resolve("t", 12).is_err());
        assert!(GroupSize::Channelwise.resolve("t", 0).is_err());
        assert_eq!(GroupSize::from_checkpoint(-1).unwrap(), GroupSize::Channelwise);
        assert!(GroupSize::from_checkpoint(256).is_err());
        assert!(QuantShape::new(0, 64, GroupSize::Group(32)).is_err());
        assert!(QuantShape::new(usize::MAX / 2, 64, GroupSize::Group(32)).is_err());
    }

    #[test]
    fn nibble_order_is_little_endian_along_k() {
        let q = [-7i8, -1, 0, 1, 2, 3, 7, -3];
        let w = pack8(&q) as u32;
        assert_eq!(w & 0xF, 1); // -7 + 8
        assert_eq!((w >> 28) & 0xF, 5); // -3 + 8
        assert_eq!(unpack8(w as i32), q);
    }
}
