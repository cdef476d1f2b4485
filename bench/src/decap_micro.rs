//! Micro-benchmark of the sans-IO packet paths, no root needed: decap and
//! encap over batches of in-memory frames, reported as nanoseconds per
//! packet (median of several runs). For instruction counts that do not
//! depend on the machine's load, `decap-micro --count CASE N` does exactly
//! N packets of one case and nothing else, for callgrind: `cargo xtask
//! instructions` runs it with two values of N and reports the difference
//! per packet (the set-up cancels out).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use gateway::datapath::decap::{decap, RxState};
use gateway::datapath::encap::{encap, NextHop, TunnelTx, TxContext, Verdict};
use gateway::datapath::offload::{self, Run, Segmenter, VnetHdr};
use gateway::datapath::tunnel::Ttl;
use gateway::datapath::tunnel::{DeviceKind, Mode, TunnelRx, TunnelTable};

fn frame(gre: bool) -> Vec<u8> {
    let inner = {
        let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 2], [10, 1, 1, 1], 64).udp(1024, 9);
        let mut v = Vec::new();
        b.write(&mut v, &[0u8; 64]).unwrap();
        v
    };
    let mut body = Vec::new();
    if gre {
        body.extend_from_slice(&[0, 0, 8, 0]);
    }
    body.extend_from_slice(&inner);
    let mut ip = etherparse::Ipv4Header::new(
        body.len() as u16,
        64,
        etherparse::IpNumber(if gre { 47 } else { 4 }),
        [192, 168, 0, 58],
        [192, 168, 0, 8],
    )
    .unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut f = vec![2, 0, 0, 0, 0, 8, 2, 0, 0, 0, 0, 0x58, 8, 0];
    ip.write(&mut f).unwrap();
    f.extend_from_slice(&body);
    f
}

