//! The Internet checksum (RFC 1071), used by IPv4 headers, ICMP and GRE.

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last
/// byte is padded with zero), folded to 16 bits but not inverted.
pub fn sum(data: &[u8]) -> u16 {
    // Big-endian 32-bit words sum to the same folded value as their 16-bit
    // halves, with half the additions.
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            + u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold(acc)
}

/// The unfolded sum of the IPv4 or IPv6 pseudo-header (addresses, protocol,
/// transport length) that TCP, UDP and ICMPv6 checksums cover; `src` and
/// `dst` are 4 or 16 bytes.
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    u64::from(sum(src)) + u64::from(sum(dst)) + u64::from(proto) + len as u64
}

/// Folds a wide one's-complement accumulator into 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for `data` (with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

/// The checksum field after one 16-bit word it covers changed from `old`
/// to `new`, without summing the rest again (RFC 1624, eqn. 3:
/// `HC' = ~(~HC + ~m + m')`). A header that was corrupted before the
/// change stays detectably corrupt after it, which a checksum computed
/// from scratch would hide.
pub fn adjust(csum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!csum) + u64::from(!old) + u64::from(new))
}

/// True when `data`, checksum field included, sums to all ones.
pub fn verify(data: &[u8]) -> bool {
    sum(data) == 0xffff
}

/// The ICMPv6 checksum of `body` (its checksum field zeroed) sent from
/// `src` to `dst`: the IPv6 pseudo-header (next header 58) included.
pub fn icmpv6(src: &[u8; 16], dst: &[u8; 16], body: &[u8]) -> u16 {
    let acc = pseudo_header(src, dst, 58, body.len());
    !fold(acc + u64::from(sum(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The example of RFC 1071 section 3: sum 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn ipv4_header_verifies() {
        // A real IPv4 header (checksum 0xb861).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verify(&hdr));
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(checksum(&zeroed), 0xb861);
    }
}
