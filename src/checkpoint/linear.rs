//! Quantized linear layers in the three on-disk layouts: validation from headers (cheap, done for
//! every layer before anything is written), loading into one common form (compressed-tensors
//! order), and writing out as compressed-tensors or Marlin.

use crate::error::{Error, Result};
use crate::format::{GroupSize, QuantShape, PACK};
use crate::reference::{marlin, quant};

use super::fastrepack::{self, Packed};
use super::source::Checkpoint;
use super::stfile::{i32_le, le_i32, le_i64, le_u16, u16_le, Dtype, OutSpec, TensorInfo};

/// The on-disk layout a quantized layer was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `P.weight_packed` / `P.weight_scale` / `P.weight_shape` (/ `P.weight_g_idx`).
    Ct,
    /// `P.qweight` `[K/8, N]` / `P.scales` / `P.qzeros` (/ `P.g_idx`).
    Gptq,
    /// `P.qweight` `[K/16, 2N]` / `P.scales` permuted (/ `P.perm`).
    Marlin,
}

/// Everything about one quantized layer that the headers (and the small index tensors) say.
#[derive(Clone, Debug)]
pub(crate) struct LinearMeta {
    /// Module name (tensor names are `prefix.xxx`).
    pub prefix: String,
    pub layout: Layout,
    pub shape: QuantShape,
    /// bf16 or f16.
    pub scale_dtype: Dtype,
    /// Act-order group of each source K-row (only when it is not the trivial `k / g`).
    pub g_idx: Option<Vec<i32>>,
    /// `argsort(g_idx)`: Marlin K-row `r` holds source row `perm[r]`.
    pub perm: Option<Vec<i32>>,
    /// The input tensors this layer consumes.
    pub inputs: Vec<String>,
    /// Tensors of the layer that conversions keep unchanged (`weight_shape`, GPTQ `qzeros`, a
    /// trivial `g_idx`): copied into the output like plain tensors, so a round trip gives them
    /// back with their original dtype and bytes.
    pub extra: Vec<String>,
    /// Their total size.
    pub in_bytes: u64,
    /// The tensor holding the packed codes (its file decides where the outputs go).
    pub codes_tensor: String,
    /// The tensor holding the scales.
    pub scales_tensor: String,
}

/// A layer loaded into compressed-tensors order.
pub(crate) struct QLinear {
    /// `[N, K/8]`, source K order.
    pub packed: Vec<i32>,
    /// Raw bits of the scales `[N, K/g]`.
    pub scales: Vec<u16>,
}

fn terr(ck: &Checkpoint, name: &str, msg: impl std::fmt::Display) -> Error {
    let file = ck.get(name).map_or_else(|| ck.root.display().to_string(), |(f, _)| f.display().to_string());
    Error::checkpoint(file, format!("tensor `{name}`: {msg}"))
}

fn expect(ck: &Checkpoint, t: &TensorInfo, dtypes: &[Dtype], rank: usize, role: &str) -> Result<()> {
    if !dtypes.contains(&t.dtype) {
        let want: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
        return Err(terr(
            ck,
            &t.name,
            format!("dtype {} is wrong for {role} (expected {})", t.dtype, want.join(" or ")),
        ));
    }
    if t.shape.len() != rank {
        return Err(terr(ck, &t.name, format!("shape {:?} is wrong for {role} (expected {rank} dimensions)", t.shape)));
    }
    Ok(())
}

fn read_i32(ck: &Checkpoint, name: &str) -> Result<Vec<i32>> {
    let (f, t) = ck.get(name).ok_or_else(|| terr(ck, name, "missing"))?;
    Ok(le_i32(f.bytes(t)))
}

fn read_u16(ck: &Checkpoint, name: &str) -> Result<Vec<u16>> {
    let (f, t) = ck.get(name).ok_or_else(|| terr(ck, name, "missing"))?;
    Ok(le_u16(f.bytes(t)))
}

