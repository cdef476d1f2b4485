//! Unit tests of the configuration: parsing, every error message, and the
//! MTU limits against what encap and reassembly really take.

use super::*;

const LAB: &str = r#"
[gateway]
iface = "ens0"
poll = "adaptive"

[[tunnel]]
name = "tun100"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
ttl = 64
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "tun200"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"
"#;

#[test]
fn lab_parses() {
    let c = Config::parse(LAB).unwrap();
    assert_eq!(c.tunnels.len(), 2);
    assert_eq!(c.poll, PollMode::Adaptive);
    assert_eq!(c.batch_size, 64);
    assert_eq!(c.queues, Queues::All);
    let t = &c.tunnels[0];
    assert_eq!(t.mode, Mode::Gre);
    assert_eq!(t.ttl, Ttl::Fixed(64));
    assert_eq!(t.mtu, Some(1400));
    assert_eq!(t.device_kind, DeviceKind::Tap);
    assert_eq!(c.tunnels[1].device_kind, DeviceKind::Tun);
    assert_eq!(c.tunnels[1].ttl, Ttl::Inherit);
    assert_eq!(t.overhead(), 24);
    assert_eq!(c.tunnels[1].overhead(), 20);
}

fn error_of(text: &str) -> String {
    Config::parse(text).unwrap_err().to_string()
}

fn lab_with(from: &str, to: &str) -> String {
    assert!(LAB.contains(from), "{from}");
    LAB.replacen(from, to, 1)
}

#[test]
fn errors_name_the_field_and_the_fix() {
    let e = error_of(&lab_with(
        "remote = \"192.168.0.58\"",
        "remote = \"192.168.0\"",
    ));
    assert!(e.starts_with("tunnel \"tun100\".remote:"), "{e}");
    assert!(e.contains("192.168.0.58"), "{e}");

    let e = error_of(&lab_with("mode = \"gre\"", "mode = \"vxlan\""));
    assert!(
        e.contains("tunnel \"tun100\".mode") && e.contains("\"gre\""),
        "{e}"
    );

    let e = error_of(&lab_with("ttl = 64", "ttl = 300"));
    assert!(e.contains(".ttl") && e.contains("inherit"), "{e}");

    let e = error_of(&lab_with("mode = \"ipip\"", "mode = \"ipip\"\nkey = 5"));
    assert!(
        e.contains("tun200\".key") && e.contains("remove key"),
        "{e}"
    );

    let e = error_of(&lab_with("device = \"tap2\"", "device = \"tap1\""));
    assert!(e.contains(".device") && e.contains("already"), "{e}");

    let e = error_of(&lab_with("peer = \"10.1.1.2\"", ""));
    assert!(e.contains("tun100\".peer: is missing"), "{e}");

    let e = error_of(&lab_with("mtu = 1400", "mtu = 20"));
    assert!(e.contains(".mtu") && e.contains("68"), "{e}");

    let e = error_of(&lab_with("poll = \"adaptive\"", "poll = \"lazy\""));
    assert!(e.contains("gateway.poll") && e.contains("\"busy\""), "{e}");

    let e = error_of(&lab_with("ttl = 64", "tll = 64"));
    assert!(e.contains("line") && e.contains("tll"), "{e}");

    let e = error_of(&lab_with("name = \"tun100\"", "name = \"tu\\n100\""));
    assert!(
        !e.contains('\n') && e.contains("not a valid interface name"),
        "{e}"
    );

    let e = error_of("[gateway]\n");
    assert!(e.contains("no [[tunnel]]"), "{e}");

    let e = error_of(&lab_with(
        "local = \"192.168.0.8\"",
        "local = \"2001:db8::8\"",
    ));
    assert!(e.contains(".remote") && e.contains("address family"), "{e}");
}

