//! Checkpoints on the CPU: round trips on small synthetic models (bf16 → quantize → inspect →
//! repack → restore gives back the same bytes), ignore patterns, sharded and single-file inputs,
//! GPTQ inputs with and without act-order, every bad-input case, and a deterministic fuzz loop
//! over corrupted headers and truncated files.

mod ckpt_util;

use std::collections::BTreeMap;
use std::path::Path;

use ckpt_util::*;
use lowbit::checkpoint::{self, stfile, DeviceChoice, Format, QuantizeOptions};
use lowbit::reference::{marlin, quant, rng::Rng};
use lowbit::{bf16, f16, GroupSize, QuantShape};
use safetensors::Dtype as D;

fn cpu_opts(g: GroupSize) -> QuantizeOptions {
    QuantizeOptions { group_size: g, device: DeviceChoice::Cpu, ..Default::default() }
}

/// Checks every quantized layer of `out` against the reference quantizer applied to `input`.
fn check_quantized_against_reference(input: &Path, out: &Path, g: GroupSize, layers: &[&str]) {
    let src = load_all(input);
    let dst = load_all(out);
    for &l in layers {
        let (_, shape, bytes) = &src[&format!("{l}.weight")];
        let w: Vec<bf16> = bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect();
        let qs = QuantShape::new(shape[0], shape[1], g).unwrap();
        let (packed, scales) = quant::quantize_pack::<bf16, bf16>(&w, &qs).unwrap();
        assert_eq!(dst[&format!("{l}.weight_packed")].2, i32_bytes(&packed), "{l}: weight_packed");
        let sb: Vec<u8> = scales.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect();
        assert_eq!(dst[&format!("{l}.weight_scale")].2, sb, "{l}: weight_scale");
        assert_eq!(dst[&format!("{l}.weight_shape")].2, i32_bytes(&[shape[0] as i32, shape[1] as i32]));
        assert!(!dst.contains_key(&format!("{l}.weight")), "{l}: the bf16 weight must be gone");
    }
}

fn round_trip(g: GroupSize, sharded: bool) {
    let tmp = TempDir::new("roundtrip");
    let input = tmp.path().join("in");
    make_model(&input, sharded);
    let q = tmp.path().join("q");
    let rep = checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(g)).unwrap();
    assert_eq!(rep.device, "cpu");
    let mut quantized = rep.quantized.clone();
    quantized.sort();
    assert_eq!(quantized, QUANTIZED_LAYERS.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    check_quantized_against_reference(&input, &q, g, QUANTIZED_LAYERS);
    // Plain tensors are copied byte for byte.
    let (src, dst) = (load_all(&input), load_all(&q));
    for (name, t) in &src {
        if !QUANTIZED_LAYERS.iter().any(|l| name == &format!("{l}.weight")) {
            assert_eq!(&dst[name], t, "{name} must be copied unchanged");
        }
    }
    assert_eq!(rep.skipped.len(), 1, "{:?}", rep.skipped);
    assert_eq!(rep.skipped[0].name, "model.layers.0.mlp.odd.weight");
    // config.json: the input's fields plus quantization_config; other files copied.
    let cfg = read_json(&q.join("config.json"));
    assert_eq!(cfg["hidden_size"], 128);
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "pack-quantized");
    let w = &qc["config_groups"]["group_0"]["weights"];
    assert_eq!(w["num_bits"], 4);
    assert_eq!(w["symmetric"], true);
    match g {
        GroupSize::Group(gs) => {
            assert_eq!(w["strategy"], "group");
            assert_eq!(w["group_size"], gs);
        }
        GroupSize::Channelwise => assert_eq!(w["strategy"], "channel"),
    }
    assert!(qc["ignore"].as_array().unwrap().iter().any(|p| p == "lm_head"));
    assert_eq!(std::fs::read(q.join("tokenizer.json")).unwrap(), std::fs::read(input.join("tokenizer.json")).unwrap());
    assert_eq!(q.join("model.safetensors.index.json").exists(), sharded);
    assert_no_partials(tmp.path());

    // inspect
    let ins = checkpoint::inspect(&q).unwrap();
    assert_eq!(ins.format, Format::CompressedTensors);
    assert_eq!(ins.group_size, Some(g.to_checkpoint()));
    assert_eq!(ins.quantized.len(), QUANTIZED_LAYERS.len());
    assert_eq!(ins.levels[0], 0, "the code -8 is never written");
    let total: u64 = ins.levels.iter().sum();
    let expect: u64 = ins.quantized.iter().map(|l| (l.n * l.k) as u64).sum();
    assert_eq!(total, expect);
    assert!(ins.quantized.iter().all(|l| l.levels_used >= 14), "random normal weights use (almost) every level");
    assert_eq!(ins.scales.invalid, 0);
    assert!(ins.plain.iter().any(|t| t.name == "lm_head.weight"));
    let json = serde_json::to_value(&ins).unwrap();
    assert_eq!(json["format"], "compressed-tensors");

    // repack → Marlin, checked against the Marlin reference.
    let m = tmp.path().join("m");
    let rep = checkpoint::repack_checkpoint(&q, &m).unwrap();
    assert_eq!(rep.quantized.len(), QUANTIZED_LAYERS.len());
    let (qt, mt) = (load_all(&q), load_all(&m));
    for l in QUANTIZED_LAYERS {
        let shape = &qt[&format!("{l}.weight_scale")].1;
        let (n, k) = (shape[0], from_i32(&qt[&format!("{l}.weight_shape")].2)[1] as usize);
        let packed = from_i32(&qt[&format!("{l}.weight_packed")].2);
        let want = marlin::ct_marlin_repack(&packed, None, k, n).unwrap();
        assert_eq!(mt[&format!("{l}.qweight")].2, i32_bytes(&want), "{l}: Marlin qweight");
        assert_eq!(mt[&format!("{l}.qweight")].1, vec![k / 16, 2 * n]);
        let scales = from_u16(&qt[&format!("{l}.weight_scale")].2);
        let gsz = k / shape[1];
        let t = quant::transpose(&scales, n, shape[1]).unwrap();
        let want = marlin::marlin_permute_scales(&t, k, n, gsz).unwrap();
        assert_eq!(mt[&format!("{l}.scales")].2, u16_bytes(&want), "{l}: Marlin scales");
        assert!(!mt.contains_key(&format!("{l}.perm")));
    }
    let md = file_metadata(&m);
    assert!(md.values().all(|m| m.get("format").map(String::as_str) == Some("marlin")));
    assert!(md.values().all(|m| m.get("group_size") == Some(&g.to_checkpoint().to_string())));
    assert!(md.values().all(|m| m.get("source").map(String::as_str) == Some("compressed-tensors")));
    let mi = checkpoint::inspect(&m).unwrap();
    assert_eq!(mi.format, Format::Marlin);
    assert_eq!(mi.levels, ins.levels, "the histogram does not depend on the layout");
    assert_eq!(mi.scales, ins.scales);

    // restore → the same bytes as the quantized checkpoint, file for file.
    let r = tmp.path().join("r");
    checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_same_tree(&q, &r);
    assert_no_partials(tmp.path());
}

