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

/// How a `quantization_config` key is treated.
#[derive(Clone, Copy)]
enum Rule {
    /// Read and validated by the parser itself.
    Used,
    /// Informational (provenance, calibration settings): any value is accepted and ignored.
    Info,
    /// Accepted only when the value satisfies the predicate (its documented default, or a value
    /// that does not change the meaning of the stored weights); anything else is an error that
    /// names the key, the value and the reason.
    Only(fn(&Value) -> bool, &'static str),
}

type KeyTable = &'static [(&'static str, Rule)];

fn null_or_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn null_empty_or_false(v: &Value) -> bool {
    null_or_empty(v) || v == &Value::Bool(false)
}

/// A key lowbit does not know whose value is harmless (null, empty or false): accepted, and
/// reported by `inspect`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IgnoredKey {
    /// Dotted path of the key (`quantization_config.config_groups.group_0.weights.foo`).
    pub key: String,
    /// Its value, as compact JSON.
    pub value: String,
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        let mut cut = 117;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

/// Checks every key of `obj` against `table`; unknown keys with harmless values are recorded in
/// `ignored`, others are errors.
fn check_keys(
    path: &str,
    what: &str,
    obj: &serde_json::Map<String, Value>,
    table: KeyTable,
    ignored: &mut Vec<IgnoredKey>,
) -> Result<()> {
    for (k, v) in obj {
        match table.iter().find(|(name, _)| name == k).map(|(_, r)| *r) {
            Some(Rule::Used | Rule::Info) => {}
            Some(Rule::Only(ok, why)) => {
                if !ok(v) {
                    return Err(Error::checkpoint(
                        path,
                        format!("{what}: `{k}` = {} is not supported: {why}", short(v)),
                    ));
                }
            }
            None if null_empty_or_false(v) => ignored.push(IgnoredKey { key: format!("{what}.{k}"), value: short(v) }),
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "{what}: unknown field `{k}` = {} (not supported by lowbit; a non-null value may change \
                         the meaning of the weights)",
                        short(v)
                    ),
                ))
            }
        }
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

use Rule::{Info, Only, Used};

fn is_null(v: &Value) -> bool {
    v.is_null()
}
fn null_or_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
fn is_str_or_null(v: &Value) -> bool {
    v.is_null() || v.is_string()
}
fn int32_or_null(v: &Value) -> bool {
    v.is_null() || v.as_str().is_some_and(|s| s == "int32" || s == "torch.int32")
}
fn gptq_method(v: &Value) -> bool {
    v.as_str() == Some("gptq")
}

const ACT: &str = "activation quantization is not supported (weight-only W4A16)";

/// Top-level keys of a compressed-tensors `quantization_config` (docs/checkpoints.md has the
/// table with the versions that write them).
const CT_KEYS: KeyTable = &[
    ("quant_method", Used),
    ("format", Used),
    ("config_groups", Used),
    ("ignore", Used),
    ("quantization_status", Info),
    ("global_compression_ratio", Info),
    ("version", Info),
    ("provider", Info),
    ("kv_cache_scheme", Info),
    ("sparsity_config", Only(null_or_empty, "sparse compression changes how the weights are stored")),
    (
        "moe_sparsity_config",
        Only(null_or_empty, "MoE expert sparsity (pruned or novice experts) changes which experts the tensors hold"),
    ),
    ("transform_config", Only(null_or_empty, "transforms (e.g. Hadamard rotations) change what the weights mean")),
];

const CT_GROUP_KEYS: KeyTable = &[
    ("targets", Used),
    ("weights", Used),
    ("format", Used),
    ("input_activations", Only(is_null, ACT)),
    ("output_activations", Only(is_null, ACT)),
];

const CT_WEIGHT_KEYS: KeyTable = &[
    ("num_bits", Used),
    ("type", Used),
    ("symmetric", Used),
    ("group_size", Used),
    ("strategy", Used),
    ("actorder", Used),
    ("block_structure", Only(is_null, "block quantization is not supported (group or channel)")),
    ("dynamic", Only(null_or_false, "dynamic weight quantization is not supported")),
    ("observer", Info),
    ("observer_kwargs", Info),
    ("scale_dtype", Only(is_str_or_null, "must be a dtype name")),
    ("zp_dtype", Only(is_null, "zero points (asymmetric quantization) are not supported")),
];

