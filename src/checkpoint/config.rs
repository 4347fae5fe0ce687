//! `config.json` `quantization_config`: strict parsing of the formats this crate reads
//! (compressed-tensors `pack-quantized`, GPTQ, lowbit Marlin), generation of the ones it writes,
//! and compressed-tensors `ignore` matching.

use regex::Regex;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::format::GroupSize;

/// The `quant_method` this crate writes into Marlin checkpoints' `config.json`.
pub const MARLIN_QUANT_METHOD: &str = "lowbit-marlin";

/// Module-name patterns that `lowbit quantize` never quantizes unless told otherwise: the LM head,
/// embeddings (2-D but not linear layers) and MoE routers. Norms and biases are 1-D and never
/// quantized anyway.
pub const DEFAULT_IGNORE: [&str; 4] = ["lm_head", "re:.*embed", "re:.*(wte|wpe)$", "re:.*mlp\\.gate$"];

/// A compiled compressed-tensors `ignore` list: plain entries match a module name exactly,
/// `re:` entries are regular expressions matched at the start of the name (Python's `re.match`,
/// as compressed-tensors does).
#[derive(Clone, Debug)]
pub struct IgnoreSet {
    patterns: Vec<String>,
    exact: Vec<String>,
    regexes: Vec<Regex>,
}

impl IgnoreSet {
    /// Compiles `patterns`; a bad regular expression is an error naming it.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let mut set = IgnoreSet { patterns: Vec::new(), exact: Vec::new(), regexes: Vec::new() };
        for p in patterns {
            let p = p.as_ref();
            set.patterns.push(p.to_string());
            if let Some(re) = p.strip_prefix("re:") {
                let r = Regex::new(&format!("^(?:{re})"))
                    .map_err(|e| Error::invalid("ignore", format!("bad regular expression `{p}`: {e}")))?;
                set.regexes.push(r);
            } else {
                set.exact.push(p.to_string());
            }
        }
        Ok(set)
    }

    /// Whether the module `name` (the tensor name without `.weight`) is ignored.
    pub fn matches(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e == name) || self.regexes.iter().any(|r| r.is_match(name))
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// A parsed `quantization_config`.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantConfig {
    /// compressed-tensors `pack-quantized`, symmetric INT4.
    CompressedTensors {
        /// Group size from `config_groups`.
        group: GroupSize,
        /// The `ignore` list.
        ignore: Vec<String>,
    },
    /// GPTQ, symmetric 4-bit.
    Gptq {
        /// `group_size`.
        group: GroupSize,
        /// `desc_act` (act-order).
        desc_act: bool,
        /// `checkpoint_format: gptq_v2` (zero points stored as is, not minus one).
        v2: bool,
    },
    /// This crate's Marlin checkpoints.
    Marlin {
        /// `group_size`.
        group: GroupSize,
        /// The format it was made from.
        source: String,
    },
}

fn unknown_keys(path: &str, what: &str, obj: &serde_json::Map<String, Value>, known: &[&str]) -> Result<()> {
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Error::checkpoint(path, format!("{what}: unknown field `{k}` (not supported by lowbit)")));
    }
    Ok(())
}

fn group_from(path: &str, what: &str, v: Option<&Value>) -> Result<GroupSize> {
    let g = v
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::checkpoint(path, format!("{what}: `group_size` is missing or not an integer")))?;
    GroupSize::from_checkpoint(g).map_err(|e| Error::checkpoint(path, format!("{what}: {e}")))
}

fn is_null_or(v: Option<&Value>, ok: impl Fn(&Value) -> bool) -> bool {
    v.is_none_or(|v| v.is_null() || ok(v))
}

/// Parses `quantization_config` (`path` names `config.json` in messages).
pub fn parse(path: &str, qc: &Value) -> Result<QuantConfig> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    let obj = qc.as_object().ok_or_else(|| err(format!("{what} is not a JSON object")))?;
    let method = obj.get("quant_method").and_then(Value::as_str).unwrap_or("gptq");
    match method {
        "compressed-tensors" => parse_ct(path, obj),
        "gptq" => parse_gptq(path, obj),
        MARLIN_QUANT_METHOD => {
            unknown_keys(
                path,
                what,
                obj,
                &[
                    "quant_method",
                    "format",
                    "bits",
                    "sym",
                    "group_size",
                    "desc_act",
                    "source",
                    "source_quantization_config",
                ],
            )?;
            if obj.get("bits").and_then(Value::as_i64) != Some(4) || obj.get("sym") != Some(&Value::Bool(true)) {
                return Err(err(format!("{what}: lowbit Marlin checkpoints are symmetric 4-bit (bits: 4, sym: true)")));
            }
            Ok(QuantConfig::Marlin {
                group: group_from(path, what, obj.get("group_size"))?,
                source: obj.get("source").and_then(Value::as_str).unwrap_or("unknown").to_string(),
            })
        }
        other => Err(err(format!(
            "{what}: quant_method `{other}` is not supported (compressed-tensors, gptq or {MARLIN_QUANT_METHOD})"
        ))),
    }
}

