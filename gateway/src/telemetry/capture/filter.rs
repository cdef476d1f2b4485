//! Filter expressions, as tcpdump takes them: compiled by libpcap (through
//! the `pcap` crate) for the two kinds of packet a point shows, and run
//! by libpcap's own BPF interpreter (`pcap_offline_filter`).

use super::Link;

/// Linux's DLT_RAW: packets that start with an IPv4 or IPv6 header. (The
/// `pcap` crate's `Linktype::RAW` is the file format's number, 101, which
/// `pcap_open_dead` does not take.)
const DLT_RAW: i32 = 12;

/// One expression compiled for Ethernet frames and for raw IP packets.
/// Each worker holds its own (a program is `Send`, not `Sync`). An
/// expression about Ethernet alone (`arp`, `ether host ...`, `vlan`)
/// compiles for Ethernet only: it takes nothing at the points that carry
/// raw IP (tun devices), as it could not match there.
pub struct Filter {
    /// `None`: the expression cannot match packets of this kind.
    ethernet: Option<pcap::BpfProgram>,
    raw: Option<pcap::BpfProgram>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filter")
    }
}

impl Filter {
    /// Compiles `expr` (tcpdump's syntax, see pcap-filter(7)); the error
    /// is libpcap's (for Ethernet frames), when it compiles for neither
    /// kind of packet.
    pub fn compile(expr: &str) -> Result<Filter, String> {
        let one = |link: pcap::Linktype| -> Result<pcap::BpfProgram, String> {
            let dead = pcap::Capture::dead(link).map_err(|e| e.to_string())?;
            dead.compile(expr, true).map_err(|e| match e {
                pcap::Error::PcapError(m) => m,
                e => e.to_string(),
            })
        };
        match (one(pcap::Linktype::ETHERNET), one(pcap::Linktype(DLT_RAW))) {
            (Err(e), Err(_)) => Err(e),
            (ethernet, raw) => Ok(Filter {
                ethernet: ethernet.ok(),
                raw: raw.ok(),
            }),
        }
    }

    /// Whether the packet `bytes` (starting as `link` says) matches.
    #[inline]
    pub fn matches(&self, link: Link, bytes: &[u8]) -> bool {
        let program = match link {
            Link::Ethernet => &self.ethernet,
            Link::Raw => &self.raw,
        };
        program.as_ref().is_some_and(|p| p.filter(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp4(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(1000, port);
        let mut v = Vec::new();
        b.write(&mut v, b"hello").unwrap();
        v
    }

    fn eth(ip: &[u8]) -> Vec<u8> {
        let mut v = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        v.extend_from_slice(ip);
        v
    }

    #[test]
    fn the_same_expression_selects_on_both_kinds_of_packet() {
        let f = Filter::compile("udp and host 10.1.1.2 and port 53").unwrap();
        let yes = udp4([10, 1, 1, 1], [10, 1, 1, 2], 53);
        let no = udp4([10, 1, 1, 1], [10, 1, 1, 3], 53);
        assert!(f.matches(Link::Raw, &yes));
        assert!(!f.matches(Link::Raw, &no));
        assert!(f.matches(Link::Ethernet, &eth(&yes)));
        assert!(!f.matches(Link::Ethernet, &eth(&no)));
        // An IPv6 packet on a tun: libpcap reads the version nibble.
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(1, 53);
        let mut v6 = Vec::new();
        b.write(&mut v6, b"x").unwrap();
        assert!(Filter::compile("ip6 and udp port 53")
            .unwrap()
            .matches(Link::Raw, &v6));
        assert!(!f.matches(Link::Raw, &v6));
    }

    #[test]
    fn an_ethernet_expression_takes_frames_and_no_raw_packet() {
        let f = Filter::compile("arp or ether src 02:00:00:00:00:02").unwrap();
        let ip = udp4([10, 1, 1, 1], [10, 1, 1, 2], 53);
        assert!(f.matches(Link::Ethernet, &eth(&ip)));
        assert!(!f.matches(Link::Raw, &ip));
        assert!(Filter::compile("vlan").is_ok());
    }

    #[test]
    fn a_bad_expression_says_what_libpcap_says() {
        let e = Filter::compile("hots 10.1.1.1").unwrap_err();
        assert!(e.contains("syntax error") || e.contains("hots"), "{e}");
    }
}