const GPTQ_KEYS: KeyTable = &[
    ("quant_method", Used),
    ("bits", Used),
    ("group_size", Used),
    ("desc_act", Used),
    ("sym", Used),
    ("checkpoint_format", Used),
    ("format", Used),
    ("method", Only(gptq_method, "only the GPTQ method writes this format")),
    ("pack_dtype", Only(int32_or_null, "lowbit reads GPTQ codes packed in int32")),
    ("dynamic", Only(null_or_empty, "per-module `dynamic` overrides are not supported")),
    ("is_marlin_format", Only(null_or_false, "legacy GPTQ Marlin checkpoints are not supported")),
    ("activation", Only(null_or_empty, ACT)),
    ("rotation", Only(null_or_empty, "rotations change what the weights mean")),
    ("lm_head", Info),
    ("meta", Info),
    ("damp_percent", Info),
    ("damp_auto_increment", Info),
    ("true_sequential", Info),
    ("static_groups", Info),
    ("mse", Info),
    ("model_name_or_path", Info),
    ("model_file_base_name", Info),
    ("dataset", Info),
    ("tokenizer", Info),
    ("backend", Info),
    ("use_exllama", Info),
    ("exllama_config", Info),
    ("cache_block_outputs", Info),
    ("max_input_length", Info),
    ("module_name_preceding_first_block", Info),
    ("batch_size", Info),
    ("use_cuda_fp16", Info),
    ("block_name_to_quantize", Info),
    ("modules_in_block_to_quantize", Info),
    ("model_seqlen", Info),
    ("pad_token_id", Info),
];

const MARLIN_KEYS: KeyTable = &[
    ("quant_method", Used),
    ("format", Info),
    ("bits", Used),
    ("sym", Used),
    ("group_size", Used),
    ("desc_act", Info),
    ("source", Used),
    ("source_quantization_config", Info),
    ("source_config_file", Info),
];

/// Parses `quantization_config` (`path` names `config.json` in messages).
pub fn parse(path: &str, qc: &Value) -> Result<QuantConfig> {
    parse_noting(path, qc).map(|(c, _)| c)
}

/// [`parse`], also returning the unknown keys that were accepted because their value is null,
/// empty or false.
pub fn parse_noting(path: &str, qc: &Value) -> Result<(QuantConfig, Vec<IgnoredKey>)> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    let obj = qc.as_object().ok_or_else(|| err(format!("{what} is not a JSON object")))?;
    let method = match obj.get("quant_method") {
        None | Some(Value::Null) => "gptq",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(err(format!("{what}: `quant_method` = {} is not a string", short(v)))),
    };
    let mut ignored = Vec::new();
    let cfg = match method {
        "compressed-tensors" => parse_ct(path, obj, &mut ignored)?,
        "gptq" => parse_gptq(path, obj, &mut ignored)?,
        MARLIN_QUANT_METHOD => {
            check_keys(path, what, obj, MARLIN_KEYS, &mut ignored)?;
            if obj.get("bits").and_then(Value::as_i64) != Some(4) || obj.get("sym") != Some(&Value::Bool(true)) {
                return Err(err(format!("{what}: lowbit Marlin checkpoints are symmetric 4-bit (bits: 4, sym: true)")));
            }
            QuantConfig::Marlin {
                group: group_from(path, what, obj.get("group_size"))?,
                source: obj.get("source").and_then(Value::as_str).unwrap_or("unknown").to_string(),
            }
        }
        other => {
            return Err(err(format!(
                "{what}: quant_method `{other}` is not supported (compressed-tensors, gptq or {MARLIN_QUANT_METHOD})"
            )))
        }
    };
    Ok((cfg, ignored))
}

