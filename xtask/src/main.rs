//! `cargo xtask`: orchestration only. Nothing here is needed to build the
//! gateway; it installs what a fresh machine lacks, runs the tests, and
//! (as they arrive) the demo and the bench.
//!
//! ```text
//! cargo xtask demo      the two-host lab in network namespaces (root)
//! cargo xtask bench     throughput, latency and ceilings in one run (root)
//! cargo xtask setup     install toolchain pieces and Debian packages
//! cargo xtask test      setup, build, unit tests, integration tests (root)
//! cargo xtask lint      rustfmt --check and clippy -D warnings
//! cargo xtask fuzz      each fuzz target for a while (cargo-fuzz, nightly)
//! cargo xtask vm        the real kernel as a peer, in a VM (root; `vm interop`)
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod demo;
mod differential;
mod guestlab;
mod interop;
mod vm;
mod vmlab;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The lab: two gateways in namespaces, ping through GRE and IPIP, the
    /// wire decoded by tshark, the counters; then everything removed.
    Demo,
    /// The bench harness: throughput, latency histograms and the machine's
    /// own ceilings in one run (root). Arguments go to gateway-bench
    /// (--quick, --payload 1372, --mode ipip, --poll adaptive, --out DIR).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what building and testing need (idempotent; says what it does).
    Setup,
    /// Setup, build, then run the unit and integration tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt --check and clippy with warnings denied.
    Lint,
    /// Instructions per packet of the sans-IO paths (decap, encap,
    /// coalescing, segmentation), counted by callgrind: reproducible where
    /// timings are not. No root needed.
    Instructions,
    /// Runs each fuzz target (decap, encap, config, reasm, offload) with
    /// cargo-fuzz, from the seed corpus in fuzz/seeds, for a while each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only this target.
        target: Option<String>,
    },
    /// The real kernel as a peer: Debian's 6.1 kernel under QEMU with the
    /// gateway on the other side of the wire (root). Alone: the seed lab by
    /// hand, a shell in the guest; `interop`: every mode, ping both ways.
    Vm {
        #[command(subcommand)]
        action: Option<vmlab::VmCmd>,
    },
}

/// Debian packages: building (LLVM 22 for bpf-linker, clang-22 and friends
/// for libxdp), and testing (iproute2, ping, capture tools, a Prometheus
/// server that scrapes the gateway).
const DEB_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "clang-22",
    "libelf-dev",
    "m4",
    "pkg-config",
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "tshark",
    "iperf3",
    "ethtool",
    "valgrind",
    "prometheus",
    // The failure tests detach the gateway's XDP link as another tool would.
    "bpftool",
    // The conformance suite builds and dissects packets with scapy.
    "python3-scapy",
    // `gateway capture` compiles filter expressions with libpcap.
    "libpcap-dev",
    // The anycast suite runs BIRD on a router and two gateway hosts.
    "bird2",
    // The bench's breakdown records the kernel's tracepoints with perf.
    "linux-perf",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn say(msg: &str) {
    eprintln!("[xtask] {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    say(&format!("running {cmd:?}"));
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"))
        .join("bin")
}

fn setup() -> Result<()> {
    // Debian packages.
    let missing: Vec<&str> = DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        say("Debian packages: all present");
    } else if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root: apt-get update && apt-get install -y {}",
            missing.join(" ")
        );
    } else {
        say(&format!("installing Debian packages {missing:?}"));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        if missing.contains(&"bird2") {
            // The package starts BIRD on the host with its sample
            // configuration; the tests run their own, in namespaces.
            let _ = Command::new("systemctl")
                .args(["disable", "--now", "bird"])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    // Nightly with rust-src: the XDP program is built with -Z build-std=core.
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the nightly Rust toolchain is missing; install it with `rustup toolchain install nightly --component rust-src`");
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup component list")?;
    if String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        say("nightly rust-src: present");
    } else {
        say("adding rust-src to the nightly toolchain (for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker built against Debian's LLVM 22.
    let linker = cargo_bin_dir().join("bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if have {
        say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        say(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 75 s, once)"
        ));
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_220_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).args(args);
    c
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    run(&mut cargo(&["build", "--workspace"]))?;
    let bin = root().join("target/debug/gateway");
    if !Path::new(&bin).exists() {
        bail!("build produced no {}", bin.display());
    }
    say("unit tests (no root needed)");
    run(cargo(&["test", "--workspace", "--exclude", "gateway-tests"]).args(args))?;
    if !is_root() {
        bail!("the integration tests need root (network namespaces, XDP, AF_XDP): run `sudo -E cargo xtask test`");
    }
    say(
        "integration tests: the real binary, XDP, AF_XDP and tap/tun devices in network namespaces",
    );
    // The VM suites (the real kernel as the peer, and the gateway inside a
    // Linux 6.1 guest) run too, unless GATEWAY_VM=0 says not to.
    let vm = std::env::var("GATEWAY_VM").unwrap_or_else(|_| "1".into());
    if vm == "1" {
        say("with the VM suites (Debian's Linux 6.1 under QEMU; GATEWAY_VM=0 to leave them out)");
    } else {
        say("without the VM suites (GATEWAY_VM is not 1)");
    }
    run(cargo(&["test", "-p", "gateway-tests", "--"])
        .arg("--test-threads=1")
        .args(args)
        .env("GATEWAY_BIN", &bin)
        .env("GATEWAY_VM", vm))?;
    Ok(())
}

