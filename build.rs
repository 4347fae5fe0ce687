//! Build script: compiles every kernel family under `csrc/<family>/` to a fatbin with nvcc and
//! embeds it; generates the kernel-name table the Rust side dispatches through.
//!
//! * nvcc discovery, in order: `NVCC`, `CUDA_HOME`/`CUDA_PATH` (`bin/nvcc`), `PATH`, then the
//!   project-local install made by `scripts/install-cuda-toolchain.sh` (`.toolchain/`).
//! * Targets: `sm_90a` and `sm_80` SASS by default; `LOWBIT_CUDA_ARCHS="90a,80"` overrides.
//! * Families compile in parallel; a family is recompiled only when its sources, the shared
//!   headers, the flags or the compiler change (a content hash is kept in `OUT_DIR`).
//! * Without nvcc the crate still builds: a cargo warning is printed, no kernels are embedded and
//!   GPU entry points return `Error::KernelsNotBuilt`. `LOWBIT_REQUIRE_KERNELS=1` turns a missing
//!   nvcc or a compile error into a build failure.
//! * A family directory may hold `instances.list`: one template instantiation per line,
//!   `name threads ParamType device_function<args...>` (threads: `256` or `256,2`, the
//!   `__launch_bounds__` arguments), turned into an `extern "C"` kernel
//!   wrapper in a generated translation unit and into the generated Rust kernel table, so Rust
//!   dispatch can only name kernels that were built.
//! * With the `bindgen` feature, `src/ffi/bindings.rs` is regenerated from `csrc/include/lowbit.h`.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Instance {
    name: String,
    /// `__launch_bounds__` arguments: `THREADS` or `THREADS,MIN_BLOCKS_PER_SM`.
    threads: String,
    params: String,
    call: String,
}

struct Family {
    name: String,
    dir: PathBuf,
    kernels: Vec<String>,
    instances: Vec<Instance>,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let csrc = root.join("csrc");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build.rs");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "NVCC_CCBIN", "CXX", "LOWBIT_CUDA_ARCHS", "LOWBIT_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let toolchain = root.join(".toolchain");
    if toolchain.exists() {
        println!("cargo:rerun-if-changed=.toolchain");
    }
    let require = env::var("LOWBIT_REQUIRE_KERNELS").map(|v| v == "1").unwrap_or(false);

    #[cfg(feature = "bindgen")]
    generate_bindings(&root);

    let families = discover_families(&csrc).unwrap_or_else(|e| panic!("reading csrc/: {e}"));
    let archs = parse_archs();
    let nvcc = find_nvcc(&root);
    let mut images: Vec<Option<PathBuf>> = vec![None; families.len()];
    let mut nvcc_version = String::new();
    match &nvcc {
        None => {
            let msg = "nvcc not found (NVCC, CUDA_HOME/CUDA_PATH, PATH, .toolchain/): building without \
                 GPU kernels; GPU calls will return Error::KernelsNotBuilt. Run \
                 scripts/install-cuda-toolchain.sh to install the CUDA 13.0 compiler.";
            if require {
                panic!("LOWBIT_REQUIRE_KERNELS=1: {msg}");
            }
            println!("cargo:warning={msg}");
        }
        Some(nvcc) => {
            nvcc_version = nvcc_version_line(nvcc);
            let ccbin = host_compiler();
            let results: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = families
                    .iter()
                    .map(|f| {
                        let (nvcc, ccbin, archs, out, csrc, ver) = (nvcc, &ccbin, &archs, &out, &csrc, &nvcc_version);
                        s.spawn(move || compile_family(f, nvcc, ccbin, archs, out, csrc, ver))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (i, r) in results.into_iter().enumerate() {
                match r {
                    Ok(p) => images[i] = Some(p),
                    Err(e) => {
                        let msg = format!("compiling kernel family `{}` failed:\n{e}", families[i].name);
                        if require {
                            panic!("LOWBIT_REQUIRE_KERNELS=1: {msg}");
                        }
                        for line in msg.lines().take(40) {
                            println!("cargo:warning={line}");
                        }
                    }
                }
            }
        }
    }
    write_kernel_table(&out, &families, &images, &archs, &nvcc_version);
}

fn parse_archs() -> Vec<String> {
    let spec = env::var("LOWBIT_CUDA_ARCHS").unwrap_or_else(|_| "90a,80".to_string());
    let archs: Vec<String> = spec
        .split([',', ';', ' '])
        .map(|s| s.trim().trim_start_matches("sm_").trim_start_matches("compute_"))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    for a in &archs {
        let digits = a.trim_end_matches('a');
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            panic!("LOWBIT_CUDA_ARCHS: `{a}` is not an architecture like 90a or 80");
        }
    }
    if archs.is_empty() {
        panic!("LOWBIT_CUDA_ARCHS is empty");
    }
    archs
}

fn runs(nvcc: &Path) -> bool {
    Command::new(nvcc).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if runs(&p) {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} does not run; trying other locations", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join(exe);
            if runs(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(exe);
            if p.is_file() && runs(&p) {
                return Some(p);
            }
        }
    }
    let lib = root.join(".toolchain/cuda-venv/lib");
    if let Ok(entries) = fs::read_dir(&lib) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin").join(exe);
            if runs(&p) {
                return Some(p);
            }
        }
    }
    None
}