/// The group size of a layer with `groups` scale groups along `k`: the configured one (checked),
/// or inferred when the checkpoint has no config.
fn resolve_group(
    ck: &Checkpoint,
    scales: &str,
    k: usize,
    n: usize,
    groups: usize,
    cfg: Option<GroupSize>,
) -> Result<QuantShape> {
    let gs = match cfg {
        Some(g) => g,
        None if groups == 1 => GroupSize::Channelwise,
        None if groups > 0 && k % groups == 0 => GroupSize::Group(k / groups),
        None => return Err(terr(ck, scales, format!("{groups} groups do not divide K = {k}"))),
    };
    let shape = QuantShape::new(n, k, gs).map_err(|e| match e {
        Error::Shape { msg, .. } => terr(ck, scales, msg),
        e => terr(ck, scales, e),
    })?;
    if shape.groups_per_row() != groups {
        return Err(terr(
            ck,
            scales,
            format!("has {groups} groups along K = {k}, but group size {gs} needs {}", shape.groups_per_row()),
        ));
    }
    Ok(shape)
}

/// The optional act-order `g_idx` tensor `name` (i32 `[K]`): validated, recorded among the
/// layer's `inputs`, and turned into `(g_idx, perm)` when it is not the trivial order.
#[allow(clippy::type_complexity)]
fn optional_g_idx(
    ck: &Checkpoint,
    name: String,
    role: &str,
    shape: &QuantShape,
    inputs: &mut Vec<String>,
    extra: &mut Vec<String>,
) -> Result<(Option<Vec<i32>>, Option<Vec<i32>>)> {
    let Some((_, gt)) = ck.get(&name) else { return Ok((None, None)) };
    expect(ck, gt, &[Dtype::I32], 1, role)?;
    if gt.shape != [shape.k] {
        return Err(terr(ck, &name, format!("shape {:?} (expected [{}])", gt.shape, shape.k)));
    }
    match act_order(ck, &name, read_i32(ck, &name)?, shape)? {
        Some((g, p)) => {
            inputs.push(name);
            Ok((Some(g), Some(p)))
        }
        None => {
            extra.push(name);
            Ok((None, None))
        }
    }
}

fn act_order(ck: &Checkpoint, name: &str, g_idx: Vec<i32>, shape: &QuantShape) -> Result<Option<(Vec<i32>, Vec<i32>)>> {
    if g_idx.iter().enumerate().all(|(r, &g)| g as i64 == (r / shape.group) as i64) {
        return Ok(None);
    }
    let perm = marlin::act_order_perm(&g_idx, shape.k, shape.group).map_err(|e| terr(ck, name, e))?;
    Ok(Some((g_idx, perm)))
}

fn bytes_of(ck: &Checkpoint, names: &[String]) -> u64 {
    names.iter().filter_map(|n| ck.get(n)).map(|(_, t)| t.nbytes() as u64).sum()
}