#[test]
fn round_trip_group32() {
    round_trip(GroupSize::Group(32), false);
}

#[test]
fn round_trip_group128_sharded() {
    round_trip(GroupSize::Group(128), true);
}

#[test]
fn round_trip_channelwise_sharded() {
    round_trip(GroupSize::Channelwise, true);
}

#[test]
fn round_trip_group64() {
    round_trip(GroupSize::Group(64), false);
}

#[test]
fn sharded_output_index_is_consistent() {
    let tmp = TempDir::new("sharded");
    let input = tmp.path().join("in");
    make_model(&input, true);
    let q = tmp.path().join("q");
    checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(GroupSize::Group(32))).unwrap();
    let idx = read_json(&q.join("model.safetensors.index.json"));
    let map = idx["weight_map"].as_object().unwrap();
    let mut total = 0u64;
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let bytes = std::fs::read(q.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("the official parser reads our output");
        for (name, view) in st.tensors() {
            assert_eq!(map[&name], f, "{name}");
            total += view.data().len() as u64;
        }
    }
    assert_eq!(map.len(), load_all(&q).len());
    assert_eq!(idx["metadata"]["total_size"], total);
    // Layer 1 lives in the second shard of the input, so its quantized tensors do too.
    assert_eq!(map["model.layers.1.mlp.down_proj.weight_packed"], "model-00002-of-00002.safetensors");
}

#[test]
fn single_file_input() {
    let tmp = TempDir::new("single");
    let input = tmp.path().join("in");
    make_model(&input, false);
    let q = tmp.path().join("q");
    checkpoint::quantize_checkpoint(input.join("model.safetensors"), &q, &cpu_opts(GroupSize::Group(64))).unwrap();
    assert!(q.join("model.safetensors").is_file());
    let cfg = read_json(&q.join("config.json"));
    assert!(cfg.get("hidden_size").is_none(), "no input config to copy from");
    assert_eq!(cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"], 64);
    check_quantized_against_reference(&input, &q, GroupSize::Group(64), QUANTIZED_LAYERS);
    // A single quantized file (no config at all) is recognised from its tensors.
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(q.join("model.safetensors"), &m).unwrap();
    assert_eq!(checkpoint::inspect(&m).unwrap().format, Format::Marlin);
}

#[test]
fn ignore_patterns_are_honoured() {
    let tmp = TempDir::new("ignore");
    let input = tmp.path().join("in");
    make_model(&input, false);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions {
        ignore: vec!["re:.*self_attn.*".into(), "model.layers.1.mlp.down_proj".into()],
        ..cpu_opts(GroupSize::Group(32))
    };
    let rep = checkpoint::quantize_checkpoint(&input, &q, &opts).unwrap();
    let t = load_all(&q);
    for l in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"] {
        assert!(t.contains_key(&format!("{l}.weight")), "{l} must stay bf16");
        assert!(!t.contains_key(&format!("{l}.weight_packed")));
        assert!(rep.ignored.contains(&format!("{l}.weight")));
    }
    assert!(t.contains_key("model.layers.0.mlp.down_proj.weight_packed"));
    let ignore = read_json(&q.join("config.json"))["quantization_config"]["ignore"].clone();
    let ignore: Vec<String> = serde_json::from_value(ignore).unwrap();
    assert!(ignore.contains(&"re:.*self_attn.*".to_string()));
    assert!(ignore.contains(&"model.layers.1.mlp.down_proj".to_string()));
    assert!(ignore.contains(&"model.layers.0.mlp.odd".to_string()), "shape-skipped layers are listed: {ignore:?}");

    // Without the defaults, lm_head and the router are quantized too (embeddings are 2-D as well).
    let q2 = tmp.path().join("q2");
    let opts =
        QuantizeOptions { default_ignore: false, ignore: vec!["re:.*embed".into()], ..cpu_opts(GroupSize::Group(32)) };
    let rep = checkpoint::quantize_checkpoint(&input, &q2, &opts).unwrap();
    assert!(rep.quantized.contains(&"lm_head".to_string()));
    assert!(rep.quantized.contains(&"model.layers.0.mlp.gate".to_string()));
    assert!(!rep.quantized.contains(&"model.embed_tokens".to_string()));
    // Bad regular expression.
    let opts = QuantizeOptions { ignore: vec!["re:(".into()], ..cpu_opts(GroupSize::Group(32)) };
    let e = checkpoint::quantize_checkpoint(&input, tmp.path().join("q3"), &opts).unwrap_err().to_string();
    assert!(e.contains("re:("), "{e}");
    assert!(!tmp.path().join("q3").exists());
}

