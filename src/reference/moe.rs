//! Mixture-of-experts math of DESIGN §4 on the CPU: top-k gating, `moe_align_block_size`, and the
//! MoE layer on dequantized weights, written plainly from the definitions.
//!
//! Ordering convention shared with the kernels: experts (and expert groups) are ranked by score
//! descending, ties going to the lower index; a NaN score ranks below every number (it is treated
//! as −∞). Top-k outputs list the chosen experts in rank order.

use std::collections::HashMap;

use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::format::{check_len, QuantShape};
use crate::moe::{align_capacity, validate_align_args, validate_expert_map, GroupedTopK};

/// The top-k routing of `tokens` tokens: `weights` f32 `[tokens, topk]`, `ids` i32 `[tokens, topk]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    pub weights: Vec<f32>,
    pub ids: Vec<i32>,
    pub tokens: usize,
    pub topk: usize,
}

/// The rank key of a score: NaN counts as −∞.
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Indices of the `k` best scores among `candidates` (score descending, lower index on ties).
fn best_k(scores: &[f32], candidates: impl Iterator<Item = usize>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    // A stable sort by descending key keeps lower indices first among equal keys.
    idx.sort_by(|&a, &b| key(scores[b]).total_cmp(&key(scores[a])));
    idx.truncate(k);
    idx
}

fn check_logits<L: Float>(op: &'static str, logits: &[L], tokens: usize, experts: usize, topk: usize) -> Result<()> {
    crate::moe::validate_gating_dims(op, tokens, experts, topk)?;
    check_len(op, "logits", logits.len(), tokens * experts)
}

/// Softmax top-k: `p = softmax(logits[t, :])` (computed in f64), the `topk` largest probabilities
/// and their experts; with `renormalize`, the chosen weights are divided by their sum.
pub fn softmax_topk<L: Float>(
    logits: &[L],
    tokens: usize,
    experts: usize,
    topk: usize,
    renormalize: bool,
) -> Result<TopK> {
    check_logits("softmax_topk", logits, tokens, experts, topk)?;
    let mut out =
        TopK { weights: Vec::with_capacity(tokens * topk), ids: Vec::with_capacity(tokens * topk), tokens, topk };
    for t in 0..tokens {
        let row: Vec<f32> = logits[t * experts..(t + 1) * experts].iter().map(|l| l.to_f32()).collect();
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(key(x) as f64));
        let denom: f64 = row.iter().map(|&x| (key(x) as f64 - max).exp()).sum();
        let chosen = best_k(&row, 0..experts, topk);
        let p: Vec<f64> = chosen.iter().map(|&e| (key(row[e]) as f64 - max).exp()).collect();
        let norm = if renormalize { p.iter().sum::<f64>() } else { denom };
        for (&e, &pe) in chosen.iter().zip(&p) {
            out.ids.push(e as i32);
            out.weights.push((pe / norm) as f32);
        }
    }
    Ok(out)
}

/// The logistic function in f32, `1 / (1 + exp(−x))`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// DeepSeek-V3 / Kimi-K2 routing (`noaux_tc`): `s = sigmoid(logits)` (f32); the selection score is
/// `s + bias` (bias zero when absent); each of the `n_group` consecutive expert groups scores the
/// sum of its two best selection scores (its only score when a group has one expert); the
/// `topk_group` best groups stay eligible; the `topk` best eligible experts are chosen. Their
/// weights are the unbiased `s`, divided by `sum + 1e-20` with `renormalize`, times
/// `routed_scaling_factor`.
pub fn grouped_topk<L: Float>(
    logits: &[L],
    tokens: usize,
    experts: usize,
    bias: Option<&[f32]>,
    cfg: &GroupedTopK,
) -> Result<TopK> {
    const OP: &str = "grouped_topk";
    check_logits(OP, logits, tokens, experts, cfg.topk)?;
    cfg.validate(OP, experts)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), experts)?;
    }
    let group_size = experts / cfg.n_group;
    let topk = cfg.topk;
    let mut out =
        TopK { weights: Vec::with_capacity(tokens * topk), ids: Vec::with_capacity(tokens * topk), tokens, topk };
    for t in 0..tokens {
        let s: Vec<f32> = logits[t * experts..(t + 1) * experts].iter().map(|l| sigmoid(l.to_f32())).collect();
        let sel: Vec<f32> = (0..experts).map(|e| s[e] + bias.map_or(0.0, |b| b[e])).collect();
        let groups: Vec<usize> = if cfg.topk_group >= cfg.n_group {
            (0..cfg.n_group).collect()
        } else {
            let group_scores: Vec<f32> = (0..cfg.n_group)
                .map(|g| {
                    let members = &sel[g * group_size..(g + 1) * group_size];
                    let two = best_k(members, 0..group_size, 2);
                    match two.as_slice() {
                        [a, b] => key(members[*a]) + key(members[*b]),
                        [a] => key(members[*a]),
                        _ => f32::NEG_INFINITY,
                    }
                })
                .collect();
            best_k(&group_scores, 0..cfg.n_group, cfg.topk_group)
        };
        let eligible = groups.iter().flat_map(|&g| g * group_size..(g + 1) * group_size);
        let mut eligible: Vec<usize> = eligible.collect();
        eligible.sort_unstable();
        let chosen = best_k(&sel, eligible.into_iter(), topk);
        let w: Vec<f32> = chosen.iter().map(|&e| s[e]).collect();
        let denom = if cfg.renormalize { w.iter().fold(0.0f32, |a, &v| a + v) + 1e-20 } else { 1.0 };
        for (&e, &we) in chosen.iter().zip(&w) {
            out.ids.push(e as i32);
            out.weights.push(we / denom * cfg.routed_scaling_factor);
        }
    }
    Ok(out)
}

