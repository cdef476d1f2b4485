//! ICMP errors about packets the gateway sent, received on the underlay:
//! "fragmentation needed" (ICMP) and "packet too big" (ICMPv6), from which
//! a tunnel's path MTU is learned.

use super::{Delivery, Kind, IPV6_DSTOPTS};
use crate::datapath::drop_reason::DropReason;
use crate::datapath::tunnel::{endpoint_key, TunnelTable};
use crate::wire::{checksum, ipv4, ipv6};

/// The kernel's `net.ipv4.route.min_pmtu` default.
pub const MIN_PMTU: u16 = 552;

/// An ICMP "fragmentation needed" from a router on the path (RFC 1191),
/// about a packet the gateway sent: the tunnel with the quoted packet's
/// endpoints, and the MTU it reports (no lower than the kernel's
/// `min_pmtu`, 552).
///
/// Only an error addressed to the tunnel's own local address is taken (the
/// one the quoted packet came from), as the kernel takes only ICMP
/// delivered to a local address: one sent to another host, quoting a
/// tunnel packet, changes nothing here.
pub(super) fn path_mtu_from_icmp(
    icmp: &[u8],
    to: std::net::Ipv4Addr,
    table: &TunnelTable,
) -> Result<Delivery, DropReason> {
    const ICMP_HEADER: usize = 8;
    if icmp.len() < ICMP_HEADER + ipv4::HEADER_LEN || !checksum::verify(icmp) {
        return Err(DropReason::IcmpMalformed);
    }
    if icmp[0] != 3 || icmp[1] != 4 {
        return Err(DropReason::NotTunnelProtocol);
    }
    let mtu = u16::from_be_bytes([icmp[6], icmp[7]]);
    let quoted = &icmp[ICMP_HEADER..];
    // (An MTU under 68, 0 from routers older than RFC 1191 among them,
    // is under min_pmtu like any other: 552, locked, as in the kernel's
    // __ip_rt_update_pmtu.)
    if quoted[0] >> 4 != 4 {
        return Err(DropReason::IcmpMalformed);
    }
    let src = std::net::Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]);
    let dst = std::net::Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]);
    if to != src {
        return Err(DropReason::IcmpNotLocal);
    }
    // What we sent: from our local address to the remote.
    let key = endpoint_key(src.into(), dst.into(), quoted[9]);
    let tunnel = table
        .any_on_endpoint(&key)
        .ok_or(DropReason::UnknownEndpoint)?;
    Ok(Delivery {
        tunnel,
        offset: 0,
        len: 0,
        kind: Kind::PathMtu {
            mtu: mtu.max(MIN_PMTU),
            locked: mtu < MIN_PMTU,
        },
    })
}

/// The IPv6 counterpart: ICMPv6 "packet too big" (RFC 4443) about a
/// packet the gateway sent. One with an MTU under 1280 changes nothing
/// (`icmp_malformed`), as in the kernel (`__ip6_rt_update_pmtu` returns
/// for it; RFC 8021), measured against Linux 6.1 in the VM lab.
pub(super) fn path_mtu_from_icmpv6(
    icmp: &[u8],
    src: &[u8; 16],
    dst: &[u8; 16],
    table: &TunnelTable,
) -> Result<Delivery, DropReason> {
    const ICMP_HEADER: usize = 8;
    if icmp.len() < ICMP_HEADER + ipv6::HEADER_LEN {
        return Err(DropReason::IcmpMalformed);
    }
    if icmp[0] != 2 {
        return Err(DropReason::NotTunnelProtocol);
    }
    let mut zeroed = [0u8; 4];
    zeroed[..2].copy_from_slice(&icmp[..2]);
    let sum = checksum::icmpv6(src, dst, &[&zeroed[..], &icmp[4..]].concat());
    if sum != u16::from_be_bytes([icmp[2], icmp[3]]) {
        return Err(DropReason::IcmpMalformed);
    }
    let mtu = u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]);
    if mtu < 1280 {
        return Err(DropReason::IcmpMalformed);
    }
    let quoted = &icmp[ICMP_HEADER..];
    if quoted[0] >> 4 != 6 {
        return Err(DropReason::IcmpMalformed);
    }
    let mut proto = quoted[6];
    if proto == IPV6_DSTOPTS {
        proto = *quoted
            .get(ipv6::HEADER_LEN)
            .ok_or(DropReason::IcmpMalformed)?;
    }
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    local.copy_from_slice(&quoted[8..24]);
    remote.copy_from_slice(&quoted[24..40]);
    // Addressed to the local address the quoted packet came from (see
    // `path_mtu_from_icmp`).
    if *dst != local {
        return Err(DropReason::IcmpNotLocal);
    }
    let key = endpoint_key(
        std::net::Ipv6Addr::from(local).into(),
        std::net::Ipv6Addr::from(remote).into(),
        proto,
    );
    let tunnel = table
        .any_on_endpoint(&key)
        .ok_or(DropReason::UnknownEndpoint)?;
    Ok(Delivery {
        tunnel,
        offset: 0,
        len: 0,
        kind: Kind::PathMtu {
            mtu: mtu.min(65535) as u16,
            locked: false,
        },
    })
}
