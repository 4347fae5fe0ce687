//! `inspect`: what a checkpoint holds.

use std::collections::BTreeSet;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use serde::Serialize;

use super::config::IgnoredKey;
use super::source::Checkpoint;
use super::stfile::{le_u16, Dtype};
use super::{detect, Format};
use crate::error::Result;

/// Statistics of a set of scales.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScaleStats {
    /// Number of scales.
    pub count: u64,
    /// Smallest finite scale.
    pub min: Option<f64>,
    /// Largest finite scale.
    pub max: Option<f64>,
    /// Mean of the finite scales.
    pub mean: Option<f64>,
    /// Scales at the floor `1e-5` of DESIGN §3 (groups of zeros).
    pub at_floor: u64,
    /// NaN, infinite, zero or negative scales (never produced by this crate's quantizer).
    pub invalid: u64,
}

impl ScaleStats {
    fn add(&mut self, o: &ScaleStats) {
        let total = self.count + o.count;
        let finite = |s: &ScaleStats| (s.count - s.invalid) as f64;
        self.mean = match (self.mean, o.mean) {
            (Some(a), Some(b)) => Some((a * finite(self) + b * finite(o)) / (finite(self) + finite(o))),
            (a, b) => a.or(b),
        };
        self.min = [self.min, o.min].into_iter().flatten().reduce(f64::min);
        self.max = [self.max, o.max].into_iter().flatten().reduce(f64::max);
        self.count = total;
        self.at_floor += o.at_floor;
        self.invalid += o.invalid;
    }

    fn of(values: &[f32], floor: f32) -> ScaleStats {
        let mut s = ScaleStats { count: values.len() as u64, ..Default::default() };
        let mut sum = 0f64;
        for &v in values {
            if !v.is_finite() || v <= 0.0 {
                s.invalid += 1;
                continue;
            }
            if v == floor {
                s.at_floor += 1;
            }
            let v = v as f64;
            sum += v;
            s.min = Some(s.min.map_or(v, |m| m.min(v)));
            s.max = Some(s.max.map_or(v, |m| m.max(v)));
        }
        let finite = s.count - s.invalid;
        if finite > 0 {
            s.mean = Some(sum / finite as f64);
        }
        s
    }
}

/// One quantized layer.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizedLayer {
    /// Module name.
    pub name: String,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Group size (-1: channelwise).
    pub group_size: i64,
    /// Whether the layer uses act-order (`g_idx` / `perm`).
    pub act_order: bool,
    /// Scale dtype (`BF16` / `F16`).
    pub scale_dtype: String,
    /// The tensors that hold it.
    pub tensors: Vec<String>,
    /// How many weights have each stored code `q = -8..=7` (index `q + 8`). `q = -8` (nibble 0)
    /// is outside the symmetric 15-level grid and never written by this crate, but
    /// compressed-tensors' own quantizer (scale `amax / 7.5`, range `[-8, 7]`) does write it.
    pub levels: [u64; 16],
    /// How many of the 15 levels `-7..=7` occur.
    pub levels_used: usize,
    /// How many weights have the code `-8` (`levels[0]`).
    pub code_minus8: u64,
    /// Scale statistics.
    pub scales: ScaleStats,
}

/// A tensor that is not part of a quantized layer.
#[derive(Clone, Debug, Serialize)]
pub struct PlainTensor {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub bytes: u64,
}

/// What [`inspect`] found.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// The path inspected.
    pub path: String,
    /// The weight format.
    pub format: Format,
    /// The group size (-1: channelwise), when quantized.
    pub group_size: Option<i64>,
    /// The safetensors files.
    pub files: Vec<String>,
    /// Total bytes of tensor data.
    pub total_bytes: u64,
    /// Quantized layers, by name.
    pub quantized: Vec<QuantizedLayer>,
    /// Every other tensor, by name.
    pub plain: Vec<PlainTensor>,
    /// Code histogram over all quantized layers (index `q + 8`).
    pub levels: [u64; 16],
    /// Scale statistics over all quantized layers.
    pub scales: ScaleStats,
    /// Weights with the code `-8` over all quantized layers (outside lowbit's 15-level grid).
    pub code_minus8: u64,
    /// Unknown `quantization_config` keys that were accepted because their value is null, empty
    /// or false.
    pub ignored_config_keys: Vec<IgnoredKey>,
}

