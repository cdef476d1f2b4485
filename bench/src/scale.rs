//! Ten thousand tunnels on one host: what a gateway with `--scale-tunnels`
//! tunnels (10,000 by default) costs and how it behaves, beside a gateway
//! with one.
//!
//! The configuration: half the tunnels are GRE with keys between the same
//! two endpoints (192.168.0.58 to 192.168.0.8, keys 65536 + i), half are
//! keyless GRE from distinct remotes (10.200.0.0/16, routed through the
//! generator's address, so one neighbour entry serves them all); tun and
//! tap devices alternate, without inner addresses (the kernel drops what
//! is written into them at once, the same for every case). Measured:
//! `gateway check` and the parse alone, the start until the gateway runs
//! (its control socket answers), resident memory against a one-tunnel
//! gateway, the XDP endpoint map's entries, decapsulation at maximum
//! offered load on one tunnel and spread over the keyed tunnels and over the
//! remotes (the per-packet lookup), a reload that adds one tunnel and one
//! that changes one while traffic runs on the keyed tunnels (sent against
//! delivered), and `gateway stats` and `/metrics`: time and size.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etherparse::{Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder};
use gateway_common::maps;
use serde_json::{json, Value};

use crate::gen::{Capture, Generator, Outcome, Template, Trial, MAGIC};
use crate::harness::{say, workers, GatewayProc, GEN_CORE, GW_CORE};
use crate::ns::{topology, NetNs};
use crate::Args;

/// First key of the keyed tunnels (the generator varies the low 16 bits).
const KEY_BASE: u32 = 0x1_0000;
/// Where the gateway serves `/metrics` inside its namespace.
const METRICS: &str = "127.0.0.1:9464";

/// The configuration of `n` tunnels (see the module's comment); with
/// `extra`, one more tunnel from 10.201.0.1; `changed`: the last remote
/// tunnel's MTU lowered.
pub(crate) fn config(n: usize, extra: bool, changed: bool) -> String {
    let keyed = n.div_ceil(2);
    let mut s = format!("[gateway]\ncores = [{GW_CORE}]\n\n");
    for i in 0..n {
        let kind = if i % 2 == 0 { "tun" } else { "tap" };
        if i < keyed {
            s.push_str(&format!(
                "[[tunnel]]\nname = \"k{i}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\nkey = {}\nmtu = 1400\ndevice = \"sk{i}\"\ndevice_kind = \"{kind}\"\n\n",
                KEY_BASE + i as u32
            ));
        } else {
            let r = i - keyed;
            let mtu = if changed && i == n - 1 { 1380 } else { 1400 };
            s.push_str(&format!(
                "[[tunnel]]\nname = \"r{r}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"10.200.{}.{}\"\nmtu = {mtu}\ndevice = \"sr{r}\"\ndevice_kind = \"{kind}\"\n\n",
                r >> 8,
                r & 255,
            ));
        }
    }
    if extra {
        s.push_str("[[tunnel]]\nname = \"added\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"10.201.0.1\"\nmtu = 1400\ndevice = \"sadded\"\ndevice_kind = \"tun\"\n");
    }
    s
}

