//! Conformance with the kernel's GRE and IPIP: every packet here is built,
//! or dissected, by scapy (tests/conformance/peer.py), not by the gateway's
//! code, sent on the wire to the real gateway, and the result (delivered,
//! dropped under the expected reason, left to the kernel, or the fields of
//! what it sent) is compared with what the kernel documents. The conformance
//! table in docs/rules.md lists these cases.

use std::os::fd::AsRawFd;
use std::time::Duration;

use gateway_tests::stats::{assert_accounting, drops, total_drops, tunnel_rx, u64_at, worker_sum};
use gateway_tests::{require_root, wait_until, Gateway, NetNs, RawSocket, Scapy, Wire};
use serde_json::Value;

const CONFIG: &str = r#"
[gateway]
poll = "adaptive"

# The kernel's defaults: keyless, no checksum, no sequence numbers,
# ttl inherit, tos 0, pmtudisc.
[[tunnel]]
name = "plain"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

# key 42, checksums and sequence numbers both ways, between the same
# endpoints: told apart from "plain" by the key.
[[tunnel]]
name = "keyed"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
key = 42
csum = true
seq = true
mtu = 1400
device = "tun3"
device_kind = "tun"
address = "30.1.1.1"
peer = "30.1.1.2"

# IPIP with tos inherit and nopmtudisc (DF follows the inner packet).
[[tunnel]]
name = "ipip"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
tos = "inherit"
pmtudisc = false
mtu = 1400
device = "tun2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"

# IPv6 in IPv4 (protocol 41), between the same hosts.
[[tunnel]]
name = "sit"
mode = "sit"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun5"
device_kind = "tun"
address = "fd00:5::1"
peer = "fd00:5::2"
"#;

