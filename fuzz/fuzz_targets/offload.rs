//! Any bytes as a packet with a virtio-net header, both ways: read from a
//! device (checksum completion, segmentation into frames) and received
//! from the tunnel (parsed for coalescing, merged with a copy of itself
//! shifted one MSS on, and hashed by inner flow for `spread_writes`).
//! Nothing may panic or write out of bounds, and every segment written
//! must fit the length announced for it.
#![no_main]

use gateway::offload::{complete_checksum, parse, Run, Segmenter, VnetHdr, VNET_HDR_LEN};
use gateway::spread::flow_hash;
use gateway::tunnel::DeviceKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(vnet) = VnetHdr::parse(data) else { return };
    let pkt = &data[VNET_HDR_LEN..];
    for kind in [DeviceKind::Tun, DeviceKind::Tap] {
        std::hint::black_box(flow_hash(kind, pkt));
    }
    for l3 in [0, 14] {
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
        }
    }
});
