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
    for section in ["settings", "machine", "ceilings", "decap", "round_trip"] {
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
