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

use gateway_tests::vm;
use serde_json::Value;

#[test]
fn every_mode_pings_both_ways_with_the_kernel() {
    const NAME: &str = "every_mode_pings_both_ways_with_the_kernel";
    if !vm::enabled(NAME, "boots Debian's kernel under QEMU") {
        return;
    }
    let only: Vec<String> = std::env::var("GATEWAY_VM_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| format!("--only={s}"))
        .collect();
    let mut args = vec!["interop"];
    args.extend(only.iter().map(String::as_str));
    // Beside `cargo xtask vm interop`'s own interop.json, not over it.
    let (status, report) = vm::xtask_vm_json(&args, "interop-test.json");
    let json = "target/vm/interop-test.json";
    let modes = report["modes"]
        .as_array()
        .unwrap_or_else(|| panic!("no \"modes\" in {}", json));
    assert!(!modes.is_empty(), "no case ran ({})", json);
    let failed: Vec<&str> = modes
        .iter()
        .filter(|m| m["passes"] != true)
        .map(|m| m["mode"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        failed.is_empty(),
        "these cases failed against the kernel: {failed:?} (the table above; JSON: {})",
        json
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
        json
    );
    assert!(
        status.success(),
        "cargo xtask vm interop failed ({status}) though every case passed (JSON: {})",
        json
    );
}