#[test]
fn f16_and_f32_inputs() {
    let tmp = TempDir::new("dtypes");
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut rng = Rng::new(5);
    let w16: Vec<f16> = rng.normal_vec(64 * 128, 0.02);
    let w32: Vec<f32> = rng.normal_vec(64 * 128, 0.02);
    write_st(
        &input.join("model.safetensors"),
        vec![
            ("a.weight".into(), D::F16, vec![64, 128], w16.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
            ("b.weight".into(), D::F32, vec![64, 128], w32.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ],
        None,
    );
    let q = tmp.path().join("q");
    checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(GroupSize::Group(32))).unwrap();
    let t = load_all(&q);
    let shape = QuantShape::new(64, 128, GroupSize::Group(32)).unwrap();
    let (pa, sa) = quant::quantize_pack::<f16, f16>(&w16, &shape).unwrap();
    assert_eq!(t["a.weight_packed"].2, i32_bytes(&pa));
    assert_eq!(t["a.weight_scale"].0, D::F16, "f16 weights get f16 scales");
    assert_eq!(t["a.weight_scale"].2, u16_bytes(&sa.iter().map(|s| s.to_bits()).collect::<Vec<_>>()));
    let (pb, sb) = quant::quantize_pack::<f32, bf16>(&w32, &shape).unwrap();
    assert_eq!(t["b.weight_packed"].2, i32_bytes(&pb));
    assert_eq!(t["b.weight_scale"].0, D::BF16);
    assert_eq!(t["b.weight_scale"].2, u16_bytes(&sb.iter().map(|s| s.to_bits()).collect::<Vec<_>>()));
}

/// One GPTQ layer: qweight, scales bits, act-order g_idx.
type GptqLayer = (Vec<i32>, Vec<u16>, Option<Vec<i32>>);

/// A GPTQ checkpoint made from random codes: returns its layers by name.
fn make_gptq(dir: &Path, act_order: bool, v2: bool, g: usize) -> BTreeMap<String, GptqLayer> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(if act_order { 11 } else { 12 });
    let mut tensors = Vec::new();
    let mut layers = BTreeMap::new();
    for (name, n, k) in
        [("model.layers.0.mlp.up_proj", 128usize, 256usize), ("model.layers.0.self_attn.o_proj", 64, 128)]
    {
        let codes: Vec<i32> = (0..k / 8 * n)
            .map(|_| {
                let mut w = 0u32;
                for t in 0..8 {
                    w |= (1 + rng.below(15) as u32) << (4 * t);
                }
                w as i32
            })
            .collect();
        let scales: Vec<u16> = (0..k / g * n).map(|_| f16::from_f32(rng.range(1e-3, 2e-2)).to_bits()).collect();
        let zero = if v2 { 0x8888_8888u32 as i32 } else { 0x7777_7777 };
        tensors.push((format!("{name}.qweight"), D::I32, vec![k / 8, n], i32_bytes(&codes)));
        tensors.push((format!("{name}.scales"), D::F16, vec![k / g, n], u16_bytes(&scales)));
        tensors.push((format!("{name}.qzeros"), D::I32, vec![k / g, n / 8], i32_bytes(&vec![zero; k / g * n / 8])));
        tensors.push((format!("{name}.bias"), D::F16, vec![n], vec![0u8; 2 * n]));
        let g_idx: Vec<i32> = if act_order {
            // GPTQ desc_act: rows visited in a random order, group = position in that order / g.
            let mut order: Vec<usize> = (0..k).collect();
            for i in (1..k).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let mut gi = vec![0i32; k];
            for (pos, &row) in order.iter().enumerate() {
                gi[row] = (pos / g) as i32;
            }
            gi
        } else {
            (0..k).map(|r| (r / g) as i32).collect()
        };
        tensors.push((format!("{name}.g_idx"), D::I32, vec![k], i32_bytes(&g_idx)));
        layers.insert(name.to_string(), (codes, scales, act_order.then_some(g_idx)));
    }
    tensors.push(("model.norm.weight".into(), D::F16, vec![64], vec![0u8; 128]));
    write_st(&dir.join("model.safetensors"), tensors, Some([("format".to_string(), "pt".to_string())].into()));
    let qc = gptqmodel7_config(g as i64, act_order, v2);
    write_json(&dir.join("config.json"), &serde_json::json!({ "model_type": "llama", "quantization_config": qc }));
    // GPTQModel also writes the same config alone.
    write_json(&dir.join("quantize_config.json"), &qc);
    layers
}

fn gptq_case(act_order: bool, v2: bool) {
    let tmp = TempDir::new("gptq");
    let input = tmp.path().join("in");
    let g = 32;
    let layers = make_gptq(&input, act_order, v2, g);
    let ins = checkpoint::inspect(&input).unwrap();
    assert_eq!(ins.format, Format::Gptq);
    assert_eq!(ins.quantized.iter().filter(|l| l.act_order).count(), if act_order { 2 } else { 0 });
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(&input, &m).unwrap();
    let mt = load_all(&m);
    for (name, (qweight, scales, g_idx)) in &layers {
        let (k, n) = (qweight.len() * 8 / mt[&format!("{name}.scales")].1[1], mt[&format!("{name}.scales")].1[1]);
        let perm = g_idx.as_ref().map(|gi| marlin::act_order_perm(gi, k, g).unwrap());
        let want = marlin::gptq_marlin_repack(qweight, perm.as_deref(), k, n).unwrap();
        assert_eq!(mt[&format!("{name}.qweight")].2, i32_bytes(&want), "{name}: Marlin qweight");
        let want = marlin::marlin_permute_scales(scales, k, n, g).unwrap();
        assert_eq!(mt[&format!("{name}.scales")].2, u16_bytes(&want), "{name}: Marlin scales");
        assert_eq!(mt[&format!("{name}.scales")].0, D::F16);
        match &perm {
            Some(p) => assert_eq!(mt[&format!("{name}.perm")].2, i32_bytes(p)),
            None => assert!(!mt.contains_key(&format!("{name}.perm"))),
        }
        // qzeros and a trivial g_idx are kept unchanged beside the Marlin tensors; an act-order
        // g_idx became `perm`.
        assert_eq!(mt.contains_key(&format!("{name}.g_idx")), g_idx.is_none());
        assert!(mt.contains_key(&format!("{name}.qzeros")));
        assert!(mt.contains_key(&format!("{name}.bias")));
    }
    let cfg = read_json(&m.join("config.json"));
    assert_eq!(cfg["quantization_config"]["desc_act"], act_order);
    assert_eq!(cfg["quantization_config"]["source"], "gptq");
    assert_eq!(cfg["quantization_config"]["source_quantization_config"]["method"], "gptq");
    // restore → GPTQ again, byte for byte (act-order included: lossless, and what GPTQ readers load).
    let r = tmp.path().join("r");
    let rep = checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_eq!(rep.output_format, Some(Format::Gptq));
    assert_same_tree(&input, &r);
    // ... which repacks to exactly the same Marlin tensors.
    let m2 = tmp.path().join("m2");
    checkpoint::repack_checkpoint(&r, &m2).unwrap();
    assert_eq!(load_all(&m2), mt);
    let _ = layers;
}

#[test]
fn gptq_v1_without_act_order() {
    gptq_case(false, false);
}

#[test]
fn gptq_v1_with_act_order() {
    gptq_case(true, false);
}

#[test]
fn gptq_v2_with_act_order() {
    gptq_case(true, true);
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear error naming the tensor, and nothing left behind.

/// Runs `f` (which must fail) and checks the message contains every needle and no output exists.
fn expect_err(tmp: &TempDir, out: &Path, r: lowbit::Result<impl std::fmt::Debug>, needles: &[&str]) -> String {
    let e = match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(e.contains(n), "error `{e}` should mention `{n}`");
    }
    eprintln!("expected error: {e}");
    assert!(!out.exists(), "{} must not exist after a failed run", out.display());
    assert_no_partials(tmp.path());
    e
}

/// A quantized compressed-tensors checkpoint to corrupt.
fn quantized_fixture(tmp: &TempDir) -> std::path::PathBuf {
    let input = tmp.path().join("in");
    make_model(&input, false);
    let q = tmp.path().join("q");
    checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(GroupSize::Group(32))).unwrap();
    q
}

/// Rewrites `dir/model.safetensors` through `edit` on its tensor list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, D, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let mut all: Vec<_> = load_file(&path).into_iter().map(|(n, (d, s, b))| (n, d, s, b)).collect();
    edit(&mut all);
    write_st(&path, all, None);
}

