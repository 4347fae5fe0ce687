//! The `lowbit` command: the end-to-end example of docs/checkpoints.md, exit codes, messages,
//! and no progress-bar noise when stderr is not a terminal.

mod ckpt_util;

use std::path::Path;
use std::process::{Command, Output};

use ckpt_util::*;

/// The `lowbit` binary, found at run time so the test also runs from a staged copy on another
/// machine: `LOWBIT_BIN`, then beside this test binary (`target/<profile>/lowbit`, or
/// `.gpu/bin/bin/lowbit` as gpu-stage lays it out), then cargo's build-time path if it exists.
fn lowbit_exe() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LOWBIT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary directory");
    let candidates =
        [dir.join("../lowbit"), dir.join("../bin/lowbit"), std::path::PathBuf::from(env!("CARGO_BIN_EXE_lowbit"))];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("the lowbit binary was not found (looked at {candidates:?}); set LOWBIT_BIN"))
}

fn lowbit(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(lowbit_exe()).args(args.iter().map(|a| a.as_ref())).output().expect("run lowbit")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lowbit failed ({:?}): {err}", out.status.code());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr `{err}` should mention `{n}`");
    }
    err
}

#[test]
fn end_to_end() {
    let tmp = TempDir::new("cli");
    let input = tmp.path().join("model");
    make_model(&input, true);
    let (q, m, r) = (tmp.path().join("model-int4"), tmp.path().join("model-marlin"), tmp.path().join("model-restored"));
    let out =
        lowbit(&[&"quantize", &"--group-size", &"32", &"--ignore", &"re:.*down_proj", &"--device", &"cpu", &input, &q]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "no progress bar when stderr is not a terminal: {err:?}");
    assert!(err.contains("4 quantized layers"), "{err}");
    assert!(err.contains("warning: `model.layers.0.mlp.odd.weight` left unquantized"), "{err}");

    let text = ok(&lowbit(&[&"inspect", &q]));
    assert!(text.contains("format:   compressed-tensors"), "{text}");
    assert!(text.contains("model.layers.1.self_attn.q_proj  [128, 128] g=32"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(&lowbit(&[&"inspect", &"--json", &q]))).unwrap();
    assert_eq!(json["format"], "compressed-tensors");
    assert_eq!(json["group_size"], 32);
    assert_eq!(json["quantized"].as_array().unwrap().len(), 4);
    assert_eq!(json["levels"][0], 0);
    assert!(json["plain"].as_array().unwrap().iter().any(|t| t["name"] == "model.layers.0.mlp.down_proj.weight"));

    ok(&lowbit(&[&"repack", &q, &m]));
    let mj: serde_json::Value = serde_json::from_str(&ok(&lowbit(&[&"inspect", &"--json", &m]))).unwrap();
    assert_eq!(mj["format"], "marlin");
    assert_eq!(mj["levels"], json["levels"]);
    ok(&lowbit(&[&"restore", &m, &r]));
    assert_same_tree(&q, &r);
}

#[test]
fn errors_have_exit_codes_and_messages() {
    let tmp = TempDir::new("cli-err");
    let input = tmp.path().join("model");
    make_model(&input, false);
    let o = tmp.path().join("o");
    // Usage errors: exit code 2.
    fails(&lowbit(&[&"quantize", &"--group-size", &"48", &input, &o]), 2, &["48"]);
    fails(&lowbit(&[&"quantize", &"--device", &"tpu", &input, &o]), 2, &["tpu"]);
    fails(&lowbit(&[&"frobnicate"]), 2, &[]);
    // Runtime errors: exit code 1, naming the file / tensor and the problem.
    fails(&lowbit(&[&"inspect", &tmp.path().join("nope")]), 1, &["lowbit: error:", "nope"]);
    fails(&lowbit(&[&"repack", &input, &o]), 1, &["no quantized layers"]);
    let q = tmp.path().join("q");
    ok(&lowbit(&[&"quantize", &"--device", &"cpu", &input, &q]));
    fails(&lowbit(&[&"quantize", &"--device", &"cpu", &input, &q]), 1, &["already exists"]);
    let st = q.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails(&lowbit(&[&"repack", &q, &o]), 1, &["model.safetensors", "truncated"]);
    fails(&lowbit(&[&"inspect", &"--json", &q]), 1, &["truncated"]);
    assert!(!o.exists());
    assert_no_partials(tmp.path());
    std::fs::write(&st, &bytes).unwrap();
    let cfg_path = q.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["quantization_config"]["bogus_field"] = 1.into();
    write_json(&cfg_path, &cfg);
    fails(&lowbit(&[&"repack", &q, &o]), 1, &["config.json", "bogus_field"]);
    assert!(!o.exists());
}

#[test]
fn gpu_device_without_gpu_is_a_clean_error() {
    // Where a GPU is usable this succeeds; elsewhere it must fail with a message, not a panic.
    let tmp = TempDir::new("cli-gpu");
    let input = tmp.path().join("model");
    make_model(&input, false);
    let o = tmp.path().join("o");
    let out = lowbit(&[&"quantize", &"--device", &"gpu", &input, &o]);
    if !out.status.success() {
        let err = fails(&out, 1, &["lowbit: error:"]);
        assert!(!err.contains("panicked"), "{err}");
        assert!(!Path::new(&o).exists());
        assert_no_partials(tmp.path());
    }
}

/// A model big enough that `quantize` is still running when the test signals it: four 32 MiB
/// BF16 weights.
fn make_big_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let block: Vec<u8> = (0..65536u32)
        .flat_map(|i| {
            lowbit::bf16::from_f32((i.wrapping_mul(2654435761) % 2001) as f32 / 1e5 - 0.01).to_bits().to_le_bytes()
        })
        .collect();
    let tensors: Vec<Tensor> = (0..4)
        .map(|i| {
            let bytes: Vec<u8> = block.iter().copied().cycle().take(4096 * 4096 * 2).collect();
            (format!("model.layers.{i}.mlp.up_proj.weight"), safetensors::Dtype::BF16, vec![4096, 4096], bytes)
        })
        .collect();
    write_st(&dir.join("model.safetensors"), tensors, None);
}

#[cfg(unix)]
fn interrupted(sig: i32, code: i32) {
    let tmp = TempDir::new("cli-signal");
    let input = tmp.path().join("big");
    make_big_model(&input);
    let out = tmp.path().join("q");
    let mut child = Command::new(lowbit_exe())
        .args([
            std::ffi::OsStr::new("quantize"),
            "--device".as_ref(),
            "cpu".as_ref(),
            input.as_os_str(),
            out.as_os_str(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = tmp.path().join(format!("q.partial-{}", child.id()));
    let t0 = std::time::Instant::now();
    while !partial.exists() && t0.elapsed().as_secs() < 20 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(partial.exists(), "the partial output never appeared");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.exists());
    assert_no_partials(tmp.path());
}

#[cfg(unix)]
#[test]
fn sigint_and_sigterm_remove_the_partial_output() {
    interrupted(libc::SIGTERM, 143);
    interrupted(libc::SIGINT, 130);
}

#[test]
fn stale_partial_is_removed_and_reported() {
    let tmp = TempDir::new("cli-stale");
    let input = tmp.path().join("model");
    make_model(&input, false);
    let stale = tmp.path().join("q.partial-2147483600");
    std::fs::create_dir_all(&stale).unwrap();
    let q = tmp.path().join("q");
    let out = lowbit(&[&"quantize", &"--device", &"cpu", &input, &q]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("q.partial-2147483600") && err.contains("no longer exists"), "{err}");
    assert!(!stale.exists());
}
