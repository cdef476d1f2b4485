//! Path MTU updates from ICMP are rate-limited per worker: a burst of
//! valid "fragmentation needed" errors (addressed to the tunnel's local
//! address, quoting its packets, built by etherparse) is taken up to the
//! budget (100 a second) and the rest counted as `icmp_rate_limited`; every
//! one is accounted for.

use std::time::Duration;

use gateway_tests::stats::{assert_accounting, drops, worker_sum};
use gateway_tests::{pkt, require_root, wait_until, Gateway, RawSocket, Wire};

const CONFIG: &str = r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "tun100"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"
"#;

/// ICMP "fragmentation needed" (MTU `mtu`) from a router to the gateway,
/// quoting the outer header of a GRE packet the gateway sent.
fn frag_needed(gw_mac: [u8; 6], mtu: u16) -> Vec<u8> {
    let mut quoted = etherparse::Ipv4Header::new(
        8,
        64,
        etherparse::IpNumber::GRE,
        [192, 168, 0, 8],
        [192, 168, 0, 58],
    )
    .unwrap();
    quoted.header_checksum = quoted.calc_header_checksum();
    let mut body = quoted.to_bytes().to_vec();
    body.extend_from_slice(&[0u8; 8]);
    let icmp = etherparse::Icmpv4Header::with_checksum(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ),
        &body,
    );
    let mut payload = icmp.to_bytes().to_vec();
    payload.extend_from_slice(&body);
    pkt::outer(gw_mac, [192, 168, 0, 58], [192, 168, 0, 8], 1, &payload)
}

#[test]
fn a_burst_of_fragmentation_needed_is_taken_up_to_the_budget() {
    if !require_root("a_burst_of_fragmentation_needed_is_taken_up_to_the_budget") {
        return;
    }
    const BURST: u64 = 300;
    let wire = Wire::new("pm", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    // Every MTU lower than the one before, so each taken one would lower
    // the path again.
    let frames: Vec<Vec<u8>> = (0..BURST)
        .map(|i| frag_needed(gw_mac, 1400 - i as u16))
        .collect();
    let sock = RawSocket::open(&wire.peer, "ens0", 4 << 20);
    let mut sent = 0;
    while sent < frames.len() {
        sent += sock.send_batch(&frames[sent..(sent + 32).min(frames.len())]);
    }
    wait_until("the burst counted", Duration::from_secs(20), || {
        let s = gw.stats();
        let (taken, limited) = (
            worker_sum(&s, "path_mtu_updates"),
            drops(&s, "icmp_rate_limited"),
        );
        if taken + limited == BURST {
            Ok(())
        } else {
            Err(format!("{taken} taken, {limited} limited: {s}"))
        }
    });
    let s = gw.settled_stats();
    assert_accounting(&s);
    let taken = worker_sum(&s, "path_mtu_updates");
    // A burst of 300 arrives within a second or two: at most 100 taken in
    // each second it spans.
    assert!(taken >= 1, "none taken: {s}");
    assert!(taken <= 200, "{taken} of {BURST} taken in a burst: {s}");
    assert!(drops(&s, "icmp_rate_limited") >= BURST - 200, "{s}");
}