fn parse_ct(path: &str, obj: &serde_json::Map<String, Value>) -> Result<QuantConfig> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    unknown_keys(
        path,
        what,
        obj,
        &[
            "quant_method",
            "format",
            "config_groups",
            "ignore",
            "kv_cache_scheme",
            "quantization_status",
            "global_compression_ratio",
            "sparsity_config",
            "transform_config",
            "version",
        ],
    )?;
    let top_format = obj.get("format").and_then(Value::as_str);
    if let Some(f) = top_format {
        if f != "pack-quantized" && f != "mixed-precision" {
            return Err(err(format!("{what}: format `{f}` is not supported (only pack-quantized)")));
        }
    }
    if !is_null_or(obj.get("sparsity_config"), |v| v.as_object().is_some_and(|o| o.is_empty())) {
        return Err(err(format!("{what}: sparsity_config is not supported")));
    }
    let ignore = match obj.get("ignore") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| err(format!("{what}: `ignore` holds a non-string"))))
            .collect::<Result<_>>()?,
        Some(_) => return Err(err(format!("{what}: `ignore` is not a list"))),
    };
    IgnoreSet::new(&ignore).map_err(|e| err(format!("{what}: {e}")))?;
    let groups = obj
        .get("config_groups")
        .and_then(Value::as_object)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| err(format!("{what}: `config_groups` is missing or empty")))?;
    let mut group: Option<GroupSize> = None;
    for (gname, g) in groups {
        let gw = format!("{what}.config_groups.{gname}");
        let g = g.as_object().ok_or_else(|| err(format!("{gw} is not an object")))?;
        unknown_keys(path, &gw, g, &["targets", "weights", "input_activations", "output_activations", "format"])?;
        if let Some(f) = g.get("format").and_then(Value::as_str) {
            if f != "pack-quantized" {
                return Err(err(format!("{gw}: format `{f}` is not supported (only pack-quantized)")));
            }
        } else if top_format != Some("pack-quantized") {
            return Err(err(format!("{what}: `format` must be pack-quantized")));
        }
        for act in ["input_activations", "output_activations"] {
            if !is_null_or(g.get(act), |_| false) {
                return Err(err(format!("{gw}: `{act}` quantization is not supported (weight-only W4A16)")));
            }
        }
        if !g.get("targets").is_some_and(|t| t.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
            return Err(err(format!("{gw}: `targets` must be a list of strings")));
        }
        let ww = format!("{gw}.weights");
        let w = g.get("weights").and_then(Value::as_object).ok_or_else(|| err(format!("{ww} is missing")))?;
        unknown_keys(
            path,
            &ww,
            w,
            &[
                "num_bits",
                "type",
                "symmetric",
                "group_size",
                "strategy",
                "block_structure",
                "dynamic",
                "actorder",
                "observer",
                "observer_kwargs",
                "scale_dtype",
                "zp_dtype",
            ],
        )?;
        if w.get("num_bits").and_then(Value::as_i64) != Some(4) {
            return Err(err(format!("{ww}: num_bits must be 4")));
        }
        if w.get("type").and_then(Value::as_str) != Some("int") {
            return Err(err(format!("{ww}: type must be `int`")));
        }
        if w.get("symmetric") != Some(&Value::Bool(true)) {
            return Err(err(format!("{ww}: asymmetric quantization (symmetric: false) is not supported")));
        }
        if !is_null_or(w.get("dynamic"), |v| v == &Value::Bool(false)) {
            return Err(err(format!("{ww}: dynamic quantization is not supported")));
        }
        if !is_null_or(w.get("block_structure"), |_| false) {
            return Err(err(format!("{ww}: block_structure is not supported")));
        }
        if !is_null_or(w.get("actorder"), |v| {
            matches!(v.as_str(), Some("group" | "weight")) || v == &Value::Bool(false)
        }) {
            return Err(err(format!("{ww}: actorder {} is not supported", w["actorder"])));
        }
        let gs = match w.get("strategy").and_then(Value::as_str) {
            Some("group") => group_from(path, &ww, w.get("group_size"))?,
            Some("channel") => GroupSize::Channelwise,
            other => return Err(err(format!("{ww}: strategy {other:?} is not supported (group or channel)"))),
        };
        if group.is_some_and(|g| g != gs) {
            return Err(err(format!("{what}: config groups with different group sizes are not supported")));
        }
        group = Some(gs);
    }
    Ok(QuantConfig::CompressedTensors { group: group.unwrap_or(GroupSize::Channelwise), ignore })
}

