//! One `[[tunnel]]` table: its raw shape and its validation into a
//! [`TunnelConfig`], by the kernel's rules for each mode and option.

use std::net::IpAddr;

use serde::Deserialize;

use super::parse::{check_ifname, enum_field, parse_ip, parse_key, show};
use super::{err, ConfigError, Tos, Ttl, TunnelConfig};
use crate::datapath::tunnel::{DeviceKind, Mode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    name: Option<String>,
    mode: Option<String>,
    local: Option<String>,
    remote: Option<String>,
    key: Option<toml::Value>,
    ikey: Option<toml::Value>,
    okey: Option<toml::Value>,
    csum: Option<bool>,
    icsum: Option<bool>,
    ocsum: Option<bool>,
    seq: Option<bool>,
    iseq: Option<bool>,
    oseq: Option<bool>,
    ttl: Option<toml::Value>,
    tos: Option<toml::Value>,
    pmtudisc: Option<bool>,
    ignore_df: Option<bool>,
    encaplimit: Option<toml::Value>,
    mtu: Option<i64>,
    device: Option<String>,
    device_kind: Option<String>,
    address: Option<String>,
    peer: Option<String>,
    accept_from: Option<Vec<String>>,
    persistent: Option<bool>,
    keepalive: Option<toml::Value>,
    carrier_follows: Option<bool>,
}

fn v4_equivalent(mode: &str) -> &'static str {
    match mode {
        "ip6gretap" => "gretap",
        "ip6ip6" => "sit",
        "ipip6" => "ipip",
        _ => "gre",
    }
}

fn v6_equivalent(mode: &str) -> &'static str {
    match mode {
        "sit" => "ip6ip6",
        _ => "ipip6",
    }
}