#[test]
fn an_ipv6_underlay_takes_the_kernels_ip6_names_and_encaplimit() {
    let t = |mode: &str, extra: &str| {
        Config::parse(&format!(
                "[[tunnel]]\nname = \"t\"\nmode = \"{mode}\"\nlocal = \"2001:db8::8\"\nremote = \"2001:db8::58\"\ndevice = \"t6\"\n{extra}"
            ))
    };
    let c = t("ip6gre", "").unwrap().tunnels.remove(0);
    assert_eq!((c.mode, c.encap_limit), (Mode::Gre, Some(4)));
    // iproute2's default hop limit for IPv6 tunnels (DEFAULT_TNL_HOP_LIMIT),
    // where IPv4 tunnels inherit.
    assert_eq!(c.ttl, Ttl::Fixed(64));
    assert_eq!(
        t("ip6gre", "ttl = \"inherit\"\n").unwrap().tunnels[0].ttl,
        Ttl::Inherit
    );
    assert_eq!(c.overhead(), 40 + 8 + 4);
    let c = t("ip6ip6", "device_kind = \"tun\"\nencaplimit = \"none\"\n")
        .unwrap()
        .tunnels
        .remove(0);
    assert_eq!((c.mode, c.encap_limit, c.overhead()), (Mode::Sit, None, 40));
    assert_eq!(t("ipip6", "").unwrap().tunnels[0].mode, Mode::Ipip);
    assert_eq!(t("gre", "").unwrap().tunnels[0].mode, Mode::Gre);
    let e = t("ipip", "").unwrap_err();
    assert!(e.message.contains("ipip6"), "{e}");
    let e = t("ip6gre", "pmtudisc = false\n").unwrap_err();
    assert!(e.field.ends_with(".pmtudisc"), "{e}");
    let e = t("ip6gre", "encaplimit = 300\n").unwrap_err();
    assert!(e.field.ends_with(".encaplimit"), "{e}");
}

#[test]
fn keys() {
    let c = Config::parse(&lab_with("ttl = 64", "ttl = 64\nkey = \"0.0.1.44\"")).unwrap();
    assert_eq!(c.tunnels[0].ikey, Some(300));
    assert_eq!(c.tunnels[0].okey, Some(300));
    let c = Config::parse(&lab_with("ttl = 64", "ttl = 64\nikey = 1\nokey = 2")).unwrap();
    assert_eq!((c.tunnels[0].ikey, c.tunnels[0].okey), (Some(1), Some(2)));
    let e = error_of(&lab_with("ttl = 64", "ttl = 64\nkey = 1\nikey = 2"));
    assert!(e.contains("key alone"), "{e}");
}

#[test]
fn same_endpoints_need_different_keys() {
    let dup = format!(
            "{LAB}\n[[tunnel]]\nname = \"tun101\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\ndevice = \"tap3\"\n"
        );
    assert!(error_of(&dup).contains("different keys"));
    let keyed = dup.replace("device = \"tap3\"", "device = \"tap3\"\nkey = 7");
    assert_eq!(Config::parse(&keyed).unwrap().tunnels.len(), 3);
}

#[test]
fn outer_header_options_follow_the_kernels_combination_rules() {
    let base = "[[tunnel]]\nname = \"t\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\ndevice = \"tap1\"\n";
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"));
    let t = parse("").unwrap().tunnels.remove(0);
    assert!(t.pmtudisc && !t.ignore_df && !t.iseq && !t.oseq);
    assert_eq!(t.tos, Tos::Fixed(0));
    let t = parse("seq = true\ntos = \"inherit\"\n")
        .unwrap()
        .tunnels
        .remove(0);
    assert!(t.iseq && t.oseq);
    assert_eq!(t.tos, Tos::Inherit);
    assert_eq!(t.overhead(), 20 + 8);
    let e = parse("ttl = 64\npmtudisc = false\n").unwrap_err();
    assert!(
        e.field.ends_with(".ttl") && e.message.contains("nopmtudisc"),
        "{e}"
    );
    let e = parse("ignore_df = true\n").unwrap_err();
    assert!(
        e.field.ends_with(".ignore_df") && e.message.contains("pmtudisc = false"),
        "{e}"
    );
    assert!(parse("pmtudisc = false\nignore_df = true\n").is_ok());
    let e = parse("seq = true\niseq = true\n").unwrap_err();
    assert!(e.field.ends_with(".seq"), "{e}");
    let e = parse("tos = 300\n").unwrap_err();
    assert!(e.field.ends_with(".tos"), "{e}");
    let ipip = base.replace("\"gre\"", "\"ipip\"");
    let e = Config::parse(&format!("{ipip}oseq = true\n")).unwrap_err();
    assert!(
        e.field.ends_with(".oseq") && e.message.contains("no GRE header"),
        "{e}"
    );
}

