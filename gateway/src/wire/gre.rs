//! GRE headers: RFC 2784 with the key and sequence number extensions of
//! RFC 2890. The optional fields follow the flags word in the order checksum
//! (with its reserved half), key, sequence number.

use super::{be16, be32, checksum, ethernet::EtherType, Error};

/// The flags-and-version word plus the protocol type.
pub const BASE_LEN: usize = 4;
/// Longest header: checksum, key and sequence number present.
pub const MAX_LEN: usize = 16;

pub const FLAG_CHECKSUM: u16 = 0x8000;
pub const FLAG_ROUTING: u16 = 0x4000;
pub const FLAG_KEY: u16 = 0x2000;
pub const FLAG_SEQUENCE: u16 = 0x1000;
/// The flag bits the kernel's GRE over IPv4 refuses: routing (R, which
/// `gre_parse_header` refuses) and the four reserved flags right above the
/// version, which `gre_demux` reads as part of the version
/// (`data[1] & 0x7f`) and drops as one it has no handler for. Strict
/// source route (0x0800), recursion control (0x0700) and the ack bit of
/// enhanced GRE (0x0080) are ignored, by the kernel as here (measured in
/// the VM lab: such packets are delivered).
pub const FLAGS_RESERVED: u16 = 0x4078;
/// Over IPv6, `ip6_gre` takes GRE itself, not through `gre_demux`: only
/// `gre_parse_header`'s routing bit is refused (with the version).
pub const FLAGS_RESERVED_V6: u16 = 0x4000;
pub const VERSION_MASK: u16 = 0x0007;

mod field {
    use core::ops::Range;
    pub const FLAGS_VERSION: Range<usize> = 0..2;
    pub const PROTOCOL: Range<usize> = 2..4;
}

/// Why a GRE header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Truncated,
    /// Version other than 0 (1 is PPTP's enhanced GRE).
    Version,
    /// The routing bit, or reserved bits the kernel refuses, set.
    ReservedFlags,
}

impl From<HeaderError> for Error {
    fn from(e: HeaderError) -> Error {
        match e {
            HeaderError::Truncated => Error::Truncated,
            _ => Error::Malformed,
        }
    }
}

