//! Packet views over byte buffers, in the manner of smoltcp's `wire`: a
//! `Packet<T: AsRef<[u8]>>` (or `Frame`) with `new_checked` for untrusted
//! input, getters on `AsRef`, setters on `AsMut`; after `check_len` succeeds
//! no accessor panics. Pure logic: no allocation, no syscalls.

pub mod checksum;
pub mod ethernet;
pub mod gre;
pub mod ipv4;
pub mod ipv6;
pub mod vnet;

/// Why a buffer could not be read as the header it was meant to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Shorter than the header, or than the length the header claims.
    Truncated,
    /// A field holds a value the protocol does not allow.
    Malformed,
}

/// IP protocol numbers the gateway cares about; others round-trip as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpProtocol {
    Icmp,
    Ipip,
    Tcp,
    Udp,
    Ipv6,
    Gre,
    Icmpv6,
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(v: u8) -> Self {
        match v {
            1 => IpProtocol::Icmp,
            4 => IpProtocol::Ipip,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            41 => IpProtocol::Ipv6,
            47 => IpProtocol::Gre,
            58 => IpProtocol::Icmpv6,
            n => IpProtocol::Unknown(n),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(p: IpProtocol) -> u8 {
        match p {
            IpProtocol::Icmp => 1,
            IpProtocol::Ipip => 4,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Ipv6 => 41,
            IpProtocol::Gre => 47,
            IpProtocol::Icmpv6 => 58,
            IpProtocol::Unknown(n) => n,
        }
    }
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_round_trips() {
        for n in 0..=255u8 {
            assert_eq!(u8::from(IpProtocol::from(n)), n);
        }
    }
}
