//! Helpers for the checkpoint tests: temporary directories, a small synthetic Llama-like model,
//! and safetensors files written and read with the official `safetensors` crate (so the tests
//! also prove interoperability of what lowbit writes).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lowbit::bf16;
use lowbit::reference::rng::Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype as D;

/// One tensor: name, dtype, shape, little-endian bytes.
pub type Tensor = (String, D, Vec<usize>, Vec<u8>);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join("lowbit-checkpoint-tests").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serializes tensors with the official writer.
pub fn st_bytes(tensors: Vec<Tensor>, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, &metadata).unwrap()
}

pub fn write_st(path: &Path, tensors: Vec<Tensor>, metadata: Option<HashMap<String, String>>) {
    std::fs::write(path, st_bytes(tensors, metadata)).unwrap();
}

/// Every tensor of one file, read with the official parser.
pub fn load_file(path: &Path) -> BTreeMap<String, (D, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn st_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Every tensor of every `.safetensors` file of a directory.
pub fn load_all(dir: &Path) -> BTreeMap<String, (D, Vec<usize>, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for f in st_files(dir) {
        for (n, t) in load_file(&f) {
            assert!(all.insert(n.clone(), t).is_none(), "{n} twice");
        }
    }
    all
}

/// `__metadata__` of every file of a directory.
pub fn file_metadata(dir: &Path) -> BTreeMap<String, HashMap<String, String>> {
    st_files(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            (f.file_name().unwrap().to_string_lossy().into_owned(), md.metadata().clone().unwrap_or_default())
        })
        .collect()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn write_json(p: &Path, v: &serde_json::Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn from_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}
pub fn from_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// The header JSON and the data section of a safetensors image.
pub fn split(bytes: &[u8]) -> (String, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (String::from_utf8(bytes[8..8 + n].to_vec()).unwrap(), &bytes[8 + n..])
}

/// A safetensors image from header JSON and data.
pub fn join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// The layers `make_model` has that `quantize` (default ignores) turns into INT4, sorted.
pub const QUANTIZED_LAYERS: &[&str] = &[
    "model.layers.0.mlp.down_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.self_attn.q_proj",
];

fn bf16_tensor(rng: &mut Rng, name: &str, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<bf16> = rng.normal_vec(n, std);
    (name.to_string(), D::BF16, shape.to_vec(), v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect())
}

/// A tiny Llama-like bf16 model (hidden 128, two layers, vocab 64) with a config, a tokenizer
/// file, an MoE-style router (`mlp.gate`), an odd linear with K = 36 (not a multiple of 8, so
/// never quantized), biases and norms. Sharded: two files and an index.
pub fn make_model(dir: &Path, sharded: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(42);
    let mut shard1 = vec![bf16_tensor(&mut rng, "model.embed_tokens.weight", &[64, 128], 1.0)];
    let mut shard2 = Vec::new();
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        let s = if l == 0 { &mut shard1 } else { &mut shard2 };
        s.push(bf16_tensor(&mut rng, &format!("{p}.input_layernorm.weight"), &[128], 1.0));
        s.push(bf16_tensor(&mut rng, &format!("{p}.self_attn.q_proj.weight"), &[128, 128], 0.02));
        s.push(("{p}.self_attn.q_proj.bias".replace("{p}", &p), D::F32, vec![128], vec![0; 512]));
        s.push(bf16_tensor(&mut rng, &format!("{p}.mlp.gate_proj.weight"), &[256, 128], 0.02));
        s.push(bf16_tensor(&mut rng, &format!("{p}.mlp.down_proj.weight"), &[128, 256], 0.02));
    }
    shard1.push(bf16_tensor(&mut rng, "model.layers.0.mlp.gate.weight", &[8, 128], 0.02));
    shard1.push(bf16_tensor(&mut rng, "model.layers.0.mlp.odd.weight", &[64, 36], 0.02));
    // A group of zeros: its scale is the 1e-5 floor.
    if let Some(t) = shard1.iter_mut().find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight") {
        t.3[..64].fill(0);
    }
    shard2.push(bf16_tensor(&mut rng, "model.norm.weight", &[128], 1.0));
    shard2.push(bf16_tensor(&mut rng, "lm_head.weight", &[64, 128], 0.02));
    let md: Option<HashMap<String, String>> = Some([("format".to_string(), "pt".to_string())].into());
    if sharded {
        let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        let mut map = serde_json::Map::new();
        for (s, f) in [(&shard1, names[0]), (&shard2, names[1])] {
            for t in s {
                map.insert(t.0.clone(), f.into());
            }
        }
        write_st(&dir.join(names[0]), shard1, md.clone());
        write_st(&dir.join(names[1]), shard2, md);
        write_json(
            &dir.join("model.safetensors.index.json"),
            &serde_json::json!({ "metadata": { "total_parameters": 123456, "total_size": 0 }, "weight_map": map }),
        );
    } else {
        shard1.extend(shard2);
        write_st(&dir.join("model.safetensors"), shard1, md);
    }
    write_json(
        &dir.join("config.json"),
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "vocab_size": 64
        }),
    );
    std::fs::write(dir.join("tokenizer.json"), br#"{"version": "1.0", "model": {}}"#).unwrap();
}

