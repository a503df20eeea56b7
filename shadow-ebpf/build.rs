use which::which;

/// Rebuild the eBPF object when bpf-linker changes (a new toolchain's LLVM), as cargo cannot see
/// the linker otherwise.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
