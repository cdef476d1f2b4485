//! The lab end to end (shared/seed-lab.md): two gateways, each in its own
//! namespace with the repository's lab configs, joined through a bridge in
//! a third namespace where captures see the wire. Ping and TCP through both
//! tunnels, nothing else crossing, the wire decoded by tshark (not by the
//! gateway's code), path-MTU discovery, and a next-hop MAC change.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::{require_root, tcp_transfer, wait_until, Gateway, Lab, NetNs};

const HOST1: &str = include_str!("../../configs/lab-host1.toml");
const HOST2: &str = include_str!("../../configs/lab-host2.toml");

struct Running {
    lab: Lab,
    gw1: Gateway,
    gw2: Gateway,
}

fn lab(tag: &str) -> Running {
    let lab = Lab::new(tag);
    let gw1 = Gateway::start(&lab.host1, HOST1);
    let gw2 = Gateway::start(&lab.host2, HOST2);
    Running { lab, gw1, gw2 }
}

fn ping(ns: &NetNs, args: &[&str]) -> (bool, String) {
    let mut v = vec!["ping", "-c", "3", "-i", "0.2", "-W", "2"];
    v.extend_from_slice(args);
    ns.exec(&v)
}

/// Pings until one answer comes back (neighbour resolution on first use).
fn ping_until_up(ns: &NetNs, dst: &str) {
    let start = Instant::now();
    while !ns.exec(&["ping", "-c", "1", "-W", "1", dst]).0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{dst} never answered"
        );
    }
}

fn drops(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["drops"][reason].as_u64().unwrap()
}

#[test]
fn both_tunnels_ping_both_ways_and_nothing_else_crosses() {
    if !require_root("both_tunnels_ping_both_ways_and_nothing_else_crosses") {
        return;
    }
    let r = lab("lb1");
    ping_until_up(&r.lab.host1, "10.1.1.2");
    for (ns, dst) in [
        (&r.lab.host1, "10.1.1.2"),
        (&r.lab.host1, "20.1.1.2"),
        (&r.lab.host2, "10.1.1.1"),
        (&r.lab.host2, "20.1.1.1"),
    ] {
        let (ok, out) = ping(ns, &[dst]);
        assert!(ok, "ping {dst} from {}: {out}", ns.name);
        assert!(out.contains(" 0% packet loss"), "{out}");
    }
    // Cross traffic: the kernel would route 20.1.1.2 into tap2 with source
    // 10.1.1.1; the far gateway must refuse it.
    let before = drops(&r.gw2.settled_stats(), "inner_source_not_peer");
    let (ok, out) = ping(&r.lab.host1, &["-I", "10.1.1.1", "20.1.1.2"]);
    assert!(!ok, "10.1.1.1 reached 20.1.1.2: {out}");
    let (ok, out) = ping(&r.lab.host2, &["-I", "10.1.1.2", "20.1.1.1"]);
    assert!(!ok, "10.1.1.2 reached 20.1.1.1: {out}");
    let after2 = drops(&r.gw2.settled_stats(), "inner_source_not_peer");
    let after1 = drops(&r.gw1.settled_stats(), "inner_source_not_peer");
    assert_eq!(
        after2 - before,
        3,
        "host2 refused host1's three cross pings"
    );
    assert_eq!(after1, 3, "host1 refused host2's three cross pings");
}

