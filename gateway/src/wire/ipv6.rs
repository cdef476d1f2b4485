//! IPv6 fixed headers (RFC 8200).

use std::net::Ipv6Addr;

use super::{be16, Error, IpProtocol};

pub const HEADER_LEN: usize = 40;

mod field {
    use core::ops::Range;
    pub const VER_TC_FLOW: Range<usize> = 0..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the version and that the buffer holds the header and the
    /// payload length it claims (trailing padding is allowed).
    pub fn check_len(&self) -> Result<(), Error> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::Malformed);
        }
        if len < HEADER_LEN + usize::from(self.payload_len()) {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW.start] >> 4
    }

    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }

    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH.start)
    }

    /// Header plus payload, in bytes.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(self.buffer.as_ref()[field::NEXT_HEADER])
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        Ipv6Addr::from(a)
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        Ipv6Addr::from(a)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 6, the traffic class and a zero flow label.
    pub fn set_version_and_traffic_class(&mut self, tc: u8) {
        let b = self.buffer.as_mut();
        b[0] = 0x60 | (tc >> 4);
        b[1] = tc << 4;
        b[2] = 0;
        b[3] = 0;
    }

    /// Sets the traffic class, keeping the version and the flow label.
    pub fn set_traffic_class(&mut self, tc: u8) {
        let b = self.buffer.as_mut();
        b[0] = (b[0] & 0xf0) | (tc >> 4);
        b[1] = (b[1] & 0x0f) | (tc << 4);
    }

    /// Sets the 20-bit flow label, keeping the version and the traffic
    /// class.
    pub fn set_flow_label(&mut self, label: u32) {
        let b = self.buffer.as_mut();
        b[1] = (b[1] & 0xf0) | ((label >> 16) & 0x0f) as u8;
        b[2] = (label >> 8) as u8;
        b[3] = label as u8;
    }

    pub fn set_payload_len(&mut self, v: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_next_header(&mut self, p: IpProtocol) {
        self.buffer.as_mut()[field::NEXT_HEADER] = u8::from(p);
    }

    pub fn set_hop_limit(&mut self, v: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = v;
    }

    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
}

/// An IPv6 header without extension headers, as the gateway emits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: IpProtocol,
    pub payload_len: usize,
    pub hop_limit: u8,
}

impl Repr {
    /// Writes the 40-byte header (traffic class and flow label zero).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) {
        p.set_version_and_traffic_class(0);
        p.set_payload_len(self.payload_len as u16);
        p.set_next_header(self.next_header);
        p.set_hop_limit(self.hop_limit);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0] = 0x60;
        b[5] = 4; // payload length
        b[6] = 47; // GRE
        b[7] = 64;
        b[8..24].copy_from_slice(&"2001:db8::58".parse::<Ipv6Addr>().unwrap().octets());
        b[24..40].copy_from_slice(&"2001:db8::8".parse::<Ipv6Addr>().unwrap().octets());
        b[40..44].copy_from_slice(&[0, 0, 0x08, 0x00]);
        b
    }

    #[test]
    fn parse() {
        let b = packet();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.next_header(), IpProtocol::Gre);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "2001:db8::58".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "2001:db8::8".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &[0, 0, 8, 0]);
    }

    #[test]
    fn emit_round_trips() {
        let b = packet();
        let p = Packet::new_unchecked(&b[..]);
        let mut out = [0u8; 44];
        out[40..].copy_from_slice(&b[40..]);
        let mut q = Packet::new_unchecked(&mut out[..]);
        q.set_version_and_traffic_class(p.traffic_class());
        q.set_payload_len(p.payload_len());
        q.set_next_header(p.next_header());
        q.set_hop_limit(p.hop_limit());
        q.set_src_addr(p.src_addr());
        q.set_dst_addr(p.dst_addr());
        assert_eq!(out, b);
    }

    #[test]
    fn truncated_and_malformed() {
        let b = packet();
        assert_eq!(Packet::new_checked(&b[..39]).err(), Some(Error::Truncated));
        assert_eq!(Packet::new_checked(&b[..43]).err(), Some(Error::Truncated));
        let mut v4 = b;
        v4[0] = 0x40;
        assert_eq!(Packet::new_checked(&v4[..]).err(), Some(Error::Malformed));
    }
}