/// A GRE packet from `src` with `key` (or none), an ICMP echo inside; the
/// generator varies the low 16 bits of the key (`keyed`) or of the outer
/// source address.
fn template(gw_mac: [u8; 6], gen_mac: [u8; 6], src: [u8; 4], key: Option<u32>) -> Template {
    let mut inner = Vec::new();
    let mut payload = vec![0u8; 64];
    payload[..8].copy_from_slice(MAGIC);
    PacketBuilder::ipv4([10, 1, 1, 2], [10, 1, 1, 1], 64)
        .icmpv4_echo_request(0x4000, 1)
        .write(&mut inner, &payload)
        .expect("inner");
    let mut gre = match key {
        Some(k) => {
            let mut g = vec![0x20, 0, 0x08, 0x00];
            g.extend_from_slice(&k.to_be_bytes());
            g
        }
        None => vec![0, 0, 0x08, 0x00],
    };
    let gre_len = gre.len();
    gre.extend_from_slice(&inner);
    let mut ip =
        Ipv4Header::new(gre.len() as u16, 64, IpNumber(47), src, [192, 168, 0, 8]).expect("outer");
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut bytes = Vec::new();
    Ethernet2Header {
        source: gen_mac,
        destination: gw_mac,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut bytes)
    .expect("eth");
    ip.write(&mut bytes).expect("ip");
    bytes.extend_from_slice(&gre);
    let icmp = 14 + 20 + gre_len + 20;
    Template {
        bytes,
        stamp_at: icmp + 8,
        icmp_at: Some(icmp),
        flow_at: if key.is_some() { 14 + 20 + 6 } else { 14 + 14 },
        ipv4_at: key.is_none().then_some(14),
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The host's available memory, in KiB.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `gateway ARGS` in the namespace; its time, output and success.
fn gateway_cmd(args: &Args, ns: Option<&NetNs>, words: &[&str]) -> Result<(f64, Vec<u8>)> {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(&args.gateway);
            c
        }
        None => Command::new(&args.gateway),
    };
    let t = Instant::now();
    let out = c.args(words).output().context("running the gateway")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "gateway {words:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((secs, out.stdout))
}

/// `GET /metrics` from inside the namespace: time and bytes.
fn fetch_metrics(ns: &NetNs) -> Result<(f64, usize)> {
    let h = ns.spawn("bench-metrics", || -> Result<(f64, usize)> {
        let t = Instant::now();
        let mut s = TcpStream::connect(METRICS)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&body);
        if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
            bail!("/metrics: {}", text.lines().next().unwrap_or("no answer"));
        }
        Ok((secs, body.len()))
    });
    h.join().map_err(|_| anyhow::anyhow!("metrics thread"))?
}

/// Entries of the endpoint maps (IPv4 and IPv6) of the XDP program `prog`
/// (bpftool).
fn endpoint_entries(prog: u64) -> Result<usize> {
    let out = crate::ns::sh(&["bpftool", "-j", "prog", "show", "id", &prog.to_string()])?;
    let v: Value = serde_json::from_str(&out)?;
    let names = [maps::ENDPOINTS_V4, maps::ENDPOINTS_V6];
    let (mut found, mut entries) = (0, 0);
    for id in v["map_ids"].as_array().into_iter().flatten() {
        let id = id.as_u64().unwrap_or(0).to_string();
        let m: Value = serde_json::from_str(&crate::ns::sh(&[
            "bpftool", "-j", "map", "show", "id", &id,
        ])?)?;
        if names.iter().any(|n| m["name"].as_str() == Some(n)) {
            let d: Value = serde_json::from_str(&crate::ns::sh(&[
                "bpftool", "-j", "map", "dump", "id", &id,
            ])?)?;
            found += 1;
            entries += d.as_array().map_or(0, Vec::len);
        }
    }
    if found != names.len() {
        bail!("XDP program {prog} lacks one of the maps {names:?}");
    }
    Ok(entries)
}

/// The gateway's counters through its control socket.
fn stats(args: &Args, ns: &NetNs) -> Result<Value> {
    let (_, out) = gateway_cmd(
        args,
        Some(ns),
        &["stats", "--iface", "ens0", "--format", "json"],
    )?;
    Ok(serde_json::from_slice(&out)?)
}

