//! `quantize`, `repack` and `restore`: plans built from the validated input, then written
//! atomically by [`source::write`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use half::{bf16, f16};
use serde_json::Value;

use super::config::{self, IgnoreSet, QuantConfig};
use super::fastquant::{self, Input, ScaleBits};
use super::jsontext;
use super::linear::LinearMeta;
use super::source::{self, Checkpoint, FilePlan, Item, Plan, Tensors};
use super::stfile::{self, i32_le, le_u16, u16_le, Dtype, OutSpec};
use super::{detect, DeviceChoice, Format, NoProgress, Progress, QuantizeOptions, Report, Skipped};
use crate::device::Device;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::format::{GroupSize, QuantShape};

/// Parallel batches of conversions read at most this many input bytes at once.
const BATCH_BYTES: u64 = 256 << 20;

/// Quantizes a BF16/F16/F32 checkpoint to compressed-tensors INT4. See the module docs.
pub fn quantize_checkpoint(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    opts: &QuantizeOptions,
) -> Result<Report> {
    quantize_checkpoint_with(input, output, opts, &mut NoProgress)
}

/// [`repack_checkpoint_with`] without progress reporting: compressed-tensors or GPTQ → Marlin.
pub fn repack_checkpoint(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<Report> {
    repack_checkpoint_with(input, output, &mut NoProgress)
}

/// [`restore_checkpoint_with`] without progress reporting: Marlin → the format it was made from.
pub fn restore_checkpoint(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<Report> {
    restore_checkpoint_with(input, output, &mut NoProgress)
}

fn quantize_gpu<T: Float, S: ScaleBits>(dev: &Device, w: &[T], shape: &QuantShape) -> Result<(Vec<u8>, Vec<u8>)> {
    let dw = dev.htod(w)?;
    let out = crate::quant::quantize_pack::<T, S>(dev, &dw, shape)?;
    let packed = dev.dtoh(&out.packed)?;
    let scales: Vec<S> = dev.dtoh(&out.scales)?;
    Ok((i32_le(&packed), u16_le(&scales.into_iter().map(S::bits).collect::<Vec<_>>())))
}

/// Quantizes one weight tensor given as little-endian bytes of `dtype` into the little-endian
/// bytes of `weight_packed` and `weight_scale`; scales are f16 for f16 weights and bf16
/// otherwise. The CPU path is [`fastquant`] (bit-identical to the reference).
fn quantize_bytes(bytes: &[u8], dtype: Dtype, shape: &QuantShape, dev: Option<&Device>) -> Result<(Vec<u8>, Vec<u8>)> {
    match (dtype, dev) {
        (Dtype::BF16, None) => fastquant::quantize_pack_bytes::<bf16>(bytes, Input::Bf16, shape),
        (Dtype::F16, None) => fastquant::quantize_pack_bytes::<f16>(bytes, Input::F16, shape),
        (Dtype::F32, None) => fastquant::quantize_pack_bytes::<bf16>(bytes, Input::F32, shape),
        (Dtype::BF16, Some(d)) => {
            let w: Vec<bf16> = le_u16(bytes).into_iter().map(bf16::from_bits).collect();
            quantize_gpu::<bf16, bf16>(d, &w, shape)
        }
        (Dtype::F16, Some(d)) => {
            let w: Vec<f16> = le_u16(bytes).into_iter().map(f16::from_bits).collect();
            quantize_gpu::<f16, f16>(d, &w, shape)
        }
        (Dtype::F32, Some(d)) => {
            let w: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            quantize_gpu::<f32, bf16>(d, &w, shape)
        }
        (other, _) => Err(Error::invalid("quantize", format!("cannot quantize {other} weights"))),
    }
}

fn open_device(choice: DeviceChoice) -> Result<Option<Device>> {
    let open = || -> Result<Device> {
        if !crate::device::kernels_built() {
            return Err(Error::KernelsNotBuilt { family: "quant" });
        }
        Device::first()
    };
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Gpu => open().map(Some),
        DeviceChoice::Auto => Ok(open().ok()),
    }
}

fn file_name(ck: &Checkpoint, fi: usize) -> String {
    ck.files[fi].path().file_name().map_or_else(|| "model.safetensors".into(), |n| n.to_string_lossy().into_owned())
}

/// The output `config.json`: the input's bytes with `quantization_config` set to the JSON text
/// `qc` (or removed when `None`), every other byte unchanged; a new file when the input had none.
fn config_text_with(ck: &Checkpoint, qc: Option<&str>) -> Result<String> {
    match &ck.config_text {
        Some(text) => jsontext::set_member(&ck.config_path, text, "quantization_config", qc),
        None => {
            let qc = qc.unwrap_or("{}");
            Ok(format!("{{\n  \"quantization_config\": {qc}\n}}\n"))
        }
    }
}

/// [`quantize_checkpoint`] reporting progress.
pub fn quantize_checkpoint_with(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    opts: &QuantizeOptions,
    progress: &mut dyn Progress,
) -> Result<Report> {
    let ck = Checkpoint::open(input.as_ref())?;
    let det = detect(&ck)?;
    if det.format != Format::Plain || ck.quant.is_some() {
        return Err(Error::checkpoint(
            ck.root.display(),
            format!("the checkpoint is already quantized ({}); quantize takes a BF16/F16/F32 checkpoint", det.format),
        ));
    }
    if let GroupSize::Group(g) = opts.group_size {
        if !GroupSize::SUPPORTED.contains(&g) {
            return Err(Error::invalid(
                "quantize",
                format!("group size {g} is not supported (32, 64, 128 or channelwise)"),
            ));
        }
    }
    let mut patterns: Vec<String> = Vec::new();
    if opts.default_ignore {
        patterns.extend(config::DEFAULT_IGNORE.iter().map(|s| s.to_string()));
    }
    patterns.extend(opts.ignore.iter().cloned());
    let ignore = IgnoreSet::new(&patterns)?;
    let dev = open_device(opts.device)?;
    let mut report = Report {
        input_format: Some(Format::Plain),
        output_format: Some(Format::CompressedTensors),
        device: dev.as_ref().map_or_else(|| "cpu".to_string(), |d| d.info().name.clone()),
        ..Report::default()
    };
    let mut skipped_modules = Vec::new();
    let mut files = Vec::new();
    for (fi, f) in ck.files.iter().enumerate() {
        let mut items = Vec::new();
        for t in &f.header.tensors {
            let module = t.name.strip_suffix(".weight");
            let candidate =
                module.filter(|_| t.shape.len() == 2 && matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32));
            let Some(module) = candidate else {
                report.copied += 1;
                items.push(Item::Copy(t.name.clone()));
                continue;
            };
            if ignore.matches(module) {
                report.ignored.push(t.name.clone());
                report.copied += 1;
                items.push(Item::Copy(t.name.clone()));
                continue;
            }
            let (n, k) = (t.shape[0], t.shape[1]);
            let shape = match QuantShape::new(n, k, opts.group_size) {
                Ok(s) => s,
                Err(e) => {
                    let reason = match e {
                        Error::Shape { msg, .. } => msg,
                        e => e.to_string(),
                    };
                    report.skipped.push(Skipped { name: t.name.clone(), reason });
                    skipped_modules.push(module.to_string());
                    report.copied += 1;
                    items.push(Item::Copy(t.name.clone()));
                    continue;
                }
            };
            let meta = LinearMeta {
                prefix: module.to_string(),
                layout: super::linear::Layout::Ct,
                shape,
                scale_dtype: if t.dtype == Dtype::F16 { Dtype::F16 } else { Dtype::BF16 },
                g_idx: None,
                perm: None,
                inputs: vec![t.name.clone()],
                extra: Vec::new(),
                in_bytes: t.nbytes() as u64,
                codes_tensor: t.name.clone(),
                scales_tensor: t.name.clone(),
            };
            report.quantized.push(module.to_string());
            let (ck_ref, dev_ref, name, dtype) = (&ck, dev.as_ref(), t.name.clone(), t.dtype);
            let outputs = meta.ct_specs();
            let in_bytes = meta.in_bytes;
            items.push(Item::Job {
                label: name.clone(),
                inputs: vec![name.clone()],
                in_bytes,
                outputs,
                run: Box::new(move || {
                    let (file, info) = ck_ref.require(&name, &meta.prefix)?;
                    let (packed, scales) = quantize_bytes(file.bytes(info), dtype, &meta.shape, dev_ref)
                        .map_err(|e| Error::checkpoint(file.display(), format!("tensor `{name}`: {e}")))?;
                    let s = &meta.shape;
                    Ok(vec![
                        (format!("{}.weight_packed", meta.prefix), packed),
                        (format!("{}.weight_scale", meta.prefix), scales),
                        (format!("{}.weight_shape", meta.prefix), i32_le(&[s.n as i32, s.k as i32])),
                    ])
                }),
            });
        }
        files.push(FilePlan { name: file_name(&ck, fi), metadata: f.header.metadata.clone(), items, order: vec![] });
    }
    let mut ignore_list = patterns.clone();
    ignore_list.extend(skipped_modules);
    let qc = jsontext::pretty_at(&config::ct_config(opts.group_size, false, &ignore_list), 1);
    let cfg = config_text_with(&ck, Some(&qc))?;
    report.bytes_read = ck.total_bytes();
    let plan = Plan {
        files,
        config: Some(cfg),
        index_metadata: ck.index_metadata.clone(),
        index_total_size: None,
        skip_extra: vec![],
        batch_bytes: if dev.is_some() { 0 } else { BATCH_BYTES },
    };
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    finish_report(&mut report, &ck, written);
    Ok(report)
}

