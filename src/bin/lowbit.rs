//! `lowbit`: quantize, repack, restore and inspect checkpoints.
fn main() {
    eprintln!("lowbit: the command-line tool is not built yet");
    std::process::exit(2);
}