#[test]
fn keepalives_are_cisco_style_on_ipv4_gre_only() {
    let base = "[[tunnel]]\nname = \"t\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\ndevice = \"tap1\"\n";
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"));
    let t = parse("keepalive = [10, 3]\ncarrier_follows = true\n")
        .unwrap()
        .tunnels
        .remove(0);
    let k = t.keepalive.unwrap();
    assert_eq!((k.interval, k.misses, k.dead_after()), (10, 3, 30));
    assert!(t.carrier_follows);
    assert_eq!(parse("").unwrap().tunnels[0].keepalive, None);
    for bad in [
        "[0, 3]",
        "[10, 0]",
        "[10]",
        "10",
        "[10, 300]",
        "[\"10\", 3]",
    ] {
        let e = parse(&format!("keepalive = {bad}\n")).unwrap_err();
        assert!(
            e.field.ends_with(".keepalive") && e.message.contains("[10, 3]"),
            "{bad}: {e}"
        );
    }
    let e = parse("keepalive = [10, 3]\niseq = true\n").unwrap_err();
    assert!(e.message.contains("iseq"), "{e}");
    let e = parse("carrier_follows = true\n").unwrap_err();
    assert!(
        e.field.ends_with(".carrier_follows") && e.message.contains("keepalive"),
        "{e}"
    );
    let ipip = base.replace("\"gre\"", "\"ipip\"");
    let e = Config::parse(&format!("{ipip}keepalive = [10, 3]\n")).unwrap_err();
    assert!(e.message.contains("gre"), "{e}");
}

#[test]
fn gretap_is_a_tap_without_inner_addresses() {
    let base = "[[tunnel]]\nname = \"t\"\nmode = \"gretap\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\ndevice = \"gtap\"\n";
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"));
    let t = parse("key = 5\n").unwrap().tunnels.remove(0);
    assert_eq!(t.mode, Mode::Gretap);
    assert_eq!(t.overhead(), 20 + 8 + 14);
    let e = parse("device_kind = \"tun\"\n").unwrap_err();
    assert!(e.field.ends_with(".device_kind"), "{e}");
    let e = parse("address = \"10.0.0.1\"\npeer = \"10.0.0.2\"\n").unwrap_err();
    assert!(
        e.field.ends_with(".address") && e.message.contains("bridge"),
        "{e}"
    );
    // A gre and a gretap tunnel between the same hosts need keys apart.
    let two = format!(
        "{base}{}",
        base.replace("\"t\"", "\"u\"")
            .replace("gretap", "gre")
            .replace("gtap", "tap9")
    );
    let e = Config::parse(&two).unwrap_err();
    assert!(e.message.contains("different keys"), "{e}");
}

#[test]
fn frame_data_len_is_what_the_umem_leaves_for_packets() {
    // The UMEM as `Xsk::new` configures it (frame size, no frame
    // headroom of ours).
    let c = xsk_rs::config::UmemConfig::builder()
        .frame_size(xsk_rs::config::FrameSize::new(crate::io::xsk::FRAME_SIZE).unwrap())
        .build()
        .unwrap();
    assert_eq!(
        (c.xdp_headroom() + c.frame_headroom()) as usize,
        UMEM_HEADROOM
    );
    assert_eq!(c.mtu() as usize, FRAME_DATA_LEN);
}

/// A one-tunnel file: `mode` over IPv4 (`v6`: IPv6) with `extra` keys.
fn one_tunnel(mode: &str, v6: bool, extra: &str) -> String {
    let (local, remote) = if v6 {
        ("2001:db8::8", "2001:db8::58")
    } else {
        ("192.168.0.8", "192.168.0.58")
    };
    format!(
            "[[tunnel]]\nname = \"t\"\nmode = \"{mode}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\ndevice = \"d\"\n{extra}"
        )
}

