//! ECN on decapsulation (RFC 6040): what the outer header's ECN field
//! does to the inner packet's.

use super::{Inner, ECN_MASK};
use crate::datapath::drop_reason::DropReason;
use crate::wire::{ipv4, ipv6};

/// ECN, RFC 6040 as the kernel does it (`INET_ECN_decapsulate`) on the
/// inner IP header at the start of `ip`, whose ECN field is `inner_ecn`:
/// congestion marked on the outer header (CE) is carried to an ECN-capable
/// inner packet, and a not-ECT inner packet under a CE outer is dropped;
/// an ECT(1) outer turns an ECT(0) inner into ECT(1) (`INET_ECN_set_ect1`,
/// for L4S). Otherwise the inner ECN field stands. An IPv4 header's
/// checksum is updated for the change alone (RFC 1624).
pub(super) fn ecn_decapsulate(
    outer: u8,
    inner_ecn: u8,
    inner: Inner,
    ip: &mut [u8],
) -> Result<(), DropReason> {
    const ECT_1: u8 = 0x01;
    const ECT_0: u8 = 0x02;
    let new = match (outer, inner_ecn) {
        (ECN_CE, 0) => return Err(DropReason::EcnCeOnNotEct),
        (ECN_CE, e) if e != ECN_CE => ECN_CE,
        (ECT_1, ECT_0) => ECT_1,
        _ => return Ok(()),
    };
    match inner {
        Inner::V4 => {
            let mut p = ipv4::Packet::new_unchecked(ip);
            let tos = p.dscp_ecn();
            p.update_dscp_ecn((tos & !ECN_MASK) | new);
        }
        Inner::V6 => {
            let mut p = ipv6::Packet::new_unchecked(ip);
            let tc = p.traffic_class();
            p.set_traffic_class((tc & !ECN_MASK) | new);
        }
    }
    Ok(())
}

const ECN_CE: u8 = 0x03;
