//! GRE checksums left to checksum offload, as a Linux sender on a virtual
//! link (a veth, a VM's virtio NIC) sends them: the skb is
//! `CHECKSUM_PARTIAL`, the GRE checksum field still 0, and the device is to
//! complete it. Between two virtual devices nobody does, and XDP on Linux
//! 6.18 cannot see that such a packet is partial (no checksum-state kfunc),
//! so the gateway counts it as `gre_checksum_bad`: the limitation the README
//! lists, with its remedy (`ethtool -K <dev> tx off` on the sender). This
//! test pins that behaviour with the kernel's own path: an AF_PACKET socket
//! with `PACKET_VNET_HDR` hands the veth a partial-checksum skb exactly as a
//! local GRE tunnel with offload would. The same packet with its checksum
//! computed (by etherparse's checksum code) is delivered.

use std::time::Duration;

use gateway_tests::stats::{drops, tunnel_rx};
use gateway_tests::{pkt, require_root, wait_until, Gateway, RawSocket, Wire};

const CONFIG: &str = r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "csum"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
csum = true
mtu = 1400
device = "tun7"
device_kind = "tun"
address = "10.7.7.1"
peer = "10.7.7.2"
"#;

/// `struct virtio_net_hdr` with `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the
/// checksum over `start..` goes at `start + offset` (native byte order).
fn vnet_needs_csum(start: u16, offset: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[6..8].copy_from_slice(&start.to_ne_bytes());
    h[8..10].copy_from_slice(&offset.to_ne_bytes());
    h
}

#[test]
fn a_gre_checksum_left_to_offload_on_a_virtual_link_is_counted_as_bad() {
    if !require_root("a_gre_checksum_left_to_offload_on_a_virtual_link_is_counted_as_bad") {
        return;
    }
    let wire = Wire::new("co", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    let inner = pkt::udp([10, 7, 7, 2], [10, 7, 7, 1], 5000, 6000, b"partial");

    // As the sender's kernel leaves it: C bit set, checksum field 0, to be
    // completed over the GRE header and payload (csum_start at the GRE
    // header, 14 + 20; the field 4 bytes in).
    let mut gre = vec![0x80, 0x00, 0x08, 0x00, 0, 0, 0, 0];
    gre.extend_from_slice(&inner);
    let partial = pkt::outer(gw_mac, [192, 168, 0, 58], [192, 168, 0, 8], 47, &gre);
    let sock = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    sock.use_vnet_hdr();
    for _ in 0..3 {
        sock.send(&[&vnet_needs_csum(34, 4)[..], &partial].concat());
    }
    wait_until(
        "three gre_checksum_bad drops",
        Duration::from_secs(20),
        || {
            let s = gw.stats();
            let n = drops(&s, "gre_checksum_bad");
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{n} so far: {s}"))
            }
        },
    );

    // The same packet with the checksum computed by the sender: delivered.
    let mut whole = gre.clone();
    let sum = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&whole)
        .ones_complement()
        .to_be();
    whole[4..6].copy_from_slice(&sum.to_be_bytes());
    let frame = pkt::outer(gw_mac, [192, 168, 0, 58], [192, 168, 0, 8], 47, &whole);
    sock.send(&[&[0u8; 10][..], &frame].concat());
    wait_until(
        "the whole packet delivered",
        Duration::from_secs(20),
        || tunnel_rx(&gw.stats(), "csum") == 1,
    );
    let s = gw.settled_stats();
    assert_eq!(drops(&s, "gre_checksum_bad"), 3, "{s}");
    gateway_tests::stats::assert_accounting(&s);
}