fn finish_report(report: &mut Report, ck: &Checkpoint, written: source::Written) {
    report.files = ck.files.len();
    report.tensors = written.tensors;
    report.bytes_written = written.bytes;
    report.removed_stale = written.removed_stale;
}

/// Builds the plan of a layer-by-layer conversion: every quantized layer becomes a job placed in
/// the file of its codes tensor, every other tensor (the layers' pass-through tensors included)
/// is copied.
fn convert_plan<'a>(
    ck: &'a Checkpoint,
    layers: &'a [LinearMeta],
    specs: &dyn Fn(&LinearMeta) -> Result<Vec<OutSpec>>,
    encode: &'a (dyn Fn(&LinearMeta) -> Result<Tensors> + Send + Sync),
    metadata: &dyn Fn(usize) -> Result<BTreeMap<String, String>>,
    report: &mut Report,
) -> Result<Vec<FilePlan<'a>>> {
    let consumed: BTreeSet<&str> = layers.iter().flat_map(|l| l.inputs.iter().map(String::as_str)).collect();
    let mut files: Vec<FilePlan> = (0..ck.files.len())
        .map(|fi| Ok(FilePlan { name: file_name(ck, fi), metadata: metadata(fi)?, items: Vec::new(), order: vec![] }))
        .collect::<Result<_>>()?;
    for (fi, f) in ck.files.iter().enumerate() {
        for t in &f.header.tensors {
            if !consumed.contains(t.name.as_str()) {
                report.copied += 1;
                files[fi].items.push(Item::Copy(t.name.clone()));
            }
        }
    }
    for l in layers {
        let fi = ck.file_of(&l.codes_tensor).unwrap_or(0);
        report.quantized.push(l.prefix.clone());
        files[fi].items.push(Item::Job {
            label: l.prefix.clone(),
            inputs: l.inputs.clone(),
            in_bytes: l.in_bytes,
            outputs: specs(l)?,
            run: Box::new(move || encode(l)),
        });
    }
    Ok(files)
}