fn parse_ct(path: &str, obj: &serde_json::Map<String, Value>, ignored: &mut Vec<IgnoredKey>) -> Result<QuantConfig> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    check_keys(path, what, obj, CT_KEYS, ignored)?;
    let top_format = match obj.get("format") {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) if f == "pack-quantized" || f == "mixed-precision" => Some(f.as_str()),
        Some(v) => return Err(err(format!("{what}: `format` = {} is not supported (only pack-quantized)", short(v)))),
    };
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
        check_keys(path, &gw, g, CT_GROUP_KEYS, ignored)?;
        match g.get("format") {
            Some(Value::String(f)) if f == "pack-quantized" => {}
            None | Some(Value::Null) if top_format == Some("pack-quantized") => {}
            None | Some(Value::Null) => return Err(err(format!("{what}: `format` must be pack-quantized"))),
            Some(v) => {
                return Err(err(format!("{gw}: `format` = {} is not supported (only pack-quantized)", short(v))))
            }
        }
        if !g.get("targets").is_some_and(|t| t.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
            return Err(err(format!("{gw}: `targets` must be a list of strings")));
        }
        let ww = format!("{gw}.weights");
        let w = g.get("weights").and_then(Value::as_object).ok_or_else(|| err(format!("{ww} is missing")))?;
        check_keys(path, &ww, w, CT_WEIGHT_KEYS, ignored)?;
        if w.get("num_bits").and_then(Value::as_i64) != Some(4) {
            return Err(err(format!("{ww}: `num_bits` = {} is not supported (only 4)", show(w.get("num_bits")))));
        }
        if w.get("type").and_then(Value::as_str) != Some("int") {
            return Err(err(format!("{ww}: `type` = {} is not supported (only int)", show(w.get("type")))));
        }
        if w.get("symmetric") != Some(&Value::Bool(true)) {
            return Err(err(format!(
                "{ww}: `symmetric` = {}: asymmetric quantization is not supported",
                show(w.get("symmetric"))
            )));
        }
        if !is_null_or(w.get("actorder"), |v| {
            matches!(v.as_str(), Some("group" | "weight" | "static")) || v == &Value::Bool(false)
        }) {
            return Err(err(format!("{ww}: `actorder` = {} is not supported", show(w.get("actorder")))));
        }
        let gs = match w.get("strategy").and_then(Value::as_str) {
            Some("group") => group_from(path, &ww, w.get("group_size"))?,
            Some("channel") => GroupSize::Channelwise,
            _ => {
                return Err(err(format!(
                    "{ww}: `strategy` = {} is not supported (group or channel)",
                    show(w.get("strategy"))
                )))
            }
        };
        if group.is_some_and(|g| g != gs) {
            return Err(err(format!("{what}: config groups with different group sizes are not supported")));
        }
        group = Some(gs);
    }
    Ok(QuantConfig::CompressedTensors { group: group.unwrap_or(GroupSize::Channelwise), ignore })
}

fn show(v: Option<&Value>) -> String {
    v.map_or_else(|| "(missing)".to_string(), short)
}

fn parse_gptq(path: &str, obj: &serde_json::Map<String, Value>, ignored: &mut Vec<IgnoredKey>) -> Result<QuantConfig> {
    let what = "quantization_config";
    let err = |m: String| Error::checkpoint(path, m);
    check_keys(path, what, obj, GPTQ_KEYS, ignored)?;
    if obj.get("bits").and_then(Value::as_i64) != Some(4) {
        return Err(err(format!("{what}: GPTQ `bits` = {} is not supported (only 4)", show(obj.get("bits")))));
    }
    if obj.get("sym") == Some(&Value::Bool(false)) {
        return Err(err(format!("{what}: `sym` = false: asymmetric GPTQ is not supported")));
    }
    // GPTQModel writes both `checkpoint_format` and `format`; older writers one of them.
    let mut v2 = None;
    for key in ["checkpoint_format", "format"] {
        let this = match obj.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::String(f)) if f == "gptq" => false,
            Some(Value::String(f)) if f == "gptq_v2" => true,
            Some(v) => return Err(err(format!("{what}: `{key}` = {} is not supported (gptq or gptq_v2)", short(v)))),
        };
        if v2.is_some_and(|x| x != this) {
            return Err(err(format!("{what}: `checkpoint_format` and `format` disagree")));
        }
        v2 = Some(this);
    }
    Ok(QuantConfig::Gptq {
        group: group_from(path, what, obj.get("group_size"))?,
        desc_act: obj.get("desc_act").and_then(Value::as_bool).unwrap_or(false),
        v2: v2.unwrap_or(false),
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

/// A GPTQ `quantization_config` (v1 zero points), for restoring a Marlin checkpoint made from
/// GPTQ whose own config was not kept.
pub fn gptq_config(group: GroupSize, desc_act: bool) -> Value {
    json!({
        "bits": 4,
        "checkpoint_format": "gptq",
        "desc_act": desc_act,
        "group_size": group.to_checkpoint(),
        "quant_method": "gptq",
        "sym": true
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
