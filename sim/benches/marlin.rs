//! Simulator speed on the Marlin W4A16 GEMM: thread-instructions per second of one launch.
//!
//! The rate is per second of the launching thread's CPU time (one core, whatever else the
//! machine is running). Runs `lowbit bench gemm` (the release binary of the parent crate, built first if missing) on
//! the simulator with `LOWBIT_SIM_PROFILE`, reads the launch's `thread_instructions` and
//! `wall_ms` back, and prints the rate. Profiling and the checkers are on, as in CI.
//!
//! `cargo bench -p lowbit-sim --bench marlin` (the issue-8 target is ≥ 150 M/s on one core).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let sim = Command::new("bash").arg(root.join("scripts/sim-lib")).output().expect("scripts/sim-lib");
    assert!(sim.status.success(), "scripts/sim-lib failed: {}", String::from_utf8_lossy(&sim.stderr));
    let libdir = String::from_utf8_lossy(&sim.stdout).lines().last().unwrap_or_default().to_string();
    let st = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bin", "lowbit"])
        .current_dir(&root)
        .status()
        .expect("cargo build --bin lowbit");
    assert!(st.success());
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let lowbit = target.join("release/lowbit");
    let cases: &[(&str, &str, &str, &str)] =
        &[("16", "4096", "4096", "128"), ("1", "4096", "4096", "128"), ("64", "2048", "2048", "32")];
    println!(
        "{:>4} {:>6} {:>6} {:>4}  {:>14} {:>10} {:>10} {:>12}",
        "M", "N", "K", "g", "thread-instr", "wall ms", "cpu ms", "M instr/s"
    );
    for &(m, n, k, g) in cases {
        let prof = std::env::temp_dir().join(format!("lowbit-sim-bench-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&prof);
        let out = Command::new(&lowbit)
            .args(["bench", "gemm", "--m", m, "--n", n, "--k", k, "--group-size", g, "--dtype", "bf16", "--json"])
            .env("LD_LIBRARY_PATH", &libdir)
            .output()
            .expect("lowbit bench");
        assert!(out.status.success(), "lowbit bench failed: {}", String::from_utf8_lossy(&out.stderr));
        let json = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| -> f64 {
            let at = json.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {json}"));
            json[at + key.len() + 3..].split([',', '}']).next().unwrap().trim().parse().unwrap()
        };
        let (ti, ms, cpu) = (field("thread_instructions"), field("wall_ms"), field("cpu_ms"));
        println!("{m:>4} {n:>6} {k:>6} {g:>4}  {ti:>14.0} {ms:>10.1} {cpu:>10.1} {:>12.1}", ti / cpu / 1e3);
    }
}
