//! The worker's decisions, one case each.

use super::*;

#[test]
fn a_coalescing_run_ends_where_it_must() {
    let mut h = Harness::new(Setup::default());
    let p = [0x5a; 100];
    // Flow 1000: three in order, a gap, then one that closes its run with
    // PSH; flow 2000 interleaved, two in order; a UDP datagram (not
    // coalesced here); all in one batch.
    let batch = [
        tcp(1000, 1, &p, false),
        tcp(2000, 7, &p, false),
        tcp(1000, 101, &p, false),
        tcp(1000, 201, &p, false),
        tcp(2000, 107, &p, false),
        tcp(1000, 401, &p, false), // gap: 301 is missing
        tcp(1000, 501, &p, true),  // PSH ends the run
        udp(3000, &p),
    ];
    for inner in &batch {
        assert!(h.sock.receive_packet(&outer(REMOTE, 4, inner)));
    }
    h.step();
    h.check_ledger();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    h.check_ledger();

    let w = written(&h.dev);
    let summary: Vec<Summary> = w
        .iter()
        .map(|(_, packets, gso, pkt)| (*packets, *gso, tcp_of(pkt)))
        .collect();
    // The gap ends flow 1000's first run (written as it meets the gap);
    // 401 and 501 make a run that PSH closes; flow 2000's run and the
    // datagram are written whole at the end of the batch.
    assert!(
        summary.contains(&(3, 100, Some((1000, 1, 300)))),
        "1, 101, 201 as one: {summary:?}"
    );
    assert!(
        summary.contains(&(2, 100, Some((1000, 401, 200)))),
        "401 and 501 (PSH) as one: {summary:?}"
    );
    assert!(
        summary.contains(&(2, 100, Some((2000, 7, 200)))),
        "flow 2000 as one: {summary:?}"
    );
    assert_eq!(summary.len(), 4, "and the datagram alone: {summary:?}");
    let order: Vec<u32> = summary
        .iter()
        .filter_map(|s| s.2.filter(|t| t.0 == 1000).map(|t| t.1))
        .collect();
    assert_eq!(order, vec![1, 401], "flow 1000 in order");
    let l = &h.run.st.local;
    assert_eq!(l.delivered, 8);
    assert_eq!(l.coalesced_writes, 3);
    assert_eq!(l.coalesced, 4, "7 segments in 3 writes");
    h.check_counts();
}

#[test]
fn a_run_of_one_tunnel_never_takes_another_tunnel_s_segment() {
    let mut h = Harness::new(Setup::default());
    let p = [7u8; 80];
    // The same inner flow, in order, alternating between two tunnels.
    for (i, remote) in [REMOTE, [192, 168, 0, 59], REMOTE, [192, 168, 0, 59]]
        .iter()
        .enumerate()
    {
        let seq = 1 + 80 * (i as u32 / 2);
        assert!(h
            .sock
            .receive_packet(&outer(*remote, 4, &tcp(1000, seq, &p, false))));
    }
    h.step();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    h.check_ledger();
    let w = written(&h.dev);
    let mut per_file: Vec<(u32, u16)> = w.iter().map(|(f, n, _, _)| (*f, *n)).collect();
    per_file.sort_unstable();
    assert_eq!(per_file, vec![(0, 2), (1, 2)], "two runs, one per tunnel");
}

#[test]
fn the_write_of_a_run_that_fails_counts_every_packet_of_it() {
    let mut h = Harness::new(Setup::default());
    let p = [1u8; 60];
    for i in 0..4u32 {
        assert!(h
            .sock
            .receive_packet(&outer(REMOTE, 4, &tcp(1000, 1 + 60 * i, &p, false))));
    }
    h.step();
    assert_eq!(
        h.dev.finish_writes(usize::MAX, Some(-libc::EIO)),
        1,
        "one write"
    );
    h.settle();
    h.check_ledger();
    let l = &h.run.st.local;
    assert_eq!(
        l.drops[DropReason::DeviceDown as usize],
        4,
        "EIO: the device is down"
    );
    assert_eq!(l.delivered, 0);
    h.check_counts();
}