fn nvcc_version_line(nvcc: &Path) -> String {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().find(|l| l.contains("release")).map(str::to_string))
        .unwrap_or_default()
}

fn host_compiler() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC_CCBIN") {
        return Some(PathBuf::from(p));
    }
    cc::Build::new().cpp(true).cargo_metadata(false).try_get_compiler().ok().map(|c| c.path().to_path_buf())
}

fn discover_families(csrc: &Path) -> std::io::Result<Vec<Family>> {
    let mut families = Vec::new();
    let mut dirs: Vec<PathBuf> = fs::read_dir(csrc)?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let main = dir.join(format!("{name}.cu"));
        if !main.is_file() {
            continue; // include/, common/: headers only
        }
        let mut kernels = Vec::new();
        for src in sorted_files(&dir)? {
            if matches!(src.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")) {
                scan_extern_kernels(&fs::read_to_string(&src)?, &mut kernels);
            }
        }
        let mut instances = Vec::new();
        let list = dir.join("instances.list");
        if list.is_file() {
            for (lineno, line) in fs::read_to_string(&list)?.lines().enumerate() {
                let line = line.split('#').next().unwrap().trim();
                if line.is_empty() {
                    continue;
                }
                let mut it = line.splitn(4, char::is_whitespace);
                let fields: Vec<&str> = (0..4).filter_map(|_| it.next()).collect();
                if fields.len() != 4 {
                    panic!("{}:{}: expected `name threads Params call`", list.display(), lineno + 1);
                }
                let bounds: Vec<&str> = fields[1].split(',').collect();
                if bounds.len() > 2 || bounds.iter().any(|b| b.parse::<u32>().is_err()) {
                    panic!(
                        "{}:{}: launch bounds `{}` (THREADS or THREADS,MIN_BLOCKS)",
                        list.display(),
                        lineno + 1,
                        fields[1]
                    );
                }
                let threads = fields[1].to_string();
                instances.push(Instance {
                    name: fields[0].to_string(),
                    threads,
                    params: fields[2].to_string(),
                    call: fields[3].trim().to_string(),
                });
                kernels.push(fields[0].to_string());
            }
        }
        kernels.sort();
        kernels.dedup();
        families.push(Family { name, dir, kernels, instances });
    }
    Ok(families)
}

fn sorted_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    v.sort();
    Ok(v)
}