const L: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn truncated_file_is_an_error() {
    let tmp = TempDir::new("err-trunc");
    let q = quantized_fixture(&tmp);
    let path = q.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let out = tmp.path().join("out");
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["model.safetensors", "truncated"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    expect_err(&tmp, &out, checkpoint::inspect(&q), &["too short"]);
    std::fs::write(&path, &bytes[..40]).unwrap();
    expect_err(&tmp, &out, checkpoint::inspect(&q), &["header length"]);
}

#[test]
fn lying_header_is_an_error() {
    let tmp = TempDir::new("err-lie");
    let q = quantized_fixture(&tmp);
    let path = q.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    // Header length larger than the file.
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let out = tmp.path().join("out");
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["header length"]);
    // A shape that does not match the byte range.
    let (hdr, data) = split(&bytes);
    let hdr = hdr.replacen("\"shape\":[128,4]", "\"shape\":[128,5]", 1);
    std::fs::write(&path, join(&hdr, data)).unwrap();
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["weight_scale", "needs"]);
}

#[test]
fn wrong_dtype_or_shape_for_the_format() {
    let tmp = TempDir::new("err-dtype");
    let q = quantized_fixture(&tmp);
    let out = tmp.path().join("out");
    edit_tensors(&q, |t| {
        let e = t.iter_mut().find(|e| e.0 == format!("{L}.weight_packed")).unwrap();
        e.1 = D::F32;
    });
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &[&format!("{L}.weight_packed"), "dtype F32"]);
    let q = {
        let tmp2 = tmp.path().join("q2");
        checkpoint::quantize_checkpoint(tmp.path().join("in"), &tmp2, &cpu_opts(GroupSize::Group(32))).unwrap();
        tmp2
    };
    edit_tensors(&q, |t| {
        let e = t.iter_mut().find(|e| e.0 == format!("{L}.weight_scale")).unwrap();
        e.2 = vec![64, 8];
    });
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &[&format!("{L}.weight_scale"), "rows"]);
}

#[test]
fn missing_tensor_is_an_error() {
    let tmp = TempDir::new("err-missing");
    let q = quantized_fixture(&tmp);
    let out = tmp.path().join("out");
    edit_tensors(&q, |t| t.retain(|e| e.0 != format!("{L}.weight_scale")));
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &[&format!("{L}.weight_scale"), "missing"]);
    // An index that lists a tensor its shard lacks.
    let tmp = TempDir::new("err-index");
    let input = tmp.path().join("in");
    make_model(&input, true);
    let ip = input.join("model.safetensors.index.json");
    let mut idx = read_json(&ip);
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
    write_json(&ip, &idx);
    let out = tmp.path().join("out");
    expect_err(
        &tmp,
        &out,
        checkpoint::quantize_checkpoint(&input, &out, &cpu_opts(GroupSize::Group(32))),
        &["ghost.weight", "missing"],
    );
}

#[test]
fn unknown_quantization_config_field_is_an_error() {
    let tmp = TempDir::new("err-config");
    let q = quantized_fixture(&tmp);
    let out = tmp.path().join("out");
    let cp = q.join("config.json");
    let orig = read_json(&cp);
    let mut cfg = orig.clone();
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["mystery"] = 1.into();
    write_json(&cp, &cfg);
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["config.json", "mystery"]);
    let mut cfg = orig.clone();
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = false.into();
    write_json(&cp, &cfg);
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["asymmetric"]);
    let mut cfg = orig.clone();
    cfg["quantization_config"]["quant_method"] = "awq".into();
    write_json(&cp, &cfg);
    expect_err(&tmp, &out, checkpoint::inspect(&q), &["awq"]);
}

#[test]
fn k_not_divisible_by_the_group_size_is_an_error() {
    let tmp = TempDir::new("err-k");
    let q = quantized_fixture(&tmp);
    let out = tmp.path().join("out");
    // Claim group 128 for layers whose K = 128 has 4 scale groups (of 32).
    let cp = q.join("config.json");
    let mut cfg = read_json(&cp);
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128.into();
    write_json(&cp, &cfg);
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["weight_scale", "group size 128"]);
    // K = 72 with group 32.
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32.into();
    write_json(&cp, &cfg);
    edit_tensors(&q, |t| {
        t.push(("x.weight_packed".into(), D::I32, vec![64, 9], vec![0; 64 * 9 * 4]));
        t.push(("x.weight_scale".into(), D::BF16, vec![64, 2], vec![0; 64 * 2 * 2]));
        t.push(("x.weight_shape".into(), D::I32, vec![2], i32_bytes(&[64, 72])));
    });
    expect_err(
        &tmp,
        &out,
        checkpoint::repack_checkpoint(&q, &out),
        &["x.weight_scale", "not a multiple of the group size 32"],
    );
}

#[test]
fn gptq_zero_points_are_validated() {
    let tmp = TempDir::new("err-gptq");
    let input = tmp.path().join("in");
    make_gptq(&input, false, false, 32);
    let out = tmp.path().join("out");
    let name = "model.layers.0.self_attn.o_proj.qzeros";
    // v2 constant in a v1 checkpoint.
    edit_tensors(&input, |t| {
        let e = t.iter_mut().find(|e| e.0 == name).unwrap();
        e.3 = i32_bytes(&vec![0x8888_8888u32 as i32; e.3.len() / 4]);
    });
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&input, &out), &[name, "checkpoint_format"]);
    // Asymmetric zero points.
    edit_tensors(&input, |t| {
        let e = t.iter_mut().find(|e| e.0 == name).unwrap();
        let mut z = vec![0x7777_7777i32; e.3.len() / 4];
        z[3] = 0x7777_7776;
        e.3 = i32_bytes(&z);
    });
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&input, &out), &[name, "asymmetric"]);
}