fn histogram(bytes: &[u8]) -> [u64; 16] {
    bytes
        .par_chunks(1 << 20)
        .map(|c| {
            let mut h = [0u64; 16];
            for b in c {
                h[(b & 0xF) as usize] += 1;
                h[(b >> 4) as usize] += 1;
            }
            h
        })
        .reduce(
            || [0u64; 16],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Inspects a checkpoint (file or directory): its format, quantized layers and plain tensors,
/// code histograms and scale statistics. Every quantized layer is validated as by `repack`.
pub fn inspect(input: impl AsRef<Path>) -> Result<Inspection> {
    let ck = Checkpoint::open(input.as_ref())?;
    let det = detect(&ck)?;
    let mut ins = Inspection {
        path: ck.root.display().to_string(),
        format: det.format,
        group_size: det.group.map(|g| g.to_checkpoint()),
        files: ck.files.iter().map(|f| f.display().to_string()).collect(),
        total_bytes: ck.total_bytes(),
        quantized: Vec::new(),
        plain: Vec::new(),
        levels: [0; 16],
        scales: ScaleStats::default(),
        code_minus8: 0,
        ignored_config_keys: ck.ignored_keys.clone(),
    };
    let consumed: BTreeSet<&str> =
        det.layers.iter().flat_map(|l| l.inputs.iter().chain(&l.extra).map(String::as_str)).collect();
    for l in &det.layers {
        let Some((f, t)) = ck.get(&l.codes_tensor) else { continue };
        // Codes are nibbles; every layout stores the same N·K of them, so the layout does not matter.
        // The nibble u = q + 8 is exactly the index q + 8.
        let levels = histogram(f.bytes(t));
        let (sf, st) = match ck.get(&l.scales_tensor) {
            Some(x) => x,
            None => continue,
        };
        let raw = sf.bytes(st);
        let (vals, floor): (Vec<f32>, f32) = match st.dtype {
            Dtype::F32 => (raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), 1e-5),
            Dtype::F16 => {
                (le_u16(raw).iter().map(|&b| f16::from_bits(b).to_f32()).collect(), f16::from_f32(1e-5).to_f32())
            }
            _ => (le_u16(raw).iter().map(|&b| bf16::from_bits(b).to_f32()).collect(), bf16::from_f32(1e-5).to_f32()),
        };
        let scales = ScaleStats::of(&vals, floor);
        ins.scales.add(&scales);
        ins.levels.iter_mut().zip(levels).for_each(|(a, b)| *a += b);
        ins.code_minus8 += levels[0];
        ins.quantized.push(QuantizedLayer {
            name: l.prefix.clone(),
            n: l.shape.n,
            k: l.shape.k,
            group_size: l.shape.group_size.to_checkpoint(),
            act_order: l.perm.is_some(),
            scale_dtype: l.scale_dtype.to_string(),
            tensors: l.inputs.iter().chain(&l.extra).cloned().collect(),
            levels,
            levels_used: levels[1..].iter().filter(|&&c| c > 0).count(),
            code_minus8: levels[0],
            scales,
        });
    }
    let mut plain: Vec<PlainTensor> = ck
        .files
        .iter()
        .flat_map(|f| f.header.tensors.iter())
        .filter(|t| !consumed.contains(t.name.as_str()))
        .map(|t| PlainTensor {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            bytes: t.nbytes() as u64,
        })
        .collect();
    plain.sort_by(|a, b| a.name.cmp(&b.name));
    ins.plain = plain;
    Ok(ins)
}