/// What a received packet must come to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Delivered into this tunnel's device.
    Delivered(&'static str),
    /// Dropped and counted under this reason.
    Dropped(&'static str),
    /// Not steered to the gateway: the XDP program passes it to the kernel
    /// and counts it under this counter.
    Kernel(&'static str),
    /// A GRE keepalive: answered on the underlay, not delivered.
    Keepalive,
}

const E: &str = "Ether(dst=GW_MAC)/IP(src=REMOTE,dst=LOCAL";
const TO_PLAIN: &str = "IP(src='10.1.1.2',dst='10.1.1.1')/UDP(sport=1,dport=9)";
const TO_KEYED: &str = "IP(src='30.1.1.2',dst='30.1.1.1')/UDP(sport=1,dport=9)";

/// The receive rules, in order (the sequence-number cases depend on it).
fn inbound_cases() -> Vec<(&'static str, String, Expect)> {
    use Expect::*;
    let keyed = |opts: &str| format!("{E})/GRE(key_present=1,key=42{opts})/{TO_KEYED}");
    vec![
        (
            "keyless packet, keyless tunnel",
            format!("{E})/GRE()/{TO_PLAIN}"),
            Delivered("plain"),
        ),
        (
            "unknown key, same endpoints",
            format!("{E})/GRE(key_present=1,key=99)/{TO_PLAIN}"),
            Dropped("key_mismatch"),
        ),
        (
            "key, checksum and sequence number 1",
            keyed(",chksum_present=1,seqnum_present=1,sequence_number=1"),
            Delivered("keyed"),
        ),
        (
            "icsum tunnel, no checksum",
            keyed(",seqnum_present=1,sequence_number=2"),
            Dropped("gre_checksum_missing"),
        ),
        (
            "icsum tunnel, wrong checksum",
            keyed(",chksum_present=1,chksum=0x1234,seqnum_present=1,sequence_number=2"),
            Dropped("gre_checksum_bad"),
        ),
        (
            "checksum on a tunnel without icsum",
            format!("{E})/GRE(chksum_present=1)/{TO_PLAIN}"),
            Dropped("gre_checksum_unexpected"),
        ),
        (
            "iseq tunnel, no sequence number",
            keyed(",chksum_present=1"),
            Dropped("gre_sequence_missing"),
        ),
        (
            "iseq tunnel, sequence number repeated",
            keyed(",chksum_present=1,seqnum_present=1,sequence_number=1"),
            Dropped("gre_sequence_old"),
        ),
        (
            "iseq tunnel, a gap (3 after 1)",
            keyed(",chksum_present=1,seqnum_present=1,sequence_number=3"),
            Delivered("keyed"),
        ),
        (
            "iseq tunnel, older than the last (2 after 3)",
            keyed(",chksum_present=1,seqnum_present=1,sequence_number=2"),
            Dropped("gre_sequence_old"),
        ),
        (
            "sequence number on a tunnel without iseq (ignored)",
            format!("{E})/GRE(seqnum_present=1,sequence_number=7)/{TO_PLAIN}"),
            Delivered("plain"),
        ),
        (
            "GRE version 1",
            format!("{E})/GRE(version=1)/{TO_PLAIN}"),
            Dropped("gre_version"),
        ),
        (
            "GRE routing bit",
            format!("{E})/GRE(routing_present=1)/{TO_PLAIN}"),
            Dropped("gre_reserved_flags"),
        ),
        (
            "GRE recursion control (ignored, as by the kernel)",
            format!("{E})/GRE(recursion_control=1)/{TO_PLAIN}"),
            Delivered("plain"),
        ),
        (
            "GRE reserved flag next to the version",
            format!("{E})/GRE(flags=1)/{TO_PLAIN}"),
            Dropped("gre_reserved_flags"),
        ),
        (
            "GRE carrying Ethernet (gretap) on a gre tunnel",
            format!("{E})/GRE(proto=0x6558)/Ether()/{TO_PLAIN}"),
            Dropped("gre_protocol_unsupported"),
        ),
        (
            "inner source not the tunnel's peer",
            format!("{E})/GRE()/IP(src='10.9.9.9',dst='10.1.1.1')/UDP()"),
            Dropped("inner_source_not_peer"),
        ),
        (
            "outer header checksum wrong",
            format!("{E},chksum=0x1234)/GRE()/{TO_PLAIN}"),
            Dropped("outer_checksum"),
        ),
        (
            "outer CE, inner not-ECT (RFC 6040)",
            format!("{E},tos=3)/IP(src='20.1.1.2',dst='20.1.1.1',tos=0)/UDP()"),
            Dropped("ecn_ce_on_not_ect"),
        ),
        (
            "outer CE, inner ECT(0): marked CE",
            format!("{E},tos=3)/IP(src='20.1.1.2',dst='20.1.1.1',tos=2)/UDP(dport=4242)"),
            Delivered("ipip"),
        ),
        (
            "outer ECT(1), inner ECT(0): inner ECT(1)",
            format!("{E},tos=1)/IP(src='20.1.1.2',dst='20.1.1.1',tos=2)/UDP(dport=4243)"),
            Delivered("ipip"),
        ),
        (
            "sit: IPv6 in IPv4",
            format!("{E},proto=41)/IPv6(src='fd00:5::2',dst='fd00:5::1')/UDP(dport=9)"),
            Delivered("sit"),
        ),
        (
            "sit: IPv4 where IPv6 belongs",
            format!("{E},proto=41)/{TO_PLAIN}"),
            Dropped("inner_malformed"),
        ),
        (
            "GRE keepalive (Cisco's: GRE local to remote inside)",
            format!("{E})/GRE()/IP(src=LOCAL,dst=REMOTE,ttl=255)/GRE(proto=0)"),
            Keepalive,
        ),
        (
            "GRE from an address that is no tunnel's remote",
            format!("Ether(dst=GW_MAC)/IP(src='192.168.0.77',dst=LOCAL)/GRE()/{TO_PLAIN}"),
            Kernel("pass_no_endpoint"),
        ),
    ]
}

#[test]
fn receive_rules_match_the_kernel() {
    if !require_root("receive_rules_match_the_kernel") {
        return;
    }
    let wire = Wire::new("cr", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let mac = wire.gw.ip(&["-br", "link", "show", "ens0"]);
    let mac = mac.split_whitespace().nth(2).unwrap().to_string();
    let mut scapy = Scapy::start(&wire.peer, &mac);
    let tun2 = RawSocket::open(&wire.gw, "tun2", 1 << 20);
    let on_wire = RawSocket::open(&wire.peer, "ens0", 4 << 20);
    wait_until("next hops", Duration::from_secs(5), || {
        gw.stats()["tunnels"][0]["next_hop"].is_string()
    });

    let mut failures = Vec::new();
    let mut before = gw.settled_stats();
    for (rule, expr, expect) in inbound_cases() {
        scapy.send(&expr);
        let after = gw.settled_stats_after(&before);
        let d = |f: &dyn Fn(&Value) -> u64| f(&after) - f(&before);
        let rx = d(&|s| worker_sum(s, "rx_frames"));
        let ok = match expect {
            Expect::Delivered(t) => {
                rx == 1 && d(&|s| tunnel_rx(s, t)) == 1 && d(&|s| total_drops(s)) == 0
            }
            Expect::Dropped(r) => {
                rx == 1 && d(&|s| drops(s, r)) == 1 && d(&|s| total_drops(s)) == 1
            }
            Expect::Kernel(c) => rx == 0 && d(&|s| u64_at(s, &["xdp", c])) == 1,
            Expect::Keepalive => {
                rx == 1 && d(&|s| worker_sum(s, "keepalives")) == 1 && d(&|s| total_drops(s)) == 0
            }
        };
        if !ok {
            failures.push(format!(
                "{rule}: expected {expect:?}; counters went from\n{before}\nto\n{after}"
            ));
        }
        before = after;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_accounting(&before);

    // The two ECN deliveries, as they reached tun2: CE applied to the
    // ECT(0) packet; the other made ECT(1) under an ECT(1) outer header, as
    // the kernel's INET_ECN_decapsulate does (INET_ECN_set_ect1, for L4S).
    let got = tun2.receive(usize::MAX, Duration::from_millis(300));
    let tos_of = |port: u16| {
        got.iter()
            .find(|p| p.len() >= 24 && u16::from_be_bytes([p[22], p[23]]) == port)
            .map(|p| p[1])
            .unwrap_or_else(|| panic!("nothing to port {port} on tun2"))
    };
    assert_eq!(tos_of(4242) & 3, 3, "outer CE onto inner ECT(0)");
    assert_eq!(
        tos_of(4243) & 3,
        1,
        "outer ECT(1) makes inner ECT(0) ECT(1)"
    );

    // Outer fragments, as a router on the way would cut a tunnel packet:
    // in order, in reverse, a train with its first fragment twice (the
    // copy dropped alone, the datagram kept, as the kernel's
    // inet_frag_queue_insert does), and two fragments that partly overlap
    // (the whole datagram dropped, RFC 5722).
    let tap = RawSocket::open(&wire.gw, "tap1", 4 << 20);
    let frags = |port: u16| {
        format!(
            "[Ether(dst=GW_MAC)/f for f in fragment(IP(src=REMOTE,dst=LOCAL,id={port})/GRE()/IP(src='10.1.1.2',dst='10.1.1.1')/UDP(sport=1,dport={port})/Raw(b'r'*1300), fragsize=400)]"
        )
    };
    let before = gw.settled_stats();
    scapy.send(&frags(4300));
    scapy.send(&format!("list(reversed({}))", frags(4301)));
    scapy.send(&format!("(lambda l: l[:1] + l)({})", frags(4302)));
    scapy.send(
        "[Ether(dst=GW_MAC)/IP(src=REMOTE,dst=LOCAL,id=4304,proto=47,flags='MF',frag=0)/Raw(b'a'*400), Ether(dst=GW_MAC)/IP(src=REMOTE,dst=LOCAL,id=4304,proto=47,flags='MF',frag=25)/Raw(b'b'*400)]",
    );
    // A train longer than reassembly takes (4004 bytes of payload in six
    // pieces of 800): every piece dropped and counted, nothing held.
    scapy.send(
        "[Ether(dst=GW_MAC)/f for f in fragment(IP(src=REMOTE,dst=LOCAL,id=4303)/GRE()/IP(src='10.1.1.2',dst='10.1.1.1')/UDP(sport=1,dport=4303)/Raw(b'o'*3972), fragsize=800)]",
    );
    let after = gw.settled_stats_after(&before);
    let d = |f: &dyn Fn(&Value) -> u64| f(&after) - f(&before);
    assert_eq!(d(&|s| drops(s, "fragment_too_big")), 6, "{after}");
    assert_eq!(
        d(&|s| tunnel_rx(s, "plain")),
        3,
        "three datagrams whole: {after}"
    );
    assert_eq!(d(&|s| worker_sum(s, "fragments_merged")), 3 * 3, "{after}");
    assert_eq!(d(&|s| drops(s, "fragment_duplicate")), 1, "{after}");
    assert_eq!(d(&|s| drops(s, "fragment_overlap")), 2, "{after}");
    assert_eq!(worker_sum(&after, "fragments_pending"), 0, "{after}");
    let whole: Vec<_> = tap
        .receive(usize::MAX, Duration::from_millis(300))
        .into_iter()
        .filter(|f| f.len() == 14 + 20 + 8 + 1300)
        .collect();
    assert_eq!(whole.len(), 3, "the three datagrams, whole, on tap1");
    assert_accounting(&after);

    // The keepalive came back as the plain GRE packet inside it, one hop
    // older, as scapy reads it. (The other GRE packets on the wire are the
    // kernel's ICMP port-unreachable answers to the UDP delivered above.)
    let back: Vec<Value> = on_wire
        .receive(usize::MAX, Duration::from_millis(300))
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[23] == 47)
        .map(|f| scapy.decode(f))
        .filter(|k| k["gre_proto"].as_u64() == Some(0))
        .collect();
    assert_eq!(back.len(), 1, "{back:?}");
    let k = &back[0];
    assert_eq!(
        (
            k["src"].as_str(),
            k["dst"].as_str(),
            k["gre_proto"].as_u64(),
            k["ttl"].as_u64()
        ),
        (
            Some("192.168.0.8"),
            Some("192.168.0.58"),
            Some(0),
            Some(254)
        ),
        "{k}"
    );
}

/// Sends one UDP datagram from `ns` to `dst` with the given TOS byte and
/// DF choice.
fn send_udp(ns: &NetNs, dst: &'static str, tos: u8, df: bool) {
    ns.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let set = |opt: libc::c_int, v: libc::c_int| {
            // SAFETY: setsockopt with a live int.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    4,
                )
            };
            assert_eq!(rc, 0, "setsockopt {opt}");
        };
        set(libc::IP_TOS, libc::c_int::from(tos));
        set(
            libc::IP_MTU_DISCOVER,
            if df {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_DONT
            },
        );
        s.send_to(b"conformance", (dst, 9)).unwrap();
    });
}