#[test]
fn other_errors() {
    let tmp = TempDir::new("err-misc");
    let input = tmp.path().join("in");
    make_model(&input, false);
    let out = tmp.path().join("out");
    // A NaN weight names the tensor, row and column.
    edit_tensors(&input, |t| {
        let e = t.iter_mut().find(|e| e.0 == format!("{L}.weight")).unwrap();
        let at = (3 * 128 + 5) * 2;
        e.3[at..at + 2].copy_from_slice(&bf16::NAN.to_bits().to_le_bytes());
    });
    expect_err(
        &tmp,
        &out,
        checkpoint::quantize_checkpoint(&input, &out, &cpu_opts(GroupSize::Group(32))),
        &[&format!("{L}.weight"), "non-finite", "row 3, column 5"],
    );
    // An existing output is refused and left alone.
    let tmp2 = TempDir::new("err-exists");
    let input = tmp2.path().join("in");
    make_model(&input, false);
    let e = checkpoint::quantize_checkpoint(&input, &input, &cpu_opts(GroupSize::Group(32))).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(input.join("model.safetensors").is_file());
    // quantize refuses a quantized checkpoint, repack a plain one, restore a non-Marlin one.
    let q = tmp2.path().join("q");
    checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(GroupSize::Group(32))).unwrap();
    let o = tmp2.path().join("o");
    expect_err(
        &tmp2,
        &o,
        checkpoint::quantize_checkpoint(&q, &o, &cpu_opts(GroupSize::Group(32))),
        &["already quantized"],
    );
    expect_err(&tmp2, &o, checkpoint::repack_checkpoint(&input, &o), &["no quantized layers"]);
    expect_err(&tmp2, &o, checkpoint::restore_checkpoint(&q, &o), &["Marlin"]);
    // Marlin needs N % 64 == 0: the router quantized without default ignores has N = 8.
    let q2 = tmp2.path().join("q2");
    let opts = QuantizeOptions { default_ignore: false, ..cpu_opts(GroupSize::Group(32)) };
    checkpoint::quantize_checkpoint(&input, &q2, &opts).unwrap();
    expect_err(&tmp2, &o, checkpoint::repack_checkpoint(&q2, &o), &["model.layers.0.mlp.gate.weight_packed", "N = 8"]);
    // No safetensors at all; a file that is not safetensors.
    let empty = tmp2.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    expect_err(&tmp2, &o, checkpoint::inspect(&empty), &["no .safetensors"]);
    std::fs::write(empty.join("model.safetensors"), b"not a safetensors file at all, just text").unwrap();
    expect_err(&tmp2, &o, checkpoint::inspect(&empty), &["model.safetensors"]);
    // GPU requested where none is usable (this machine may or may not have one: only check that
    // a failure is an error, not a panic, and leaves nothing behind).
    let g = tmp2.path().join("g");
    let opts = QuantizeOptions { device: DeviceChoice::Gpu, ..cpu_opts(GroupSize::Group(32)) };
    if checkpoint::quantize_checkpoint(&input, &g, &opts).is_err() {
        assert!(!g.exists());
        assert_no_partials(tmp2.path());
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing the header parser: deterministic mutations, never a panic, always a checked result.

fn check_parse(bytes: &[u8]) -> bool {
    match stfile::parse_bytes("fuzz", bytes) {
        Ok(h) => {
            let (hdr, data) = stfile::split_file("fuzz", bytes).unwrap();
            assert!(8 + hdr.len() + data.len() == bytes.len());
            let mut ranges: Vec<(usize, usize)> = Vec::new();
            for t in &h.tensors {
                assert!(t.begin <= t.end && t.end <= data.len(), "{t:?} out of bounds");
                assert_eq!(t.numel() * t.dtype.size(), t.end - t.begin);
                if t.begin < t.end {
                    ranges.push((t.begin, t.end));
                }
            }
            ranges.sort();
            assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "overlap accepted");
            true
        }
        Err(e) => {
            assert!(matches!(e, lowbit::Error::Checkpoint { .. }), "{e:?}");
            false
        }
    }
}

#[test]
fn fuzz_header_parser() {
    let mut rng = Rng::new(0xF022);
    let valid = st_bytes(
        vec![
            ("a".into(), D::BF16, vec![4, 8], vec![1; 64]),
            ("b.weight_packed".into(), D::I32, vec![3, 2], vec![2; 24]),
            ("c".into(), D::F32, vec![], vec![3; 4]),
            ("e".into(), D::U8, vec![0], vec![]),
        ],
        Some([("format".to_string(), "pt".to_string())].into()),
    );
    assert!(check_parse(&valid));
    let (hdr, data) = split(&valid);
    let mut accepted = 0;
    for i in 0..4000 {
        let mut b = valid.clone();
        match i % 8 {
            // Truncate anywhere.
            0 => b.truncate(rng.below(valid.len())),
            // Flip 1-4 random bytes anywhere (mostly the header).
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(8 + hdr.len() + 4);
                    let at = at.min(b.len() - 1);
                    b[at] ^= 1 << rng.below(8);
                }
            }
            // Random header length.
            2 => {
                let n: u64 = match rng.below(4) {
                    0 => rng.next_u64(),
                    1 => rng.below(b.len() * 2) as u64,
                    2 => u64::MAX - rng.below(16) as u64,
                    _ => hdr.len() as u64 + rng.below(9) as u64 - 4,
                };
                b[..8].copy_from_slice(&n.to_le_bytes());
            }
            // Overwrite a header character with a JSON-significant one.
            3 => {
                let at = 8 + rng.below(hdr.len());
                b[at] = b"{}[],:\"0123456789-e. \\"[rng.below(22)];
            }
            // Change a number in the header.
            4 => {
                let digits: Vec<usize> =
                    hdr.bytes().enumerate().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
                let at = digits[rng.below(digits.len())];
                let big = ["18446744073709551615", "99999999999999999999999", "-1", "1e3", "0", "4294967296", "64"];
                let h = format!("{}{}{}", &hdr[..at], big[rng.below(big.len())], &hdr[at + 1..]);
                b = join(&h, data);
            }
            // Drop or truncate the data section while the header stays.
            5 => b.truncate(8 + hdr.len() + rng.below(data.len() + 1)),
            // Structured lies.
            6 => {
                let lies = [
                    r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"y":{"dtype":"BF16","shape":[2],"data_offsets":[2,6]}}"#,
                    r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,4]}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[4,0]}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4],"extra":1}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
                    r#"{"__metadata__":{"a":1}}"#,
                    r#"{"__metadata__":[]}"#,
                    r#"{"x":{"dtype":"BF16","shape":[-2],"data_offsets":[0,4]}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[2]}}"#,
                    r#"{"x":[]}"#,
                    r#"[]"#,
                    r#""#,
                    r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,18446744073709551615]}}"#,
                    r#"{"x":{"dtype":"BF16","shape":[1,2,3,4,5,6,7,8,9],"data_offsets":[0,4]}}"#,
                ];
                let h = lies[rng.below(lies.len())];
                b = join(h, &[0u8; 16]);
            }
            // Random garbage of random length.
            _ => {
                let n = rng.below(64);
                b = (0..n).map(|_| rng.below(256) as u8).collect();
                if n >= 8 && rng.below(2) == 0 {
                    b[..8].copy_from_slice(&((n - 8) as u64).to_le_bytes());
                }
            }
        }
        if check_parse(&b) {
            accepted += 1;
        }
    }
    assert!(accepted > 0 && accepted < 4000, "the mutations exercised both outcomes ({accepted})");
}

#[test]
fn fuzz_checkpoint_files() {
    // Corrupted files on disk through the whole pipeline (open → detect → repack / inspect).
    let tmp = TempDir::new("fuzz-files");
    let q = quantized_fixture(&tmp);
    let path = q.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let (hdr, data) = split(&good);
    let mut rng = Rng::new(77);
    let out = tmp.path().join("out");
    for i in 0..150 {
        let b = match i % 3 {
            0 => good[..rng.below(good.len())].to_vec(),
            1 => {
                let mut h = hdr.clone().into_bytes();
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(h.len());
                    h[at] = b"{}[],:\"0123456789"[rng.below(17)];
                }
                join(&String::from_utf8_lossy(&h), data)
            }
            _ => {
                let digits: Vec<usize> =
                    hdr.bytes().enumerate().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
                let at = digits[rng.below(digits.len())];
                let h = format!("{}{}{}", &hdr[..at], rng.below(10), &hdr[at + 1..]);
                join(&h, data)
            }
        };
        std::fs::write(&path, &b).unwrap();
        let _ = checkpoint::inspect(&q);
        if checkpoint::repack_checkpoint(&q, &out).is_ok() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        assert!(!out.exists());
        assert_no_partials(tmp.path());
    }
}

