//! The bench harness's smoke run produces what it promises: a results JSON
//! with every section, HdrHistogram `.hgrm` files and an SVG plot. No
//! timing is asserted: only that the files exist and are well formed.

use std::path::PathBuf;
use std::process::Command;

use gateway_tests::{gateway_bin, require_root};

fn bench_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GATEWAY_BENCH_BIN") {
        return PathBuf::from(p);
    }
    let gw = gateway_bin();
    gw.with_file_name("gateway-bench")
}

#[test]
fn quick_bench_writes_json_hgrm_and_plot() {
    if !require_root("quick_bench_writes_json_hgrm_and_plot") {
        return;
    }
    let bin = bench_bin();
    assert!(
        bin.exists(),
        "no bench binary at {}: cargo build -p gateway-bench",
        bin.display()
    );
    let out = std::env::temp_dir().join(format!("gwt-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(&bin)
        .arg("--quick")
        .arg("--gateway")
        .arg(gateway_bin())
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run the bench");
    assert!(status.success(), "gateway-bench --quick failed");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for section in [
        "settings",
        "machine",
        "ceilings",
        "decap",
        "capture_cost",
        "round_trip",
        "app",
        "xdp_cost",
    ] {
        assert!(
            json[section].is_object(),
            "results.json has {section}: {json}"
        );
    }
    for k in ["wire_xdp_drop_pps", "tap_write_pps", "tap_io_uring_pps"] {
        assert!(
            json["ceilings"][k].as_f64().is_some_and(|v| v > 0.0),
            "ceilings.{k}: {json}"
        );
    }
    assert!(json["decap"]["max_delivered_pps"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    // The worker's cost per packet at 1, 16 and 256 flows, each beside one
    // write(2).
    let by_flows = json["decap"]["worker_cost_by_flows"].as_array().unwrap();
    assert_eq!(
        by_flows
            .iter()
            .map(|r| r["flows"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 16, 256],
        "{by_flows:?}"
    );
    for r in by_flows {
        assert!(
            r["ratio_worker_cost_to_one_write"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{r}"
        );
    }
    // Application to application: the bare veth and the tunnel with both
    // poll modes, each with blocking and busy-polling applications.
    let cases = json["app"]["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "bare-blocking",
            "bare-busy_poll",
            "tunnel-busy-blocking",
            "tunnel-busy-busy_poll",
            "tunnel-adaptive-blocking",
            "tunnel-adaptive-busy_poll",
        ]
    );
    for c in cases {
        assert!(c["round_trips"].as_u64().unwrap() > 0, "{c}");
        assert!(
            c["half_round_trip_us"]["p50"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{c}"
        );
        let name = c["round_trip_hgrm"].as_str().unwrap();
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.contains("#[Max"), "{name}: {text}");
        if c["path"] == "tunnel" {
            assert!(c["ratio_p50_to_bare"].as_f64().is_some(), "{c}");
        }
    }
    // The breakdown put round trips together from the traced events.
    assert!(
        json["breakdown"]["round_trips"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "breakdown: {}",
        json["breakdown"]
    );
    // The XDP run time: both programs ran, and were timed, in every round.
    let rounds = json["xdp_cost"]["rounds"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rounds.len(), 3, "xdp_cost: {}", json["xdp_cost"]);
    for round in &rounds {
        for prog in ["steering", "redirect_all"] {
            let p = &round[prog];
            assert!(
                p["runs"].as_u64().is_some_and(|v| v > 0)
                    && p["ns_per_run"].as_f64().is_some_and(|v| v > 0.0),
                "xdp_cost.{prog}: {}",
                json["xdp_cost"]
            );
        }
    }
    for prog in ["steering", "redirect_all"] {
        assert!(
            json["xdp_cost"][prog]["ns_per_run"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "xdp_cost.{prog}: {}",
            json["xdp_cost"]
        );
    }
    // The capture cost: each case measured, and the capture of everything
    // took copies (the summary its client printed).
    for case in ["none", "all", "filter_matching_none"] {
        assert!(
            json["capture_cost"]["mean"][case]["delivered_pps"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "capture_cost.mean.{case}: {}",
            json["capture_cost"]
        );
    }
    assert!(
        json["capture_cost"]["trials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["capture"] == "all"
                && t["client_said"]
                    .as_str()
                    .is_some_and(|s| s.contains("packets taken"))),
        "{}",
        json["capture_cost"]
    );
    let levels = json["round_trip"]["latency"].as_array().unwrap();
    assert_eq!(
        levels.len(),
        3,
        "latency at 10, 50 and 90% of the no-drop rate"
    );
    for l in levels {
        for side in ["tunnel_hgrm", "bare_hgrm"] {
            let name = l[side].as_str().unwrap();
            let text = std::fs::read_to_string(out.join(name)).unwrap();
            assert!(text.trim_start().starts_with("Value"), "{name}: {text}");
            assert!(text.contains("#[Max"), "{name} has the footer");
            let rows = text
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .next()
                        .is_some_and(|w| w.parse::<f64>().is_ok())
                })
                .count();
            assert!(rows > 1, "{name} has percentile rows");
        }
        assert!(
            l["tunnel"]["count"].as_u64().unwrap() > 0,
            "samples recorded: {l}"
        );
    }
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("<polyline"), "latency curves drawn");
    let _ = std::fs::remove_dir_all(&out);
}

/// Two-host mode, with two namespaces standing in for the hosts: the
/// gateway started by hand in one (as docs/performance.md tells), the bench's
/// generator on the other's interface, capturing only tunnel packets.
#[test]
fn two_host_mode_measures_the_round_trip() {
    if !require_root("two_host_mode_measures_the_round_trip") {
        return;
    }
    let wire = gateway_tests::Wire::new("bt2", &[]);
    let _gw = gateway_tests::Gateway::start(&wire.gw, gateway_tests::ONE_GRE_TUNNEL);
    let out = std::env::temp_dir().join(format!("gwt-bench2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("ip")
        .args(["netns", "exec", &wire.peer.name])
        .arg(bench_bin())
        .args([
            "--quick",
            "--iface",
            "ens0",
            "--gateway-ip",
            "192.168.0.8",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run the bench");
    assert!(status.success(), "gateway-bench --iface failed");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["settings"]["hosts"], "two");
    let levels = json["round_trip"]["latency"].as_array().unwrap();
    assert_eq!(levels.len(), 3);
    for l in levels {
        assert!(l["tunnel"]["count"].as_u64().unwrap() > 0, "{l}");
        assert!(out.join(l["tunnel_hgrm"].as_str().unwrap()).exists());
    }
    assert!(out.join("plot.svg").exists());
    // The run needed the generator host's kernel to answer the gateway's
    // ARP (only tunnel packets go to the generator's socket); afterwards
    // nothing is left attached and the host still answers.
    assert!(
        !wire.peer.has_xdp("ens0"),
        "the generator's XDP program is gone"
    );
    assert!(
        wire.peer
            .exec(&["ping", "-c", "1", "-W", "2", "192.168.0.8"])
            .0
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The soak mode writes its series: memory, frames and latency per chunk.
#[test]
fn soak_mode_reports_memory_frames_and_latency_over_time() {
    if !require_root("soak_mode_reports_memory_frames_and_latency_over_time") {
        return;
    }
    let out = std::env::temp_dir().join(format!("gwt-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(bench_bin())
        .args(["--quick", "--soak", "4", "--gateway"])
        .arg(gateway_bin())
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run the bench");
    assert!(status.success(), "gateway-bench --soak failed");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("soak.json")).unwrap()).unwrap();
    let series = json["series"].as_array().unwrap();
    assert!(!series.is_empty());
    for c in series {
        assert!(c["rss_kib"].as_u64().unwrap() > 0, "{c}");
        let f = &c["frames"];
        let sum: u64 = ["free", "in_kernel", "in_flight", "in_tx"]
            .iter()
            .map(|k| f[*k].as_u64().unwrap())
            .sum();
        assert_eq!(sum, f["total"].as_u64().unwrap(), "frames balance: {c}");
        assert!(c["latency"]["count"].as_u64().unwrap() > 0, "{c}");
    }
    assert!(out.join("soak-latency.hgrm").exists());
    let _ = std::fs::remove_dir_all(&out);
}