/// A compressed-tensors layer.
pub(crate) fn probe_ct(ck: &Checkpoint, p: &str, cfg: Option<GroupSize>) -> Result<LinearMeta> {
    let (packed_n, scale_n, shape_n, gidx_n) = (
        format!("{p}.weight_packed"),
        format!("{p}.weight_scale"),
        format!("{p}.weight_shape"),
        format!("{p}.weight_g_idx"),
    );
    for zp in [format!("{p}.weight_zero_point"), format!("{p}.weight_zero_points")] {
        if ck.get(&zp).is_some() {
            return Err(terr(ck, &zp, "asymmetric quantization (zero points) is not supported"));
        }
    }
    let (_, packed) = ck.require(&packed_n, p)?;
    let (_, scale) = ck.require(&scale_n, p)?;
    let (sf, st) = ck.require(&shape_n, p)?;
    expect(ck, packed, &[Dtype::I32], 2, "weight_packed")?;
    expect(ck, scale, &[Dtype::BF16, Dtype::F16, Dtype::F32], 2, "weight_scale")?;
    expect(ck, st, &[Dtype::I32, Dtype::I64], 1, "weight_shape")?;
    if st.shape != [2] {
        return Err(terr(ck, &shape_n, format!("shape {:?} (expected [2])", st.shape)));
    }
    let dims: Vec<i64> = if st.dtype == Dtype::I32 {
        le_i32(sf.bytes(st)).into_iter().map(i64::from).collect()
    } else {
        le_i64(sf.bytes(st))
    };
    let (n, k) = match (usize::try_from(dims[0]), usize::try_from(dims[1])) {
        (Ok(n), Ok(k)) if n > 0 && k > 0 => (n, k),
        _ => return Err(terr(ck, &shape_n, format!("holds {dims:?}, not a positive (N, K)"))),
    };
    if k % PACK != 0 || packed.shape != [n, k / PACK] {
        return Err(terr(
            ck,
            &packed_n,
            format!("shape {:?} does not match weight_shape (N, K) = ({n}, {k}): expected [{n}, K/8]", packed.shape),
        ));
    }
    if scale.shape[0] != n {
        return Err(terr(ck, &scale_n, format!("shape {:?} does not have N = {n} rows", scale.shape)));
    }
    let shape = resolve_group(ck, &scale_n, k, n, scale.shape[1], cfg)?;
    let mut inputs = vec![packed_n.clone(), scale_n.clone()];
    let mut extra = vec![shape_n];
    let (g_idx, perm) = optional_g_idx(ck, gidx_n, "weight_g_idx", &shape, &mut inputs, &mut extra)?;
    Ok(LinearMeta {
        prefix: p.to_string(),
        layout: Layout::Ct,
        shape,
        scale_dtype: scale.dtype,
        g_idx,
        perm,
        in_bytes: bytes_of(ck, &inputs),
        inputs,
        extra,
        codes_tensor: packed_n,
        scales_tensor: scale_n,
    })
}

/// GPTQ zero-point words of the symmetric 4-bit format: v1 stores `8 - 1` per nibble, v2 `8`.
const QZEROS_V1: i32 = 0x7777_7777;
const QZEROS_V2: i32 = 0x8888_8888_u32 as i32;

/// A GPTQ layer. `v2`: the checkpoint format, or `None` to infer it from the zero points.
pub(crate) fn probe_gptq(ck: &Checkpoint, p: &str, cfg: Option<GroupSize>, v2: Option<bool>) -> Result<LinearMeta> {
    let (qw_n, sc_n, qz_n, gi_n) =
        (format!("{p}.qweight"), format!("{p}.scales"), format!("{p}.qzeros"), format!("{p}.g_idx"));
    let (_, qw) = ck.require(&qw_n, p)?;
    let (_, sc) = ck.require(&sc_n, p)?;
    let (_, qz) = ck.require(&qz_n, p)?;
    expect(ck, qw, &[Dtype::I32], 2, "GPTQ qweight")?;
    expect(ck, sc, &[Dtype::F16, Dtype::BF16, Dtype::F32], 2, "GPTQ scales")?;
    expect(ck, qz, &[Dtype::I32], 2, "GPTQ qzeros")?;
    let (k, n) = (qw.shape[0] * PACK, qw.shape[1]);
    if k == 0 || n == 0 {
        return Err(terr(ck, &qw_n, format!("empty shape {:?}", qw.shape)));
    }
    if sc.shape[1] != n {
        return Err(terr(
            ck,
            &sc_n,
            format!("shape {:?} does not have N = {n} columns (qweight is {:?})", sc.shape, qw.shape),
        ));
    }
    let shape = resolve_group(ck, &sc_n, k, n, sc.shape[0], cfg)?;
    if n % PACK != 0 || qz.shape != [shape.groups_per_row(), n / PACK] {
        return Err(terr(
            ck,
            &qz_n,
            format!("shape {:?} (expected [{}, {}])", qz.shape, shape.groups_per_row(), n / PACK),
        ));
    }
    let zeros = read_i32(ck, &qz_n)?;
    let want = match v2 {
        Some(true) => QZEROS_V2,
        Some(false) => QZEROS_V1,
        None if zeros.first() == Some(&QZEROS_V2) => QZEROS_V2,
        None => QZEROS_V1,
    };
    if let Some(i) = zeros.iter().position(|&z| z != want) {
        let z = zeros[i];
        let why = if z == QZEROS_V1 || z == QZEROS_V2 {
            format!(
                "zero points {z:#010x} do not match the checkpoint format (gptq v1 stores 0x77777777, gptq_v2 0x88888888); \
                 check checkpoint_format"
            )
        } else {
            format!("word {i} is {:#010x}: asymmetric GPTQ (non-constant zero points) is not supported", z as u32)
        };
        return Err(terr(ck, &qz_n, why));
    }
    let mut inputs = vec![qw_n.clone(), sc_n.clone()];
    let mut extra = vec![qz_n];
    let (g_idx, perm) = optional_g_idx(ck, gi_n, "GPTQ g_idx", &shape, &mut inputs, &mut extra)?;
    Ok(LinearMeta {
        prefix: p.to_string(),
        layout: Layout::Gptq,
        shape,
        scale_dtype: sc.dtype,
        g_idx,
        perm,
        in_bytes: bytes_of(ck, &inputs),
        inputs,
        extra,
        codes_tensor: qw_n,
        scales_tensor: sc_n,
    })
}

