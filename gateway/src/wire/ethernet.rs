//! Ethernet II frames.

use super::{be16, Error};

pub const HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;

/// A MAC address.
pub type Address = [u8; 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtherType {
    Ipv4,
    Arp,
    /// An 802.1Q tag follows.
    Vlan,
    /// An 802.1ad (service, "QinQ" outer) tag follows.
    ServiceVlan,
    Ipv6,
    /// Transparent Ethernet bridging, GRE's protocol type for gretap.
    TransparentEthernet,
    Unknown(u16),
}

impl From<u16> for EtherType {
    fn from(v: u16) -> Self {
        match v {
            0x0800 => EtherType::Ipv4,
            0x0806 => EtherType::Arp,
            0x8100 => EtherType::Vlan,
            0x88a8 => EtherType::ServiceVlan,
            0x86dd => EtherType::Ipv6,
            0x6558 => EtherType::TransparentEthernet,
            n => EtherType::Unknown(n),
        }
    }
}

impl From<EtherType> for u16 {
    fn from(t: EtherType) -> u16 {
        match t {
            EtherType::Ipv4 => 0x0800,
            EtherType::Arp => 0x0806,
            EtherType::Vlan => 0x8100,
            EtherType::ServiceVlan => 0x88a8,
            EtherType::Ipv6 => 0x86dd,
            EtherType::TransparentEthernet => 0x6558,
            EtherType::Unknown(n) => n,
        }
    }
}

mod field {
    use core::ops::Range;
    pub const DESTINATION: Range<usize> = 0..6;
    pub const SOURCE: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Frame { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    pub fn check_len(&self) -> Result<(), Error> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> Address {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::DESTINATION]);
        a
    }

    pub fn src_addr(&self) -> Address {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SOURCE]);
        a
    }

    pub fn ethertype(&self) -> EtherType {
        EtherType::from(be16(self.buffer.as_ref(), field::ETHERTYPE.start))
    }

    /// The network-layer protocol of an untagged frame, and where its
    /// header starts. A VLAN-tagged frame (802.1Q, 802.1ad) is
    /// `Malformed` here: the outer frames of tunnel packets come untagged
    /// (a VLAN's frames are its VLAN device's, as in the kernel).
    pub fn network(&self) -> Result<(EtherType, usize), Error> {
        match self.ethertype() {
            EtherType::Vlan | EtherType::ServiceVlan => Err(Error::Malformed),
            t => Ok((t, HEADER_LEN)),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_dst_addr(&mut self, a: Address) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&a);
    }

    pub fn set_src_addr(&mut self, a: Address) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&a);
    }

    pub fn set_ethertype(&mut self, t: EtherType) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&u16::from(t).to_be_bytes());
    }
}

/// The parts of an Ethernet header the gateway writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub dst: Address,
    pub src: Address,
    pub ethertype: EtherType,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Repr {
        Repr {
            dst: frame.dst_addr(),
            src: frame.src_addr(),
            ethertype: frame.ethertype(),
        }
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `frame`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        frame.set_dst_addr(self.dst);
        frame.set_src_addr(self.src);
        frame.set_ethertype(self.ethertype);
    }
}

/// For tests: `untagged` (an Ethernet II frame carrying IPv4) with a tag
/// of protocol `tpid` (802.1Q or 802.1ad) for VLAN `vid` after its
/// addresses, the tag written by etherparse.
#[cfg(test)]
pub(crate) fn tagged_by_etherparse(
    untagged: &[u8],
    tpid: etherparse::EtherType,
    vid: u16,
) -> Vec<u8> {
    let mut f = untagged[..12].to_vec();
    f.extend_from_slice(&tpid.0.to_be_bytes());
    etherparse::SingleVlanHeader {
        vlan_id: etherparse::VlanId::try_new(vid).unwrap(),
        ether_type: etherparse::EtherType::IPV4,
        ..Default::default()
    }
    .write(&mut f)
    .unwrap();
    f.extend_from_slice(&untagged[14..]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: [u8; 16] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // dst
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // src
        0x08, 0x00, // IPv4
        0x45, 0x00,
    ];

    #[test]
    fn parse() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        let r = Repr::parse(&f);
        assert_eq!(r.dst, [2, 0, 0, 0, 0, 1]);
        assert_eq!(r.src, [2, 0, 0, 0, 0, 2]);
        assert_eq!(r.ethertype, EtherType::Ipv4);
        assert_eq!(f.network(), Ok((EtherType::Ipv4, 14)));
    }

    #[test]
    fn emit_round_trips() {
        let r = Repr::parse(&Frame::new_unchecked(&FRAME[..]));
        let mut buf = [0u8; 14];
        r.emit(&mut Frame::new_unchecked(&mut buf[..]));
        assert_eq!(buf[..], FRAME[..14]);
    }

    #[test]
    fn a_tagged_frame_is_no_tunnels() {
        // Built by etherparse: an 802.1Q and an 802.1ad frame carrying IPv4.
        for outer in [
            etherparse::EtherType::VLAN_TAGGED_FRAME,
            etherparse::EtherType::PROVIDER_BRIDGING,
        ] {
            let mut b = Vec::new();
            etherparse::Ethernet2Header {
                source: [2, 0, 0, 0, 0, 2],
                destination: [2, 0, 0, 0, 0, 1],
                ether_type: etherparse::EtherType::IPV4,
            }
            .write(&mut b)
            .unwrap();
            b.extend_from_slice(&[0x45; 20]);
            let b = super::tagged_by_etherparse(&b, outer, 100);
            let f = Frame::new_checked(&b[..]).unwrap();
            assert_eq!(f.network(), Err(Error::Malformed), "{outer:?}");
        }
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Frame::new_checked(&FRAME[..13]).err(),
            Some(Error::Truncated)
        );
    }
}