/// The limit's cases: (mode, IPv6 underlay, extra keys, largest MTU).
const LIMITS: &[(&str, bool, &str, u16)] = &[
    ("gre", false, "", 3796),
    ("gre", false, "key = 5\ncsum = true\nseq = true\n", 3784),
    ("gre", false, "device_kind = \"tun\"\n", 3796),
    ("ip6gre", true, "", 3774),
    ("ip6gre", true, "key = 5\ncsum = true\nseq = true\n", 3762),
    // The peer may send the option all the same (Linux does by default).
    ("ip6gre", true, "encaplimit = \"none\"\n", 3774),
    // Options only on what the peer sends: counted all the same.
    ("gre", false, "ikey = 5\nicsum = true\niseq = true\n", 3784),
    ("ipip", false, "device_kind = \"tun\"\n", 3800),
    ("sit", false, "device_kind = \"tun\"\n", 3800),
    ("ip6ip6", true, "device_kind = \"tun\"\n", 3778),
    ("gretap", false, "", 3778),
    ("gretap", false, "key = 5\ncsum = true\nseq = true\n", 3766),
    ("ip6gretap", true, "key = 5\n", 3752),
];

#[test]
fn an_mtu_past_what_a_umem_frame_carries_is_refused() {
    for &(mode, v6, extra, max) in LIMITS {
        let at = |mtu: u16| Config::parse(&one_tunnel(mode, v6, &format!("{extra}mtu = {mtu}\n")));
        let t = at(max).unwrap().tunnels.remove(0);
        assert_eq!(t.max_mtu(), max, "{mode} {extra:?}");
        let e = at(max + 1).unwrap_err().to_string();
        assert_eq!(
                e,
                format!(
                    "tunnel \"t\".mtu: {} is more than a 4096-byte UMEM frame can carry with this tunnel's headers (at most {max}); set mtu = {max} or less",
                    max + 1
                )
            );
        assert!(
            at(9000).unwrap_err().to_string().contains("(at most"),
            "{mode}"
        );
    }
}

#[test]
fn an_underlay_mtu_past_the_limit_is_clamped_not_refused() {
    let t = Config::parse(&one_tunnel("gre", false, ""))
        .unwrap()
        .tunnels
        .remove(0);
    assert_eq!(t.auto_mtu(1500).unwrap(), 1476);
    assert_eq!(t.auto_mtu(9000).unwrap(), t.max_mtu());
    assert_eq!(t.auto_mtu(65535).unwrap(), t.max_mtu());
    let e = t.auto_mtu(80).unwrap_err().to_string();
    assert_eq!(
        e,
        "tunnel \"t\".mtu: the underlay MTU 80 leaves no room; set mtu explicitly"
    );
}

/// What the send path gets for `t`, sending packets of up to `mtu`.
fn tx_of(t: &TunnelConfig, mtu: u16) -> crate::datapath::encap::TunnelTx {
    crate::datapath::encap::TunnelTx {
        mode: t.mode,
        local: t.local,
        remote: t.remote,
        encap_limit: t.encap_limit,
        okey: t.okey,
        ocsum: t.ocsum,
        oseq: t.oseq.then(Default::default),
        ident: Default::default(),
        path_mtu: Default::default(),
        ttl: t.ttl,
        tos: t.tos,
        pmtudisc: t.pmtudisc,
        ignore_df: t.ignore_df,
        mtu,
        device_kind: t.device_kind,
        device_mac: [2, 0xaa, 0, 0, 0, 1],
        peer_mac: [2, 0xbb, 0, 0, 0, 2],
        address: None,
        peer: None,
        keepalive: None,
    }
}