/// An Ethernet frame with a TCP segment (timestamps option, ACK) of
/// `payload` bytes at sequence number `seq`, checksums right.
fn tcp_segment(seq: u32, payload: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 1, 1, 2], [10, 1, 1, 1], 64)
        .tcp(5001, 40000, seq, 65535)
        .ack(7)
        .options(&[etherparse::TcpOptionElement::Timestamp(1, 2)])
        .unwrap();
    let mut v = Vec::new();
    b.write(&mut v, &vec![0x5a; payload]).unwrap();
    // DF, as Linux sends TCP.
    v[20] = 0x40;
    v[24..26].copy_from_slice(&[0, 0]);
    let c = !gateway::wire::checksum::sum(&v[14..34]);
    v[24..26].copy_from_slice(&c.to_be_bytes());
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rx = TunnelTable::new(vec![
        TunnelRx {
            name: "tun100".into(),
            mode: Mode::Gre,
            local: Ipv4Addr::new(192, 168, 0, 8).into(),
            remote: Ipv4Addr::new(192, 168, 0, 58).into(),
            ikey: None,
            icsum: false,
            iseq: false,
            device_kind: DeviceKind::Tap,
            device_mac: [2, 0, 0, 0, 0, 1],
            peer_mac: [2, 0, 0, 0, 0, 2],
            mtu: 1400,
            allowed_sources: vec![gateway::datapath::tunnel::Prefix::parse("10.1.1.2").unwrap()],
        },
        TunnelRx {
            name: "tun200".into(),
            mode: Mode::Ipip,
            local: Ipv4Addr::new(192, 168, 0, 8).into(),
            remote: Ipv4Addr::new(192, 168, 0, 58).into(),
            ikey: None,
            icsum: false,
            iseq: false,
            device_kind: DeviceKind::Tun,
            device_mac: [0; 6],
            peer_mac: [2, 0, 0, 0, 0, 2],
            mtu: 1400,
            allowed_sources: vec![],
        },
    ]);
    const BATCH: usize = 64;
    let args: Vec<String> = std::env::args().collect();
    let count = (args.get(1).map(String::as_str) == Some("--count")).then(|| {
        let case = args.get(2).cloned().unwrap_or_default();
        let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10_000);
        (case, n)
    });
    let iters = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000usize);
    // Valid packets, then garbage as a flood would bring it: what a
    // dropped packet costs the worker beside a delivered one.
    let gre = frame(true);
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("decap gre->tap".into(), gre.clone()),
        ("decap ipip->tun".into(), frame(false)),
    ];
    let ip = 14;
    let mut garbage = Vec::new();
    let mut spoofed = gre.clone();
    spoofed[ip + 24 + 12..ip + 24 + 16].copy_from_slice(&[6, 6, 6, 6]);
    garbage.push(spoofed);
    let mut bad_csum = gre.clone();
    bad_csum[ip + 10] ^= 0xff;
    garbage.push(bad_csum);
    let mut version = gre.clone();
    version[ip + 21] = 1;
    garbage.push(version);
    let mut keyed = gre.clone();
    keyed[ip + 20] = 0x20;
    garbage.push(keyed);
    let mut inner_bad = gre.clone();
    inner_bad[ip + 24] = 0x43;
    garbage.push(inner_bad);
    for g in garbage {
        let mut probe = g.clone();
        let reason = match decap(&mut probe, &rx, &mut RxState::new(2)) {
            Ok(_) => "delivered".to_string(),
            Err(r) => r.name().to_string(),
        };
        cases.push((format!("drop {reason}"), g));
    }
    let mut state = RxState::new(2);
    if let Some((case, n)) = &count {
        if case == "list" {
            for (name, _) in &cases {
                println!("{name}");
            }
            for name in ["encap tun->gre", "coalesce tcp 1400", "segment tso 1348"] {
                println!("{name}");
            }
            return;
        }
        if let Some((_, template)) = cases.iter().find(|(name, _)| name == case) {
            let mut f = template.clone();
            for _ in 0..*n {
                f.copy_from_slice(black_box(template));
                let _ = black_box(decap(black_box(&mut f), &rx, &mut state));
            }
            return;
        }
    }
    for (name, template) in cases.iter().filter(|_| count.is_none()) {
        let mut batch: Vec<Vec<u8>> = (0..BATCH).map(|_| template.clone()).collect();
        // decap rewrites the frame in place, so each round restores it
        // first; the restore alone is timed too and subtracted.
        let mut runs = Vec::new();
        let mut copies = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..iters / BATCH {
                for f in batch.iter_mut() {
                    f.copy_from_slice(black_box(template));
                    match decap(black_box(f), &rx, &mut state) {
                        Ok(d) => {
                            black_box(d);
                        }
                        Err(e) => {
                            black_box(e);
                        }
                    }
                }
            }
            runs.push(start.elapsed().as_nanos() as f64 / (iters / BATCH * BATCH) as f64);
            let start = Instant::now();
            for _ in 0..iters / BATCH {
                for f in batch.iter_mut() {
                    f.copy_from_slice(black_box(template));
                    black_box(&f);
                }
            }
            copies.push(start.elapsed().as_nanos() as f64 / (iters / BATCH * BATCH) as f64);
        }
        println!(
            "{name:<34} {:6.1} ns/packet (median of 5 runs of {iters}, less {:.1} ns of frame restore)",
            median(runs) - median(copies.clone()),
            median(copies)
        );
    }

    let tx = TunnelTx {
        mode: Mode::Gre,
        local: Ipv4Addr::new(192, 168, 0, 8).into(),
        remote: Ipv4Addr::new(192, 168, 0, 58).into(),
        encap_limit: None,
        path_mtu: Default::default(),
        ident: Default::default(),
        okey: None,
        ocsum: false,
        oseq: None,
        tos: gateway::datapath::tunnel::Tos::Fixed(0),
        pmtudisc: true,
        ignore_df: false,
        ttl: Ttl::Fixed(64),
        mtu: 1400,
        device_kind: DeviceKind::Tun,
        device_mac: [0; 6],
        peer_mac: [2, 0, 0, 0, 0, 2],
        address: None,
        peer: None,
        keepalive: None,
    };
    let hop = NextHop {
        dst: [2, 0, 0, 0, 0, 0x58],
        src: [2, 0, 0, 0, 0, 8],
    };
    let inner = {
        let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], 64).udp(9, 1024);
        let mut v = Vec::new();
        b.write(&mut v, &[0u8; 64]).unwrap();
        v
    };
    if let Some((case, n)) = &count {
        match case.as_str() {
            "encap tun->gre" => {
                let mut b = vec![0u8; 2048];
                let off = tx.read_offset();
                for i in 0..*n {
                    b[off..off + inner.len()].copy_from_slice(black_box(&inner));
                    black_box(encap(
                        black_box(&mut b),
                        inner.len(),
                        &tx,
                        Some(hop),
                        &mut TxContext::new(i as u16),
                    ));
                }
            }
            "coalesce tcp 1400" => {
                // What the worker does per received TCP segment: parse it
                // (checksum verified) and add it to its flow's run.
                let (a, b) = (tcp_segment(1000, 1348), tcp_segment(2348, 1348));
                let first = offload::parse(&a, 14, true).unwrap();
                for _ in 0..*n {
                    let mut run = Run::start(first);
                    let seg = offload::parse(black_box(&b), 14, true).unwrap();
                    if run.accepts(&seg) {
                        run.add(&seg);
                    }
                    black_box(run);
                }
            }
            "segment tso 1348" => {
                // One segment cut from a 64 KiB TSO packet, per packet.
                let big = tcp_segment(1000, 48 * 1348);
                let h = VnetHdr {
                    flags: offload::F_NEEDS_CSUM,
                    gso_type: offload::GSO_TCPV4,
                    hdr_len: 66,
                    gso_size: 1348,
                    csum_start: 34,
                    csum_offset: 16,
                };
                let seg = Segmenter::new(&big, 14, &h).unwrap();
                let mut out = vec![0u8; 2048];
                for i in 0..*n {
                    black_box(seg.write(i % seg.count(), black_box(&mut out)));
                }
            }
            other => {
                eprintln!("no case {other:?}; `decap-micro --count list 0` lists them");
                std::process::exit(2);
            }
        }
        return;
    }
    let mut bufs: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| {
            let mut b = vec![0u8; 2048];
            let off = tx.read_offset();
            b[off..off + inner.len()].copy_from_slice(&inner);
            b
        })
        .collect();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iters / BATCH {
            for (i, b) in bufs.iter_mut().enumerate() {
                let v = encap(
                    black_box(b),
                    inner.len(),
                    &tx,
                    Some(hop),
                    &mut TxContext::new(i as u16),
                );
                assert!(matches!(v, Verdict::Transmit { .. }));
            }
        }
        runs.push(start.elapsed().as_nanos() as f64 / (iters / BATCH * BATCH) as f64);
    }
    println!(
        "{:<18} {:6.1} ns/packet (median of 5 runs of {iters})",
        "encap tun->gre",
        median(runs)
    );
}