/// Both directories hold the same file names with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b), "file lists differ");
    for n in names(a) {
        let (x, y) = (std::fs::read(a.join(&n)).unwrap(), std::fs::read(b.join(&n)).unwrap());
        assert!(x == y, "{n} differs between {} and {}", a.display(), b.display());
    }
}

/// No `*.partial-*` directory was left behind in `dir`.
pub fn assert_no_partials(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".partial-"), "left behind: {n}");
    }
}

/// The `quantization_config` GPTQModel 7.7 writes for 4-bit GPTQ (from its
/// `QuantizeConfig.to_dict`: `method` and `quant_method`, `format` and `checkpoint_format`,
/// `pack_dtype`, `lm_head`, the `meta` block; keys whose value is None or `{}` are dropped).
pub fn gptqmodel7_config(group_size: i64, desc_act: bool, v2: bool) -> serde_json::Value {
    let fmt = if v2 { "gptq_v2" } else { "gptq" };
    serde_json::json!({
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "lm_head": false,
        "method": "gptq",
        "quant_method": "gptq",
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": ["gptqmodel:7.7.0"],
            "uri": "https://github.com/modelcloud/gptqmodel",
            "damp_percent": 0.05,
            "damp_auto_increment": 0.01,
            "static_groups": false,
            "true_sequential": true,
            "mse": 0.0,
            "act_group_aware": !desc_act,
            "fallback": { "strategy": "rtn", "threshold": "0.5%", "smooth": null },
            "offload_to_disk": true,
            "telemetry": { "device": false },
            "offload_to_disk_path": "./gptqmodel_offload/abcd/",
            "pack_impl": "cpu",
            "gc_mode": "interval",
            "wait_for_submodule_finalizers": false,
            "auto_forward_data_parallel": true,
            "dense_vram_strategy": "exclusive",
            "dense_vram_strategy_devices": null,
            "moe_vram_strategy": "exclusive",
            "moe_vram_strategy_devices": null
        },
        "sym": true
    })
}

/// A `config.json` as compressed-tensors 0.20.1 writes it (`ModelCompressor.update_config`:
/// `json.dump(indent=2, sort_keys=True)`, no trailing newline) for a tiny Llama, with the
/// `quantization_config` of a symmetric INT4 `pack-quantized` group (or channel) scheme.
pub fn ct020_config(group_size: Option<usize>) -> serde_json::Value {
    let (strategy, gs) = match group_size {
        Some(g) => ("group", serde_json::json!(g)),
        None => ("channel", serde_json::Value::Null),
    };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "dtype": "bfloat16",
        "hidden_size": 128,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-06,
        "quantization_config": {
            "config_groups": { "group_0": {
                "format": "pack-quantized",
                "input_activations": null,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {
                    "dynamic": false, "group_size": gs, "num_bits": 4, "strategy": strategy,
                    "symmetric": true, "type": "int"
                }
            } },
            "format": "pack-quantized",
            "global_compression_ratio": null,
            "ignore": ["lm_head"],
            "kv_cache_scheme": null,
            "moe_sparsity_config": null,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.1"
        },
        "transformers_version": "5.24.0"
    })
}