/// What the device hands over for an inner packet of `mtu` bytes (IPv6
/// for sit, IPv4 otherwise): the packet, behind an Ethernet header on
/// a tap, with a VLAN tag too on gretap.
fn device_packet(t: &TunnelConfig, mtu: u16) -> Vec<u8> {
    let n = usize::from(mtu);
    let mut ip = vec![0u8; n];
    let ethertype = if t.mode == Mode::Sit {
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(mtu - 40).to_be_bytes());
        ip[6] = 17;
        ip[7] = 64;
        ip[8..24].copy_from_slice(
            &"2001:db8:1::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ip[24..40].copy_from_slice(
            &"2001:db8:1::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        [0x86, 0xdd]
    } else {
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&mtu.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 1, 1, 1]);
        ip[16..20].copy_from_slice(&[10, 1, 1, 2]);
        [0x08, 0x00]
    };
    let mut out = Vec::new();
    if t.device_kind == DeviceKind::Tap {
        out.extend_from_slice(&[2, 0xbb, 0, 0, 0, 2, 2, 0xaa, 0, 0, 0, 1]);
        if t.mode == Mode::Gretap {
            out.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        out.extend_from_slice(&ethertype);
    }
    out.extend_from_slice(&ip);
    out
}

/// Encapsulates a packet of `mtu` bytes as the worker does: read into
/// a UMEM frame's worth of buffer at the read offset (`None` where
/// `take_read` finds it does not fit), then `encap`.
fn send_at(t: &TunnelConfig, mtu: u16) -> Option<Vec<u8>> {
    let tx = tx_of(t, mtu);
    let pkt = device_packet(t, mtu);
    let off = tx.read_offset();
    let mut buf = vec![0u8; FRAME_DATA_LEN];
    if off + pkt.len() > buf.len() {
        return None;
    }
    buf[off..off + pkt.len()].copy_from_slice(&pkt);
    let hop = crate::datapath::encap::NextHop {
        dst: [2, 0, 0, 0, 0, 0x58],
        src: [2, 0, 0, 0, 0, 8],
    };
    match crate::datapath::encap::encap(
        &mut buf,
        pkt.len(),
        &tx,
        Some(hop),
        &mut crate::datapath::encap::TxContext::new(7),
    ) {
        crate::datapath::encap::Verdict::Transmit { len } => Some(buf[..len].to_vec()),
        v => panic!("{:?} mtu {mtu}: {v:?}", t.mode),
    }
}

#[test]
fn the_largest_mtu_fills_a_umem_frame_at_most() {
    for &(mode, v6, extra, _) in LIMITS {
        let t = Config::parse(&one_tunnel(mode, v6, extra))
            .unwrap()
            .tunnels
            .remove(0);
        let max = t.max_mtu();
        let sent =
            send_at(&t, max).unwrap_or_else(|| panic!("{mode} {extra:?}: {max} does not fit"));
        assert!(sent.len() <= t.outer_frame_len(max), "{mode} {extra:?}");
        assert!(sent.len() <= FRAME_DATA_LEN);
        let frame_max = (FRAME_DATA_LEN - t.outer_frame_len(0)) as u16;
        assert!(max <= frame_max);
        if t.overhead() == t.largest_overhead() {
            // Both ways alike: exactly what is sent, and one byte past
            // what the frame holds is what the worker drops.
            assert_eq!(sent.len(), t.outer_frame_len(max), "{mode} {extra:?}");
            assert!(send_at(&t, frame_max).is_some(), "{mode} {extra:?}");
            assert!(send_at(&t, frame_max + 1).is_none(), "{mode} {extra:?}");
        }
    }
}