/// One decapsulation trial: offered, delivered, worker time per packet.
fn decap(
    args: &Args,
    ns: &NetNs,
    gen: &Generator,
    t: &Template,
    flows: u16,
    rate: Option<f64>,
    duration: Duration,
) -> Result<(Outcome, u64, f64, Value)> {
    let before = stats(args, ns)?;
    let out = gen.run(Trial {
        template: t.clone(),
        rate,
        duration,
        flows,
    })?;
    let after = stats(args, ns)?;
    let delivered = workers(&after, &["delivered"]) - workers(&before, &["delivered"]);
    let busy = workers(&after, &["polls", "busy_ns"]) - workers(&before, &["polls", "busy_ns"]);
    let ns_per = busy as f64 / delivered.max(1) as f64;
    let secs = out.elapsed.as_secs_f64();
    let row = json!({
        "flows": flows,
        "offered_pps": out.sent as f64 / secs,
        "delivered_pps": delivered as f64 / secs,
        "sent": out.sent,
        "delivered": delivered,
        "worker_ns_per_packet": ns_per,
        "drops": drops_between(&before, &after),
    });
    Ok((out, delivered, ns_per, row))
}

/// Drop reasons that grew between two snapshots.
fn drops_between(before: &Value, after: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in after["drops"].as_object().into_iter().flatten() {
        let d = v.as_u64().unwrap_or(0) - before["drops"][k].as_u64().unwrap_or(0);
        if d > 0 {
            m.insert(k.clone(), json!(d));
        }
    }
    Value::Object(m)
}

/// Traffic on the keyed tunnels at `rate` while, after a second, the
/// configuration becomes `next` and the gateway reloads it.
#[allow(clippy::too_many_arguments)]
fn reload_under_traffic(
    args: &Args,
    ns: &NetNs,
    gen: &Generator,
    t: &Template,
    flows: u16,
    rate: f64,
    config: &Path,
    next: &str,
    what: &str,
) -> Result<Value> {
    let before = stats(args, ns)?;
    let (cfg, next, bin, nsname) = (
        config.to_path_buf(),
        next.to_string(),
        args.gateway.clone(),
        ns.name.clone(),
    );
    let reloader = std::thread::spawn(move || -> Result<(f64, String)> {
        std::thread::sleep(Duration::from_millis(1000));
        std::fs::write(&cfg, next)?;
        let t = Instant::now();
        let out = Command::new("ip")
            .args(["netns", "exec", &nsname])
            .arg(&bin)
            .args(["reload", "--iface", "ens0"])
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok((secs, said))
    });
    let out = gen.run(Trial {
        template: t.clone(),
        rate: Some(rate),
        duration: Duration::from_secs(4),
        flows,
    })?;
    let (secs, said) = reloader
        .join()
        .map_err(|_| anyhow::anyhow!("reload thread"))??;
    let after = stats(args, ns)?;
    let delivered = workers(&after, &["delivered"]) - workers(&before, &["delivered"]);
    // "added 1 tunnel" and the like, shortened: the list of unchanged
    // tunnels is a count.
    let summary: String = said.chars().take(300).collect();
    say(&format!(
        "  reload that {what}: {:.0} ms; {} sent on the other tunnels at {:.0} pps, {} delivered ({} lost); {summary}",
        secs * 1e3,
        out.sent,
        rate,
        delivered,
        out.sent.saturating_sub(delivered)
    ));
    Ok(json!({
        "what": what,
        "reload_s": secs,
        "answer": summary,
        "rate_pps": rate,
        "sent": out.sent,
        "delivered": delivered,
        "lost": out.sent.saturating_sub(delivered),
        "drops": drops_between(&before, &after),
    }))
}