/// Names (after `P.`) of the source tensors `repack` keeps beside the Marlin ones.
const PASSTHROUGH: [&str; 4] = ["weight_shape", "weight_g_idx", "qzeros", "g_idx"];

/// A lowbit Marlin layer.
pub(crate) fn probe_marlin(ck: &Checkpoint, p: &str, group: GroupSize) -> Result<LinearMeta> {
    let (qw_n, sc_n, pm_n) = (format!("{p}.qweight"), format!("{p}.scales"), format!("{p}.perm"));
    let (_, qw) = ck.require(&qw_n, p)?;
    let (_, sc) = ck.require(&sc_n, p)?;
    expect(ck, qw, &[Dtype::I32], 2, "Marlin qweight")?;
    expect(ck, sc, &[Dtype::BF16, Dtype::F16], 2, "Marlin scales")?;
    if qw.shape[1] % 2 != 0 {
        return Err(terr(
            ck,
            &qw_n,
            format!("shape {:?}: the Marlin layout has an even number of columns (2N)", qw.shape),
        ));
    }
    let (k, n) = (qw.shape[0] * marlin::TILE_K, qw.shape[1] / 2);
    marlin::check_marlin_shape("marlin", k, n).map_err(|e| terr(ck, &qw_n, e))?;
    if sc.shape[1] != n {
        return Err(terr(
            ck,
            &sc_n,
            format!("shape {:?} does not have N = {n} columns (qweight is {:?})", sc.shape, qw.shape),
        ));
    }
    let shape = resolve_group(ck, &sc_n, k, n, sc.shape[0], Some(group))?;
    let mut inputs = vec![qw_n.clone(), sc_n.clone()];
    let (mut g_idx, mut perm) = (None, None);
    if let Some((_, pt)) = ck.get(&pm_n) {
        expect(ck, pt, &[Dtype::I32], 1, "Marlin perm")?;
        if pt.shape != [k] {
            return Err(terr(ck, &pm_n, format!("shape {:?} (expected [{k}])", pt.shape)));
        }
        let pv = read_i32(ck, &pm_n)?;
        marlin::check_perm("marlin", &pv, k).map_err(|e| terr(ck, &pm_n, e))?;
        let mut gi = vec![0i32; k];
        for (r, &src) in pv.iter().enumerate() {
            gi[src as usize] = (r / shape.group) as i32;
        }
        g_idx = Some(gi);
        perm = Some(pv);
        inputs.push(pm_n);
    }
    // Source tensors that repack kept unchanged.
    let extra: Vec<String> = PASSTHROUGH.iter().map(|s| format!("{p}.{s}")).filter(|n| ck.get(n).is_some()).collect();
    Ok(LinearMeta {
        prefix: p.to_string(),
        layout: Layout::Marlin,
        shape,
        scale_dtype: sc.dtype,
        g_idx,
        perm,
        in_bytes: bytes_of(ck, &inputs),
        inputs,
        extra,
        codes_tensor: qw_n,
        scales_tensor: sc_n,
    })
}