#[test]
fn a_hand_over_brings_its_frames_back() {
    let (mut a, mut b) = pair();
    // Thirty flows, all received by worker a: the ones that hash to b are
    // handed over, written by b, and their frames come back to a.
    let n = 30u16;
    for sport in 0..n {
        assert!(a
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(5000 + sport, &[3; 40]))));
    }
    for _ in 0..20 {
        a.step();
        b.step();
        a.dev.finish_writes(usize::MAX, None);
        b.dev.finish_writes(usize::MAX, None);
    }
    let (la, lb) = (&a.run.st.local, &b.run.st.local);
    assert!(la.spread_out > 0, "some flows hash to b");
    assert!(la.spread_out < u64::from(n), "some stay with a");
    assert_eq!(la.spread_out, lb.spread_in, "what a hands over, b writes");
    assert_eq!(
        la.delivered,
        u64::from(n),
        "a counts every delivery, handed over or not"
    );
    assert_eq!(
        a.dev.packets_written() + b.dev.packets_written(),
        u64::from(n),
        "each written once"
    );
    assert!(
        b.dev
            .state
            .lock()
            .unwrap()
            .written
            .iter()
            .all(|(_, packets, _)| *packets == 1),
        "datagrams are not coalesced here"
    );
    assert_eq!(
        a.run.st.frames.at_peers, 0,
        "every frame back: {:?}",
        a.run.st.frames
    );
    a.check_ledger();
    b.check_ledger();
    a.check_counts();
}

#[test]
fn the_stop_waits_for_frames_handed_over() {
    let (mut a, b) = pair();
    for sport in 0..20u16 {
        assert!(a
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(6000 + sport, &[3; 40]))));
    }
    a.step();
    assert!(a.run.st.frames.at_peers > 0, "handed over, not yet written");
    // Both stop, each on its own thread, while this one plays the kernel.
    let (dev_a, dev_b, stats_a, sock_a) = (
        a.dev.clone(),
        b.dev.clone(),
        a.stats.clone(),
        a.sock.clone(),
    );
    let total = a.ids.len() as u64;
    stop_both(a, b);
    let f = published_frames(&stats_a);
    assert_eq!(f.at_peers, 0, "every frame handed over came back: {f:?}");
    assert_eq!(f.in_flight, 0, "{f:?}");
    assert_eq!(f.free + f.in_kernel + f.in_tx, total, "{f:?}");
    assert_eq!(sock_a.ids().len() as u64, f.in_kernel + f.in_tx);
    assert_eq!(
        dev_a.packets_written() + dev_b.packets_written(),
        20,
        "every datagram written once"
    );
}

#[test]
fn a_reload_drains_before_it_switches() {
    let mut h = Harness::new(Setup::default());
    // Writes in flight on the old devices.
    for sport in 0..5u16 {
        assert!(h
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(7000 + sport, &[9; 30]))));
    }
    h.step();
    assert_eq!(h.dev.state.lock().unwrap().in_flight.len(), 5);
    // A read of tunnel 0's device that finishes with a packet as the
    // reads are cancelled: sent with the old list, before the switch.
    h.dev.state.lock().unwrap().read_at_cancel = Some((0, {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v.extend(udp(8000, &[4; 20]));
        v
    }));
    // The new list: tunnel 0 goes to another remote, with a new device
    // (its old one is finished with: its read cancelled).
    let (done_tx, done_rx) = crossbeam::channel::bounded(1);
    h.control
        .send(Reconfig {
            tunnels: tunnels(vec![ipip("a", [192, 168, 0, 77])]),
            devices: vec![DeviceQueue::New(device_fd())],
            counters_from: vec![Some(0)],
            done: done_tx,
        })
        .unwrap();
    for _ in 0..200 {
        h.step();
        if !done_rx.is_empty() {
            break;
        }
    }
    assert_eq!(done_rx.try_recv().expect("answered"), Ok(()), "switched");
    let events = h.dev.state.lock().unwrap().events.clone();
    let switch = events
        .iter()
        .position(|e| *e == Event::FilesUpdated)
        .expect("files replaced");
    let writes_before = events[..switch]
        .iter()
        .filter(|e| matches!(e, Event::WriteDone(..)))
        .count();
    assert_eq!(
        writes_before, 5,
        "every old write finished first: {events:?}"
    );
    assert_eq!(h.run.st.local.delivered, 5);
    // The read taken at the cancel left with the old tunnel's remote.
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1, "the read was sent");
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(ip.header().destination(), REMOTE, "the old list's remote");
    // And a packet from the new remote is taken on the new list.
    assert!(h
        .sock
        .receive_packet(&outer([192, 168, 0, 77], 4, &udp(1, &[1; 10]))));
    h.settle();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    assert_eq!(h.run.st.local.delivered, 6);
    h.check_ledger();
    h.check_counts();
}

