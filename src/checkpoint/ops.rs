//! `quantize`, `repack` and `restore`: plans built from the validated input, then written
//! atomically by [`source::write`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::Value;

use super::config::{self, IgnoreSet, QuantConfig};
use super::linear::LinearMeta;
use super::source::{self, Checkpoint, FilePlan, Item, Plan, Tensors};
use super::stfile::{i32_le, le_u16, u16_le, Dtype, OutSpec};
use super::{detect, DeviceChoice, Format, NoProgress, Progress, QuantizeOptions, Report, Skipped};
use crate::device::Device;
use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::format::{GroupSize, QuantShape};

/// Parallel batches of conversions read at most this many input bytes at once.
const BATCH_BYTES: u64 = 256 << 20;

/// Rows per CPU work item of `quantize` (about a million weights).
const ROW_CHUNK_ELEMS: usize = 1 << 20;

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

/// [`restore_checkpoint_with`] without progress reporting: Marlin → compressed-tensors.
pub fn restore_checkpoint(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<Report> {
    restore_checkpoint_with(input, output, &mut NoProgress)
}

trait Bits: ScaleFloat {
    fn bits(self) -> u16;
}
impl Bits for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}
impl Bits for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// The CPU path: rows are independent, so chunks of rows are quantized in parallel with the
/// reference implementation and concatenated (bit-identical to one call over the whole matrix).
fn quantize_cpu<T: Float, S: Bits>(w: &[T], shape: &QuantShape) -> Result<(Vec<i32>, Vec<u16>)> {
    let rows = (ROW_CHUNK_ELEMS / shape.k).max(1);
    let parts: Vec<Result<(Vec<i32>, Vec<S>)>> = w
        .par_chunks(rows * shape.k)
        .enumerate()
        .map(|(i, c)| {
            let sh = QuantShape::new(c.len() / shape.k, shape.k, shape.group_size)?;
            crate::reference::quant::quantize_pack::<T, S>(c, &sh).map_err(|e| match e {
                Error::NonFinite { op, row, col } => Error::NonFinite { op, row: row + i * rows, col },
                Error::ScaleOverflow { op, row, group } => Error::ScaleOverflow { op, row: row + i * rows, group },
                e => e,
            })
        })
        .collect();
    let mut packed = Vec::with_capacity(shape.packed_len());
    let mut scales = Vec::with_capacity(shape.scales_len());
    for p in parts {
        let (pk, sc) = p?;
        packed.extend_from_slice(&pk);
        scales.extend(sc.into_iter().map(S::bits));
    }
    Ok((packed, scales))
}

fn quantize_gpu<T: Float, S: Bits>(dev: &Device, w: &[T], shape: &QuantShape) -> Result<(Vec<i32>, Vec<u16>)> {
    let dw = dev.htod(w)?;
    let out = crate::quant::quantize_pack::<T, S>(dev, &dw, shape)?;
    let packed = dev.dtoh(&out.packed)?;
    let scales: Vec<S> = dev.dtoh(&out.scales)?;
    Ok((packed, scales.into_iter().map(S::bits).collect()))
}

fn quantize_typed<T: Float, S: Bits>(
    w: Vec<T>,
    shape: &QuantShape,
    dev: Option<&Device>,
) -> Result<(Vec<i32>, Vec<u16>)> {
    match dev {
        Some(d) => quantize_gpu::<T, S>(d, &w, shape),
        None => quantize_cpu::<T, S>(&w, shape),
    }
}