#[test]
fn fifty_megabytes_of_tcp_arrive_intact_through_each_tunnel() {
    if !require_root("fifty_megabytes_of_tcp_arrive_intact_through_each_tunnel") {
        return;
    }
    let r = lab("lb2");
    ping_until_up(&r.lab.host1, "10.1.1.2");
    ping_until_up(&r.lab.host1, "20.1.1.2");
    const BYTES: usize = 50_000_000;
    for (server_ip, name) in [("10.1.1.2", "tun100 (GRE)"), ("20.1.1.2", "tun200 (IPIP)")] {
        let (got, took) = tcp_transfer(&r.lab.host2, server_ip, &r.lab.host1, BYTES);
        assert_eq!(got, BYTES, "{name}: bytes received");
        eprintln!(
            "{name}: {BYTES} bytes intact in {took:?} ({:.0} Mbit/s)",
            BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
    }
    // The offloads were used: host1's kernel handed its gateway large TCP
    // packets to cut (TSO), and host2's gateway wrote runs of segments as
    // one (coalescing); the data above arrived intact through both.
    let (s1, s2) = (r.gw1.settled_stats(), r.gw2.settled_stats());
    use gateway_tests::stats::worker_sum;
    assert!(
        worker_sum(&s1, "tx_gso_packets") > 0,
        "no TSO packet cut: {s1}"
    );
    assert!(
        worker_sum(&s2, "coalesced") > 0,
        "no segment coalesced: {s2}"
    );
    eprintln!(
        "host1's gateway cut {} large packets into {} segments; host2's wrote {} segments in {} coalesced writes",
        worker_sum(&s1, "tx_gso_packets"),
        worker_sum(&s1, "tx_sent"),
        worker_sum(&s2, "coalesced") + worker_sum(&s2, "coalesced_writes"),
        worker_sum(&s2, "coalesced_writes"),
    );
    for gw in [&r.gw1, &r.gw2] {
        let s = gw.settled_stats();
        for w in s["workers"].as_array().unwrap() {
            let f = &w["frames"];
            let sum: u64 = ["free", "in_kernel", "in_flight", "in_tx"]
                .iter()
                .map(|k| f[*k].as_u64().unwrap())
                .sum();
            assert_eq!(sum, f["total"].as_u64().unwrap(), "frames balance: {w}");
        }
    }
}

#[test]
fn tcp_arrives_intact_with_the_plain_reads_of_kernels_before_6_7() {
    if !require_root("tcp_arrives_intact_with_the_plain_reads_of_kernels_before_6_7") {
        return;
    }
    // What a kernel without multishot io_uring reads gets: one plain read
    // per device queue at a time (forced here, this kernel has them).
    let lab = Lab::new("lb6");
    let env = ["env", "GATEWAY_NO_MULTISHOT=1"];
    let gw1 = Gateway::start_wrapped(&lab.host1, HOST1, &env, &[]);
    let gw2 = Gateway::start_wrapped(&lab.host2, HOST2, &env, &[]);
    ping_until_up(&lab.host1, "10.1.1.2");
    const BYTES: usize = 20_000_000;
    let (got, took) = tcp_transfer(&lab.host2, "10.1.1.2", &lab.host1, BYTES);
    assert_eq!(got, BYTES);
    eprintln!("plain reads: {BYTES} bytes intact in {took:?}");
    for gw in [&gw1, &gw2] {
        gateway_tests::stats::assert_accounting(&gw.settled_stats());
    }
}

/// Runs tshark in the wire namespace, from the moment it captures, for
/// the duration of `f` and until `enough` holds for what it captured
/// (`want` says what that is); returns the requested fields of every
/// captured tunnel packet, one row each.
fn capture_fields(
    wire: &NetNs,
    fields: &[&str],
    want: &str,
    enough: impl Fn(&[Vec<String>]) -> bool,
    f: impl FnOnce(),
) -> Vec<Vec<String>> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &wire.name,
        "tshark",
        "-q",
        "-l",
        "-i",
        "br0",
        "-f",
        "ip proto 47 or ip proto 4",
        "-o",
        "ip.check_checksum:TRUE",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let mut tshark = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tshark (apt-get install tshark)");
    // Each packet's fields, a line as it is captured (-l).
    let rows: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let reader = {
        let (rows, out) = (rows.clone(), tshark.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let row = line.split('|').map(str::to_string).collect();
                rows.lock().unwrap().push(row);
            }
        })
    };
    let said: Arc<Mutex<String>> = Arc::default();
    {
        let (said, err) = (said.clone(), tshark.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut said = said.lock().unwrap();
                said.push_str(&line);
                said.push('\n');
            }
        });
    }
    wait_until("tshark to capture", Duration::from_secs(30), || {
        let said = said.lock().unwrap();
        if said.contains("Capture started") {
            Ok(())
        } else {
            Err(format!("tshark said {said:?}"))
        }
    });
    f();
    wait_until(want, Duration::from_secs(20), || {
        let rows = rows.lock().unwrap();
        if enough(&rows) {
            Ok(())
        } else {
            Err(format!("{} captured: {rows:?}", rows.len()))
        }
    });
    // SIGINT makes tshark finish.
    let _ = Command::new("kill")
        .args(["-INT", &tshark.id().to_string()])
        .status();
    let _ = tshark.wait();
    reader.join().unwrap();
    let rows = rows.lock().unwrap().clone();
    rows
}

