//! `gateway capture` and `gateway trace` on a running gateway, with real
//! traffic: packets built with etherparse, sent from the peer's end of a
//! veth; the capture files read by tshark and tcpdump, never by the
//! gateway's own code.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use gateway_tests::stats::{assert_accounting, drops, total_drops, tunnel_rx, u64_at};
use gateway_tests::{gateway_bin, pkt, require_root, wait_until, Gateway, NetNs, RawSocket, Wire};
use serde_json::Value;

const LOCAL: [u8; 4] = [192, 168, 0, 8];
const REMOTE: [u8; 4] = [192, 168, 0, 58];

/// The seed lab's two tunnels (tun100 with a key), both into tun devices.
const CONFIG: &str = r#"
[gateway]
poll = "adaptive"
xdp_mode = "native"

[[tunnel]]
name = "tun100"
mode = "gre"
key = 42
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun100"
device_kind = "tun"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "tun200"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun200"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"
"#;

struct Lab {
    wire: Wire,
    gw: Gateway,
    gw_mac: [u8; 6],
    tx: RawSocket,
    dir: PathBuf,
}

fn lab(tag: &str) -> Lab {
    let wire = Wire::new(tag, &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    // The peer's MAC resolved first: the replies are not held up (or
    // dropped as tx_no_neighbour) while it is.
    wait_until("the next hops", Duration::from_secs(20), || {
        let s = gw.stats();
        s["tunnels"]
            .as_array()
            .is_some_and(|ts| ts.iter().all(|t| t["next_hop"].is_string()))
    });
    let dir = std::env::temp_dir().join(format!("gwt-cap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Lab {
        wire,
        gw,
        gw_mac,
        tx,
        dir,
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// An ICMP echo from the peer's inner address, in GRE with `key`.
    fn gre_echo(&self, key: u32, src: [u8; 4], seq: u16) -> Vec<u8> {
        let inner = pkt::icmp_echo(src, [10, 1, 1, 1], seq, b"capture me");
        pkt::outer(
            self.gw_mac,
            REMOTE,
            LOCAL,
            47,
            &pkt::gre(0x2000, 0x0800, key, 0, &inner),
        )
    }

    fn gre_udp(&self, port: u16, seq: u16) -> Vec<u8> {
        let inner = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000 + seq, port, b"udp");
        pkt::outer(
            self.gw_mac,
            REMOTE,
            LOCAL,
            47,
            &pkt::gre(0x2000, 0x0800, 42, 0, &inner),
        )
    }

    fn ipip_echo(&self, seq: u16) -> Vec<u8> {
        let inner = pkt::icmp_echo([20, 1, 1, 2], [20, 1, 1, 1], seq, b"capture me too");
        pkt::outer(self.gw_mac, REMOTE, LOCAL, 4, &inner)
    }
}

/// A `gateway capture` or `gateway trace` running in a namespace.
struct Client {
    child: Child,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Client {
    fn start(ns: &NetNs, args: &[&str], stdout: Stdio) -> Client {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(gateway_bin())
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway capture");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut c = Client {
            child,
            stderr: rx,
            seen: Vec::new(),
        };
        // Attached once it says so (a capture: "capturing on", a trace:
        // "tracing the next").
        wait_until("the client to attach", Duration::from_secs(20), || {
            while let Ok(l) = c.stderr.try_recv() {
                c.seen.push(l);
            }
            if c.seen.iter().any(|l| l.starts_with("error")) {
                return Err(c.seen.join("\n"));
            }
            if c.seen
                .iter()
                .any(|l| l.starts_with("capturing on") || l.starts_with("tracing the next"))
            {
                Ok(())
            } else {
                Err(c.seen.join("\n"))
            }
        });
        c
    }

    /// Ctrl-C, then its exit and all it said on stderr.
    fn stop(self) -> String {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Its exit (within a generous deadline) and all it said on stderr.
    fn wait(mut self) -> String {
        let mut status = None;
        wait_until("the client to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap();
        // The reader thread ends with the pipe.
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        let err = self.seen.join("\n");
        assert!(status.success(), "the client failed ({status}):\n{err}");
        err
    }
}

/// tshark's fields of each packet in `file`, `|`-separated.
fn tshark(file: &Path, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"])
        .arg(file)
        .args(["-T", "fields", "-E", "separator=|"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("tshark");
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

fn copies(gw: &Gateway) -> u64 {
    u64_at(&gw.stats(), &["captures", "copies"])
}

#[test]
fn a_capture_shows_each_point_with_its_tunnel_and_a_drop_with_its_reason() {
    if !require_root("a_capture_shows_each_point_with_its_tunnel_and_a_drop_with_its_reason") {
        return;
    }
    let l = lab("cap1");
    let file = l.dir.join("all.pcapng");
    let cap = Client::start(
        &l.wire.gw,
        &["capture", "--iface", "ens0", "-w", file.to_str().unwrap()],
        Stdio::null(),
    );
    // A keyed GRE echo and an IPIP one (the gateway host's kernel answers
    // both through the devices), and a GRE packet with a key no tunnel has.
    l.tx.send(&l.gre_echo(42, [10, 1, 1, 2], 1));
    l.tx.send(&l.ipip_echo(2));
    l.tx.send(&l.gre_echo(99, [10, 1, 1, 2], 3));
    // And a malformed one: GRE version 1 (PPTP's), which a tunnel does not
    // take.
    let inner = pkt::icmp_echo([10, 1, 1, 2], [10, 1, 1, 1], 4, b"version 1");
    l.tx.send(&pkt::outer(
        l.gw_mac,
        REMOTE,
        LOCAL,
        47,
        &pkt::gre(0x2001, 0x0800, 42, 0, &inner),
    ));
    // And one with the tunnel's key whose inner source is not the peer's
    // (spoofed): dropped after the lookup, so with its tunnel.
    l.tx.send(&l.gre_echo(42, [10, 9, 9, 9], 5));
    // wire-in 5, drop 3, device-out 2, device-in 2, wire-out 2.
    wait_until("fourteen copies", Duration::from_secs(30), || {
        let n = copies(&l.gw);
        if n >= 14 {
            Ok(())
        } else {
            Err(format!("{n} copies"))
        }
    });
    // The file grows as the capture goes (tshark can read it meanwhile).
    wait_until("the copies in the file", Duration::from_secs(30), || {
        let n = tshark(&file, &["frame.number"]).len();
        if n >= 14 {
            Ok(())
        } else {
            Err(format!("{n} packets in the file"))
        }
    });
    let said = cap.stop();
    assert!(said.contains("packets taken"), "{said}");

    let rows = tshark(
        &file,
        &[
            "frame.interface_name",
            "frame.comment",
            "ip.src",
            "ip.dst",
            "icmp.type",
            "gre.key",
        ],
    );
    let find = |point: &str, comment: &str, src: &str, icmp: &str| {
        rows.iter()
            .any(|r| r[0] == point && r[1].contains(comment) && r[2] == src && r[4] == icmp)
    };
    let all = format!("{rows:#?}");
    // The way in: as received (outer and inner addresses), with the tunnel
    // the gateway chose; into the device, the inner packet alone.
    assert!(
        find("wire-in", "tunnel=tun100", "192.168.0.58,10.1.1.2", "8"),
        "{all}"
    );
    assert!(
        find("wire-in", "tunnel=tun200", "192.168.0.58,20.1.1.2", "8"),
        "{all}"
    );
    assert!(
        find("device-out", "tunnel=tun100", "10.1.1.2", "8"),
        "{all}"
    );
    assert!(
        find("device-out", "tunnel=tun200", "20.1.1.2", "8"),
        "{all}"
    );
    // The way out: the kernel's replies read from the devices, then
    // encapsulated.
    assert!(find("device-in", "tunnel=tun100", "10.1.1.1", "0"), "{all}");
    assert!(find("device-in", "tunnel=tun200", "20.1.1.1", "0"), "{all}");
    assert!(
        find("wire-out", "tunnel=tun100", "192.168.0.8,10.1.1.1", "0"),
        "{all}"
    );
    assert!(
        find("wire-out", "tunnel=tun200", "192.168.0.8,20.1.1.1", "0"),
        "{all}"
    );
    // The packet with key 99: seen on the way in with no tunnel, and
    // dropped with its reason.
    // (tshark shows GRE keys in hex.)
    let key99: Vec<_> = rows.iter().filter(|r| r[5] == "0x00000063").collect();
    assert!(
        key99
            .iter()
            .any(|r| r[0] == "wire-in" && !r[1].contains("tunnel=")),
        "{all}"
    );
    assert!(
        key99
            .iter()
            .any(|r| r[0] == "drop" && r[1].contains("reason=key_mismatch")),
        "{all}"
    );
    // The malformed one, with its reason.
    assert!(
        rows.iter().any(|r| r[0] == "drop"
            && r[1].contains("reason=gre_version")
            && r[2].starts_with("192.168.0.58")),
        "{all}"
    );
    assert!(
        rows.iter().any(|r| r[0] == "drop"
            && r[1].contains("tunnel=tun100 reason=inner_source_not_peer")
            && r[2] == "192.168.0.58,10.9.9.9"),
        "{all}"
    );
    // Nothing else was dropped, and nothing crossed: every row of a tunnel
    // carries that tunnel's inner addresses (but the spoofed one's).
    assert_eq!(rows.iter().filter(|r| r[0] == "drop").count(), 3, "{all}");
    for r in rows.iter().filter(|r| !r[2].contains("10.9.9.9")) {
        if r[1].contains("tunnel=tun100") {
            assert!(r[2].contains("10.1.1."), "{all}");
        }
        if r[1].contains("tunnel=tun200") {
            assert!(r[2].contains("20.1.1."), "{all}");
        }
    }
    let s = l.gw.settled_stats();
    assert_eq!(drops(&s, "key_mismatch"), 1);
    assert_eq!(drops(&s, "gre_version"), 1);
    assert_eq!(drops(&s, "inner_source_not_peer"), 1);
    assert_accounting(&s);
}

/// The packets of `file` as tcpdump prints them (no timestamps), after
/// tcpdump's own `filter`, if any.
fn tcpdump(file: &Path, filter: Option<&str>) -> String {
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-n", "-t", "-x", "-r"]).arg(file);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    let out = cmd.output().expect("tcpdump");
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_filter_selects_what_tcpdumps_selects() {
    if !require_root("a_filter_selects_what_tcpdumps_selects") {
        return;
    }
    let l = lab("cap2");
    let path = |n: &str| l.dir.join(n);
    // On the wire (Ethernet) and into the devices (raw IP): everything,
    // and what the filter takes.
    let wire_filter = "ip proto 4";
    let dev_filter = "udp dst port 5000 or (icmp and src host 20.1.1.2)";
    let caps = [
        ("wire-in", "wire_all.pcapng", None),
        ("wire-in", "wire_f.pcapng", Some(wire_filter)),
        ("device-out", "dev_all.pcapng", None),
        ("device-out", "dev_f.pcapng", Some(dev_filter)),
    ];
    let clients: Vec<Client> = caps
        .iter()
        .map(|(point, name, filter)| {
            let file = path(name);
            let mut args = vec![
                "capture",
                "--iface",
                "ens0",
                "--point",
                point,
                "-w",
                file.to_str().unwrap(),
            ];
            args.extend(filter.iter().copied());
            Client::start(&l.wire.gw, &args, Stdio::null())
        })
        .collect();
    let mut sent = 0;
    for i in 0..5 {
        l.tx.send(&l.gre_udp(5000, i));
        l.tx.send(&l.gre_udp(6000, i));
        l.tx.send(&l.ipip_echo(i));
        l.tx.send(&l.gre_echo(42, [10, 1, 1, 2], i));
        sent += 4;
    }
    wait_until("every packet delivered", Duration::from_secs(30), || {
        let s = l.gw.stats();
        let n = tunnel_rx(&s, "tun100") + tunnel_rx(&s, "tun200");
        if n >= sent {
            Ok(())
        } else {
            Err(format!("{n} of {sent}"))
        }
    });
    // Each unfiltered capture holds them all (the filtered ones then hold
    // what they will).
    wait_until("the copies", Duration::from_secs(30), || {
        copies(&l.gw) >= 2 * sent + 15
    });
    for c in clients {
        c.stop();
    }
    for (all, filtered, filter, expect) in [
        ("wire_all.pcapng", "wire_f.pcapng", wire_filter, 5),
        ("dev_all.pcapng", "dev_f.pcapng", dev_filter, 10),
    ] {
        let everything = tcpdump(&path(all), None);
        assert_eq!(
            everything.lines().filter(|l| !l.starts_with('\t')).count(),
            sent as usize,
            "{all}:\n{everything}"
        );
        let want = tcpdump(&path(all), Some(filter));
        let got = tcpdump(&path(filtered), None);
        assert_eq!(
            got.lines().filter(|l| !l.starts_with('\t')).count(),
            expect,
            "{filtered}:\n{got}"
        );
        assert_eq!(
            got, want,
            "the gateway's filter and tcpdump's differ on {filter:?}"
        );
    }
}

#[test]
fn a_slow_reader_loses_copies_not_packets() {
    if !require_root("a_slow_reader_loses_copies_not_packets") {
        return;
    }
    let l = lab("cap3");
    // `-w -` into a pipe nobody reads: the pipe fills, then the socket,
    // then the session's queue.
    let mut cap = Client::start(
        &l.wire.gw,
        &["capture", "--iface", "ens0", "-w", "-"],
        Stdio::piped(),
    );
    let before = tunnel_rx(&l.gw.stats(), "tun100");
    const N: u64 = 30_000;
    let frames: Vec<Vec<u8>> = (0..500u16).map(|i| l.gre_udp(5000, i)).collect();
    let mut sent = 0u64;
    while sent < N {
        sent += l.tx.send_batch(&frames) as u64;
        // Paced by what the gateway has taken, so the RX ring never
        // overflows: what is measured is the capture, not the veth.
        wait_until("the gateway to keep up", Duration::from_secs(30), || {
            let n = tunnel_rx(&l.gw.stats(), "tun100") - before;
            if n >= sent {
                Ok(())
            } else {
                Err(format!("{n} of {sent}"))
            }
        });
    }
    let s = l.gw.settled_stats();
    assert_eq!(tunnel_rx(&s, "tun100") - before, sent);
    assert_eq!(total_drops(&s), 0, "{s:#}");
    assert_accounting(&s);
    let lost = u64_at(&s, &["captures", "copies_lost"]);
    assert!(lost > 0, "no copy was lost: {:#}", s["captures"]);
    // Every packet reached the device.
    let (ok, out) = l
        .wire
        .gw
        .exec(&["cat", "/sys/class/net/tun100/statistics/rx_packets"]);
    assert!(ok, "{out}");
    assert!(out.trim().parse::<u64>().unwrap() >= sent, "{out}");
    // The reader catches up: what it had is read, and it says what it lost.
    let mut stdout = cap.child.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
        sink.len()
    });
    let said = cap.stop();
    assert!(drain.join().unwrap() > 0);
    assert!(said.contains("lost (the reader was slower"), "{said}");
}

#[test]
fn a_trace_shows_each_stage_of_a_keyed_packet_and_the_verdict_on_spoofed_ones() {
    if !require_root("a_trace_shows_each_stage_of_a_keyed_packet_and_the_verdict_on_spoofed_ones") {
        return;
    }
    let l = lab("cap4");
    // GRE only (the kernel's replies, read from the device, do not match).
    let tr = Client::start(
        &l.wire.gw,
        &[
            "trace",
            "--iface",
            "ens0",
            "-c",
            "3",
            "--json",
            "ip proto 47",
        ],
        Stdio::piped(),
    );
    // A keyed packet from the peer; one with the right key but an inner
    // source that is not the peer's (spoofed); one with a key no tunnel has.
    l.tx.send(&l.gre_echo(42, [10, 1, 1, 2], 1));
    l.tx.send(&l.gre_echo(42, [10, 9, 9, 9], 2));
    l.tx.send(&l.gre_echo(99, [10, 1, 1, 2], 3));
    let mut child = tr.child;
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let tr = Client {
        child,
        stderr: tr.stderr,
        seen: tr.seen,
    };
    let said = tr.wait();
    assert!(said.contains("3 traces taken"), "{said}");
    let traces: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON trace"))
        .collect();
    assert_eq!(traces.len(), 3, "{out}");
    let stage = |t: &Value, name: &str| -> Value {
        t["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let stages = |t: &Value| -> Vec<String> {
        t["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_string())
            .collect()
    };
    // The keyed packet: every stage, and written into tun100.
    let ok = &traces[0];
    assert_eq!(
        stages(ok),
        ["wire-in", "outer", "gre", "lookup", "source", "ecn", "device"],
        "{ok:#}"
    );
    assert_eq!(stage(ok, "outer")["src"], "192.168.0.58");
    assert_eq!(stage(ok, "gre")["key"], 42);
    assert_eq!(stage(ok, "lookup")["tunnel"], "tun100");
    assert_eq!(stage(ok, "source")["inner_src"], "10.1.1.2");
    assert_eq!(stage(ok, "device")["verdict"], "written");
    assert_eq!(stage(ok, "device")["tunnel"], "tun100");
    // The spoofed inner source: the tunnel found, the packet dropped.
    let spoofed = &traces[1];
    assert_eq!(stage(spoofed, "lookup")["tunnel"], "tun100", "{spoofed:#}");
    assert_eq!(stage(spoofed, "verdict")["reason"], "inner_source_not_peer");
    assert_eq!(stage(spoofed, "device"), Value::Null);
    // The unknown key: no tunnel.
    let nokey = &traces[2];
    assert_eq!(stage(nokey, "gre")["key"], 99, "{nokey:#}");
    assert_eq!(stage(nokey, "lookup"), Value::Null);
    assert_eq!(stage(nokey, "verdict")["reason"], "key_mismatch");

    // The way out, for a person: a ping from the gateway's host into
    // tun100 is read, encapsulated and sent.
    let tr = Client::start(
        &l.wire.gw,
        &[
            "trace", "--iface", "ens0", "-c", "1", "--tunnel", "tun100", "icmp",
        ],
        Stdio::piped(),
    );
    let (ok, _) = l.wire.gw.exec(&["ping", "-c", "1", "-W", "1", "10.1.1.2"]);
    assert!(!ok, "the peer has no tunnel: no reply");
    let mut child = tr.child;
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("from a device"), "{out}");
    assert!(out.contains("device-in"), "{out}");
    assert!(out.contains("read from tun100's device"), "{out}");
    assert!(
        out.contains("encapsulated for tun100 (remote 192.168.0.58)"),
        "{out}"
    );
    assert!(out.contains("wire-out"), "{out}");
}
