//! Interop with the real kernel: Debian's 6.1 kernel booted under QEMU
//! (KVM when it works, TCG otherwise) is the peer, with its tunnels made by
//! iproute2's own commands; the real gateway runs on the host side of the
//! wire. For every mode (gre, ipip, gretap, sit, ip6gre, ip6gretap, ip6ip6,
//! ipip6) and GRE's options (key, csum, seq and their i/o variants; ttl and
//! tos inherit, nopmtudisc, encaplimit none), ping must cross both ways,
//! counted by the gateway's tunnel, ARP must cross gretap, and 1 MiB of TCP
//! must cross each way intact (SHA-256 compared). The outer headers each
//! side sent, captured on the wire and dissected by tshark, are compared
//! field by field and the differences printed (not asserted: some are
//! known, see the table).
//!
//! This boots a VM and downloads a kernel package (once, into
//! `target/vm`): it runs only with `GATEWAY_VM=1` (`GATEWAY_VM_ONLY=gre,ipip`
//! picks cases). The same code is `cargo xtask vm interop`. Nothing here
//! asserts a timing: waits are conditions with generous deadlines.

#[allow(dead_code)]
#[path = "../../xtask/src/vm.rs"]
mod vm;

#[allow(dead_code)]
#[path = "../../xtask/src/interop.rs"]
mod interop;

#[allow(dead_code)]
#[path = "../../xtask/src/wire.rs"]
mod wire;

use gateway_tests::{gateway_bin, require_root};

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
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let only: Vec<String> = std::env::var("GATEWAY_VM_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let report = interop::run(
        &root.join("target/vm"),
        &gateway_bin(),
        &only,
        &vm::Stop::default(),
    )
    .unwrap_or_else(|e| panic!("the VM lab failed: {e:#}"));
    let table = report.table();
    println!("{table}");
    let json = root.join("target/vm/interop-test.json");
    std::fs::write(&json, report.to_json()).expect("write the JSON");
    let failed: Vec<&str> = report
        .results
        .iter()
        .filter(|r| !(r.pings_pass() && r.tcp_pass()))
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "these cases failed against the kernel: {failed:?}\n{table}\n(JSON: {})",
        json.display()
    );
}
