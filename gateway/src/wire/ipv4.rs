//! IPv4 headers (RFC 791).

use std::net::Ipv4Addr;

use super::{be16, checksum, Error, IpProtocol};

pub const HEADER_LEN: usize = 20;

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet.
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

    /// Checks that the buffer holds the whole header and the whole packet as
    /// the total-length field gives it, and that the version is 4. Bytes past
    /// the total length (link-layer padding) are allowed and ignored.
    pub fn check_len(&self) -> Result<(), Error> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::Malformed);
        }
        let hl = self.header_len();
        let tl = usize::from(self.total_len());
        if hl < HEADER_LEN || tl < hl {
            return Err(Error::Malformed);
        }
        if len < hl || len < tl {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH.start)
    }

    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT.start)
    }

    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF.start) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF.start) & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF.start) & OFFSET_MASK) * 8
    }

    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> IpProtocol {
        IpProtocol::from(self.buffer.as_ref()[field::PROTOCOL])
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// True when the header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::verify(&self.buffer.as_ref()[..self.header_len()])
    }

    /// The payload: from the end of the header to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version_and_header_len(&mut self, header_len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((header_len / 4) as u8 & 0x0f);
    }

    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = v;
    }

    pub fn set_total_len(&mut self, v: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_ident(&mut self, v: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets DF and clears MF and the fragment offset.
    pub fn set_unfragmented(&mut self, dont_frag: bool) {
        let v = if dont_frag { FLAG_DF } else { 0 };
        self.buffer.as_mut()[field::FLG_OFF].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }

    pub fn set_protocol(&mut self, p: IpProtocol) {
        self.buffer.as_mut()[field::PROTOCOL] = u8::from(p);
    }

    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }

    /// Replaces the 16-bit word at `at` (an even offset in the fixed
    /// header) and adjusts the header checksum for the change alone
    /// ([`checksum::adjust`]).
    fn update_word(&mut self, at: usize, new: [u8; 2]) {
        let b = self.buffer.as_mut();
        let old = u16::from_be_bytes([b[at], b[at + 1]]);
        let c = u16::from_be_bytes([b[field::CHECKSUM.start], b[field::CHECKSUM.start + 1]]);
        b[at..at + 2].copy_from_slice(&new);
        let c = checksum::adjust(c, old, u16::from_be_bytes(new));
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// Sets the TTL, adjusting the checksum incrementally (RFC 1624).
    pub fn update_ttl(&mut self, v: u8) {
        let p = self.buffer.as_ref()[field::PROTOCOL];
        self.update_word(field::TTL, [v, p]);
    }

    /// Sets DSCP and ECN, adjusting the checksum incrementally.
    pub fn update_dscp_ecn(&mut self, v: u8) {
        let vi = self.buffer.as_ref()[field::VER_IHL];
        self.update_word(field::VER_IHL, [vi, v]);
    }

    /// Sets the total length, adjusting the checksum incrementally.
    pub fn update_total_len(&mut self, v: u16) {
        self.update_word(field::LENGTH.start, v.to_be_bytes());
    }

    /// Sets the identification, adjusting the checksum incrementally.
    pub fn update_ident(&mut self, v: u16) {
        self.update_word(field::IDENT.start, v.to_be_bytes());
    }

    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        let hl = self.header_len();
        let b = self.buffer.as_mut();
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&b[..hl]);
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
}

/// An IPv4 header without options, as the gateway emits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: IpProtocol,
    pub payload_len: usize,
    pub ttl: u8,
    pub dscp_ecn: u8,
    pub dont_frag: bool,
    pub ident: u16,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            src: p.src_addr(),
            dst: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: usize::from(p.total_len()) - p.header_len(),
            ttl: p.ttl(),
            dscp_ecn: p.dscp_ecn(),
            dont_frag: p.dont_frag(),
            ident: p.ident(),
        }
    }

    /// Writes a 20-byte header, checksum included, into the front of `p`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) {
        p.set_version_and_header_len(HEADER_LEN);
        p.set_dscp_ecn(self.dscp_ecn);
        p.set_total_len((HEADER_LEN + self.payload_len) as u16);
        p.set_ident(self.ident);
        p.set_unfragmented(self.dont_frag);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
        p.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 192.168.0.58 -> 192.168.0.8, GRE, 28 bytes total, DF, TTL 64.
    const PACKET: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x2f, 0x00, 0x00, 192, 168, 0, 58,
        192, 168, 0, 8, // header
        0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04,
    ];

    fn packet() -> [u8; 28] {
        let mut b = PACKET;
        Packet::new_unchecked(&mut b[..]).fill_checksum();
        b
    }

    #[test]
    fn parse() {
        let b = packet();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.verify_checksum());
        let r = Repr::parse(&p);
        assert_eq!(r.src, Ipv4Addr::new(192, 168, 0, 58));
        assert_eq!(r.dst, Ipv4Addr::new(192, 168, 0, 8));
        assert_eq!(r.protocol, IpProtocol::Gre);
        assert_eq!(r.payload_len, 8);
        assert!(r.dont_frag);
        assert!(!p.is_fragment());
        assert_eq!(p.payload(), &PACKET[20..]);
    }

    #[test]
    fn emit_round_trips() {
        let b = packet();
        let r = Repr::parse(&Packet::new_unchecked(&b[..]));
        let mut out = [0u8; 28];
        out[20..].copy_from_slice(&b[20..]);
        r.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, b);
    }

    #[test]
    fn padding_is_ignored() {
        let mut b = [0u8; 40];
        b[..28].copy_from_slice(&packet());
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn truncated_and_malformed() {
        let b = packet();
        assert_eq!(Packet::new_checked(&b[..19]).err(), Some(Error::Truncated));
        assert_eq!(Packet::new_checked(&b[..27]).err(), Some(Error::Truncated));
        let mut v6 = b;
        v6[0] = 0x65;
        assert_eq!(Packet::new_checked(&v6[..]).err(), Some(Error::Malformed));
        let mut short_ihl = b;
        short_ihl[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&short_ihl[..]).err(),
            Some(Error::Malformed)
        );
        let mut short_total = b;
        short_total[3] = 19;
        assert_eq!(
            Packet::new_checked(&short_total[..]).err(),
            Some(Error::Malformed)
        );
        let mut long_ihl = b;
        long_ihl[0] = 0x4f; // 60-byte header in a 28-byte packet
        assert!(Packet::new_checked(&long_ihl[..]).is_err());
    }

    #[test]
    fn fragments() {
        let mut b = packet();
        b[6] = 0x20; // MF
        assert!(Packet::new_unchecked(&b[..]).is_fragment());
        b[6] = 0x00;
        b[7] = 0x01; // offset 8
        let p = Packet::new_unchecked(&b[..]);
        assert!(p.is_fragment());
        assert_eq!(p.frag_offset(), 8);
    }
}