impl LinearMeta {
    /// Loads the codes and scales into compressed-tensors order.
    pub fn load(&self, ck: &Checkpoint) -> Result<QLinear> {
        let s = &self.shape;
        if !matches!(self.scale_dtype, Dtype::BF16 | Dtype::F16) {
            return Err(terr(ck, &self.scales_tensor, format!("{} scales are not supported here", self.scale_dtype)));
        }
        let words = read_i32(ck, &self.codes_tensor)?;
        let scales = read_u16(ck, &self.scales_tensor)?;
        let e = |x: Error| terr(ck, &self.codes_tensor, x);
        Ok(match self.layout {
            Layout::Ct => QLinear { packed: words, scales },
            Layout::Gptq => QLinear {
                packed: quant::gptq_to_ct(&words, s).map_err(e)?,
                scales: quant::transpose(&scales, s.groups_per_row(), s.n).map_err(e)?,
            },
            Layout::Marlin => {
                let packed = marlin::marlin_to_ct(&words, self.perm.as_deref(), s.k, s.n).map_err(e)?;
                let g = marlin::marlin_unpermute_scales(&scales, s.k, s.n, s.group).map_err(e)?;
                QLinear { packed, scales: quant::transpose(&g, s.groups_per_row(), s.n).map_err(e)? }
            }
        })
    }

    fn has_extra(&self, suffix: &str) -> bool {
        let name = format!("{}.{suffix}", self.prefix);
        self.extra.contains(&name)
    }

    /// The compressed-tensors tensors of this layer (`weight_shape` only when the input does not
    /// carry the source's own, which is then copied unchanged).
    pub fn ct_specs(&self) -> Vec<OutSpec> {
        let (p, s) = (&self.prefix, &self.shape);
        let mut v = vec![
            OutSpec { name: format!("{p}.weight_packed"), dtype: Dtype::I32, shape: vec![s.n, s.k / PACK] },
            OutSpec {
                name: format!("{p}.weight_scale"),
                dtype: self.scale_dtype,
                shape: vec![s.n, s.groups_per_row()],
            },
        ];
        if !self.has_extra("weight_shape") {
            v.push(OutSpec { name: format!("{p}.weight_shape"), dtype: Dtype::I32, shape: vec![2] });
        }
        if self.g_idx.is_some() {
            v.push(OutSpec { name: format!("{p}.weight_g_idx"), dtype: Dtype::I32, shape: vec![s.k] });
        }
        v
    }

    /// Encodes a loaded layer as compressed-tensors (the tensors of [`ct_specs`](Self::ct_specs)).
    pub fn ct_tensors(&self, q: &QLinear) -> super::source::Tensors {
        let (p, s) = (&self.prefix, &self.shape);
        let mut v =
            vec![(format!("{p}.weight_packed"), i32_le(&q.packed)), (format!("{p}.weight_scale"), u16_le(&q.scales))];
        if !self.has_extra("weight_shape") {
            v.push((format!("{p}.weight_shape"), i32_le(&[s.n as i32, s.k as i32])));
        }
        if let Some(g) = &self.g_idx {
            v.push((format!("{p}.weight_g_idx"), i32_le(g)));
        }
        v
    }