#[test]
fn a_device_read_is_encapsulated_and_sent_to_the_next_hop() {
    let mut h = Harness::new(Setup::default());
    h.step(); // reads armed
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(4444, &[8; 50]));
    assert!(h.dev.device_sends(1, &read));
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1);
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = s.link else {
        panic!("Ethernet")
    };
    assert_eq!((eth.source(), eth.destination()), (GW_MAC, HOP_MAC));
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(ip.header().protocol(), IpNumber(4));
    assert_eq!(
        ip.header().destination(),
        [192, 168, 0, 59],
        "tunnel b's remote"
    );
    assert_eq!(
        ip.payload().payload,
        &read[VNET_HDR_LEN..],
        "the inner packet as read"
    );
    h.settle();
    h.check_ledger();
    let l = &h.run.st.local;
    assert_eq!((l.tx_read, l.tx_sent), (1, 1));
}

#[test]
fn a_completion_of_an_unknown_read_file_is_not_a_panic() {
    // A read completion for a device slot past the list (a stale one after
    // a reload shrank it) is dropped as malformed, not indexed blindly.
    let mut h = Harness::new(Setup::default());
    h.step();
    h.dev.state.lock().unwrap().armed.insert(9);
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(1, &[1; 10]));
    assert!(h.dev.device_sends(9, &read));
    h.settle();
    h.check_ledger();
    assert_eq!(h.run.st.local.drops[DropReason::TxMalformed as usize], 1);
    assert_eq!(h.dev.state.lock().unwrap().pool.len(), 8, "its buffer back");
}

#[test]
fn a_spreading_worker_with_nothing_to_do_goes_idle() {
    // With nothing received and nothing handed over, a worker of a mesh is
    // idle: it yields (busy poll) or sleeps (adaptive) like any other. (An
    // empty hand-over queue once counted as progress, and such a worker
    // spun for ever.)
    let (mut a, _b) = pair();
    for _ in 0..10 {
        a.step();
    }
    assert!(a.run.idle >= 5, "idle iterations: {}", a.run.idle);
    assert!(a.run.st.local.idle_polls >= 5);
}

#[test]
fn under_a_steady_flood_the_socket_s_own_drops_are_published() {
    // The kernel's counters of the socket are read now and then even when
    // the worker never idles: drops under a flood show while it lasts.
    let mut h = Harness::new(Setup::default());
    assert!(
        !h.sock.receive_packet(&[0u8; fake::FRAME_DATA + 1]),
        "dropped"
    );
    let dropped = || h_dropped(&h.stats);
    assert_eq!(dropped(), 0);
    for i in 0..1100u32 {
        assert!(h.sock.receive_packet(&outer(REMOTE, 4, &udp(1, &[0; 8]))));
        h.step();
        assert_eq!(h.run.idle, 0, "busy at iteration {i}");
        h.dev.finish_writes(usize::MAX, None);
    }
    assert_eq!(
        h_dropped(&h.stats),
        1,
        "the socket's drop, published while busy"
    );
}