// ---------------------------------------------------------------------------------------------
// Real checkpoints: what compressed-tensors 0.20.1 and GPTQModel 7 write.

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Copies a fixture directory (flat) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Inspect, repack and restore a compressed-tensors checkpoint; the restored directory must be
/// byte-identical to the input (config.json, tensors with their dtypes, metadata, other files).
fn ct_real_round_trip(input: &Path, group: i64) {
    let tmp = TempDir::new("ct-real");
    let ins = checkpoint::inspect(input).unwrap();
    assert_eq!(ins.format, Format::CompressedTensors);
    assert_eq!(ins.group_size, Some(group));
    assert!(!ins.quantized.is_empty());
    // compressed-tensors' own quantizer (scale amax / 7.5, range [-8, 7]) uses the code -8.
    assert!(ins.code_minus8 > 0 && ins.code_minus8 == ins.levels[0]);
    assert!(ins.ignored_config_keys.is_empty(), "{:?}", ins.ignored_config_keys);
    let layer = &ins.quantized[0];
    assert!(layer.tensors.iter().any(|t| t.ends_with(".weight_shape")), "{:?}", layer.tensors);
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(input, &m).unwrap();
    let mt = load_all(&m);
    let src = load_all(input);
    // The Marlin codes decode to exactly the source codes.
    for l in &ins.quantized {
        let packed = from_i32(&src[&format!("{}.weight_packed", l.name)].2);
        let want = marlin::ct_marlin_repack(&packed, None, l.k, l.n).unwrap();
        assert_eq!(mt[&format!("{}.qweight", l.name)].2, i32_bytes(&want), "{}", l.name);
        assert_eq!(src[&format!("{}.weight_shape", l.name)].0, D::I64, "compressed-tensors writes I64 shapes");
    }
    assert_eq!(checkpoint::inspect(&m).unwrap().levels, ins.levels);
    let r = tmp.path().join("r");
    checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_same_tree(input, &r);
}

#[test]
fn compressed_tensors_0_20_checkpoints_round_trip_byte_for_byte() {
    ct_real_round_trip(&fixture("ct-0.20.1/g32"), 32);
    ct_real_round_trip(&fixture("ct-0.20.1/g128"), 128);
    ct_real_round_trip(&fixture("ct-0.20.1/channel"), -1);
}

#[test]
fn gptqmodel7_configs_are_read() {
    for g in [32usize, 128] {
        let tmp = TempDir::new("gptqmodel7");
        let input = tmp.path().join("in");
        make_gptq(&input, false, false, g);
        let ins = checkpoint::inspect(&input).unwrap();
        assert_eq!(ins.format, Format::Gptq);
        assert_eq!(ins.group_size, Some(g as i64));
        assert!(ins.ignored_config_keys.is_empty(), "{:?}", ins.ignored_config_keys);
        assert!(ins.quantized.iter().all(|l| l.tensors.iter().any(|t| t.ends_with(".qzeros"))));
        let m = tmp.path().join("m");
        let r = tmp.path().join("r");
        checkpoint::repack_checkpoint(&input, &m).unwrap();
        checkpoint::restore_checkpoint(&m, &r).unwrap();
        assert_same_tree(&input, &r);
    }
}

/// Sets `quantization_config[path...] = v` in `dir/config.json`.
fn set_qc(dir: &Path, path: &[&str], v: serde_json::Value) {
    let p = dir.join("config.json");
    let mut cfg = read_json(&p);
    let mut at = &mut cfg["quantization_config"];
    for k in path {
        at = &mut at[*k];
    }
    *at = v;
    write_json(&p, &cfg);
}

#[test]
fn harmless_unknown_keys_are_accepted_and_listed() {
    let tmp = TempDir::new("cfg-tolerant");
    let q = tmp.path().join("q");
    copy_dir(&fixture("ct-0.20.1/g32"), &q);
    set_qc(&q, &["future_feature"], serde_json::Value::Null);
    set_qc(&q, &["config_groups", "group_0", "weights", "new_knob"], serde_json::json!({}));
    let ins = checkpoint::inspect(&q).unwrap();
    let keys: Vec<&str> = ins.ignored_config_keys.iter().map(|k| k.key.as_str()).collect();
    assert!(keys.contains(&"quantization_config.future_feature"), "{keys:?}");
    assert!(keys.contains(&"quantization_config.config_groups.group_0.weights.new_knob"), "{keys:?}");
    // Values lowbit does not use but that do not change the weights are accepted.
    set_qc(&q, &["config_groups", "group_0", "weights", "actorder"], "weight".into());
    set_qc(&q, &["config_groups", "group_0", "weights", "observer"], "memoryless_minmax".into());
    set_qc(&q, &["kv_cache_scheme"], serde_json::json!({"num_bits": 8, "type": "float"}));
    checkpoint::inspect(&q).unwrap();
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(&q, &m).unwrap();
    let r = tmp.path().join("r");
    checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_same_tree(&q, &r);
}

#[test]
fn meaning_changing_keys_are_errors_naming_key_and_value() {
    let tmp = TempDir::new("cfg-strict");
    let orig = fixture("ct-0.20.1/g128");
    let cases: Vec<(&[&str], serde_json::Value, &[&str])> = vec![
        (
            &["moe_sparsity_config"],
            serde_json::json!({"method": "prune", "num_experts": [8, 6]}),
            &["moe_sparsity_config", "prune"],
        ),
        (&["sparsity_config"], serde_json::json!({"format": "sparse-24-bitmask"}), &["sparsity_config", "sparse-24"]),
        (
            &["transform_config"],
            serde_json::json!({"config_groups": {"u": {"type": "hadamard"}}}),
            &["transform_config", "hadamard"],
        ),
        (
            &["config_groups", "group_0", "input_activations"],
            serde_json::json!({"num_bits": 8}),
            &["input_activations", "num_bits"],
        ),
        (&["config_groups", "group_0", "weights", "symmetric"], false.into(), &["symmetric", "false"]),
        (&["config_groups", "group_0", "weights", "actorder"], "dynamic".into(), &["actorder", "dynamic"]),
        (&["config_groups", "group_0", "weights", "strategy"], "block".into(), &["strategy", "block"]),
        (&["config_groups", "group_0", "weights", "num_bits"], 8.into(), &["num_bits", "8"]),
        (&["surprise"], 3.into(), &["surprise", "3"]),
        (&["format"], "nvfp4-pack-quantized".into(), &["format", "nvfp4"]),
    ];
    for (i, (path, v, needles)) in cases.into_iter().enumerate() {
        let q = tmp.path().join(format!("q{i}"));
        copy_dir(&orig, &q);
        set_qc(&q, path, v);
        let out = tmp.path().join(format!("o{i}"));
        let mut all = vec!["config.json"];
        all.extend_from_slice(needles);
        expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &all);
    }
    // GPTQModel keys that change meaning.
    let gcases: Vec<(&str, serde_json::Value, &[&str])> = vec![
        ("method", "qqq".into(), &["method", "qqq"]),
        ("rotation", "hadamard".into(), &["rotation", "hadamard"]),
        ("activation", serde_json::json!({"mode": "fp8"}), &["activation", "fp8"]),
        ("pack_dtype", "int16".into(), &["pack_dtype", "int16"]),
        ("format", "marlin".into(), &["format", "marlin"]),
        ("dynamic", serde_json::json!({"-:lm_head": {}}), &["dynamic"]),
    ];
    for (i, (key, v, needles)) in gcases.into_iter().enumerate() {
        let g = tmp.path().join(format!("g{i}"));
        make_gptq(&g, false, false, 32);
        set_qc(&g, &[key], v);
        let out = tmp.path().join(format!("go{i}"));
        expect_err(&tmp, &out, checkpoint::repack_checkpoint(&g, &out), needles);
    }
}

