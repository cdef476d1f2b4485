//! Builds the XDP program (`ebpf/`) for the BPF target and leaves the object
//! in `OUT_DIR`, where `src/xdp.rs` embeds it. The aya-template pattern: a
//! plain `cargo build` yields a complete `gateway` binary.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker`; `cargo xtask
//! setup` installs them. Set `AYA_BUILD_SKIP=1` to build without them (the
//! binary then refuses to start and says why).
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../ebpf");
    let common_dir = manifest.join("../common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skip {
        // An empty placeholder so `include_bytes_aligned!` still compiles.
        let out = PathBuf::from(std::env::var("OUT_DIR")?).join("gateway-ebpf");
        std::fs::write(out, [])?;
    }
    // aya-build forwards every line the nested cargo prints as a
    // `cargo:warning`, which cargo then repeats on every build; keep the
    // nested build quiet so only its real warnings and errors show.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