/// Quantizes one weight tensor given as little-endian bytes of `dtype`; scales are f16 for f16
/// weights and bf16 otherwise.
fn quantize_bytes(
    bytes: &[u8],
    dtype: Dtype,
    shape: &QuantShape,
    dev: Option<&Device>,
) -> Result<(Vec<i32>, Vec<u16>)> {
    match dtype {
        Dtype::BF16 => {
            quantize_typed::<bf16, bf16>(le_u16(bytes).into_iter().map(bf16::from_bits).collect(), shape, dev)
        }
        Dtype::F16 => quantize_typed::<f16, f16>(le_u16(bytes).into_iter().map(f16::from_bits).collect(), shape, dev),
        Dtype::F32 => quantize_typed::<f32, bf16>(
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            shape,
            dev,
        ),
        other => Err(Error::invalid("quantize", format!("cannot quantize {other} weights"))),
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

fn config_with(ck: &Checkpoint, qc: Value) -> Value {
    let mut cfg = ck.config.clone().unwrap_or_else(|| Value::Object(Default::default()));
    if let Some(o) = cfg.as_object_mut() {
        o.insert("quantization_config".into(), qc);
    }
    cfg
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
                in_bytes,
                outputs,
                run: Box::new(move || {
                    let (file, info) = ck_ref.require(&name, &meta.prefix)?;
                    let (packed, scales) = quantize_bytes(file.bytes(info), dtype, &meta.shape, dev_ref)
                        .map_err(|e| Error::checkpoint(file.display(), format!("tensor `{name}`: {e}")))?;
                    let s = &meta.shape;
                    Ok(vec![
                        (format!("{}.weight_packed", meta.prefix), i32_le(&packed)),
                        (format!("{}.weight_scale", meta.prefix), u16_le(&scales)),
                        (format!("{}.weight_shape", meta.prefix), i32_le(&[s.n as i32, s.k as i32])),
                    ])
                }),
            });
        }
        files.push(FilePlan { name: file_name(&ck, fi), metadata: f.header.metadata.clone(), items });
    }
    let mut ignore_list = patterns.clone();
    ignore_list.extend(skipped_modules);
    let cfg = config_with(&ck, config::ct_config(opts.group_size, false, &ignore_list));
    report.bytes_read = ck.total_bytes();
    let plan =
        Plan { files, config: Some(cfg), skip_extra: vec![], batch_bytes: if dev.is_some() { 0 } else { BATCH_BYTES } };
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    report.files = ck.files.len();
    report.tensors = written.tensors;
    report.bytes_written = written.bytes;
    Ok(report)
}

/// Builds the plan of a layer-by-layer conversion: every quantized layer becomes a job placed in
/// the file of its codes tensor, every other tensor is copied.
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
        .map(|fi| Ok(FilePlan { name: file_name(ck, fi), metadata: metadata(fi)?, items: Vec::new() }))
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
            in_bytes: l.in_bytes,
            outputs: specs(l)?,
            run: Box::new(move || encode(l)),
        });
    }
    Ok(files)
}

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
        Ok(m)
    };
    let ckr = &ck;
    let encode = move |l: &LinearMeta| -> Result<Tensors> { l.marlin_tensors(ckr, &l.load(ckr)?) };
    let specs = |l: &LinearMeta| l.marlin_specs(ckr);
    let files = convert_plan(&ck, &det.layers, &specs, &encode, &metadata, &mut report)?;
    let source_qc = ck.quant.as_ref().map(|(_, v)| v);
    let cfg = config_with(&ck, config::marlin_config(group, desc_act, source_name, source_qc));
    let skip_extra = vec!["quantize_config.json".to_string()];
    let plan = Plan { files, config: Some(cfg), skip_extra, batch_bytes: BATCH_BYTES };
    report.bytes_read = ck.total_bytes();
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    report.files = ck.files.len();
    report.tensors = written.tensors;
    report.bytes_written = written.bytes;
    Ok(report)
}

/// [`restore_checkpoint`] reporting progress.
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
    let mut report = Report {
        input_format: Some(Format::Marlin),
        output_format: Some(Format::CompressedTensors),
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
    let encode = move |l: &LinearMeta| -> Result<Tensors> { Ok(l.ct_tensors(&l.load(ckr)?)) };
    let specs = |l: &LinearMeta| Ok(l.ct_specs());
    let files = convert_plan(&ck, &det.layers, &specs, &encode, &metadata, &mut report)?;
    // The original compressed-tensors config when there was one, else a new one whose ignore list
    // names every 2-D weight that stayed unquantized.
    let stored = ck.config.as_ref().and_then(|c| c.get("quantization_config")).and_then(|qc| {
        let src = qc.get("source_quantization_config")?;
        matches!(config::parse(&ck.config_path, src), Ok(QuantConfig::CompressedTensors { .. })).then(|| src.clone())
    });
    let qc = stored.unwrap_or_else(|| {
        let quantized: BTreeSet<&str> = det.layers.iter().map(|l| l.prefix.as_str()).collect();
        let mut ignore: Vec<String> = ck
            .names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(".weight").filter(|m| !quantized.contains(m)).map(|m| (n, m)))
            .filter(|(n, _)| ck.get(n).is_some_and(|(_, t)| t.shape.len() == 2))
            .map(|(_, m)| m.to_string())
            .collect();
        ignore.sort();
        config::ct_config(group, actorder, &ignore)
    });
    let plan = Plan { files, config: Some(config_with(&ck, qc)), skip_extra: vec![], batch_bytes: BATCH_BYTES };
    report.bytes_read = ck.total_bytes();
    let written = source::write(&ck, output.as_ref(), plan, progress)?;
    report.files = ck.files.len();
    report.tensors = written.tensors;
    report.bytes_written = written.bytes;
    Ok(report)
}