/// A view of a GRE packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Validates the flags and version and checks that the whole header,
    /// optional fields included, is there.
    pub fn new_checked(buffer: T) -> Result<Self, HeaderError> {
        let p = Self::new_unchecked(buffer);
        p.check()?;
        Ok(p)
    }

    pub fn check(&self) -> Result<(), HeaderError> {
        self.check_with(FLAGS_RESERVED)
    }

    /// [`Packet::check`] with the reserved bits of the underlay's family
    /// ([`FLAGS_RESERVED`] over IPv4, [`FLAGS_RESERVED_V6`] over IPv6).
    pub fn check_with(&self, reserved: u16) -> Result<(), HeaderError> {
        let b = self.buffer.as_ref();
        if b.len() < BASE_LEN {
            return Err(HeaderError::Truncated);
        }
        let fv = self.flags_version();
        if fv & VERSION_MASK != 0 {
            return Err(HeaderError::Version);
        }
        if fv & reserved != 0 {
            return Err(HeaderError::ReservedFlags);
        }
        if b.len() < self.header_len() {
            return Err(HeaderError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn flags_version(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLAGS_VERSION.start)
    }

    pub fn has_checksum(&self) -> bool {
        self.flags_version() & FLAG_CHECKSUM != 0
    }

    pub fn has_key(&self) -> bool {
        self.flags_version() & FLAG_KEY != 0
    }

    pub fn has_sequence(&self) -> bool {
        self.flags_version() & FLAG_SEQUENCE != 0
    }

    pub fn protocol(&self) -> EtherType {
        EtherType::from(be16(self.buffer.as_ref(), field::PROTOCOL.start))
    }

    /// Header length from the C, K and S bits.
    pub fn header_len(&self) -> usize {
        BASE_LEN
            + 4 * usize::from(self.has_checksum())
            + 4 * usize::from(self.has_key())
            + 4 * usize::from(self.has_sequence())
    }

    fn key_offset(&self) -> usize {
        BASE_LEN + 4 * usize::from(self.has_checksum())
    }

    pub fn checksum(&self) -> Option<u16> {
        self.has_checksum()
            .then(|| be16(self.buffer.as_ref(), BASE_LEN))
    }

    pub fn key(&self) -> Option<u32> {
        self.has_key()
            .then(|| be32(self.buffer.as_ref(), self.key_offset()))
    }

    pub fn sequence(&self) -> Option<u32> {
        self.has_sequence().then(|| {
            be32(
                self.buffer.as_ref(),
                self.key_offset() + 4 * usize::from(self.has_key()),
            )
        })
    }

    /// True when there is no checksum, or when the checksum over the GRE
    /// header and payload is right.
    pub fn verify_checksum(&self) -> bool {
        !self.has_checksum() || checksum::verify(self.buffer.as_ref())
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Computes the checksum over the whole buffer (header and payload) and
    /// stores it. Only meaningful when the C bit is set.
    pub fn fill_checksum(&mut self) {
        let b = self.buffer.as_mut();
        b[BASE_LEN..BASE_LEN + 2].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(b);
        b[BASE_LEN..BASE_LEN + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// A GRE header as the gateway emits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub protocol: EtherType,
    pub checksum: bool,
    pub key: Option<u32>,
    pub sequence: Option<u32>,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            protocol: p.protocol(),
            checksum: p.has_checksum(),
            key: p.key(),
            sequence: p.sequence(),
        }
    }

    pub fn header_len(&self) -> usize {
        BASE_LEN
            + 4 * usize::from(self.checksum)
            + 4 * usize::from(self.key.is_some())
            + 4 * usize::from(self.sequence.is_some())
    }

    /// Writes the header into the front of `buf`. When `checksum` is set the
    /// checksum field is left zero: call [`Packet::fill_checksum`] once the
    /// payload is in place.
    pub fn emit(&self, buf: &mut [u8]) {
        let mut flags = 0u16;
        if self.checksum {
            flags |= FLAG_CHECKSUM;
        }
        if self.key.is_some() {
            flags |= FLAG_KEY;
        }
        if self.sequence.is_some() {
            flags |= FLAG_SEQUENCE;
        }
        buf[0..2].copy_from_slice(&flags.to_be_bytes());
        buf[2..4].copy_from_slice(&u16::from(self.protocol).to_be_bytes());
        let mut at = BASE_LEN;
        if self.checksum {
            buf[at..at + 4].copy_from_slice(&[0; 4]);
            at += 4;
        }
        if let Some(k) = self.key {
            buf[at..at + 4].copy_from_slice(&k.to_be_bytes());
            at += 4;
        }
        if let Some(s) = self.sequence {
            buf[at..at + 4].copy_from_slice(&s.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain() {
        let b = [0x00, 0x00, 0x08, 0x00, 0x45];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.header_len(), 4);
        assert_eq!(p.protocol(), EtherType::Ipv4);
        assert_eq!(p.key(), None);
        assert_eq!(p.payload(), &[0x45]);
    }

    #[test]
    fn all_options_in_order() {
        // C, K, S: checksum+reserved, key 0x01020304, sequence 7.
        let mut b = [
            0xb0, 0x00, 0x86, 0xdd, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 7, 0x60, 0,
        ];
        Packet::new_unchecked(&mut b[..]).fill_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.header_len(), 16);
        assert_eq!(p.protocol(), EtherType::Ipv6);
        assert_eq!(p.key(), Some(0x01020304));
        assert_eq!(p.sequence(), Some(7));
        assert!(p.verify_checksum());
        b[17] ^= 1;
        assert!(!Packet::new_unchecked(&b[..]).verify_checksum());
    }

    #[test]
    fn key_without_checksum_follows_base() {
        let b = [0x20, 0x00, 0x08, 0x00, 0, 0, 0, 100];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.key(), Some(100));
        assert_eq!(p.checksum(), None);
    }

    #[test]
    fn emit_round_trips() {
        let r = Repr {
            protocol: EtherType::Ipv4,
            checksum: true,
            key: Some(42),
            sequence: Some(9),
        };
        let mut b = [0u8; 20];
        r.emit(&mut b);
        b[16..].copy_from_slice(&[0x45, 0, 0, 4]);
        Packet::new_unchecked(&mut b[..]).fill_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p), r);
        assert!(p.verify_checksum());
        assert_eq!(r.header_len(), 16);
    }

    #[test]
    fn refused() {
        assert_eq!(
            Packet::new_checked(&[0x00, 0x01, 0x08, 0x00][..]).err(),
            Some(HeaderError::Version)
        );
        assert_eq!(
            Packet::new_checked(&[0x40, 0x00, 0x08, 0x00, 0, 0, 0, 0][..]).err(),
            Some(HeaderError::ReservedFlags)
        );
        assert_eq!(
            Packet::new_checked(&[0x00, 0x08, 0x08, 0x00][..]).err(),
            Some(HeaderError::ReservedFlags)
        );
        assert_eq!(
            Packet::new_checked(&[0x00, 0x40, 0x08, 0x00][..]).err(),
            Some(HeaderError::ReservedFlags)
        );
        // Recursion control, strict source route and the ack bit: ignored,
        // as by the kernel.
        for flags in [[0x01, 0x00], [0x07, 0x00], [0x08, 0x00], [0x00, 0x80]] {
            let b = [flags[0], flags[1], 0x08, 0x00];
            assert!(Packet::new_checked(&b[..]).is_ok(), "{flags:x?}");
        }
        assert_eq!(
            Packet::new_checked(&[0x20, 0x00, 0x08, 0x00, 0, 0][..]).err(),
            Some(HeaderError::Truncated)
        );
        assert_eq!(
            Packet::new_checked(&[0x00, 0x00, 0x08][..]).err(),
            Some(HeaderError::Truncated)
        );
    }
}
