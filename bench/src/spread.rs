//! The spreading section: decapsulation with every packet on one queue of
//! two, the gateway's device writes spread over both workers or not.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::gen::{self, Capture, Generator, Trial};
use crate::harness::{gateway_config, say, workers, GatewayProc, GEN_CORE, GW_CORE};
use crate::ns::topology;
use crate::templates::{self, Addrs};
use crate::Args;

/// Spreading device writes: a veth of two queues, every packet on queue 0
/// (the generator sends from its queue 0, as a NIC that hashes the outer
/// addresses puts a whole tunnel on one queue), a gateway worker per queue
/// (cores 1 and 0, the generator's core too), decapsulation at maximum
/// offered load with `spread_writes` off and on, side by side.
pub(crate) fn section(args: &Args, trial: Duration, out_dir: &Path) -> Result<Value> {
    say(
        "spreading: 2 queues, all packets on queue 0, a worker per queue; spread_writes off and on",
    );
    let (gen_ns, gw_ns, gen_mac, gw_mac) = topology("gwb-sgen", "gwb-sgw", 2)?;
    let udp = templates::tunnel_udp(
        &Addrs::LAB,
        gw_mac,
        gen_mac,
        args.mode == "gre",
        args.payload,
    );
    let gen = Generator::start(Some(&gen_ns), "gen0", GEN_CORE, Capture::All)?;
    let addrs = ["192.168.0.8", "192.168.0.58", "10.1.1.1", "10.1.1.2"];
    let cores = format!("{GW_CORE}, {GEN_CORE}");
    let mut rows = Vec::new();
    for spread in [false, true] {
        let name = format!("gateway-spread-{}", if spread { "on" } else { "off" });
        let config = out_dir.join(format!("{name}.toml"));
        let extra = format!("queues = \"all\"\nspread_writes = {spread}\n");
        std::fs::write(
            &config,
            gateway_config(&args.poll, &cores, &extra, &args.mode, addrs),
        )?;
        let gw = GatewayProc::start(
            &gw_ns,
            &args.gateway,
            &config,
            &out_dir.join(format!("{name}.log")),
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        let before = gw.stats()?;
        let out = gen.run(Trial {
            template: udp.clone(),
            rate: None,
            duration: trial,
            flows: args.flows,
        })?;
        std::thread::sleep(Duration::from_millis(200));
        let after = gw.stats()?;
        let mut row = spread_trial(&before, &after, &out);
        row["spread_writes"] = json!(spread);
        say(&format!(
            "  spread_writes {spread}: offered {:.0} pps, delivered {:.0} pps ({:.2}% loss); received per queue {}; written for the other worker per queue {}; busy ns per received packet per worker {}",
            row["offered_pps"].as_f64().unwrap_or(0.0),
            row["delivered_pps"].as_f64().unwrap_or(0.0),
            100.0 * row["loss_ratio"].as_f64().unwrap_or(0.0),
            row["rx_frames_per_queue"],
            row["spread_in_per_queue"],
            row["busy_ns_per_rx_packet_per_queue"],
        ));
        rows.push(row);
        drop(gw);
    }
    drop(gen);
    drop(gen_ns);
    drop(gw_ns);
    let delivered = |i: usize| rows[i]["delivered_pps"].as_f64().unwrap_or(0.0);
    let ratio = delivered(1) / delivered(0).max(1.0);
    say(&format!(
        "  delivered at maximum load, spread on / off: {ratio:.2}x"
    ));
    Ok(json!({
        "trials": rows,
        "ratio_delivered_on_to_off": ratio,
    }))
}

/// One trial of the spreading section, from the counters before and after.
fn spread_trial(before: &Value, after: &Value, out: &gen::Outcome) -> Value {
    let per_queue = |path: &[&str]| -> Vec<u64> {
        let a = after["workers"].as_array().cloned().unwrap_or_default();
        let b = before["workers"].as_array().cloned().unwrap_or_default();
        let get = |w: &Value| {
            let mut v = w;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        };
        a.iter().zip(&b).map(|(x, y)| get(x) - get(y)).collect()
    };
    let secs = out.elapsed.as_secs_f64();
    let delivered = workers(after, &["delivered"]) - workers(before, &["delivered"]);
    let rx = per_queue(&["rx_frames"]);
    let received: u64 = rx.iter().sum();
    let busy = per_queue(&["polls", "busy_ns"]);
    json!({
        "offered_pps": out.sent as f64 / secs,
        "delivered_pps": delivered as f64 / secs,
        "loss_ratio": 1.0 - delivered as f64 / out.sent.max(1) as f64,
        "rx_frames_per_queue": rx,
        "spread_in_per_queue": per_queue(&["spread_in"]),
        "busy_ns_per_queue": busy,
        "busy_ns_per_rx_packet_per_queue": busy
            .iter()
            .map(|b| (*b as f64 / received.max(1) as f64).round())
            .collect::<Vec<_>>(),
    })
}

/// `--spread-only`: the spreading section alone, its results in
/// `results.json`.
pub(crate) fn only(args: &Args, out_dir: &Path) -> Result<()> {
    let trial = if args.quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(3)
    };
    let sp = section(args, trial, out_dir)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json!({ "spread": sp }))?,
    )?;
    Ok(())
}