    /// The GPTQ tensors of this layer (`qzeros` only when the input does not carry the source's
    /// own; `v2` picks the zero-point convention then).
    pub fn gptq_specs(&self) -> Vec<OutSpec> {
        let (p, s) = (&self.prefix, &self.shape);
        let mut v = vec![
            OutSpec { name: format!("{p}.qweight"), dtype: Dtype::I32, shape: vec![s.k / PACK, s.n] },
            OutSpec { name: format!("{p}.scales"), dtype: self.scale_dtype, shape: vec![s.groups_per_row(), s.n] },
        ];
        if !self.has_extra("qzeros") {
            v.push(OutSpec {
                name: format!("{p}.qzeros"),
                dtype: Dtype::I32,
                shape: vec![s.groups_per_row(), s.n / PACK],
            });
        }
        if self.g_idx.is_some() {
            v.push(OutSpec { name: format!("{p}.g_idx"), dtype: Dtype::I32, shape: vec![s.k] });
        }
        v
    }

    /// Encodes a loaded layer as GPTQ (the tensors of [`gptq_specs`](Self::gptq_specs)).
    pub fn gptq_tensors(&self, ck: &Checkpoint, q: &QLinear, v2: bool) -> Result<super::source::Tensors> {
        let (p, s) = (&self.prefix, &self.shape);
        let e = |x: Error| terr(ck, &self.codes_tensor, x);
        let mut v = vec![
            (format!("{p}.qweight"), i32_le(&quant::ct_to_gptq(&q.packed, s).map_err(e)?)),
            (format!("{p}.scales"), u16_le(&quant::transpose(&q.scales, s.n, s.groups_per_row()).map_err(e)?)),
        ];
        if !self.has_extra("qzeros") {
            let z = if v2 { QZEROS_V2 } else { QZEROS_V1 };
            v.push((format!("{p}.qzeros"), i32_le(&vec![z; s.groups_per_row() * (s.n / PACK)])));
        }
        if let Some(g) = &self.g_idx {
            v.push((format!("{p}.g_idx"), i32_le(g)));
        }
        Ok(v)
    }

    /// Marlin needs 16-bit scales; an error explaining why otherwise.
    fn check_marlin_scales(&self, ck: &Checkpoint) -> Result<()> {
        if matches!(self.scale_dtype, Dtype::BF16 | Dtype::F16) {
            return Ok(());
        }
        Err(terr(
            ck,
            &self.scales_tensor,
            format!(
                "{} scales cannot be repacked: the Marlin kernel multiplies each code by a 16-bit scale in the \
                 activation dtype (BF16 or F16), and rounding these scales to 16 bits would change every \
                 dequantized weight. Quantize the original weights with `lowbit quantize` (BF16 scales), or \
                 convert the scales to BF16/F16 deliberately before repacking",
                self.scale_dtype
            ),
        ))
    }

    /// The Marlin tensors of this layer (checks the layout's shape limits).
    pub fn marlin_specs(&self, ck: &Checkpoint) -> Result<Vec<OutSpec>> {
        let (p, s) = (&self.prefix, &self.shape);
        self.check_marlin_scales(ck)?;
        marlin::check_marlin_shape("repack", s.k, s.n).map_err(|e| terr(ck, &self.codes_tensor, e))?;
        let mut v = vec![
            OutSpec { name: format!("{p}.qweight"), dtype: Dtype::I32, shape: vec![s.k / marlin::TILE_K, 2 * s.n] },
            OutSpec { name: format!("{p}.scales"), dtype: self.scale_dtype, shape: vec![s.groups_per_row(), s.n] },
        ];
        if self.perm.is_some() {
            v.push(OutSpec { name: format!("{p}.perm"), dtype: Dtype::I32, shape: vec![s.k] });
        }
        Ok(v)
    }