/// The result of `moe_align_block_size`: per-expert slot lists padded to the block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// `[capacity]`: slot indices `t·topk + k`, grouped by expert (ascending expert id, and
    /// ascending slot index within an expert); padding holds the sentinel `tokens·topk`.
    pub sorted_token_ids: Vec<i32>,
    /// `[capacity / block_size]`: the (local) expert of each block; −1 for blocks past
    /// `num_tokens_post_padded` and for experts that are not local under the expert map.
    pub expert_ids: Vec<i32>,
    /// Σ over experts of the expert's slot count rounded up to the block size.
    pub num_tokens_post_padded: usize,
    pub block_size: usize,
}

/// `moe_align_block_size` from its definition. `topk_ids` `[tokens, topk]` holds global expert
/// ids in `[0, num_experts)`; `expert_map` (`[num_experts]`, global → local or −1) relabels blocks.
pub fn moe_align_block_size(
    topk_ids: &[i32],
    tokens: usize,
    topk: usize,
    num_experts: usize,
    block_size: usize,
    expert_map: Option<&[i32]>,
) -> Result<Alignment> {
    const OP: &str = "moe_align_block_size";
    validate_align_args(OP, tokens, topk, num_experts, block_size)?;
    check_len(OP, "topk_ids", topk_ids.len(), tokens * topk)?;
    if let Some(map) = expert_map {
        validate_expert_map(OP, map, num_experts, None)?;
    }
    let slots = tokens * topk;
    let mut lists: Vec<Vec<i32>> = vec![Vec::new(); num_experts];
    for (slot, &e) in topk_ids.iter().enumerate() {
        if e < 0 || e as usize >= num_experts {
            return Err(Error::invalid(
                OP,
                format!("expert id {e} at token {}, k {} is outside [0, {num_experts})", slot / topk, slot % topk),
            ));
        }
        lists[e as usize].push(slot as i32);
    }
    let capacity = align_capacity(slots, num_experts, block_size);
    let mut sorted = Vec::with_capacity(capacity);
    let mut expert_ids = Vec::with_capacity(capacity / block_size);
    for (e, list) in lists.iter().enumerate() {
        let padded = list.len().div_ceil(block_size) * block_size;
        sorted.extend_from_slice(list);
        sorted.resize(sorted.len() + padded - list.len(), slots as i32);
        let label = expert_map.map_or(e as i32, |m| m[e]);
        expert_ids.resize(expert_ids.len() + padded / block_size, label);
    }
    let num_tokens_post_padded = sorted.len();
    sorted.resize(capacity, slots as i32);
    expert_ids.resize(capacity / block_size, -1);
    Ok(Alignment { sorted_token_ids: sorted, expert_ids, num_tokens_post_padded, block_size })
}

/// Dimensions of one MoE layer: `x [tokens, hidden]`; per (local) expert `w13 [2·inter, hidden]`
/// (gate = rows `0..inter`, up = rows `inter..2·inter`) and `w2 [hidden, inter]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeDims {
    pub tokens: usize,
    pub hidden: usize,
    pub inter: usize,
    /// Experts whose weights are present (local experts under an expert map).
    pub experts: usize,
    pub topk: usize,
}

/// `silu(x) = x · sigmoid(x)` in f64.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Maps a routed (global) id to the local expert whose weights compute it, or `None` when the
/// expert is not local.
fn local_expert(op: &'static str, id: i32, dims: &MoeDims, expert_map: Option<&[i32]>) -> Result<Option<usize>> {
    let global = expert_map.map_or(dims.experts, <[i32]>::len);
    if id < 0 || id as usize >= global {
        return Err(Error::invalid(op, format!("expert id {id} is outside [0, {global})")));
    }
    Ok(match expert_map {
        None => Some(id as usize),
        Some(m) => (m[id as usize] >= 0).then_some(m[id as usize] as usize),
    })
}