/// Finds `extern "C" __global__ void [__launch_bounds__(..)] NAME(` declarations.
fn scan_extern_kernels(text: &str, out: &mut Vec<String>) {
    let mut rest = text;
    while let Some(pos) = rest.find("extern \"C\"") {
        rest = &rest[pos + 10..];
        let head = rest.trim_start();
        let Some(after_global) = head.strip_prefix("__global__") else { continue };
        let mut s = after_global.trim_start();
        let Some(after_void) = s.strip_prefix("void") else { continue };
        s = after_void.trim_start();
        if let Some(lb) = s.strip_prefix("__launch_bounds__") {
            let mut depth = 0usize;
            let mut end = 0;
            for (i, c) in lb.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            s = lb[end..].trim_start();
        }
        let name: String = s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
}

fn hash_dir(dir: &Path, h: &mut DefaultHasher) {
    if let Ok(files) = sorted_files(dir) {
        for f in files {
            f.file_name().hash(h);
            fs::read(&f).unwrap_or_default().hash(h);
        }
    }
}

fn compile_family(
    f: &Family,
    nvcc: &Path,
    ccbin: &Option<PathBuf>,
    archs: &[String],
    out: &Path,
    csrc: &Path,
    nvcc_version: &str,
) -> Result<PathBuf, String> {
    // The translation unit: the family's main file plus generated instance wrappers.
    let mut tu = format!("#include \"{}\"\n", f.dir.join(format!("{}.cu", f.name)).display());
    for i in &f.instances {
        let _ = writeln!(
            tu,
            "extern \"C\" __global__ void __launch_bounds__({}) {}(const {} p) {{ {}(p); }}",
            i.threads, i.name, i.params, i.call
        );
    }
    let tu_path = out.join(format!("{}_tu.cu", f.name));

    let mut args: Vec<String> = vec![
        "-fatbin".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-lineinfo".into(),
        "--expt-relaxed-constexpr".into(),
        "-Xptxas=-v".into(),
        format!("-I{}", csrc.join("include").display()),
        format!("-I{}", csrc.join("common").display()),
        format!("-I{}", csrc.display()),
    ];
    if let Some(cc) = ccbin {
        args.push("-ccbin".into());
        args.push(cc.display().to_string());
    }
    for a in archs {
        args.push("-gencode".into());
        args.push(format!("arch=compute_{a},code=sm_{a}"));
    }
    // compute_80 PTX, uncompressed: what lowbit-sim interprets, and what a real GPU newer than
    // every SASS target JITs.
    args.push("-gencode".into());
    args.push("arch=compute_80,code=compute_80".into());
    args.push("--no-compress".into());

    let mut h = DefaultHasher::new();
    tu.hash(&mut h);
    args.hash(&mut h);
    nvcc_version.hash(&mut h);
    hash_dir(&f.dir, &mut h);
    hash_dir(&csrc.join("include"), &mut h);
    hash_dir(&csrc.join("common"), &mut h);
    // Fatbins are cached by content hash in a directory shared by every profile of this target
    // dir (cargo check, clippy, test and release builds all reuse one compilation).
    let cache = kernel_cache_dir(out);
    let fatbin = cache.join(format!("{}-{:016x}.fatbin", f.name, h.finish()));
    if fatbin.is_file() {
        return Ok(fatbin);
    }
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    fs::write(&tu_path, &tu).map_err(|e| e.to_string())?;
    let partial = fatbin.with_extension(format!("partial-{}", std::process::id()));
    let output = Command::new(nvcc)
        .args(&args)
        .arg("-o")
        .arg(&partial)
        .arg(&tu_path)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    fs::write(out.join(format!("{}.ptxas.log", f.name)), &log).ok();
    if !output.status.success() {
        let _ = fs::remove_file(&partial);
        return Err(log);
    }
    fs::rename(&partial, &fatbin).map_err(|e| e.to_string())?;
    Ok(fatbin)
}

/// `<target>/lowbit-kernel-cache`, derived from `OUT_DIR` (`<target>/<profile>/build/<pkg>/out`).
fn kernel_cache_dir(out: &Path) -> PathBuf {
    out.ancestors().nth(4).map_or_else(|| out.to_path_buf(), |t| t.join("lowbit-kernel-cache"))
}

fn write_kernel_table(
    out: &Path,
    families: &[Family],
    images: &[Option<PathBuf>],
    archs: &[String],
    nvcc_version: &str,
) {
    let mut s = String::from("// @generated by build.rs: kernel families embedded in this build.\n");
    let _ = writeln!(
        s,
        "pub const ARCHS: &[&str] = &[{}];",
        archs.iter().map(|a| format!("\"sm_{a}\"")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(s, "pub const NVCC_VERSION: &str = {:?};", nvcc_version);
    s.push_str("pub static FAMILIES: &[crate::device::FamilyImage] = &[\n");
    for (f, img) in families.iter().zip(images) {
        let image = match img {
            Some(p) => format!("Some(include_bytes!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        let _ = writeln!(
            s,
            "    crate::device::FamilyImage {{ name: {:?}, fatbin: {image}, kernels: &[{}] }},",
            f.name,
            f.kernels.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
        );
    }
    s.push_str("];\n");
    let path = out.join("kernels.rs");
    if fs::read_to_string(&path).ok().as_deref() != Some(s.as_str()) {
        fs::write(&path, s).expect("writing kernels.rs");
    }
}

#[cfg(feature = "bindgen")]
fn generate_bindings(root: &Path) {
    let header = root.join("csrc/include/lowbit.h");
    let bindings = bindgen::Builder::default()
        .header(header.display().to_string())
        .clang_arg(format!("-I{}", root.join("csrc/include").display()))
        .allowlist_type("Lowbit.*")
        .allowlist_var("LOWBIT_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .use_core()
        .generate_comments(true)
        .generate()
        .expect("bindgen failed on csrc/include/lowbit.h");
    let text = format!(
        "// @generated by bindgen from csrc/include/lowbit.h (cargo build --features bindgen).\n\
         // Do not edit by hand; CI fails when this file drifts from the headers.\n{}",
        bindings
    );
    let dest = root.join("src/ffi/bindings.rs");
    if fs::read_to_string(&dest).ok().as_deref() != Some(text.as_str()) {
        fs::write(&dest, text).expect("writing src/ffi/bindings.rs");
    }
}