fn h_dropped(s: &WorkerStats) -> u64 {
    s.xsk_rx_dropped.load(Ordering::Relaxed)
}

#[test]
fn a_read_the_pool_cannot_take_ends_and_is_armed_again() {
    // Reads into a pool of one buffer: the second packet finds none and
    // its read ends (ENOBUFS); once the first is sent and its buffer back,
    // the worker arms the read again and the next packet goes out. With the
    // plain reads of kernels before 6.7 (one packet per read) as well.
    for multishot in [true, false] {
        let mut h = Harness::new(Setup {
            read_bufs: 1,
            multishot,
            ..Setup::default()
        });
        h.step();
        let mut read = vec![0u8; VNET_HDR_LEN];
        read.extend(udp(4444, &[8; 50]));
        assert!(h.dev.device_sends(0, &read));
        assert!(!h.dev.device_sends(0, &read), "no buffer: the read ends");
        h.settle();
        assert!(h.dev.device_sends(0, &read), "armed again ({multishot})");
        h.settle();
        h.sock.send(usize::MAX);
        assert_eq!(h.sock.state.lock().unwrap().sent.len(), 2, "{multishot}");
        h.check_ledger();
    }
}

#[test]
fn an_arp_request_from_a_tap_is_answered_into_the_tap() {
    let mut h = Harness::new(Setup {
        tunnels: tunnels(vec![ipip_tap("c", [192, 168, 0, 60])]),
        ..Setup::default()
    });
    h.step();
    let arp = etherparse::ArpPacket::new(
        etherparse::ArpHardwareId::ETHERNET,
        etherparse::EtherType::IPV4,
        etherparse::ArpOperation::REQUEST,
        &TAP_MAC,
        &[10, 9, 0, 1],
        &[0; 6],
        &[10, 9, 0, 2],
    )
    .unwrap();
    let mut read = vec![0u8; VNET_HDR_LEN];
    PacketBuilder::ethernet2(TAP_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut read)
        .unwrap();
    assert!(h.dev.device_sends(0, &read));
    h.settle();
    assert_eq!(
        h.dev.finish_writes(usize::MAX, None),
        1,
        "one write: the answer"
    );
    h.settle();
    h.check_ledger();
    let w = written(&h.dev);
    let reply = etherparse::SlicedPacket::from_ethernet(&w[0].3).expect("a frame");
    let Some(etherparse::NetSlice::Arp(a)) = reply.net else {
        panic!("ARP: {reply:?}")
    };
    assert_eq!(a.operation(), etherparse::ArpOperation::REPLY);
    assert_eq!(
        a.sender_hw_addr(),
        &PEER_MAC,
        "the peer's MAC, as the far side"
    );
    assert_eq!(a.sender_protocol_addr(), &[10, 9, 0, 2]);
    assert_eq!(a.target_hw_addr(), &TAP_MAC);
    let l = &h.run.st.local;
    assert_eq!((l.tx_read, l.tx_replies), (1, 1));
}

#[test]
fn a_flood_from_the_devices_leaves_the_way_in_its_frames() {
    // The NIC sends nothing (its TX ring stalls) while a device floods the
    // worker with packets to send: the way out holds at most half the
    // frames, the rest keep the fill ring going, and every packet received
    // meanwhile is delivered.
    let mut h = Harness::new(Setup {
        read_bufs: 64,
        ..Setup::default()
    });
    h.step();
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(4444, &[8; 100]));
    let mut received = 0;
    for _ in 0..40 {
        for _ in 0..8 {
            h.dev.device_sends(0, &read);
        }
        for _ in 0..4 {
            if h.sock.receive_packet(&outer(REMOTE, 4, &udp(1, &[1; 20]))) {
                received += 1;
            }
        }
        h.step();
        h.dev.finish_writes(usize::MAX, None);
        h.step();
        let out = h.run.st.frames.in_tx as usize + h.run.st.tx_pending.len();
        assert!(out <= h.run.st.tx_cap, "the way out holds {out} frames");
        h.check_ledger();
    }
    assert_eq!(received, 160, "the fill ring never ran dry");
    h.settle();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    assert_eq!(h.run.st.local.delivered, 160);
}