/// `frame` cut into two outer fragments, as a router (IPv4) or the
/// sender (IPv6, with a fragment header) would.
fn fragments(frame: &[u8], v6: bool) -> Vec<Vec<u8>> {
    let l3 = ethernet::HEADER_LEN;
    let hl = if v6 {
        ipv6::HEADER_LEN
    } else {
        ipv4::HEADER_LEN
    };
    let payload = &frame[l3 + hl..];
    let cut = 1496;
    let mut out = Vec::new();
    for (start, part) in [(0, &payload[..cut]), (cut, &payload[cut..])] {
        let more = start == 0;
        let mut f = frame[..l3 + hl].to_vec();
        if v6 {
            let next = f[l3 + 6];
            f[l3 + 6] = 44;
            f[l3 + 4..l3 + 6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            let offset_flags = start as u16 | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&offset_flags.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 9]);
        } else {
            f[l3 + 2..l3 + 4].copy_from_slice(&((hl + part.len()) as u16).to_be_bytes());
            let flags = (start / 8) as u16 | if more { 0x2000 } else { 0 };
            f[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
            f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let mut sum: u32 = f[l3..l3 + hl]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            f[l3 + 10..l3 + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        }
        f.extend_from_slice(part);
        out.push(f);
    }
    out
}

#[test]
fn the_largest_outer_packet_fits_reassembly() {
    use crate::datapath::reasm::{Outcome, Reassembler, MAX_PAYLOAD};
    for &(mode, v6, extra, _) in LIMITS {
        let t = Config::parse(&one_tunnel(mode, v6, extra))
            .unwrap()
            .tunnels
            .remove(0);
        let max = t.max_mtu();
        let sent = send_at(&t, max).unwrap();
        let fixed = if v6 {
            ipv6::HEADER_LEN
        } else {
            ipv4::HEADER_LEN
        };
        let payload = sent.len() - ethernet::HEADER_LEN - fixed;
        assert!(payload <= t.outer_ip_payload_len(max), "{mode} {extra:?}");
        if t.overhead() == t.largest_overhead() {
            assert_eq!(payload, t.outer_ip_payload_len(max), "{mode} {extra:?}");
        }
        assert!(
            payload <= MAX_PAYLOAD,
            "{mode} {extra:?}: {payload} > {MAX_PAYLOAD}"
        );
        // And reassembled for real, into a frame.
        let mut r = Reassembler::new();
        let frags = fragments(&sent, v6);
        assert_eq!(r.add(&frags[0], 1), Outcome::Held, "{mode} {extra:?}");
        assert_eq!(
            r.add(&frags[1], 1),
            Outcome::Complete { merged: 1 },
            "{mode} {extra:?}"
        );
        let mut frame = vec![0u8; FRAME_DATA_LEN];
        let len = r.take(&mut frame).expect("fits a frame");
        assert_eq!(len, sent.len(), "{mode} {extra:?}");
        let l4 = ethernet::HEADER_LEN + fixed;
        assert_eq!(frame[l4..len], sent[l4..], "{mode} {extra:?}");
    }
}

// ---------------------------------------------------------------- anycast

const ANYCAST_TUNNEL: &str = r#"
[anycast]
addresses = ["192.0.2.1"]

[[tunnel]]
name = "a1"
mode = "gre"
local = "192.0.2.1"
remote = "10.1.1.2"
device = "tap1"
"#;

#[test]
fn anycast_defaults_and_fields() {
    let c = Config::parse(ANYCAST_TUNNEL).unwrap();
    let a = c.anycast.unwrap();
    assert_eq!(a.addresses, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(a.device, "gw-anycast");
    assert_eq!(a.drain_quiet, std::time::Duration::from_secs(2));
    assert_eq!(a.drain_timeout, std::time::Duration::from_secs(60));
    assert!(Config::parse(
        &ANYCAST_TUNNEL.replace("local = \"192.0.2.1\"", "local = \"192.0.2.9\"")
    )
    .unwrap()
    .anycast
    .is_some());
}

#[test]
fn anycast_refuses_state_the_other_gateways_do_not_share() {
    for (extra, field, says) in [
        ("oseq = true", "tunnel \"a1\".oseq", "iseq refuses"),
        ("seq = true", "tunnel \"a1\".oseq", "remove oseq (or seq)"),
        (
            "keepalive = [10, 3]",
            "tunnel \"a1\".keepalive",
            "whichever gateway",
        ),
        ("", "tunnel \"a1\".device", "[anycast]'s device"),
    ] {
        let text = if extra.is_empty() {
            ANYCAST_TUNNEL.replace("\"tap1\"", "\"gw-anycast\"")
        } else {
            format!("{ANYCAST_TUNNEL}{extra}\n")
        };
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.field, field, "{extra}: {e}");
        assert!(e.message.contains(says), "{extra}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    let e = Config::parse(&format!("{ANYCAST_TUNNEL}iseq = true\n")).unwrap_err();
    assert_eq!(e.field, "tunnel \"a1\".iseq", "{e}");
    // A tunnel on another local address may have them.
    let other = ANYCAST_TUNNEL.replace("local = \"192.0.2.1\"", "local = \"192.0.2.9\"");
    Config::parse(&format!("{other}oseq = true\nkeepalive = [10, 3]\n")).unwrap();
}

#[test]
fn anycast_field_errors_name_the_field() {
    for (table, field) in [
        ("addresses = []", "anycast.addresses"),
        ("device = \"x\"", "anycast.addresses"),
        ("addresses = [\"banana\"]", "anycast.addresses[0]"),
        ("addresses = [\"192.0.2.1/32\"]", "anycast.addresses[0]"),
        ("addresses = [\"0.0.0.0\"]", "anycast.addresses[0]"),
        (
            "addresses = [\"192.0.2.1\", \"192.0.2.1\"]",
            "anycast.addresses[1]",
        ),
        (
            "addresses = [\"192.0.2.1\"]\ndevice = \"a/b\"",
            "anycast.device",
        ),
        (
            "addresses = [\"192.0.2.1\"]\ndrain_quiet = 0",
            "anycast.drain_quiet",
        ),
        (
            "addresses = [\"192.0.2.1\"]\ndrain_timeout = 5000",
            "anycast.drain_timeout",
        ),
        (
            "addresses = [\"192.0.2.1\"]\ndrain_quiet = 30\ndrain_timeout = 10",
            "anycast.drain_timeout",
        ),
    ] {
        let text = format!(
            "[anycast]\n{table}\n\n[[tunnel]]\nname = \"a1\"\nmode = \"gre\"\nlocal = \"192.0.2.1\"\nremote = \"10.1.1.2\"\ndevice = \"tap1\"\n"
        );
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.field, field, "{table}: {e}");
        assert!(!e.message.is_empty() && !e.to_string().contains('\n'));
    }
    let e = Config::parse(&format!(
        "[gateway]\niface = \"ens0\"\n{}",
        ANYCAST_TUNNEL.replace("[anycast]\n", "[anycast]\ndevice = \"ens0\"\n")
    ))
    .unwrap_err();
    assert_eq!(e.field, "anycast.device", "{e}");
    let e = Config::parse(&format!("{ANYCAST_TUNNEL}\n[anycast.extra]\n")).unwrap_err();
    assert!(
        e.to_string().contains("extra") || e.to_string().contains("anycast"),
        "{e}"
    );
}

/// `n` keyed GRE tunnels between one pair of hosts, tun devices, each with
/// its own inner peer.
fn many(n: usize) -> String {
    let mut s = String::from("[gateway]\niface = \"ens0\"\n");
    for i in 0..n {
        s.push_str(&format!(
            "[[tunnel]]\nname = \"t{i}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\nkey = {}\ndevice = \"d{i}\"\ndevice_kind = \"tun\"\naddress = \"10.{}.{}.1\"\npeer = \"10.{}.{}.2\"\n",
            i + 1,
            64 + i / 256,
            i % 256,
            64 + i / 256,
            i % 256
        ));
    }
    s
}

#[test]
fn ten_thousand_tunnels_parse_and_more_than_the_limit_are_refused_in_one_line() {
    let c = Config::parse(&many(10_000)).unwrap();
    assert_eq!(c.tunnels.len(), 10_000);
    let max = crate::datapath::tunnel::MAX_TUNNELS;
    let e = error_of(&many(max + 1));
    assert_eq!(
        e,
        format!("tunnel: {} tunnels are configured and one gateway serves at most {max}; remove 1 or split them over gateways on more hosts", max + 1)
    );
    assert!(!e.contains('\n'));
}

#[test]
fn a_peer_used_twice_names_both_tunnels() {
    let text = many(3).replace("peer = \"10.64.2.2\"", "peer = \"10.64.0.2\"");
    let e = error_of(&text);
    assert!(
        e.contains("tunnel \"t2\".peer: 10.64.0.2 is also tunnel \"t0\"'s peer"),
        "{e}"
    );
}