/// Shared validation of the routing tensors of the MoE references.
fn check_moe(
    op: &'static str,
    x_len: usize,
    dims: &MoeDims,
    topk_w: &[f32],
    topk_ids: &[i32],
    expert_map: Option<&[i32]>,
) -> Result<()> {
    if dims.tokens == 0 || dims.hidden == 0 || dims.inter == 0 || dims.experts == 0 || dims.topk == 0 {
        return Err(Error::shape(op, format!("every dimension must be positive: {dims:?}")));
    }
    check_len(op, "x", x_len, dims.tokens * dims.hidden)?;
    check_len(op, "topk_weights", topk_w.len(), dims.tokens * dims.topk)?;
    check_len(op, "topk_ids", topk_ids.len(), dims.tokens * dims.topk)?;
    if let Some(map) = expert_map {
        validate_expert_map(op, map, map.len(), Some(dims.experts))?;
    }
    Ok(())
}

/// The MoE layer on one token with an expert-weight lookup, accumulated in f64:
/// `out = Σ_k w_k · W2_e · (silu(W1_e x) ⊙ W3_e x)`.
fn moe_token<'w>(
    x: &[f32],
    dims: &MoeDims,
    routes: &[(f32, Option<usize>)],
    weights: &dyn Fn(usize) -> (&'w [f32], &'w [f32]),
) -> Vec<f32> {
    let (h, i_dim) = (dims.hidden, dims.inter);
    let mut acc = vec![0f64; h];
    let mut act = vec![0f64; i_dim];
    for &(w, e) in routes {
        let Some(e) = e else { continue };
        let (w13, w2) = weights(e);
        for (i, a) in act.iter_mut().enumerate() {
            let dot = |row: &[f32]| row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
            let gate = dot(&w13[i * h..(i + 1) * h]);
            let up = dot(&w13[(i_dim + i) * h..(i_dim + i + 1) * h]);
            *a = silu(gate) * up;
        }
        for (n, o) in acc.iter_mut().enumerate() {
            let row = &w2[n * i_dim..(n + 1) * i_dim];
            *o += w as f64 * row.iter().zip(&act).map(|(&a, &b)| a as f64 * b).sum::<f64>();
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// The MoE layer on dequantized f32 weights: `w13_deq [experts, 2·inter, hidden]`,
/// `w2_deq [experts, hidden, inter]`; `topk_ids` are global ids, mapped through `expert_map`
/// (`[global experts]`, −1 = not local: contributes zero) when given. Returns `[tokens, hidden]`.
#[allow(clippy::too_many_arguments)]
pub fn moe_ref(
    x: &[f32],
    dims: &MoeDims,
    w13_deq: &[f32],
    w2_deq: &[f32],
    topk_w: &[f32],
    topk_ids: &[i32],
    expert_map: Option<&[i32]>,
) -> Result<Vec<f32>> {
    const OP: &str = "moe_ref";
    check_moe(OP, x.len(), dims, topk_w, topk_ids, expert_map)?;
    let (h, i_dim) = (dims.hidden, dims.inter);
    check_len(OP, "w13", w13_deq.len(), dims.experts * 2 * i_dim * h)?;
    check_len(OP, "w2", w2_deq.len(), dims.experts * h * i_dim)?;
    let lookup =
        |e: usize| (&w13_deq[e * 2 * i_dim * h..(e + 1) * 2 * i_dim * h], &w2_deq[e * h * i_dim..(e + 1) * h * i_dim]);
    moe_rows(OP, x, dims, topk_w, topk_ids, expert_map, &lookup)
}

#[allow(clippy::too_many_arguments)]
fn moe_rows<'w>(
    op: &'static str,
    x: &[f32],
    dims: &MoeDims,
    topk_w: &[f32],
    topk_ids: &[i32],
    expert_map: Option<&[i32]>,
    lookup: &dyn Fn(usize) -> (&'w [f32], &'w [f32]),
) -> Result<Vec<f32>> {
    let (h, k) = (dims.hidden, dims.topk);
    let mut out = Vec::with_capacity(dims.tokens * h);
    for t in 0..dims.tokens {
        let routes = (0..k)
            .map(|j| Ok((topk_w[t * k + j], local_expert(op, topk_ids[t * k + j], dims, expert_map)?)))
            .collect::<Result<Vec<_>>>()?;
        out.extend(moe_token(&x[t * h..(t + 1) * h], dims, &routes, lookup));
    }
    Ok(out)
}

/// Stacked compressed-tensors `pack-quantized` weights of `num_experts` experts that share one
/// per-expert shape: `packed [E, N, K/8]`, `scales [E, N, K/g]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedExperts<S> {
    pub packed: Vec<i32>,
    pub scales: Vec<S>,
    pub shape: QuantShape,
    pub num_experts: usize,
}

impl<S: ScaleFloat> PackedExperts<S> {
    /// Quantizes stacked weights `w [E, N, K]` expert by expert with [`crate::reference::quant`].
    pub fn quantize<T: Float>(w: &[T], shape: &QuantShape, num_experts: usize) -> Result<Self> {
        check_len("PackedExperts::quantize", "weights", w.len(), num_experts * shape.numel())?;
        let mut packed = Vec::with_capacity(num_experts * shape.packed_len());
        let mut scales = Vec::with_capacity(num_experts * shape.scales_len());
        for e in 0..num_experts {
            let (p, s) =
                crate::reference::quant::quantize_pack::<T, S>(&w[e * shape.numel()..(e + 1) * shape.numel()], shape)?;
            packed.extend(p);
            scales.extend(s);
        }
        Ok(PackedExperts { packed, scales, shape: *shape, num_experts })
    }

    /// The dequantized weights `T(q · s)` of expert `e`, `[N, K]`.
    pub fn dequantize<T: Float>(&self, e: usize) -> Result<Vec<T>> {
        const OP: &str = "PackedExperts::dequantize";
        if e >= self.num_experts {
            return Err(Error::invalid(OP, format!("expert {e} of {}", self.num_experts)));
        }
        check_len(OP, "packed", self.packed.len(), self.num_experts * self.shape.packed_len())?;
        check_len(OP, "scales", self.scales.len(), self.num_experts * self.shape.scales_len())?;
        let (pl, sl) = (self.shape.packed_len(), self.shape.scales_len());
        crate::reference::quant::dequantize::<T, S>(
            &self.packed[e * pl..(e + 1) * pl],
            &self.scales[e * sl..(e + 1) * sl],
            &self.shape,
        )
    }
}

/// The rollout MoE from compressed-tensors weights: every routed expert is dequantized to the
/// activation dtype `T` exactly as the kernels see it (`T(q · s)`), then [`moe_ref`]'s math runs
/// on `x` (also `T`). Only the experts that are routed to are dequantized, so large expert counts
/// stay cheap. `w13`: per expert `[2·inter, hidden]`; `w2`: `[hidden, inter]`.
pub fn fused_moe_ref<T: Float, S: ScaleFloat>(
    x: &[T],
    dims: &MoeDims,
    w13: &PackedExperts<S>,
    w2: &PackedExperts<S>,
    topk_w: &[f32],
    topk_ids: &[i32],
    expert_map: Option<&[i32]>,
) -> Result<Vec<f32>> {
    const OP: &str = "fused_moe_ref";
    check_moe(OP, x.len(), dims, topk_w, topk_ids, expert_map)?;
    let want13 = (2 * dims.inter, dims.hidden);
    let want2 = (dims.hidden, dims.inter);
    if (w13.shape.n, w13.shape.k) != want13 || (w2.shape.n, w2.shape.k) != want2 {
        return Err(Error::shape(
            OP,
            format!(
                "w13 is [{}, {}] and w2 [{}, {}] per expert; expected {want13:?} and {want2:?}",
                w13.shape.n, w13.shape.k, w2.shape.n, w2.shape.k
            ),
        ));
    }
    if w13.num_experts != dims.experts || w2.num_experts != dims.experts {
        return Err(Error::shape(
            OP,
            format!("w13 has {} experts, w2 {}, dims say {}", w13.num_experts, w2.num_experts, dims.experts),
        ));
    }
    let mut cache: HashMap<usize, (Vec<f32>, Vec<f32>)> = HashMap::new();
    for &id in topk_ids {
        if let Some(e) = local_expert(OP, id, dims, expert_map)? {
            if let std::collections::hash_map::Entry::Vacant(v) = cache.entry(e) {
                let a: Vec<f32> = w13.dequantize::<T>(e)?.iter().map(|v| v.to_f32()).collect();
                let b: Vec<f32> = w2.dequantize::<T>(e)?.iter().map(|v| v.to_f32()).collect();
                v.insert((a, b));
            }
        }
    }
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let lookup = |e: usize| {
        let (a, b) = &cache[&e];
        (a.as_slice(), b.as_slice())
    };
    moe_rows(OP, &xf, dims, topk_w, topk_ids, expert_map, &lookup)
}
