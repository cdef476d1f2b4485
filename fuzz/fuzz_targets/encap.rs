//! Any bytes as a packet read from a tunnel device, under tunnel settings
//! taken from the first bytes: encap must transmit, reply or drop within
//! the frame, never panic or write out of bounds.
#![no_main]

use std::net::Ipv4Addr;

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use gateway::datapath::tunnel::{Tos, Ttl};
use gateway::datapath::encap::{
    encap, keepalive_probe, KeepaliveProbe, NextHop, TunnelTx, TxContext, Verdict,
};
use gateway::datapath::tunnel::{DeviceKind, Mode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, packet)) = data.split_first() else {
        return;
    };
    let t = TunnelTx {
        mode: if knobs & 1 == 0 {
            Mode::Gre
        } else {
            Mode::Ipip
        },
        // IPv4 or IPv6 underlay, the latter with or without the
        // encapsulation-limit option.
        local: if data.len() % 3 == 0 {
            "2001:db8::8".parse().unwrap()
        } else {
            Ipv4Addr::new(192, 168, 0, 8).into()
        },
        remote: if data.len() % 3 == 0 {
            "2001:db8::58".parse().unwrap()
        } else {
            Ipv4Addr::new(192, 168, 0, 58).into()
        },
        encap_limit: (data.len() % 2 == 0).then_some(4),
        path_mtu: Default::default(),
        ident: Default::default(),
        okey: (knobs & 2 != 0).then_some(0x0102_0304),
        ocsum: knobs & 4 != 0,
        // Sequence numbers with the key; TOS, DF and ignore-df follow the
        // TTL choice, in the combinations the configuration allows.
        oseq: (knobs & 2 != 0).then(|| Arc::new(AtomicU32::new(u32::MAX))),
        ttl: if knobs & 8 != 0 {
            Ttl::Inherit
        } else {
            Ttl::Fixed(64)
        },
        tos: if knobs & 8 != 0 {
            Tos::Inherit
        } else {
            Tos::Fixed(0xb8)
        },
        pmtudisc: knobs & 8 == 0,
        ignore_df: knobs & 8 != 0 && knobs & 4 != 0,
        mtu: if knobs & 16 != 0 { 1280 } else { 68 },
        device_kind: if knobs & 32 != 0 {
            DeviceKind::Tun
        } else {
            DeviceKind::Tap
        },
        device_mac: [2, 0, 0, 0, 0, 1],
        peer_mac: [2, 0, 0, 0, 0, 2],
        address: (knobs & 64 != 0).then(|| "10.1.1.1".parse().unwrap()),
        peer: (knobs & 64 != 0).then(|| "10.1.1.2".parse().unwrap()),
        keepalive: (knobs & 2 != 0).then_some(KeepaliveProbe {
            interval: 10,
            reply_key: Some(7),
            reply_csum: knobs & 4 != 0,
        }),
    };
    let hop = (knobs & 128 == 0).then_some(NextHop {
        dst: [2, 0, 0, 0, 0, 0x58],
        src: [2, 0, 0, 0, 0, 8],
    });
    // The frame as the worker has it: the read lands at the read offset,
    // the buffer runs to the end of a UMEM frame.
    let mut buf = vec![0u8; 3840];
    let off = t.read_offset();
    if off + packet.len() > buf.len() {
        return;
    }
    buf[off..off + packet.len()].copy_from_slice(packet);
    // A path MTU learned, sometimes: small enough for IPv6 to go out with
    // the outer DF clear, or not.
    if knobs & 16 != 0 && data.len() % 5 == 0 {
        t.path_mtu.lower_locked(
            if data.len() % 10 == 0 { 600 } else { 1400 },
            data.len() % 7 == 0,
            0,
        );
    }
    let mut cx = TxContext::new(7);
    cx.flow_seed = u32::from(knobs) * 0x9e37;
    match encap(&mut buf, packet.len(), &t, hop, &mut cx) {
        Verdict::Transmit { len } => assert!(len <= buf.len()),
        Verdict::Reply { offset, len, .. } => assert!(offset + len <= buf.len()),
        Verdict::Drop(_) => {}
    }
    // A keepalive probe for the same tunnel, over what encap left: built
    // within the frame, or refused (IPv6, no keepalive, no next hop).
    match keepalive_probe(&mut buf, &t, hop, &mut cx) {
        Verdict::Transmit { len } => assert!(len <= buf.len()),
        Verdict::Reply { offset, len, .. } => assert!(offset + len <= buf.len()),
        Verdict::Drop(_) => {}
    }
});