#[test]
fn send_rules_match_the_kernel() {
    if !require_root("send_rules_match_the_kernel") {
        return;
    }
    let wire = Wire::new("cs", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    wait_until("next hops", Duration::from_secs(5), || {
        gw.stats()["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["next_hop"].is_string())
    });
    let mac = wire.gw.ip(&["-br", "link", "show", "ens0"]);
    let mac = mac.split_whitespace().nth(2).unwrap().to_string();
    let mut scapy = Scapy::start(&wire.peer, &mac);
    let cap = RawSocket::open(&wire.peer, "ens0", 4 << 20);
    // What the gateway sent for one datagram, as scapy reads it.
    let mut sent = |dst: &'static str, tos: u8, df: bool| -> Value {
        send_udp(&wire.gw, dst, tos, df);
        let frames = cap.receive(usize::MAX, Duration::from_millis(300));
        let ours: Vec<_> = frames
            .iter()
            .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && (f[23] == 47 || f[23] == 4))
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "one tunnel packet for {dst}, got {}",
            ours.len()
        );
        scapy.decode(ours[0])
    };

    // plain: tos 0 with the inner ECN copied, DF always (pmtudisc), TTL
    // inherited, a bare GRE header.
    let p = sent("10.1.1.2", 0xb8 | 1, false);
    assert_eq!(
        (p["proto"].as_u64(), p["tos"].as_u64(), p["df"].as_bool()),
        (Some(47), Some(1), Some(true)),
        "{p}"
    );
    assert_eq!(p["ttl"], p["inner_ttl"], "{p}");
    assert!(
        p["gre_key"].is_null() && p["gre_seq"].is_null() && p["gre_csum_present"] == false,
        "{p}"
    );
    // Inner CE goes out as ECT(0) on the outer header.
    let p = sent("10.1.1.2", 3, true);
    assert_eq!(p["tos"].as_u64(), Some(2), "{p}");

    // keyed: key 42, a right checksum, sequence numbers 1, 2.
    for want in [1, 2] {
        let p = sent("30.1.1.2", 0, true);
        assert_eq!(p["gre_key"].as_u64(), Some(42), "{p}");
        assert_eq!(p["gre_csum_ok"].as_bool(), Some(true), "{p}");
        assert_eq!(p["gre_seq"].as_u64(), Some(want), "{p}");
    }

    // ipip, tos inherit: the DSCP copied, ECN copied (CE as ECT(0)); and
    // with nopmtudisc DF follows the inner packet.
    let p = sent("20.1.1.2", 0xb8 | 3, false);
    assert_eq!(
        (p["proto"].as_u64(), p["tos"].as_u64(), p["df"].as_bool()),
        (Some(4), Some(0xb8 | 2), Some(false)),
        "{p}"
    );
    let p = sent("20.1.1.2", 0x28, true);
    assert_eq!(
        (p["tos"].as_u64(), p["df"].as_bool()),
        (Some(0x28), Some(true)),
        "{p}"
    );

    // sit: IPv6 out in IPv4, protocol 41.
    wire.gw.run(|| {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        s.send_to(b"conformance", ("fd00:5::2", 9)).unwrap();
    });
    let frames = cap.receive(usize::MAX, Duration::from_millis(300));
    let sit: Vec<_> = frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[23] == 41)
        .collect();
    assert_eq!(sit.len(), 1, "one sit packet");
    let p = scapy.decode(sit[0]);
    assert_eq!(
        (p["proto"].as_u64(), p["inner_v6"].as_bool()),
        (Some(41), Some(true)),
        "{p}"
    );

    // Path MTU from the underlay: a router says the path to the remote
    // carries 1300 bytes. A 1400-byte DF packet into the plain tunnel is
    // then refused with fragmentation needed, carrying 1300 less the outer
    // IPv4 and GRE headers, as the kernel's tunnels do; the sender's kernel
    // takes that MTU for the route.
    // First, the same error addressed to a host that is not this one
    // (192.168.0.99, through our MAC): anyone could send it, and it must
    // change nothing (the XDP program leaves it to the kernel, which
    // drops it, not being a router here). Three of them, then the real one:
    // only the real one is taken.
    let xdp_other_host = |s: &Value| u64_at(s, &["xdp", "pass_other_host"]);
    let before_spoof = gw.settled_stats();
    for _ in 0..3 {
        scapy.send(
            "Ether(dst=GW_MAC)/IP(src=REMOTE,dst='192.168.0.99')/ICMP(type=3,code=4,nexthopmtu=600)/IP(src=LOCAL,dst=REMOTE,proto=47)/GRE()",
        );
    }
    // The XDP program leaves them to the kernel (none reaches a worker).
    wait_until(
        "three ICMP errors for another host passed",
        Duration::from_secs(10),
        || xdp_other_host(&gw.stats()) - xdp_other_host(&before_spoof) == 3,
    );
    scapy.send(&format!(
        "{E})/ICMP(type=3,code=4,nexthopmtu=1300)/IP(src=LOCAL,dst=REMOTE,proto=47)/GRE()"
    ));
    wait_until("the path MTU to be taken", Duration::from_secs(5), || {
        worker_sum(&gw.stats(), "path_mtu_updates") >= 1
    });
    let s = gw.settled_stats();
    assert_eq!(
        worker_sum(&s, "path_mtu_updates"),
        1,
        "an ICMP error for another host lowered the path MTU: {s}"
    );
    assert_eq!(drops(&s, "icmp_not_local"), 0, "{s}");
    // The socket stays open until the end: the kernel takes an ICMP error
    // for a UDP datagram only while its socket exists.
    let _sender = wire.gw.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let v: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a live int.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&v as *const libc::c_int).cast(),
                4,
            )
        };
        let _ = s.send_to(&[0u8; 1372], ("10.1.1.2", 9));
        s
    });
    let big: Vec<_> = cap
        .receive(usize::MAX, Duration::from_millis(300))
        .into_iter()
        .filter(|f| f.len() > 1400 && f[12..14] == [8, 0] && f[23] == 47)
        .collect();
    assert!(big.is_empty(), "a packet over the path MTU went out");
    wait_until("the route to learn the MTU", Duration::from_secs(5), || {
        wire.gw
            .ip(&["route", "get", "10.1.1.2"])
            .contains("mtu 1276")
    });
    let s = gw.settled_stats();
    assert_eq!(drops(&s, "tx_too_big_icmp_sent"), 1, "{s}");

    assert_accounting(&s);
}
