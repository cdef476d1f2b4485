//! Flows: where the IP header of a device's packet starts, the hash that
//! keeps a flow's packets together (on one writing worker, in one
//! coalescing run), and which worker writes a hash.

use std::hash::Hasher;

use crate::datapath::tunnel::DeviceKind;

/// Where the IP header starts in a packet of a device of this kind: at 0
/// in a tun; after the Ethernet header (and up to two VLAN tags) in a tap.
/// `None`: not IP.
pub fn l3_of(kind: DeviceKind, pkt: &[u8]) -> Option<usize> {
    match kind {
        DeviceKind::Tun => Some(0),
        DeviceKind::Tap => {
            let mut at = 12;
            for _ in 0..3 {
                match pkt.get(at..at + 2)? {
                    [0x08, 0x00] | [0x86, 0xdd] => return Some(at + 2),
                    [0x81, 0x00] | [0x88, 0xa8] => at += 4,
                    _ => return None,
                }
            }
            None
        }
    }
}

/// Which of `n` workers writes packets of flow hash `hash`.
#[inline]
pub fn writer_of(hash: u32, n: usize) -> usize {
    ((u64::from(hash) * n as u64) >> 32) as usize
}

/// The flow hash of a packet as a device of this kind takes it: the inner
/// addresses, protocol and (unless a fragment) ports. Not IP: the MAC
/// addresses of a tap's frame, 0 for a tun.
pub fn flow_hash(kind: DeviceKind, pkt: &[u8]) -> u32 {
    let mut h = rustc_hash::FxHasher::default();
    let Some(l3) = l3_of(kind, pkt) else {
        if let Some(macs) = pkt.get(..12) {
            h.write(macs);
        }
        return fold(h.finish());
    };
    let ip = &pkt[l3..];
    let (proto, l4) = match ip.first().map(|b| b >> 4) {
        Some(4) if ip.len() >= 20 => {
            h.write(&ip[12..20]);
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            (ip[9], (!frag).then_some(ihl))
        }
        Some(6) if ip.len() >= 40 => {
            h.write(&ip[8..40]);
            (ip[6], Some(40))
        }
        _ => {
            if let Some(b) = ip.get(..ip.len().min(40)) {
                h.write(b);
            }
            return fold(h.finish());
        }
    };
    h.write_u8(proto);
    // TCP, UDP, SCTP, UDP-Lite: ports in the first four bytes.
    if matches!(proto, 6 | 17 | 132 | 136) {
        if let Some(ports) = l4.and_then(|at| ip.get(at..at + 4)) {
            h.write(ports);
        }
    }
    fold(h.finish())
}

fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, ports: [u8; 4], frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..24].copy_from_slice(&ports);
        p
    }

    #[test]
    fn a_flow_hashes_the_same_and_ports_tell_flows_apart() {
        let a = v4([10, 1, 1, 1], [10, 1, 1, 2], 17, [0, 1, 0, 2], 0);
        let mut a2 = a.clone();
        a2.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            flow_hash(DeviceKind::Tun, &a),
            flow_hash(DeviceKind::Tun, &a2),
            "the payload does not count"
        );
        let b = v4([10, 1, 1, 1], [10, 1, 1, 2], 17, [0, 1, 0, 3], 0);
        assert_ne!(
            flow_hash(DeviceKind::Tun, &a),
            flow_hash(DeviceKind::Tun, &b)
        );
        // Fragments: addresses and protocol only, whatever follows.
        let f1 = v4([10, 1, 1, 1], [10, 1, 1, 2], 17, [0, 1, 0, 2], 0x2000);
        let f2 = v4([10, 1, 1, 1], [10, 1, 1, 2], 17, [9, 9, 9, 9], 0x0010);
        assert_eq!(
            flow_hash(DeviceKind::Tun, &f1),
            flow_hash(DeviceKind::Tun, &f2)
        );
        // Behind an Ethernet header in a tap: the same as in a tun.
        let mut t = vec![0u8; 14];
        t[12..14].copy_from_slice(&[0x08, 0x00]);
        t.extend_from_slice(&a);
        assert_eq!(
            flow_hash(DeviceKind::Tap, &t),
            flow_hash(DeviceKind::Tun, &a)
        );
    }

    #[test]
    fn ipv6_and_odd_packets_hash_without_panicking() {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = 6;
        p[8] = 0xfd;
        p[40..44].copy_from_slice(&[0, 80, 1, 0]);
        let h = flow_hash(DeviceKind::Tun, &p);
        p[43] = 1;
        assert_ne!(h, flow_hash(DeviceKind::Tun, &p));
        for n in 0..48 {
            flow_hash(DeviceKind::Tun, &p[..n]);
            flow_hash(DeviceKind::Tap, &p[..n]);
        }
    }

    #[test]
    fn flows_spread_over_the_workers() {
        // The writer of a hash, for 2 and 3 workers: even enough over 4096
        // flows.
        for n in [2usize, 3] {
            let mut per = vec![0u32; n];
            for port in 0..4096u16 {
                let p = v4(
                    [10, 1, 1, 1],
                    [10, 1, 1, 2],
                    17,
                    {
                        let b = port.to_be_bytes();
                        [b[0], b[1], 0, 53]
                    },
                    0,
                );
                let h = flow_hash(DeviceKind::Tun, &p);
                per[writer_of(h, n)] += 1;
            }
            let fair = 4096 / n as u32;
            for c in per {
                assert!(
                    c > fair * 8 / 10 && c < fair * 12 / 10,
                    "{n} workers: {c} of 4096"
                );
            }
        }
    }

    #[test]
    fn the_ip_header_is_found_behind_ethernet_and_vlan_tags() {
        let mut f = vec![0u8; 64];
        assert_eq!(l3_of(DeviceKind::Tun, &f), Some(0));
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(l3_of(DeviceKind::Tap, &f), Some(14));
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        f[16..18].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(l3_of(DeviceKind::Tap, &f), Some(18));
        f[12..14].copy_from_slice(&[0x88, 0xa8]);
        f[16..18].copy_from_slice(&[0x81, 0x00]);
        f[20..22].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(l3_of(DeviceKind::Tap, &f), Some(22), "QinQ");
        f[20..22].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(l3_of(DeviceKind::Tap, &f), None, "ARP is not IP");
        assert_eq!(l3_of(DeviceKind::Tap, &f[..13]), None, "too short");
    }
}
