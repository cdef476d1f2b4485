//! Link flags of the XDP program, for the BPF target only (on the host the
//! crate is an empty binary and links as usual).
//!
//! `allows-misaligned-mem-access`: header fields are read as whole words
//! (the MAC compared as a 4- and a 2-byte load, the endpoint addresses
//! loaded as words) instead of byte by byte and shifted together, which
//! halves the program. The packet's headers have no alignment the
//! compiler can rely on; the verifier accepts misaligned packet access on
//! architectures with efficient unaligned access (x86-64, arm64), and
//! refuses the program at load on any other. Stack accesses must stay
//! aligned: the program keeps its lookup keys 8-aligned. Needs a
//! bpf-linker built against LLVM 22 (`cargo xtask setup` installs one).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    }
}