#[test]
fn the_wire_shows_what_the_kernel_would_send() {
    if !require_root("the_wire_shows_what_the_kernel_would_send") {
        return;
    }
    let r = lab("lb3");
    ping_until_up(&r.lab.host1, "10.1.1.2");
    ping_until_up(&r.lab.host1, "20.1.1.2");
    let fields = [
        "ip.src",
        "ip.dst",
        "ip.proto",
        "ip.ttl",
        "ip.checksum.status",
        "ip.flags.df",
        "gre",
        "gre.proto",
        "icmp.type",
        "icmp.seq",
        "icmp.checksum.status",
        "data.data",
    ];
    // tun200 has ttl inherit: a ping with TTL 33 must leave with outer TTL 33.
    // Two pings through each tunnel: four requests and four replies.
    let rows = capture_fields(
        &r.lab.wire,
        &fields,
        "four requests and four replies on the wire",
        |rows| rows.len() >= 8,
        || {
            assert!(ping(&r.lab.host1, &["-c", "2", "-p", "c0ffee", "10.1.1.2"]).0);
            assert!(
                ping(
                    &r.lab.host1,
                    &["-c", "2", "-t", "33", "-p", "c0ffee", "20.1.1.2"]
                )
                .0
            );
        },
    );
    let col = |row: &Vec<String>, i: usize| -> Vec<String> {
        row.get(i)
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut gre_seen = 0;
    let mut ipip_seen = 0;
    for row in &rows {
        let src = col(row, 0);
        let dst = col(row, 1);
        let proto = col(row, 2);
        let ttl = col(row, 3);
        let sum = col(row, 4);
        let gre = &row[6];
        assert_eq!(src.len(), 2, "outer and inner IPv4 headers: {row:?}");
        assert_eq!(
            sum,
            ["1", "1"],
            "outer and inner header checksums are good: {row:?}"
        );
        assert_eq!(
            col(row, 10),
            ["1"],
            "inner ICMP checksum good (inner unchanged): {row:?}"
        );
        assert!(
            row[11].contains("c0ffee"),
            "payload pattern intact: {row:?}"
        );
        let outer = (src[0].as_str(), dst[0].as_str());
        assert!(
            outer == ("192.168.0.8", "192.168.0.58") || outer == ("192.168.0.58", "192.168.0.8"),
            "outer addresses are the configured endpoints: {row:?}"
        );
        match proto[0].as_str() {
            "47" => {
                gre_seen += 1;
                assert!(!gre.is_empty(), "a GRE header: {row:?}");
                assert_eq!(row[7], "0x0800", "GRE carries IPv4: {row:?}");
                assert_eq!(ttl[0], "64", "tun100 has ttl 64: {row:?}");
                assert!(
                    src[1].starts_with("10.1.1.") && dst[1].starts_with("10.1.1."),
                    "{row:?}"
                );
            }
            "4" => {
                ipip_seen += 1;
                assert!(gre.is_empty(), "no GRE header in IPIP: {row:?}");
                assert_eq!(proto[1], "1", "the inner ICMP packet right behind: {row:?}");
                assert!(
                    src[1].starts_with("20.1.1.") && dst[1].starts_with("20.1.1."),
                    "{row:?}"
                );
                if src[0] == "192.168.0.8" {
                    assert_eq!(ttl[0], "33", "ttl inherit copies the inner TTL: {row:?}");
                }
            }
            p => panic!("unexpected protocol {p}: {row:?}"),
        }
        assert_eq!(
            col(row, 5)[0],
            "1",
            "outer DF set (the kernel's pmtudisc default): {row:?}"
        );
    }
    assert_eq!(gre_seen, 4, "two GRE requests and two replies: {rows:?}");
    assert_eq!(ipip_seen, 4, "two IPIP requests and two replies: {rows:?}");
}

#[test]
fn too_big_packets_get_fragmentation_needed_and_tcp_adapts() {
    if !require_root("too_big_packets_get_fragmentation_needed_and_tcp_adapts") {
        return;
    }
    let r = lab("lb4");
    ping_until_up(&r.lab.host1, "10.1.1.2");
    // The device takes 1500-byte packets now, the tunnel still 1400: the
    // gateway itself must answer with ICMP.
    r.lab.host1.ip(&["link", "set", "tap1", "mtu", "1500"]);
    let (ok, out) = r.lab.host1.exec(&[
        "ping", "-c", "2", "-i", "0.3", "-W", "1", "-M", "do", "-s", "1472", "10.1.1.2",
    ]);
    assert!(
        !ok,
        "a 1500-byte DF ping must not pass a 1400-byte tunnel: {out}"
    );
    assert!(
        out.contains("mtu = 1400") || out.contains("mtu=1400"),
        "the sender learns the tunnel MTU: {out}"
    );
    let s = r.gw1.settled_stats();
    assert!(drops(&s, "tx_too_big_icmp_sent") >= 1, "{s}");

    // A new TCP connection starts with 1500-byte segments and must adapt.
    r.lab.host1.exec(&["ip", "route", "flush", "cache"]);
    let (got, took) = tcp_transfer(&r.lab.host2, "10.1.1.2", &r.lab.host1, 5_000_000);
    assert_eq!(got, 5_000_000);
    eprintln!("5 MB after path-MTU discovery in {took:?}");
}

#[test]
fn a_next_hop_mac_change_is_followed_within_seconds() {
    if !require_root("a_next_hop_mac_change_is_followed_within_seconds") {
        return;
    }
    let r = lab("lb5");
    ping_until_up(&r.lab.host1, "10.1.1.2");
    // host2 announces its new MAC (gratuitous ARP on address change).
    r.lab
        .host2
        .exec(&["sysctl", "-w", "net.ipv4.conf.ens0.arp_notify=1"]);
    // An announcement within the ARP locktime of the entry's last update
    // may be ignored: wait until host1's entry for host2 is older than that.
    let locktime = r
        .lab
        .host1
        .exec(&["cat", "/proc/sys/net/ipv4/neigh/ens0/locktime"])
        .1;
    let locktime: u64 = locktime
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("locktime: {locktime}"));
    wait_until(
        "host1's neighbour entry for host2 to be older than the ARP locktime",
        Duration::from_secs(20),
        || {
            let shown =
                r.lab
                    .host1
                    .ip(&["-j", "-s", "neigh", "show", "192.168.0.58", "dev", "ens0"]);
            let entries: serde_json::Value =
                serde_json::from_str(&shown).unwrap_or(serde_json::Value::Null);
            // Whole seconds (rounded down) against hundredths of one.
            match entries[0]["updated"].as_u64() {
                Some(age) if age * 100 > locktime => Ok(()),
                _ => Err(format!("{shown} (locktime {locktime} hundredths)")),
            }
        },
    );
    let new_mac = "02:00:00:00:05:58";
    r.lab.host2.ip(&["link", "set", "ens0", "address", new_mac]);
    let changed = Instant::now();
    wait_until(
        "the gateway to follow the new MAC",
        Duration::from_secs(20),
        || {
            let log = r.gw1.log();
            if log.contains(new_mac) {
                Ok(())
            } else {
                Err(format!("its log:\n{log}"))
            }
        },
    );
    eprintln!(
        "next hop followed {:?} after the MAC change",
        changed.elapsed()
    );
    // And the packets on the wire now go to the new MAC.
    let from_host1 = |rows: &[Vec<String>]| -> usize {
        rows.iter()
            .filter(|r| r[2].starts_with("192.168.0.8,"))
            .count()
    };
    let rows = capture_fields(
        &r.lab.wire,
        &["eth.src", "eth.dst", "ip.src"],
        "host1's two requests on the wire",
        |rows| from_host1(rows) >= 2,
        || {
            assert!(ping(&r.lab.host1, &["-c", "2", "10.1.1.2"]).0);
        },
    );
    let from_host1: Vec<_> = rows
        .iter()
        .filter(|r| r[2].starts_with("192.168.0.8,"))
        .collect();
    assert_eq!(from_host1.len(), 2, "{rows:?}");
    for row in from_host1 {
        assert_eq!(row[1], new_mac, "tunnel packets go to the new MAC: {row:?}");
    }
}