#[test]
fn f32_scales_are_inspected_and_repack_explains() {
    let tmp = TempDir::new("f32-scales");
    let q = tmp.path().join("q");
    copy_dir(&fixture("ct-0.20.1/g32"), &q);
    edit_tensors(&q, |all| {
        for t in all.iter_mut().filter(|t| t.0.ends_with(".weight_scale")) {
            let v: Vec<u8> = from_u16(&t.3).iter().flat_map(|&b| bf16::from_bits(b).to_f32().to_le_bytes()).collect();
            *t = (t.0.clone(), D::F32, t.2.clone(), v);
        }
    });
    let ins = checkpoint::inspect(&q).unwrap();
    assert!(ins.quantized.iter().all(|l| l.scale_dtype == "F32"));
    assert_eq!(ins.scales.invalid, 0);
    assert!(ins.scales.min.unwrap() > 0.0);
    let out = tmp.path().join("o");
    expect_err(&tmp, &out, checkpoint::repack_checkpoint(&q, &out), &["weight_scale", "F32", "16-bit"]);
}

#[test]
fn act_order_restore_never_writes_what_compressed_tensors_rejects() {
    let tmp = TempDir::new("act-order-ct");
    let input = tmp.path().join("in");
    make_gptq(&input, true, false, 32);
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(&input, &m).unwrap();
    // Restoring goes back to GPTQ (lossless, loadable).
    let r = tmp.path().join("r");
    assert_eq!(checkpoint::restore_checkpoint(&m, &r).unwrap().output_format, Some(Format::Gptq));
    // A Marlin act-order checkpoint that claims a compressed-tensors source without its config:
    // no current compressed-tensors reads act-order, so restore refuses and says why.
    let cp = m.join("config.json");
    let mut cfg = read_json(&cp);
    let qc = cfg["quantization_config"].as_object_mut().unwrap();
    qc.remove("source_quantization_config");
    qc.insert("source".into(), "compressed-tensors".into());
    write_json(&cp, &cfg);
    let path = m.join("model.safetensors");
    let all: Vec<_> = load_file(&path).into_iter().map(|(n, (d, s, b))| (n, d, s, b)).collect();
    let md: std::collections::HashMap<String, String> =
        [("format", "marlin"), ("group_size", "32"), ("source", "compressed-tensors")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    write_st(&path, all, Some(md));
    let out = tmp.path().join("o");
    expect_err(&tmp, &out, checkpoint::restore_checkpoint(&m, &out), &["act-order", "compressed-tensors >= 0.19"]);
}

#[test]
fn stale_partials_of_dead_processes_are_removed() {
    let tmp = TempDir::new("stale");
    let input = tmp.path().join("in");
    make_model(&input, false);
    let q = tmp.path().join("q");
    // A pid far above any pid_max: no such process.
    let stale = tmp.path().join("q.partial-2147483600");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"half-written").unwrap();
    // A partial of a live process (this one's parent) is left alone.
    let live = tmp.path().join(format!("q.partial-{}", std::os::unix::process::parent_id()));
    std::fs::create_dir_all(&live).unwrap();
    let rep = checkpoint::quantize_checkpoint(&input, &q, &cpu_opts(GroupSize::Group(32))).unwrap();
    assert_eq!(rep.removed_stale, vec![stale.display().to_string()]);
    assert!(!stale.exists() && live.exists() && q.is_dir());
}

/// The Python with torch, transformers and compressed-tensors (`LOWBIT_PYTHON`, else `python3`),
/// or `None` with the reason printed.
fn real_python() -> Option<String> {
    let py = std::env::var("LOWBIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&py)
        .args(["-c", "import torch, transformers, compressed_tensors; print(compressed_tensors.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            eprintln!("using {py}: compressed-tensors {}", String::from_utf8_lossy(&o.stdout).trim());
            Some(py)
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "skipped: `{py}` lacks torch/transformers/compressed-tensors ({}); set LOWBIT_PYTHON",
                err.lines().last().unwrap_or("")
            );
            None
        }
        Err(e) => {
            eprintln!("skipped: cannot run `{py}` ({e}); set LOWBIT_PYTHON to a Python with compressed-tensors");
            None
        }
    }
}

fn run_py(py: &str, args: &[&std::ffi::OsStr]) -> String {
    // The Python tools write logs into their working directory: keep them out of the repository.
    let o = std::process::Command::new(py).args(args).current_dir(std::env::temp_dir()).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{py} {args:?} failed:\n{out}\n{err}");
    out.into_owned()
}

/// Decodes every quantized layer of a Marlin checkpoint to BF16 with the reference, as
/// `(layer.weight, bytes)`.
fn decode_marlin(m: &Path) -> Vec<(String, Vec<u8>)> {
    let ins = checkpoint::inspect(m).unwrap();
    let t = load_all(m);
    ins.quantized
        .iter()
        .map(|l| {
            let g = if l.group_size < 0 { GroupSize::Channelwise } else { GroupSize::Group(l.group_size as usize) };
            let shape = QuantShape::new(l.n, l.k, g).unwrap();
            let packed = marlin::marlin_to_ct(&from_i32(&t[&format!("{}.qweight", l.name)].2), None, l.k, l.n).unwrap();
            let sc = from_u16(&t[&format!("{}.scales", l.name)].2);
            let sc = marlin::marlin_unpermute_scales(&sc, l.k, l.n, shape.group).unwrap();
            let sc: Vec<bf16> =
                quant::transpose(&sc, shape.groups_per_row(), l.n).unwrap().into_iter().map(bf16::from_bits).collect();
            let w: Vec<bf16> = quant::dequantize(&packed, &sc, &shape).unwrap();
            (format!("{}.weight", l.name), w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect())
        })
        .collect()
}

