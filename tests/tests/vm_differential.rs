//! Differential conformance with the real kernel: every case of the
//! conformance suite (and the ones the kernel's behaviour makes
//! interesting: the RFC 6040 matrix, sequence numbers, outer fragments,
//! ICMP from a router, keepalives, malformed GRE, IPv6 extension headers)
//! sent as the same bytes to Debian's 6.1 kernel in a VM and to the
//! gateway, and both outcomes compared (`cargo xtask vm differential`,
//! `xtask/src/differential/`).
//!
//! This boots a VM and downloads a kernel package (once, into
//! `target/vm`): it runs only with `GATEWAY_VM=1`. It runs the command as a
//! subprocess (build the gateway first: `cargo build -p gateway`) and checks
//! the JSON it writes on its own: every case has both outcomes recorded,
//! the verdict follows from them, and no difference is left without a
//! reason. Nothing here asserts a timing.

use gateway_tests::vm;
use serde_json::Value;

/// What a side's outcome is compared by: the packets its stack took, what
/// it sent back on the wire, and what its host's next packet met.
fn compared(o: &Value) -> (Value, Value, Value) {
    (
        o["delivered"].clone(),
        o["back"].clone(),
        o["after"].clone(),
    )
}

#[test]
fn every_case_does_what_the_kernel_does_or_says_why_not() {
    const NAME: &str = "every_case_does_what_the_kernel_does_or_says_why_not";
    if !vm::enabled(NAME, "boots Debian's kernel under QEMU") {
        return;
    }
    let (status, report) = vm::xtask_vm_json(&["differential"], "differential-test.json");
    let cases = report["cases"].as_array().expect("a \"cases\" list");
    assert!(cases.len() >= 90, "only {} cases ran", cases.len());
    let mut unexplained = Vec::new();
    for c in cases {
        let name = c["name"].as_str().expect("a name");
        for side in ["kernel", "gateway"] {
            let o = &c[side];
            for field in ["delivered", "through", "answers", "back"] {
                assert!(o[field].is_array(), "{name}: no {side}.{field}");
            }
            assert!(o["counters"].is_object(), "{name}: no {side}.counters");
            assert!(o["after"].is_string(), "{name}: no {side}.after");
        }
        let k = &c["kernel"];
        let g = &c["gateway"];
        let gw_moved = !g["counters"].as_object().unwrap().is_empty();
        // Every packet the gateway receives is counted somewhere.
        assert!(gw_moved, "{name}: the gateway's counters did not move: {g}");
        let same = compared(k) == compared(g);
        let verdict = c["verdict"].as_str().expect("a verdict");
        assert_eq!(
            verdict == "same",
            same,
            "{name}: the verdict {verdict} does not follow from the outcomes"
        );
        // A reason covers only the fields it names: any other field that
        // differs is unexplained.
        let covered: Vec<&str> = c["differs_in"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let differing: Vec<&str> = ["delivered", "back", "after"]
            .into_iter()
            .filter(|f| k[*f] != g[*f])
            .collect();
        let has_reason = !c["reason"].as_str().unwrap_or("").is_empty();
        let explained = has_reason && differing.iter().all(|f| covered.contains(f));
        if !(same || explained) {
            unexplained.push(format!(
                "{name} (differs in {differing:?})\n  kernel:  {k}\n  gateway: {g}"
            ));
        }
    }
    assert!(
        unexplained.is_empty(),
        "{} case(s) differ from the kernel with no reason given:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert!(
        status.success(),
        "cargo xtask vm differential failed ({status}) though every case passed"
    );
}