    /// The Marlin tensors of this layer, straight from the input bytes ([`fastrepack`]) when it
    /// has no act-order, else through [`load`](Self::load) and the reference.
    pub fn marlin_tensors_direct(&self, ck: &Checkpoint) -> Result<super::source::Tensors> {
        let from = match (self.layout, &self.perm) {
            (Layout::Ct, None) => Packed::Ct,
            (Layout::Gptq, None) => Packed::Gptq,
            _ => return self.marlin_tensors(ck, &self.load(ck)?),
        };
        self.check_marlin_scales(ck)?;
        let (p, s) = (&self.prefix, &self.shape);
        let e = |x: Error| terr(ck, &self.codes_tensor, x);
        let (f, t) = ck.get(&self.codes_tensor).ok_or_else(|| terr(ck, &self.codes_tensor, "missing"))?;
        let qw = fastrepack::to_marlin(f.bytes(t), from, s.k, s.n).map_err(e)?;
        let scales = read_u16(ck, &self.scales_tensor)?;
        let g = match from {
            Packed::Ct => quant::transpose(&scales, s.n, s.groups_per_row()).map_err(e)?,
            Packed::Gptq => scales,
        };
        let sc = marlin::marlin_permute_scales(&g, s.k, s.n, s.group).map_err(e)?;
        Ok(vec![(format!("{p}.qweight"), qw), (format!("{p}.scales"), u16_le(&sc))])
    }

    /// Restores a Marlin layer without act-order straight from its bytes: `Some` tensors in the
    /// `to` layout (as [`ct_tensors`](Self::ct_tensors) / [`gptq_tensors`](Self::gptq_tensors)),
    /// or `None` when the layer needs the general path.
    pub fn restore_direct(&self, ck: &Checkpoint, gptq: bool, v2: bool) -> Result<Option<super::source::Tensors>> {
        if self.layout != Layout::Marlin || self.perm.is_some() {
            return Ok(None);
        }
        let (p, s) = (&self.prefix, &self.shape);
        let e = |x: Error| terr(ck, &self.codes_tensor, x);
        let (f, t) = ck.get(&self.codes_tensor).ok_or_else(|| terr(ck, &self.codes_tensor, "missing"))?;
        let to = if gptq { Packed::Gptq } else { Packed::Ct };
        let codes = fastrepack::from_marlin(f.bytes(t), to, s.k, s.n).map_err(e)?;
        let scales = read_u16(ck, &self.scales_tensor)?;
        let g = marlin::marlin_unpermute_scales(&scales, s.k, s.n, s.group).map_err(e)?;
        let mut v = Vec::new();
        if gptq {
            v.push((format!("{p}.qweight"), codes));
            v.push((format!("{p}.scales"), u16_le(&g)));
            if !self.has_extra("qzeros") {
                let z = if v2 { QZEROS_V2 } else { QZEROS_V1 };
                v.push((format!("{p}.qzeros"), i32_le(&vec![z; s.groups_per_row() * (s.n / PACK)])));
            }
        } else {
            v.push((format!("{p}.weight_packed"), codes));
            v.push((format!("{p}.weight_scale"), u16_le(&quant::transpose(&g, s.groups_per_row(), s.n).map_err(e)?)));
            if !self.has_extra("weight_shape") {
                v.push((format!("{p}.weight_shape"), i32_le(&[s.n as i32, s.k as i32])));
            }
        }
        Ok(Some(v))
    }

    /// Encodes a loaded layer in the Marlin layout.
    pub fn marlin_tensors(&self, ck: &Checkpoint, q: &QLinear) -> Result<super::source::Tensors> {
        let (p, s) = (&self.prefix, &self.shape);
        let e = |x: Error| terr(ck, &self.codes_tensor, x);
        let qw = marlin::ct_marlin_repack(&q.packed, self.perm.as_deref(), s.k, s.n).map_err(e)?;
        let g = quant::transpose(&q.scales, s.n, s.groups_per_row()).map_err(e)?;
        let sc = marlin::marlin_permute_scales(&g, s.k, s.n, s.group).map_err(e)?;
        let mut v = vec![(format!("{p}.qweight"), i32_le(&qw)), (format!("{p}.scales"), u16_le(&sc))];
        if let Some(pm) = &self.perm {
            v.push((format!("{p}.perm"), i32_le(pm)));
        }
        Ok(v)
    }
}