pub(super) fn validate_tunnel(i: usize, t: RawTunnel) -> Result<TunnelConfig, ConfigError> {
    let name = t.name.ok_or_else(|| {
        err(
            format!("tunnel[{i}].name"),
            "is missing; add name = \"tun100\"",
        )
    })?;
    let f = |k: &str| format!("tunnel {name:?}.{k}");
    check_ifname(&f("name"), &name)?;
    let mode_s = t.mode.ok_or_else(|| {
        err(
            f("mode"),
            "is missing; add mode = \"gre\" or mode = \"ipip\"",
        )
    })?;
    let mode =
        match mode_s.as_str() {
            "gre" => Mode::Gre,
            "ipip" => Mode::Ipip,
            "gretap" => Mode::Gretap,
            "sit" => Mode::Sit,
            // The IPv6-underlay names of the kernel's ip6gre and ip6tnl: the
            // same encapsulations with an IPv6 outer header.
            "ip6gre" => Mode::Gre,
            "ip6gretap" => Mode::Gretap,
            "ip6ip6" => Mode::Sit,
            "ipip6" => Mode::Ipip,
            "ip6tnl" => return Err(err(
                f("mode"),
                "\"ip6tnl\" is a device type; name the mode: \"ip6ip6\" (IPv6 inside) or \"ipip6\" (IPv4 inside)",
            )),
            other => return Err(err(
                f("mode"),
                format!(
                    "{other:?} is not a tunnel mode; use \"gre\", \"gretap\", \"ipip\", \"sit\", \"ip6gre\", \"ip6gretap\", \"ip6ip6\" or \"ipip6\""
                ),
            )),
        };
    let local = parse_ip(
        &f("local"),
        t.local.as_deref().ok_or_else(|| {
            err(
                f("local"),
                "is missing; add local = \"<this host's underlay address>\"",
            )
        })?,
    )?;
    let remote = parse_ip(
        &f("remote"),
        t.remote.as_deref().ok_or_else(|| {
            err(
                f("remote"),
                "is missing; add remote = \"<the peer's underlay address>\"",
            )
        })?,
    )?;
    for (k, a) in [("local", local), ("remote", remote)] {
        if a.is_unspecified() || a.is_multicast() || matches!(a, IpAddr::V4(v) if v.is_broadcast())
        {
            return Err(err(
                f(k),
                format!("{a} cannot be a tunnel endpoint; use a unicast address"),
            ));
        }
    }
    if local == remote {
        return Err(err(f("remote"), "equals local; use the peer's address"));
    }
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(err(
            f("remote"),
            "is of another address family than local; use the same",
        ));
    }
    // Mode names that say which underlay they run on.
    let v6_names = ["ip6gre", "ip6gretap", "ip6ip6", "ipip6"];
    let v4_names = ["ipip", "sit"];
    if local.is_ipv4() && v6_names.contains(&mode_s.as_str()) {
        return Err(err(
            f("local"),
            format!(
                "mode {mode_s:?} runs over IPv6; use IPv6 endpoints, or mode {:?}",
                v4_equivalent(&mode_s)
            ),
        ));
    }
    if local.is_ipv6() && v4_names.contains(&mode_s.as_str()) {
        return Err(err(
            f("local"),
            format!("mode {mode_s:?} runs over IPv4; use IPv4 endpoints, or mode {:?} for an IPv6 underlay", v6_equivalent(&mode_s)),
        ));
    }

    let gre_only = |k: &str, present: bool| -> Result<(), ConfigError> {
        if present && !mode.is_gre() {
            Err(err(
                f(k),
                format!("mode {mode_s:?} has no GRE header; remove {k}"),
            ))
        } else {
            Ok(())
        }
    };
    gre_only("key", t.key.is_some())?;
    gre_only("ikey", t.ikey.is_some())?;
    gre_only("okey", t.okey.is_some())?;
    gre_only("csum", t.csum.is_some())?;
    gre_only("icsum", t.icsum.is_some())?;
    gre_only("ocsum", t.ocsum.is_some())?;
    gre_only("seq", t.seq.is_some())?;
    gre_only("iseq", t.iseq.is_some())?;
    gre_only("oseq", t.oseq.is_some())?;
    if t.seq.is_some() && (t.iseq.is_some() || t.oseq.is_some()) {
        return Err(err(
            f("seq"),
            "is given with iseq/oseq; use seq alone, or iseq and oseq",
        ));
    }
    let iseq = t.iseq.or(t.seq).unwrap_or(false);
    let oseq = t.oseq.or(t.seq).unwrap_or(false);
    if t.key.is_some() && (t.ikey.is_some() || t.okey.is_some()) {
        return Err(err(
            f("key"),
            "is given with ikey/okey; use key alone, or ikey and okey",
        ));
    }
    if t.csum.is_some() && (t.icsum.is_some() || t.ocsum.is_some()) {
        return Err(err(
            f("csum"),
            "is given with icsum/ocsum; use csum alone, or icsum and ocsum",
        ));
    }
    let key = t
        .key
        .as_ref()
        .map(|v| parse_key(&f("key"), v))
        .transpose()?;
    let ikey = t
        .ikey
        .as_ref()
        .map(|v| parse_key(&f("ikey"), v))
        .transpose()?
        .or(key);
    let okey = t
        .okey
        .as_ref()
        .map(|v| parse_key(&f("okey"), v))
        .transpose()?
        .or(key);
    let icsum = t.icsum.or(t.csum).unwrap_or(false);
    let ocsum = t.ocsum.or(t.csum).unwrap_or(false);

    let ttl = match &t.ttl {
        // iproute2's defaults: IPv4 tunnels inherit (ttl 0), IPv6 tunnels
        // send hop limit 64 (`ip -6 tunnel` and `ip link add type
        // ip6gre|ip6gretap|ip6tnl` fill in DEFAULT_TNL_HOP_LIMIT).
        None if local.is_ipv6() => Ttl::Fixed(64),
        None => Ttl::Inherit,
        Some(toml::Value::String(s)) if s == "inherit" => Ttl::Inherit,
        Some(toml::Value::Integer(n)) if (1..=255).contains(n) => Ttl::Fixed(*n as u8),
        Some(v) => {
            return Err(err(
                f("ttl"),
                format!("{} is not valid; use 1..=255 or \"inherit\"", show(v)),
            ))
        }
    };
    let tos = match &t.tos {
        None => Tos::Fixed(0),
        Some(toml::Value::String(s)) if s == "inherit" => Tos::Inherit,
        Some(toml::Value::Integer(n)) if (0..=255).contains(n) => Tos::Fixed(*n as u8),
        Some(v) => {
            return Err(err(
                f("tos"),
                format!(
                    "{} is not valid; use 0..=255 (the TOS byte, e.g. 0xb8 for EF) or \"inherit\"",
                    show(v)
                ),
            ))
        }
    };
    let pmtudisc = t.pmtudisc.unwrap_or(true);
    let ignore_df = t.ignore_df.unwrap_or(false);
    // The kernel's combination rules (iproute2 and ip_gre/ipip refuse the
    // same combinations).
    if local.is_ipv6() && (t.pmtudisc.is_some() || t.ignore_df.is_some()) {
        return Err(err(
            f(if t.pmtudisc.is_some() {
                "pmtudisc"
            } else {
                "ignore_df"
            }),
            "IPv6 has no DF bit (an IPv6 underlay never fragments in transit); remove it",
        ));
    }
    if let (Ttl::Fixed(n), false) = (ttl, pmtudisc) {
        return Err(err(
            f("ttl"),
            format!("{n} needs pmtudisc (a fixed TTL implies DF, as the kernel says: \"ttl != 0 and nopmtudisc are incompatible\"); use ttl = \"inherit\" or remove pmtudisc = false"),
        ));
    }
    let encap_limit = match (&t.encaplimit, local.is_ipv6()) {
        (None, true) => Some(4),
        (None, false) => None,
        (Some(_), false) => {
            return Err(err(
                f("encaplimit"),
                "applies to an IPv6 underlay only; remove it",
            ))
        }
        (Some(toml::Value::String(s)), true) if s == "none" => None,
        (Some(toml::Value::Integer(n)), true) if (0..=255).contains(n) => Some(*n as u8),
        (Some(v), true) => {
            return Err(err(
                f("encaplimit"),
                format!("{} is not valid; use 0..=255 or \"none\"", show(v)),
            ))
        }
    };
    if ignore_df && pmtudisc {
        return Err(err(
            f("ignore_df"),
            "needs pmtudisc = false (the kernel refuses ignore-df with pmtudisc); add pmtudisc = false",
        ));
    }
    let mtu = match t.mtu {
        None => None,
        Some(n) if (68..=65535).contains(&n) => Some(n as u16),
        Some(n) => {
            return Err(err(
                f("mtu"),
                format!("{n} is out of range; use 68..=65535, e.g. 1400"),
            ))
        }
    };
    let device = t.device.ok_or_else(|| {
        err(
            f("device"),
            "is missing; name the inner device, e.g. device = \"tap1\"",
        )
    })?;
    check_ifname(&f("device"), &device)?;
    let device_kind = enum_field(
        &f("device_kind"),
        t.device_kind.as_deref(),
        DeviceKind::Tap,
        &[("tap", DeviceKind::Tap), ("tun", DeviceKind::Tun)],
    )?;
    if mode == Mode::Gretap {
        if device_kind != DeviceKind::Tap {
            return Err(err(
                f("device_kind"),
                "gretap carries Ethernet frames, so its device is a tap; remove device_kind or write \"tap\"",
            ));
        }
        for (k, present) in [
            ("address", t.address.is_some()),
            ("peer", t.peer.is_some()),
            ("accept_from", t.accept_from.is_some()),
        ] {
            if present {
                return Err(err(
                    f(k),
                    "does not apply to gretap, which carries Ethernet frames (no inner source is checked); remove it, and bridge the tap or address it with ip addr",
                ));
            }
        }
    }
    let address = t
        .address
        .as_deref()
        .map(|a| parse_ip(&f("address"), a))
        .transpose()?;
    let peer = t
        .peer
        .as_deref()
        .map(|a| parse_ip(&f("peer"), a))
        .transpose()?;
    match (address, peer) {
        (Some(a), Some(p)) if a.is_ipv4() != p.is_ipv4() => {
            return Err(err(
                f("peer"),
                "is of another address family than address; use the same",
            ))
        }
        (Some(_), None) => {
            return Err(err(
                f("peer"),
                "is missing; give the far end's inner address, e.g. peer = \"10.1.1.2\"",
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                f("address"),
                "is missing; give this end's inner address, e.g. address = \"10.1.1.1\"",
            ))
        }
        (Some(a), Some(p)) if a == p => {
            return Err(err(
                f("peer"),
                "equals address; use the far end's inner address",
            ))
        }
        _ => {}
    }
    if mode == Mode::Ipip && address.is_some_and(|a| a.is_ipv6()) {
        return Err(err(
            f("address"),
            "ipip carries IPv4 only; use IPv4 inner addresses (or mode \"gre\")",
        ));
    }
    if mode == Mode::Sit && address.is_some_and(|a| a.is_ipv4()) {
        return Err(err(
            f("address"),
            "sit carries IPv6 only; use IPv6 inner addresses (or mode \"gre\")",
        ));
    }
    let mut accept_from = Vec::new();
    for a in t.accept_from.iter().flatten() {
        let p = crate::datapath::tunnel::Prefix::parse(a).ok_or_else(|| {
            err(
                f("accept_from"),
                format!("{a:?} is not a prefix; write one such as \"172.16.0.0/24\""),
            )
        })?;
        if mode == Mode::Ipip && p.addr.is_ipv6() {
            return Err(err(
                f("accept_from"),
                format!("{p}: ipip carries IPv4 only"),
            ));
        }
        if mode == Mode::Sit && p.addr.is_ipv4() {
            return Err(err(f("accept_from"), format!("{p}: sit carries IPv6 only")));
        }
        accept_from.push(p);
    }
    if !accept_from.is_empty() && peer.is_none() {
        return Err(err(
            f("accept_from"),
            "needs peer: without peer every inner source is accepted; add peer = \"<far inner address>\"",
        ));
    }
    let keepalive = match &t.keepalive {
        None => None,
        Some(v) => Some(parse_keepalive(&f("keepalive"), v)?),
    };
    if keepalive.is_some() {
        if mode != Mode::Gre || local.is_ipv6() {
            return Err(err(
                f("keepalive"),
                "GRE keepalives (Cisco's, which the kernel reflects) run over mode = \"gre\" on IPv4 only; remove it",
            ));
        }
        if iseq {
            return Err(err(
                f("keepalive"),
                "cannot be used with iseq: the replies come back without sequence numbers; remove one of them",
            ));
        }
    }
    let carrier_follows = t.carrier_follows.unwrap_or(false);
    if carrier_follows && keepalive.is_none() {
        return Err(err(
            f("carrier_follows"),
            "needs keepalive (the state the carrier follows); add keepalive = [10, 3]",
        ));
    }
    let cfg = TunnelConfig {
        name,
        mode,
        local,
        remote,
        ikey,
        okey,
        icsum,
        ocsum,
        iseq,
        oseq,
        ttl,
        tos,
        pmtudisc,
        ignore_df,
        encap_limit,
        mtu,
        device,
        device_kind,
        address,
        peer,
        accept_from,
        persistent: t.persistent.unwrap_or(false),
        keepalive,
        carrier_follows,
    };
    if let Some(m) = cfg.mtu {
        let max = cfg.max_mtu();
        if m > max {
            return Err(err(
                format!("tunnel {:?}.mtu", cfg.name),
                format!(
                    "{m} is more than a {}-byte UMEM frame can carry with this tunnel's headers (at most {max}); set mtu = {max} or less",
                    crate::io::xsk::FRAME_SIZE
                ),
            ));
        }
    }
    Ok(cfg)
}

/// `keepalive = [INTERVAL, MISSES]`: a keepalive every INTERVAL seconds
/// (1..=32767), the tunnel down after MISSES (1..=255) intervals without a
/// reply: Cisco's `keepalive 10 3`.
fn parse_keepalive(
    field: &str,
    v: &toml::Value,
) -> Result<crate::datapath::tunnel::Keepalive, ConfigError> {
    let bad = || {
        err(
            field,
            format!(
                "{} is not valid; use [INTERVAL, MISSES] such as [10, 3] (seconds 1..=32767, misses 1..=255)",
                show(v)
            ),
        )
    };
    let Some([i, m]) = v.as_array().map(Vec::as_slice) else {
        return Err(bad());
    };
    match (i.as_integer(), m.as_integer()) {
        (Some(i @ 1..=32767), Some(m @ 1..=255)) => Ok(crate::datapath::tunnel::Keepalive {
            interval: i as u16,
            misses: m as u8,
        }),
        _ => Err(bad()),
    }
}