/// File metadata key under which `repack` keeps a source file's tensor order (only when it is not
/// the official writer's).
const SOURCE_ORDER: &str = "source_order";
/// Index metadata key under which `repack` keeps the source index's `total_size`.
const SOURCE_TOTAL_SIZE: &str = "lowbit_source_total_size";
/// Marlin `quantization_config` key saying the source config came from `quantize_config.json`
/// (GPTQ) rather than `config.json`.
const SOURCE_CONFIG_FILE: &str = "source_config_file";

/// [`repack_checkpoint`] reporting progress.
pub fn repack_checkpoint_with(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    progress: &mut dyn Progress,
) -> Result<Report> {
    let ck = Checkpoint::open(input.as_ref())?;
    let root = ck.root.display().to_string();
    let det = detect(&ck)?;
    let source_name = match det.format {
        Format::CompressedTensors => "compressed-tensors",
        Format::Gptq => "gptq",
        Format::Marlin => return Err(Error::checkpoint(&root, "the checkpoint is already in the Marlin format")),
        Format::Plain => {
            return Err(Error::checkpoint(&root, "the checkpoint has no quantized layers; run `lowbit quantize` first"))
        }
    };
    if det.layers.is_empty() {
        return Err(Error::checkpoint(&root, "the checkpoint has no quantized layers"));
    }
    let group = det.group.unwrap_or(GroupSize::Channelwise);
    if let Some(l) = det.layers.iter().find(|l| l.shape.group_size != group) {
        return Err(Error::checkpoint(
            &root,
            format!(
                "layer `{}` has group size {}, others {group}: mixed group sizes are not supported",
                l.prefix, l.shape.group_size
            ),
        ));
    }
    let desc_act = det.layers.iter().any(|l| l.perm.is_some());
    let mut report = Report {
        input_format: Some(det.format),
        output_format: Some(Format::Marlin),
        device: "cpu".into(),
        ..Report::default()
    };
    let metadata = |fi: usize| -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        m.insert("format".to_string(), "marlin".to_string());
        m.insert("group_size".to_string(), group.to_checkpoint().to_string());
        m.insert("source".to_string(), source_name.to_string());
        let src = &ck.files[fi].header.metadata;
        if !src.is_empty() {
            m.insert(
                "source_metadata".to_string(),
                serde_json::to_string(src).map_err(|e| Error::checkpoint(&root, e))?,
            );
        }
        // A source written by another writer than `safetensors.serialize` (GPTQModel, ...): keep
        // its data order so restore can give the file back byte for byte.
        if let Some(order) = stfile::custom_order(&ck.files[fi].header) {
            m.insert(SOURCE_ORDER.to_string(), serde_json::to_string(&order).map_err(|e| Error::checkpoint(&root, e))?);
        }
        Ok(m)
    };
    let ckr = &ck;
    let encode = move |l: &LinearMeta| -> Result<Tensors> { l.marlin_tensors_direct(ckr) };
    let specs = |l: &LinearMeta| l.marlin_specs(ckr);
    let files = convert_plan(&ck, &det.layers, &specs, &encode, &metadata, &mut report)?;
    // The Marlin config keeps the source's quantization_config text verbatim, so restore can give
    // it back byte for byte.
    let source_qc_text: Option<String> = match (&ck.config_text, &ck.quant) {
        (Some(text), _) if ck.config.as_ref().is_some_and(|c| c.get("quantization_config").is_some()) => {
            jsontext::member_text(&ck.config_path, text, "quantization_config")?.map(str::to_string)
        }
        (_, Some(_)) => {
            Some(std::fs::read_to_string(&ck.config_path).map_err(Error::io(&ck.config_path))?.trim_end().to_string())
        }
        _ => None,
    };
    let from_qcfg_file =
        source_qc_text.is_some() && ck.config.as_ref().is_none_or(|c| c.get("quantization_config").is_none());
    let mut mq = config::marlin_config(group, desc_act, source_name, None);
    if from_qcfg_file {
        mq[SOURCE_CONFIG_FILE] = "quantize_config.json".into();
    }
    let mut qc = jsontext::pretty_at(&mq, 1);
    if let Some(t) = &source_qc_text {
        qc = jsontext::set_member(&root, &qc, "source_quantization_config", Some(t))?;
    }
    let cfg = config_text_with(&ck, Some(&qc))?;
    let mut index_metadata = ck.index_metadata.clone();
    if let Some(ts) = &ck.index_total_size {
        index_metadata.insert(SOURCE_TOTAL_SIZE.into(), ts.clone());
    }
    let plan = Plan {
        files,
        config: Some(cfg),
        index_metadata,
        index_total_size: None,
        skip_extra: vec![],
        batch_bytes: BATCH_BYTES,
    };
    report.bytes_read = ck.total_bytes();
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    finish_report(&mut report, &ck, written);
    Ok(report)
}

