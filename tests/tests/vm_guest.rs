//! The gateway inside the guest: Debian 12's Linux 6.1 under QEMU (older
//! io_uring: no multishot reads, no USO) with a virtio-net NIC of 2 queue
//! pairs (`-smp 2`, `mq=on`) in native XDP mode, one worker per queue,
//! against a second gateway on the host side of the wire. Through four
//! tunnels (gre, gre with keys, ipip; different outer addresses): ping both
//! ways and 1 MiB of TCP with its SHA-256 compared; both workers must have
//! received tunnel packets (the NIC's hash spreads the flows); SIGTERM and
//! SIGKILL must leave no XDP program on eth0 (nor the gateway's devices).
//!
//! This boots a VM and downloads a kernel package (once, into
//! `target/vm`): it runs only with `GATEWAY_VM=1`. It runs `cargo xtask vm
//! guest` as a subprocess (which builds the gateway first) and checks its
//! exit status and, independently, the JSON it writes. Nothing here
//! asserts a timing: waits are conditions with generous deadlines.

use gateway_tests::vm;
use serde_json::Value;

#[test]
fn the_gateway_runs_in_a_linux_6_1_guest_on_virtio_net_with_two_queues() {
    const NAME: &str = "the_gateway_runs_in_a_linux_6_1_guest_on_virtio_net_with_two_queues";
    if !vm::enabled(NAME, "boots Debian's kernel under QEMU") {
        return;
    }
    // Beside `cargo xtask vm guest`'s own guest.json, not over it.
    let (status, r): (_, Value) = vm::xtask_vm_json(&["guest"], "guest-test.json");
    let at = "target/vm/guest-test.json";
    assert!(
        r["error"].is_null(),
        "the run stopped: {} ({at})",
        r["error"]
    );
    assert!(
        r["kernel"].as_str().is_some_and(|k| k.starts_with("6.1.")),
        "kernel {} is not Linux 6.1 ({at})",
        r["kernel"]
    );
    assert_eq!(r["driver"], "virtio_net", "({at})");
    assert_eq!(r["combined_channels"], 2, "eth0's channels ({at})");
    assert_eq!(r["xdp_mode"], "driver", "XDP not native ({at})");
    assert_eq!(r["xdp_attached"], true, "the gateway's stats ({at})");

    // Both workers, one per queue, received tunnel packets.
    let workers = r["workers"].as_array().expect("workers");
    let mut queues: Vec<u64> = workers.iter().filter_map(|w| w["queue"].as_u64()).collect();
    queues.sort();
    assert_eq!(queues, [0, 1], "one worker per queue ({at})");
    for w in workers {
        assert!(
            w["rx_frames"].as_u64().is_some_and(|n| n > 0),
            "the worker of queue {} received nothing ({at})",
            w["queue"]
        );
    }

    // Every tunnel: pings both ways, all answered; TCP intact.
    let tunnels = r["tunnels"].as_array().expect("tunnels");
    assert!(tunnels.len() >= 2, "too few tunnels ({at})");
    for t in tunnels {
        let name = &t["name"];
        for way in ["host_to_guest", "guest_to_host"] {
            let p = &t[way];
            assert!(
                p["sent"].as_u64().is_some_and(|n| n > 0) && p["received"] == p["sent"],
                "tunnel {name}: ping {way} {p} ({at})"
            );
        }
        let tcp = &t["tcp"];
        let sha = tcp["sent_sha256"].as_str().expect("a sent SHA-256");
        assert_eq!(sha.len(), 64, "tunnel {name}: {tcp} ({at})");
        assert_eq!(
            tcp["received_sha256"], tcp["sent_sha256"],
            "tunnel {name}: TCP arrived altered ({at})"
        );
        assert_eq!(tcp["received_bytes"], tcp["bytes"], "tunnel {name} ({at})");
    }

    // SIGTERM (a clean exit) and SIGKILL: no XDP program left either time.
    let signals = r["signals"].as_array().expect("signals");
    let names: Vec<&str> = signals
        .iter()
        .filter_map(|s| s["signal"].as_str())
        .collect();
    assert_eq!(names, ["SIGTERM", "SIGKILL"], "({at})");
    assert_eq!(
        signals[0]["exit_status"], 0,
        "SIGTERM: not a clean exit ({at})"
    );
    for s in signals {
        assert!(
            s["xdp_prog_id_before"].as_u64().is_some(),
            "{}: no XDP program before ({at})",
            s["signal"]
        );
        assert_eq!(
            s["no_xdp_after"], true,
            "{}: an XDP program left on eth0: {} ({at})",
            s["signal"], s["ip_link_after"]
        );
        assert_ne!(s["bpftool_no_xdp_after"], false, "{} ({at})", s["signal"]);
        assert_eq!(
            s["devices_left"].as_array().map(Vec::len),
            Some(0),
            "{}: the gateway's devices stayed ({at})",
            s["signal"]
        );
    }
    let again = &r["restart_pings"];
    for way in ["host_to_guest", "guest_to_host"] {
        let p = &again[way];
        assert!(
            p["sent"].as_u64().is_some_and(|n| n > 0) && p["received"] == p["sent"],
            "after SIGKILL, a third start: ping {way} {p} ({at})"
        );
    }
    assert_eq!(r["pass"], true, "({at})");
    assert!(
        status.success(),
        "cargo xtask vm guest failed ({status}) though its JSON passes ({at})"
    );
}