const FUZZ_TARGETS: &[&str] = &["decap", "encap", "config", "reasm", "offload"];

fn fuzz(time: u64, only: Option<&str>) -> Result<()> {
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        say("installing cargo-fuzz (once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_none_or(|o| o == **t))
    {
        // Work in a scratch corpus so the committed seeds stay small.
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        for e in std::fs::read_dir(root().join("fuzz/seeds").join(target))? {
            let e = e?;
            std::fs::copy(e.path(), corpus.join(e.file_name()))?;
        }
        say(&format!("fuzzing {target} for {time} s"));
        run(Command::new("cargo")
            .current_dir(root().join("fuzz"))
            .args(["+nightly", "fuzz", "run", target])
            // The fuzz targets need no XDP object: skip building it.
            .env("AYA_BUILD_SKIP", "1")
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={time}"))
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}

/// Runs `decap-micro --count CASE n` under callgrind and returns the
/// instructions it executed.
fn callgrind(bin: &std::path::Path, case: &str, n: usize) -> Result<u64> {
    let out_file = std::env::temp_dir().join(format!("gateway-callgrind-{}", std::process::id()));
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(bin)
        .args(["--count", case, &n.to_string()])
        .output()
        .context("running valgrind (apt-get install valgrind)")?;
    let _ = std::fs::remove_file(&out_file);
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| {
            let v = l.split("Collected :").nth(1)?;
            v.trim().parse().ok()
        })
        .with_context(|| format!("no instruction count from callgrind:\n{text}"))
}

fn instructions() -> Result<()> {
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "gateway-bench",
        "--bin",
        "decap-micro",
    ]))?;
    let bin = root().join("target/release/decap-micro");
    let list = Command::new(&bin).args(["--count", "list", "0"]).output()?;
    let (n1, n2) = (10_000usize, 30_000usize);
    println!("{:<34} {:>14}", "case", "instructions/packet");
    for case in String::from_utf8_lossy(&list.stdout).lines() {
        let a = callgrind(&bin, case, n1)?;
        let b = callgrind(&bin, case, n2)?;
        // The set-up is the same in both runs: the difference is the
        // packets alone.
        let per = b.saturating_sub(a) as f64 / (n2 - n1) as f64;
        println!("{case:<34} {per:>14.1}");
    }
    println!("(callgrind, {} and {} packets per case, difference per packet; decap cases include restoring the frame, a 100-byte copy)", n1, n2);
    Ok(())
}

fn lint() -> Result<()> {
    run(&mut cargo(&["fmt", "--all", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The XDP program for its own target: on the host it compiles to an
    // empty binary, so the lints above never see its code (its `unsafe`
    // blocks must say why they are sound: undocumented_unsafe_blocks).
    run(Command::new("cargo")
        .current_dir(root().join("ebpf"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "+nightly",
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Bench { args } => {
            setup()?;
            run(&mut cargo(&[
                "build",
                "--release",
                "-p",
                "gateway",
                "-p",
                "gateway-bench",
            ]))?;
            if !is_root() {
                bail!("the bench needs root (network namespaces, XDP, AF_XDP): run `sudo -E cargo xtask bench`");
            }
            run(Command::new(root().join("target/release/gateway-bench"))
                .current_dir(root())
                .arg("--gateway")
                .arg(root().join("target/release/gateway"))
                .args(&args))
        }
        Cmd::Demo => {
            setup()?;
            run(&mut cargo(&["build", "--release", "-p", "gateway"]))?;
            if !is_root() {
                bail!(
                    "the demo needs root (network namespaces, XDP): run `sudo -E cargo xtask demo`"
                );
            }
            let interrupted = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, interrupted.clone())?;
            }
            demo::demo(&root(), &root().join("target/release/gateway"), interrupted)
        }
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint(),
        Cmd::Instructions => {
            setup()?;
            instructions()
        }
        Cmd::Fuzz { time, target } => fuzz(time, target.as_deref()),
        Cmd::Vm { action } => {
            setup()?;
            run(&mut cargo(&["build", "-p", "gateway"]))?;
            if !is_root() {
                bail!("the VM lab needs root (network namespaces, taps, XDP): run `sudo -E cargo xtask vm`");
            }
            vmlab::main(&root(), &root().join("target/debug/gateway"), action)
        }
    }
}