/// [`restore_checkpoint`] reporting progress: Marlin → the format it was made from
/// (compressed-tensors or GPTQ), giving back the source's tensors, `config.json` and index
/// metadata byte for byte.
pub fn restore_checkpoint_with(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    progress: &mut dyn Progress,
) -> Result<Report> {
    let ck = Checkpoint::open(input.as_ref())?;
    let root = ck.root.display().to_string();
    let det = detect(&ck)?;
    if det.format != Format::Marlin {
        return Err(Error::checkpoint(&root, format!("restore takes a Marlin checkpoint, this one is {}", det.format)));
    }
    let group = det.group.unwrap_or(GroupSize::Channelwise);
    let actorder = det.layers.iter().any(|l| l.g_idx.is_some());
    let marlin_qc = ck.config.as_ref().and_then(|c| c.get("quantization_config"));
    let source = match (&ck.quant, ck.marlin_metadata().and_then(|m| m.get("source"))) {
        (Some((QuantConfig::Marlin { source, .. }, _)), _) if source != "unknown" => source.clone(),
        (_, Some(s)) => s.clone(),
        _ => "compressed-tensors".to_string(),
    };
    let target = match source.as_str() {
        "compressed-tensors" => Format::CompressedTensors,
        "gptq" => Format::Gptq,
        other => {
            return Err(Error::checkpoint(
                &root,
                format!("unknown source format `{other}` (compressed-tensors or gptq)"),
            ))
        }
    };
    // The source's own quantization_config, verbatim, when repack kept it.
    let stored_text: Option<String> = match (&ck.config_text, marlin_qc) {
        (Some(text), Some(_)) => match jsontext::member_text(&ck.config_path, text, "quantization_config")? {
            Some(qct) => jsontext::member_text(&ck.config_path, qct, "source_quantization_config")?.map(str::to_string),
            None => None,
        },
        _ => None,
    };
    if let Some(t) = &stored_text {
        let v: Value = serde_json::from_str(t).map_err(|e| Error::checkpoint(&ck.config_path, e))?;
        let parsed = config::parse(&ck.config_path, &v)?;
        let matches = matches!(
            (&parsed, target),
            (QuantConfig::CompressedTensors { .. }, Format::CompressedTensors)
                | (QuantConfig::Gptq { .. }, Format::Gptq)
        );
        if !matches {
            return Err(Error::checkpoint(
                &ck.config_path,
                format!("source_quantization_config does not describe the source format {source}"),
            ));
        }
    }
    let from_qcfg_file =
        marlin_qc.and_then(|q| q.get(SOURCE_CONFIG_FILE)).and_then(Value::as_str) == Some("quantize_config.json");
    let v2 = match (&stored_text, target) {
        (Some(t), Format::Gptq) => {
            let v: Value = serde_json::from_str(t).map_err(|e| Error::checkpoint(&ck.config_path, e))?;
            matches!(config::parse(&ck.config_path, &v)?, QuantConfig::Gptq { v2: true, .. })
        }
        _ => false,
    };
    let new_qc: Option<String> = match (&stored_text, target) {
        (Some(_), Format::Gptq) if from_qcfg_file => None,
        (Some(t), _) => Some(t.clone()),
        (None, Format::CompressedTensors) => {
            if actorder {
                return Err(Error::checkpoint(
                    &root,
                    "the Marlin checkpoint has act-order layers (perm) but no source quantization_config: \
                     compressed-tensors >= 0.19 removed act-order (`actorder: group`, `weight_g_idx`) from \
                     pack-quantized, so no current reader would load the result; the source GPTQ checkpoint \
                     (or a Marlin checkpoint repacked from it) restores losslessly to GPTQ",
                ));
            }
            let quantized: BTreeSet<&str> = det.layers.iter().map(|l| l.prefix.as_str()).collect();
            let mut ignore: Vec<String> = ck
                .names()
                .into_iter()
                .filter_map(|n| n.strip_suffix(".weight").filter(|m| !quantized.contains(m)).map(|m| (n, m)))
                .filter(|(n, _)| ck.get(n).is_some_and(|(_, t)| t.shape.len() == 2))
                .map(|(_, m)| m.to_string())
                .collect();
            ignore.sort();
            Some(jsontext::pretty_at(&config::ct_config(group, false, &ignore), 1))
        }
        (None, _) => Some(jsontext::pretty_at(&config::gptq_config(group, actorder), 1)),
    };
    let mut report = Report {
        input_format: Some(Format::Marlin),
        output_format: Some(target),
        device: "cpu".into(),
        ..Report::default()
    };
    let metadata = |fi: usize| -> Result<BTreeMap<String, String>> {
        let f = &ck.files[fi];
        match f.header.metadata.get("source_metadata") {
            Some(s) => serde_json::from_str(s).map_err(|e| {
                Error::checkpoint(f.display(), format!("__metadata__.source_metadata is not a JSON string map: {e}"))
            }),
            None => Ok(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        }
    };
    let ckr = &ck;
    let encode = move |l: &LinearMeta| -> Result<Tensors> {
        if let Some(t) = l.restore_direct(ckr, target == Format::Gptq, v2)? {
            return Ok(t);
        }
        let q = l.load(ckr)?;
        match target {
            Format::Gptq => l.gptq_tensors(ckr, &q, v2),
            _ => Ok(l.ct_tensors(&q)),
        }
    };
    let specs = |l: &LinearMeta| Ok(if target == Format::Gptq { l.gptq_specs() } else { l.ct_specs() });
    let mut files = convert_plan(&ck, &det.layers, &specs, &encode, &metadata, &mut report)?;
    for (fi, fp) in files.iter_mut().enumerate() {
        let f = &ck.files[fi];
        if let Some(o) = f.header.metadata.get(SOURCE_ORDER) {
            fp.order = serde_json::from_str(o).map_err(|e| {
                Error::checkpoint(f.display(), format!("__metadata__.{SOURCE_ORDER} is not a JSON list of names: {e}"))
            })?;
        }
    }
    let mut index_metadata = ck.index_metadata.clone();
    let index_total_size = index_metadata.remove(SOURCE_TOTAL_SIZE);
    let plan = Plan {
        files,
        config: Some(config_text_with(&ck, new_qc.as_deref())?),
        index_metadata,
        index_total_size,
        skip_extra: vec![],
        batch_bytes: BATCH_BYTES,
    };
    report.bytes_read = ck.total_bytes();
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    finish_report(&mut report, &ck, written);
    Ok(report)
}
