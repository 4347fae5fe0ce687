//! `lowbit bench`: argument parsing, bad usage (exit 2), and the no-device exit status 2.
//! The model arithmetic is unit-tested in `src/bin/bench/model.rs` (`cargo test --bin lowbit`).

use std::process::{Command, Output};

/// The `lowbit` binary: `LOWBIT_BIN`, beside this test binary, or cargo's build-time path.
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

fn lowbit(args: &[&str]) -> Output {
    Command::new(lowbit_exe()).args(args).output().expect("run lowbit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_four_operations_and_their_options() {
    let o = lowbit(&["bench", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for op in ["gemm", "moe", "sync", "fake-quant"] {
        assert!(text.contains(op), "{op} missing from:\n{text}");
    }
    let o = lowbit(&["bench", "moe", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in ["--experts", "--top-k", "--hidden", "--intermediate", "--group-size", "--dtype", "--json", "--iters"] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["bench", "gemm", "--n", "64"][..],
        &["bench", "gemm", "--group-size", "17"],
        &["bench", "gemm", "--dtype", "f32"],
        &["bench", "sync", "--iters", "0"],
        &["bench", "nope"],
    ] {
        let o = lowbit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn without_a_device_it_says_so_and_exits_2() {
    if lowbit::device::probe().is_ok() {
        eprintln!("skipped: a CUDA device (or lowbit-sim) is present; this test needs none");
        return;
    }
    let o = lowbit(&["bench", "gemm", "--m", "1", "--n", "28672", "--k", "8192", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("lowbit bench:"), "{err}");
    assert!(o.stdout.is_empty(), "nothing on stdout without a device");
}