/// Runs compressed-tensors itself when it is installed: its `save_pretrained` output goes through
/// inspect / repack / restore byte for byte, lowbit's Marlin decodes to compressed-tensors' own
/// dequantized weights, and what `lowbit quantize` writes loads in transformers + compressed-tensors
/// with bit-identical values.
#[test]
fn real_compressed_tensors_when_installed() {
    let Some(py) = real_python() else { return };
    let tmp = TempDir::new("ct-python");
    let real = tmp.path().join("real");
    let script = fixture("make_ct_real.py");
    assert!(run_py(&py, &[script.as_os_str(), real.as_os_str()]).contains("ok"));
    for (name, g) in [("ct-g32", 32), ("ct-g128", 128), ("ct-channel", -1)] {
        let dir = real.join(name);
        ct_real_round_trip(&dir, g);
        let m = tmp.path().join(format!("{name}-m"));
        checkpoint::repack_checkpoint(&dir, &m).unwrap();
        let want = load_file(&real.join(format!("{name}.dequant.safetensors")));
        for (w, bytes) in decode_marlin(&m) {
            let (_, _, ct) = &want[&w];
            // compressed-tensors' fake_quantize keeps the sign of weights that round to zero.
            let same = from_u16(ct).iter().zip(from_u16(&bytes)).all(|(&a, b)| a == b || (a | b) == 0x8000);
            assert!(same, "{name} {w}: the Marlin decode differs from compressed-tensors' dequantized weight");
        }
    }
    // lowbit quantize → compressed-tensors / transformers load, values bit for bit.
    let check = fixture("check_ct_load.py");
    for g in [GroupSize::Group(32), GroupSize::Group(128), GroupSize::Channelwise] {
        let q = tmp.path().join(format!("lowbit-{}", g.to_checkpoint()));
        checkpoint::quantize_checkpoint(real.join("bf16"), &q, &cpu_opts(g)).unwrap();
        let m = tmp.path().join(format!("lowbit-{}-m", g.to_checkpoint()));
        checkpoint::repack_checkpoint(&q, &m).unwrap();
        let reference: Vec<Tensor> =
            decode_marlin(&m).into_iter().map(|(n, b)| (n, D::BF16, vec![], b)).collect::<Vec<_>>();
        let shapes = load_all(&real.join("bf16"));
        let reference: Vec<Tensor> =
            reference.into_iter().map(|(n, d, _, b)| (n.clone(), d, shapes[&n].1.clone(), b)).collect();
        let refp = tmp.path().join(format!("ref-{}.safetensors", g.to_checkpoint()));
        write_st(&refp, reference, None);
        let out = run_py(&py, &[check.as_os_str(), q.as_os_str(), refp.as_os_str()]);
        assert!(out.contains("ok 7"), "{out}");
    }
}

#[test]
fn gptq_with_only_quantize_config_json_round_trips() {
    // AutoGPTQ-era layout: config.json without quantization_config, the config in
    // quantize_config.json.
    let tmp = TempDir::new("gptq-qcfg");
    let input = tmp.path().join("in");
    make_gptq(&input, true, false, 32);
    write_json(&input.join("config.json"), &serde_json::json!({ "model_type": "llama", "torch_dtype": "float16" }));
    assert_eq!(checkpoint::inspect(&input).unwrap().format, Format::Gptq);
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(&input, &m).unwrap();
    let cfg = read_json(&m.join("config.json"));
    assert_eq!(cfg["quantization_config"]["source_config_file"], "quantize_config.json");
    let r = tmp.path().join("r");
    checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_same_tree(&input, &r);
}

/// Inspect, repack (checked against the reference GPTQ → Marlin repack) and restore a GPTQ
/// checkpoint; the restored directory must be byte-identical to the input.
fn gptq_real_round_trip(input: &Path, group: i64, act_order: bool) {
    let tmp = TempDir::new("gptq-real");
    let ins = checkpoint::inspect(input).unwrap();
    assert_eq!(ins.format, Format::Gptq);
    assert_eq!(ins.group_size, Some(group));
    assert!(ins.ignored_config_keys.is_empty(), "{:?}", ins.ignored_config_keys);
    // With act-order, a layer whose K is one group has a trivial g_idx (no reordering).
    assert_eq!(ins.quantized.iter().any(|l| l.act_order), act_order);
    let m = tmp.path().join("m");
    checkpoint::repack_checkpoint(input, &m).unwrap();
    let (src, mt) = (load_all(input), load_all(&m));
    for l in &ins.quantized {
        let qw = from_i32(&src[&format!("{}.qweight", l.name)].2);
        let g_idx = from_i32(&src[&format!("{}.g_idx", l.name)].2);
        let gs = if group < 0 { l.k } else { group as usize };
        let perm = l.act_order.then(|| marlin::act_order_perm(&g_idx, l.k, gs).unwrap());
        let want = marlin::gptq_marlin_repack(&qw, perm.as_deref(), l.k, l.n).unwrap();
        assert_eq!(mt[&format!("{}.qweight", l.name)].2, i32_bytes(&want), "{}", l.name);
    }
    let r = tmp.path().join("r");
    checkpoint::restore_checkpoint(&m, &r).unwrap();
    assert_same_tree(input, &r);
}

#[test]
fn gptqmodel_7_7_checkpoints_round_trip_byte_for_byte() {
    // Written by GPTQModel 7.7.0 itself (tests/fixtures/make_gptqmodel_real.py): its own tensor
    // order (not safetensors.serialize's), F16 scales, always a g_idx, quantize_config.json and
    // quant_log.csv beside the weights.
    gptq_real_round_trip(&fixture("gptqmodel-7.7/g32"), 32, false);
    gptq_real_round_trip(&fixture("gptqmodel-7.7/g128-act"), 128, true);
}

/// Runs GPTQModel itself when it is installed (`LOWBIT_PYTHON` with gptqmodel; skipped with the
/// reason otherwise): fresh GPTQModel checkpoints, with and without act-order, repack and restore
/// byte for byte.
#[test]
fn real_gptqmodel_when_installed() {
    let Some(py) = real_python() else { return };
    let probe = std::process::Command::new(&py).args(["-c", "import gptqmodel"]).output().unwrap();
    if !probe.status.success() {
        eprintln!("skipped: `{py}` has no gptqmodel");
        return;
    }
    let tmp = TempDir::new("gptqmodel-python");
    let real = tmp.path().join("real");
    let script = fixture("make_gptqmodel_real.py");
    let o = std::process::Command::new(&py)
        .env("GPTQMODEL_CPU_WORKERS", "2")
        .current_dir(tmp.path())
        .args([script.as_os_str(), real.as_os_str()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    gptq_real_round_trip(&real.join("g32"), 32, false);
    gptq_real_round_trip(&real.join("g128-act"), 128, true);
}