/// The section, in namespaces of its own; returns its results.
pub(crate) fn section(args: &Args, out_dir: &Path) -> Result<Value> {
    // The gateway holds a queue of every device (one worker here) and
    // about 256 files more; it raises its soft limit to the hard one, and
    // the bench cannot raise the hard one without CAP_SYS_RESOURCE.
    let hard = open_files_hard_limit();
    let n = match hard {
        Some(h) if (args.scale_tunnels() as u64) + 257 > h => {
            // (One spare: the section's reload adds a tunnel.)
            let room = h.saturating_sub(257).max(1);
            let fits = if room >= 1000 {
                room / 1000 * 1000
            } else {
                room
            };
            say(&format!(
                "scale: {} tunnels asked for, but this process may open {h} files (RLIMIT_NOFILE, hard limit): {fits} tunnels instead; raise the limit as root with CAP_SYS_RESOURCE (`ulimit -Hn`, prlimit) for more",
                args.scale_tunnels()
            ));
            fits as usize
        }
        _ => args.scale_tunnels(),
    };
    say(&format!(
        "scale: {n} tunnels ({} keyed between one pair of hosts, {} from distinct remotes), beside one",
        n.div_ceil(2),
        n / 2
    ));
    let trial = if args.quick {
        Duration::from_millis(1000)
    } else {
        Duration::from_secs(3)
    };
    let (gen_ns, gw_ns, gen_mac, gw_mac) = topology("gwb-xgen", "gwb-xgw", 1)?;
    gw_ns.ip(&[
        "route",
        "add",
        "10.200.0.0/15",
        "via",
        "192.168.0.58",
        "dev",
        "ens0",
    ])?;
    let gen = Generator::start(Some(&gen_ns), "gen0", GEN_CORE, Capture::All)?;
    let keyed = template(gw_mac, gen_mac, [192, 168, 0, 58], Some(KEY_BASE));
    let remotes = template(gw_mac, gen_mac, [10, 200, 0, 0], None);
    let nkeyed = n.div_ceil(2).min(usize::from(u16::MAX)) as u16;
    let nremote = (n / 2).min(usize::from(u16::MAX)) as u16;

    // The configuration: check and parse.
    let path = out_dir.join("scale.toml");
    let text = config(n, false, false);
    std::fs::write(&path, &text)?;
    let p = path.to_string_lossy().to_string();
    let (check_s, check_out) = gateway_cmd(args, None, &["check", "--config", &p])?;
    let mut parse_s = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let c = gateway::control::config::Config::load(&path)?;
        parse_s = parse_s.min(t.elapsed().as_secs_f64());
        assert_eq!(c.tunnels.len(), n);
    }
    say(&format!(
        "  config of {} bytes: gateway check {:.0} ms ({} bytes of plan), the parse alone {:.0} ms",
        text.len(),
        check_s * 1e3,
        check_out.len(),
        parse_s * 1e3
    ));

    // One tunnel: memory and decapsulation, to compare with.
    let one_path = out_dir.join("scale-one.toml");
    std::fs::write(&one_path, config(1, false, false))?;
    let t = Instant::now();
    let gw1 = GatewayProc::start_with(
        &gw_ns,
        &args.gateway,
        &one_path,
        &out_dir.join("scale-one.log"),
        &[],
        Duration::from_secs(60),
    )?;
    let one_start_s = t.elapsed().as_secs_f64();
    let one_rss = rss_kib(gw1.child.id());
    let (_, _, one_ns, one_row) = decap(args, &gw_ns, &gen, &keyed, 1, None, trial)?;
    say(&format!(
        "  one tunnel: started in {:.0} ms, {} KiB resident; decap {:.0} pps, worker {:.0} ns per packet",
        one_start_s * 1e3,
        one_rss,
        one_row["delivered_pps"].as_f64().unwrap_or(0.0),
        one_ns
    ));
    drop(gw1);

    // N tunnels.
    let avail_before = mem_available_kib();
    let t = Instant::now();
    let gw = GatewayProc::start_with(
        &gw_ns,
        &args.gateway,
        &path,
        &out_dir.join("scale.log"),
        &["--metrics", METRICS],
        Duration::from_secs(600),
    )?;
    let running_s = t.elapsed().as_secs_f64();
    // Ready: the control socket answers.
    let first = stats(args, &gw_ns)?;
    let ready_s = t.elapsed().as_secs_f64();
    let rss = rss_kib(gw.child.id());
    let host_kib = avail_before.saturating_sub(mem_available_kib());
    let prog = first["gateway"]["xdp_program_id"].as_u64().unwrap_or(0);
    let entries = endpoint_entries(prog).unwrap_or_else(|e| {
        say(&format!("  endpoint map: {e:#}"));
        0
    });
    let tunnels_seen = first["tunnels"].as_array().map_or(0, Vec::len);
    say(&format!(
        "  {n} tunnels: running in {:.1} s, control socket answering at {:.1} s; {} KiB resident ({:.1} KiB per tunnel over one), host memory {} KiB less; XDP endpoint map {} entries; {} tunnels in stats",
        running_s,
        ready_s,
        rss,
        rss.saturating_sub(one_rss) as f64 / n as f64,
        host_kib,
        entries,
        tunnels_seen
    ));

    // Stats and metrics: time and size.
    let mut stats_rows = Vec::new();
    for format in ["human", "json", "prometheus"] {
        let (secs, out) = gateway_cmd(
            args,
            Some(&gw_ns),
            &["stats", "--iface", "ens0", "--format", format],
        )?;
        say(&format!(
            "  gateway stats --format {format}: {:.0} ms, {} bytes",
            secs * 1e3,
            out.len()
        ));
        stats_rows.push(json!({ "format": format, "seconds": secs, "bytes": out.len() }));
    }
    let (metrics_s, metrics_bytes) = fetch_metrics(&gw_ns)?;
    say(&format!(
        "  GET /metrics: {:.0} ms, {} bytes",
        metrics_s * 1e3,
        metrics_bytes
    ));

    // Decapsulation: one tunnel, spread over the keyed tunnels, over the
    // remotes.
    let mut decap_rows = Vec::new();
    let mut spread_pps: f64 = 0.0;
    for (label, tpl, flows) in [
        ("one keyed tunnel", &keyed, 1),
        ("spread over the keyed tunnels", &keyed, nkeyed),
        ("spread over the remotes", &remotes, nremote),
    ] {
        let (_, _, ns_per, mut row) = decap(args, &gw_ns, &gen, tpl, flows, None, trial)?;
        say(&format!(
            "  decap, {label} ({flows}): offered {:.0} pps, delivered {:.0} pps; worker {:.0} ns per packet; drops {}",
            row["offered_pps"].as_f64().unwrap_or(0.0),
            row["delivered_pps"].as_f64().unwrap_or(0.0),
            ns_per,
            row["drops"]
        ));
        if label == "spread over the keyed tunnels" {
            spread_pps = row["delivered_pps"].as_f64().unwrap_or(0.0);
        }
        row["case"] = json!(label);
        decap_rows.push(row);
    }

    // Reloads under traffic on the keyed tunnels, at a rate well inside
    // what the gateway delivers.
    let rate = (spread_pps * 0.25).clamp(1000.0, 50_000.0);
    let added = reload_under_traffic(
        args,
        &gw_ns,
        &gen,
        &keyed,
        nkeyed,
        rate,
        &path,
        &config(n, true, false),
        "adds one tunnel",
    )?;
    let changed = reload_under_traffic(
        args,
        &gw_ns,
        &gen,
        &keyed,
        nkeyed,
        rate,
        &path,
        &config(n, true, true),
        "changes one tunnel's MTU",
    )?;
    let last = stats(args, &gw_ns)?;
    let t = Instant::now();
    drop(gw);
    let stop_s = t.elapsed().as_secs_f64();
    say(&format!("  stopped in {:.1} s", stop_s));
    drop(gen);
    drop(gen_ns);
    drop(gw_ns);
    Ok(json!({
        "tunnels": n,
        "tunnels_asked": args.scale_tunnels(),
        "open_files_hard_limit": hard,
        "keyed_between_one_pair": n.div_ceil(2),
        "distinct_remotes": n / 2,
        "config_bytes": text.len(),
        "check_s": check_s,
        "check_output_bytes": check_out.len(),
        "parse_s": parse_s,
        "one_tunnel": {
            "start_s": one_start_s,
            "rss_kib": one_rss,
            "decap": one_row,
        },
        "start_running_s": running_s,
        "start_ready_s": ready_s,
        "rss_kib": rss,
        "rss_per_tunnel_kib": rss.saturating_sub(one_rss) as f64 / n as f64,
        "host_mem_available_drop_kib": host_kib,
        "xdp_endpoint_entries": entries,
        "stats": stats_rows,
        "metrics": { "seconds": metrics_s, "bytes": metrics_bytes },
        "decap": decap_rows,
        "reload_add": added,
        "reload_change": changed,
        "stop_s": stop_s,
        "drops_total": last["drops"],
    }))
}

