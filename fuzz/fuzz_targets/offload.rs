//! Any bytes as a packet with a virtio-net header, both ways: read from a
//! device (checksum completion, segmentation into frames) and received
//! from the tunnel (parsed for coalescing, merged with a copy of itself
//! shifted one MSS on, and hashed by inner flow for `spread_writes`).
//! Nothing may panic or write out of bounds, and every segment written
//! must fit the length announced for it. Coalescing keys on the link
//! header: the same packet behind a link header that differs in any byte
//! (another VLAN tag, another MAC) is never taken into the same run, and
//! behind the same one always is the same flow.
#![no_main]

use gateway::datapath::offload::{complete_checksum, parse, Run, Segmenter, VnetHdr, VNET_HDR_LEN};
use gateway::datapath::flow::flow_hash;
use gateway::datapath::tunnel::DeviceKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(vnet) = VnetHdr::parse(data) else { return };
    let pkt = &data[VNET_HDR_LEN..];
    for kind in [DeviceKind::Tun, DeviceKind::Tap] {
        std::hint::black_box(flow_hash(kind, pkt));
    }
    // No link header (tun), Ethernet, and one or two VLAN tags (tap).
    for l3 in [0, 14, 18, 22] {
        let mut copy = pkt.to_vec();
        complete_checksum(&mut copy, &vnet);
        if let Ok(s) = Segmenter::new(pkt, l3, &vnet) {
            let mut out = vec![0u8; 70_000];
            for i in 0..s.count().min(64) {
                let n = s.len(i);
                assert!(n <= pkt.len());
                assert_eq!(s.write(i, &mut out[..n]), n);
            }
        }
        if let Some(seg) = parse(pkt, l3, true) {
            let mut run = Run::start(seg);
            if run.accepts(&seg) {
                run.add(&seg);
            }
            if seg.hdr_len <= pkt.len() {
                let mut first = pkt.to_vec();
                if run.segments > 1 {
                    run.finish(&mut first, l3);
                }
            }
            let again = parse(pkt, l3, true).expect("parsed once, parsed again");
            assert!(Run::start(seg).same_flow(&again));
            if l3 > 0 {
                // One byte of the link header changed (which, and how, from
                // the input): another flow.
                let mut other = pkt.to_vec();
                let at = usize::from(data[data.len() - 1]) % l3;
                other[at] ^= 0x01 | data[0];
                if let Some(b) = parse(&other, l3, true) {
                    let run = Run::start(seg);
                    assert!(!run.same_flow(&b), "link byte {at} changed, same flow");
                    assert!(!run.accepts(&b), "link byte {at} changed, accepted");
                }
            }
        }
    }
});