fn parse_gptq(path: &str, obj: &serde_json::Map<String, Value>) -> Result<QuantConfig> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    unknown_keys(
        path,
        what,
        obj,
        &[
            "quant_method",
            "bits",
            "group_size",
            "desc_act",
            "sym",
            "checkpoint_format",
            "format",
            "damp_percent",
            "damp_auto_increment",
            "true_sequential",
            "static_groups",
            "model_name_or_path",
            "model_file_base_name",
            "lm_head",
            "dataset",
            "tokenizer",
            "pack_dtype",
            "meta",
            "backend",
            "use_exllama",
            "exllama_config",
            "cache_block_outputs",
            "max_input_length",
            "module_name_preceding_first_block",
            "batch_size",
            "use_cuda_fp16",
            "block_name_to_quantize",
            "modules_in_block_to_quantize",
            "mse",
            "dynamic",
            "is_marlin_format",
        ],
    )?;
    if obj.get("bits").and_then(Value::as_i64) != Some(4) {
        return Err(err(format!("{what}: GPTQ `bits` must be 4")));
    }
    if obj.get("sym") == Some(&Value::Bool(false)) {
        return Err(err(format!("{what}: asymmetric GPTQ (sym: false) is not supported")));
    }
    if obj.get("is_marlin_format") == Some(&Value::Bool(true)) {
        return Err(err(format!("{what}: legacy GPTQ Marlin checkpoints (is_marlin_format) are not supported")));
    }
    if !is_null_or(obj.get("dynamic"), |v| v.as_object().is_some_and(|o| o.is_empty())) {
        return Err(err(format!("{what}: per-module `dynamic` overrides are not supported")));
    }
    let fmt = obj.get("checkpoint_format").or_else(|| obj.get("format")).and_then(Value::as_str).unwrap_or("gptq");
    let v2 = match fmt {
        "gptq" => false,
        "gptq_v2" => true,
        other => return Err(err(format!("{what}: checkpoint_format `{other}` is not supported (gptq or gptq_v2)"))),
    };
    Ok(QuantConfig::Gptq {
        group: group_from(path, what, obj.get("group_size"))?,
        desc_act: obj.get("desc_act").and_then(Value::as_bool).unwrap_or(false),
        v2,
    })
}

/// The compressed-tensors `quantization_config` this crate writes.
pub fn ct_config(group: GroupSize, actorder: bool, ignore: &[String]) -> Value {
    let (strategy, gs) = match group {
        GroupSize::Group(g) => ("group", json!(g)),
        GroupSize::Channelwise => ("channel", Value::Null),
    };
    json!({
        "config_groups": {
            "group_0": {
                "input_activations": null,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {
                    "actorder": if actorder { json!("group") } else { Value::Null },
                    "block_structure": null,
                    "dynamic": false,
                    "group_size": gs,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": strategy,
                    "symmetric": true,
                    "type": "int"
                }
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed"
    })
}

/// The `quantization_config` of this crate's Marlin checkpoints. `source_qc` (the input's own
/// config, kept so that `restore` gives back the same bytes) is stored verbatim.
pub fn marlin_config(group: GroupSize, desc_act: bool, source: &str, source_qc: Option<&Value>) -> Value {
    let mut v = json!({
        "bits": 4,
        "desc_act": desc_act,
        "format": "marlin",
        "group_size": group.to_checkpoint(),
        "quant_method": MARLIN_QUANT_METHOD,
        "source": source,
        "sym": true
    });
    if let (Some(qc), Some(o)) = (source_qc, v.as_object_mut()) {
        o.insert("source_quantization_config".into(), qc.clone());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignore_semantics() {
        let s = IgnoreSet::new(&DEFAULT_IGNORE).unwrap();
        assert!(s.matches("lm_head"));
        assert!(s.matches("model.embed_tokens"));
        assert!(s.matches("model.layers.0.mlp.gate"));
        assert!(!s.matches("model.layers.0.mlp.gate_proj"));
        assert!(!s.matches("model.layers.0.self_attn.q_proj"));
        assert!(IgnoreSet::new(&["re:("]).is_err());
    }

    #[test]
    fn written_configs_parse_back() {
        for g in [GroupSize::Group(32), GroupSize::Channelwise] {
            let ct = ct_config(g, false, &["lm_head".into()]);
            assert_eq!(
                parse("c", &ct).unwrap(),
                QuantConfig::CompressedTensors { group: g, ignore: vec!["lm_head".into()] }
            );
            let m = marlin_config(g, true, "gptq", Some(&ct));
            assert_eq!(parse("c", &m).unwrap(), QuantConfig::Marlin { group: g, source: "gptq".into() });
        }
        let mut bad = ct_config(GroupSize::Group(32), false, &[]);
        bad["surprise"] = json!(1);
        assert!(parse("c", &bad).unwrap_err().to_string().contains("surprise"));
    }
}