/// `--scale-only`: just this section, into `results.json`.
pub(crate) fn only(args: &Args, out_dir: &Path) -> Result<()> {
    let v = section(args, out_dir)?;
    summary(&v);
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "machine": crate::report::machine(),
            "scale": v,
        }))?,
    )?;
    println!("\nfiles: {}/results.json, scale.log", out_dir.display());
    Ok(())
}

/// The section's lines of the printed summary.
pub(crate) fn summary(v: &Value) {
    let f = |p: &Value| p.as_f64().unwrap_or(0.0);
    let n = v["tunnels"].as_u64().unwrap_or(0);
    println!("\nscale: {n} tunnels");
    println!(
        "{:<52} {:>12.0} ms",
        "gateway check",
        f(&v["check_s"]) * 1e3
    );
    println!("{:<52} {:>12.0} ms", "config parse", f(&v["parse_s"]) * 1e3);
    println!(
        "{:<52} {:>12.0} ms",
        "start until the control socket answers",
        f(&v["start_ready_s"]) * 1e3
    );
    println!(
        "{:<52} {:>12.1} KiB",
        "resident memory per tunnel (over a 1-tunnel gateway)",
        f(&v["rss_per_tunnel_kib"])
    );
    println!(
        "{:<52} {:>12}",
        "XDP endpoint map entries", v["xdp_endpoint_entries"]
    );
    for d in v["decap"].as_array().into_iter().flatten() {
        println!(
            "{:<52} {:>12.0} pps {:>6.0} ns/pkt",
            format!("decap, {}", d["case"].as_str().unwrap_or("")),
            f(&d["delivered_pps"]),
            f(&d["worker_ns_per_packet"])
        );
    }
    let o = &v["one_tunnel"]["decap"];
    println!(
        "{:<52} {:>12.0} pps {:>6.0} ns/pkt",
        "decap, a 1-tunnel gateway",
        f(&o["delivered_pps"]),
        f(&o["worker_ns_per_packet"])
    );
    for k in ["reload_add", "reload_change"] {
        let r = &v[k];
        println!(
            "{:<52} {:>12.0} ms, {} lost of {}",
            format!("reload that {}", r["what"].as_str().unwrap_or("")),
            f(&r["reload_s"]) * 1e3,
            r["lost"],
            r["sent"]
        );
    }
    for s in v["stats"].as_array().into_iter().flatten() {
        println!(
            "{:<52} {:>12.0} ms, {} bytes",
            format!(
                "gateway stats --format {}",
                s["format"].as_str().unwrap_or("")
            ),
            f(&s["seconds"]) * 1e3,
            s["bytes"]
        );
    }
    println!(
        "{:<52} {:>12.0} ms, {} bytes",
        "GET /metrics",
        f(&v["metrics"]["seconds"]) * 1e3,
        v["metrics"]["bytes"]
    );
}

/// The hard limit on open files of this process (and so of the gateway it
/// starts), from /proc/self/limits; `None` when unlimited or unreadable.
fn open_files_hard_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}
