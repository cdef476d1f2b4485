//! Interop with the real kernel: Debian's 6.1 kernel booted under QEMU
//! (KVM when it works, TCG otherwise) is the peer, with its tunnels made by
//! iproute2's own commands; the real gateway runs on the host side of the
//! wire. For every mode (gre, ipip, gretap, sit, ip6gre, ip6gretap, ip6ip6,
//! ipip6) and GRE's options (key, csum, seq and their i/o variants; ttl and
//! tos inherit, nopmtudisc, encaplimit none), ping must cross both ways,
//! counted by the gateway's tunnel, ARP must cross gretap, and 1 MiB of TCP
//! must cross each way intact (SHA-256 compared). The outer headers each
//! side sent, captured on the wire and dissected by tshark, are compared
//! field by field: a difference fails the test (those by construction,
//! the two sides given mirrored i/o options, are kept apart).
//!
//! This boots a VM and downloads a kernel package (once, into
//! `target/vm`): it runs only with `GATEWAY_VM=1` (`GATEWAY_VM_ONLY=gre,ipip`
//! picks cases). It runs `cargo xtask vm interop` as a subprocess (which
//! builds the gateway first) and checks its exit status and the JSON it
//! writes. Nothing here asserts a timing: waits are conditions with
//! generous deadlines.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gateway_tests::require_root;
use serde_json::Value;

/// Passes each line `from` gives to `out` (`println!` or `eprintln!`, so
/// that the test harness captures it), from a thread of its own.
fn relay(from: impl Read + Send + 'static, out: fn(&str)) -> std::thread::JoinHandle<()> {
    // Spawned threads inherit the test's output capture.
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            out(&line);
        }
    })
}

/// `cargo xtask vm interop --json JSON [--only NAME]...`, run from the
/// workspace root with its output relayed; its exit status.
fn xtask_vm_interop(root: &Path, json: &Path, only: &[String]) -> std::process::ExitStatus {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args(["run", "--quiet", "--package", "xtask", "--"])
        .args(["vm", "interop", "--json"])
        .arg(json);
    for name in only {
        cmd.args(["--only", name]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let out = relay(stdout.expect("piped stdout"), |l| println!("{l}"));
    let err = relay(stderr.expect("piped stderr"), |l| eprintln!("{l}"));
    let status = child.wait().expect("waiting for cargo xtask vm interop");
    let _ = out.join();
    let _ = err.join();
    status
}

#[test]
fn every_mode_pings_both_ways_with_the_kernel() {
    const NAME: &str = "every_mode_pings_both_ways_with_the_kernel";
    if std::env::var("GATEWAY_VM").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {NAME}: boots Debian's kernel under QEMU (minutes under TCG); \
             set GATEWAY_VM=1 to run it (or run `cargo xtask vm interop`)"
        );
        return;
    }
    if !require_root(NAME) {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let only: Vec<String> = std::env::var("GATEWAY_VM_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    // Beside `cargo xtask vm interop`'s own interop.json, not over it.
    let json = root.join("target/vm/interop-test.json");
    let _ = std::fs::remove_file(&json);
    let status = xtask_vm_interop(&root, &json, &only);
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "the VM lab failed ({status}) and wrote no {}: {e}",
            json.display()
        )
    });
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", json.display()));
    let modes = report["modes"]
        .as_array()
        .unwrap_or_else(|| panic!("no \"modes\" in {}", json.display()));
    assert!(!modes.is_empty(), "no case ran ({})", json.display());
    let failed: Vec<&str> = modes
        .iter()
        .filter(|m| m["passes"] != true)
        .map(|m| m["mode"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        failed.is_empty(),
        "these cases failed against the kernel: {failed:?} (the table above; JSON: {})",
        json.display()
    );
    // The outer headers each side sent, field by field: every difference
    // the lab once found has been changed to what the kernel does, so any
    // difference now is a regression (those by construction, mirrored
    // i/o options, are listed apart and not counted).
    let differing: Vec<String> = modes
        .iter()
        .filter_map(|m| {
            let d = m["unexpected_differences"].as_array()?;
            (!d.is_empty()).then(|| format!("{}: {}", m["mode"], Value::Array(d.clone())))
        })
        .collect();
    assert!(
        differing.is_empty(),
        "the gateway's outer headers differ from the kernel's: {differing:?} (JSON: {})",
        json.display()
    );
    assert!(
        status.success(),
        "cargo xtask vm interop failed ({status}) though every case passed (JSON: {})",
        json.display()
    );
}
