//! Loads PTX files (or fatbins) and reports parse/lowering time and per-kernel facts:
//! `cargo run --release -p lowbit-sim --example ptx_load -- file.ptx ...`.

fn main() {
    for path in std::env::args().skip(1) {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let text = String::from_utf8_lossy(&bytes);
        let t = std::time::Instant::now();
        let ast = lowbit_sim::ptx::parse(&text);
        let parse = t.elapsed();
        match ast {
            Err(e) => println!("{path}: parse error: {e}"),
            Ok(m) => {
                let t = std::time::Instant::now();
                let r = lowbit_sim::ir::Module::from_ast(&m);
                println!("{path}: {} entries, parse {parse:?}, lower {:?}", m.entries.len(), t.elapsed());
                match r {
                    Err(e) => println!("  lowering error: {e}"),
                    Ok(module) => {
                        for k in &module.kernels {
                            println!("  {}", k.summary());
                        }
                    }
                }
            }
        }
    }
}