#[test]
fn the_keepalive_worker_sends_probes_and_counts_the_replies() {
    // Tunnel "a" as a keyed gre tunnel with keepalives (ikey 9).
    let (mut rx, mut tx) = ipip("a", REMOTE);
    rx.mode = Mode::Gre;
    rx.ikey = Some(9);
    tx.mode = Mode::Gre;
    tx.keepalive = Some(crate::datapath::encap::KeepaliveProbe {
        interval: 10,
        reply_key: Some(9),
        reply_csum: false,
    });
    let mut h = Harness::new(Setup {
        tunnels: tunnels(vec![(rx, tx), ipip("b", [192, 168, 0, 59])]),
        keepalives: true,
        ..Setup::default()
    });
    h.step();
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    // (The coarse clock does not move in unit tests: one second, one probe.)
    assert_eq!(
        sent.len(),
        1,
        "one probe, for the one tunnel with keepalives"
    );
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(ip.header().destination(), REMOTE);
    assert_eq!(ip.header().protocol(), IpNumber(47));
    assert_eq!(h.run.st.local.tunnel_keepalives_sent, [1, 0]);

    // The peer reflects it: GRE REMOTE -> LOCAL, key 9, protocol 0.
    let reply = etherparse::PacketBuilder::ethernet2(HOP_MAC, GW_MAC).ipv4(REMOTE, LOCAL, 254);
    let mut frame = Vec::new();
    reply
        .write(&mut frame, IpNumber(47), &[0x20, 0, 0, 0, 0, 0, 0, 9])
        .unwrap();
    assert!(h.sock.receive_packet(&frame));
    h.step();
    h.settle();
    let l = &h.run.st.local;
    assert_eq!(l.keepalive_replies, 1);
    assert_eq!(l.tunnel_keepalive_replies, [1, 0]);
    assert_eq!(
        l.tunnel_keepalive_reply_at[0],
        u64::from(crate::io::clock::now()) + 1
    );
    assert_eq!(l.delivered, 0, "nothing for the device");
    h.check_ledger();
}

#[test]
fn a_reload_leaves_the_read_of_a_device_that_stays_armed() {
    let mut h = Harness::new(Setup::default());
    h.step(); // reads armed on both devices
              // Tunnel 0 keeps its device in its place and goes to another remote;
              // tunnel 1 gets a new device.
    let (done_tx, done_rx) = crossbeam::channel::bounded(1);
    h.control
        .send(Reconfig {
            tunnels: tunnels(vec![
                ipip("a", [192, 168, 0, 77]),
                ipip("b", [192, 168, 0, 59]),
            ]),
            devices: vec![DeviceQueue::Keep(0), DeviceQueue::New(device_fd())],
            counters_from: vec![Some(0), Some(1)],
            done: done_tx,
        })
        .unwrap();
    for _ in 0..200 {
        h.step();
        if !done_rx.is_empty() {
            break;
        }
    }
    assert_eq!(done_rx.try_recv().expect("answered"), Ok(()), "switched");
    assert_eq!(
        h.dev.state.lock().unwrap().cancelled,
        vec![1],
        "only the replaced device's read is cancelled"
    );
    // What the staying device sends now leaves with the new list.
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(4444, &[8; 50]));
    assert!(h.dev.device_sends(0, &read), "its read is still armed");
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1);
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(
        ip.header().destination(),
        [192, 168, 0, 77],
        "the new list's remote"
    );
    h.check_ledger();
    h.check_counts();
}
