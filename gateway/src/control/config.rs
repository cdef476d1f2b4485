//! The configuration file: TOML in iproute2's words, so that
//! `ip tunnel add tun100 mode gre remote 192.168.0.58 local 192.168.0.8 ttl 64`
//! becomes a `[[tunnel]]` table with the same keys. Parsing is two steps:
//! serde reads the raw shape (unknown keys refused), then [`Config::validate`]
//! checks meaning and reports the first problem in one line that names the
//! field and the fix.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::Deserialize;

use crate::datapath::tunnel::{DeviceKind, Mode};
pub use crate::datapath::tunnel::{Tos, Ttl};
pub use crate::engine::worker::PollMode;
pub use crate::io::xdp::XdpAttach;
pub use crate::io::xsk::XskBind;
use crate::wire::{ethernet, ipv4, ipv6};

/// Where the gateway looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/gateway/gateway.toml";

/// Bytes in front of the packet data in every UMEM frame: the kernel's
/// `XDP_PACKET_HEADROOM`. The gateway's UMEM adds no frame headroom of its
/// own (xsk-rs's default, see [`crate::io::xsk::Xsk::new`]) and its XDP
/// program never moves a packet's start, so every frame's data starts this
/// far in.
pub const UMEM_HEADROOM: usize = 256;

/// Packet bytes one UMEM frame holds: from the data start to the end of the
/// frame, what [`crate::io::xsk::Xsk::buffer_mut`] hands out (3840).
pub const FRAME_DATA_LEN: usize = crate::io::xsk::FRAME_SIZE as usize - UMEM_HEADROOM;

/// A configuration problem, in one line: the field, what is wrong, the fix.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- raw shape

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    gateway: RawGlobal,
    #[serde(default)]
    tunnel: Vec<RawTunnel>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    iface: Option<String>,
    queues: Option<toml::Value>,
    cores: Option<toml::Value>,
    batch_size: Option<i64>,
    poll: Option<String>,
    xdp_mode: Option<String>,
    xsk_bind: Option<String>,
    frames_per_queue: Option<i64>,
    ring_size: Option<i64>,
    busy_poll_budget: Option<i64>,
    spread_writes: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
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
}

// ---------------------------------------------------------------- validated

/// Which NIC RX queues get an AF_XDP socket and a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queues {
    All,
    List(Vec<u32>),
}

/// Which cores workers are pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cores {
    /// Worker `i` on the last cores, leaving core 0 to the rest of the host.
    Auto,
    List(Vec<usize>),
}

// Displayed in the configuration's own words.
impl std::fmt::Display for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queues::All => f.write_str("\"all\""),
            Queues::List(l) => write!(f, "{l:?}"),
        }
    }
}

impl std::fmt::Display for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cores::Auto => f.write_str("\"auto\""),
            Cores::List(l) => write!(f, "{l:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    pub name: String,
    pub mode: Mode,
    pub local: IpAddr,
    pub remote: IpAddr,
    pub ikey: Option<u32>,
    pub okey: Option<u32>,
    pub icsum: bool,
    pub ocsum: bool,
    /// Received packets must carry a sequence number, newer than the last.
    pub iseq: bool,
    /// Sent packets carry a sequence number (1, 2, ...).
    pub oseq: bool,
    pub ttl: Ttl,
    pub tos: Tos,
    /// Path MTU discovery: the outer DF bit always set (the kernel's
    /// default). Without it DF follows the inner packet.
    pub pmtudisc: bool,
    /// With `pmtudisc = false`: never set DF on the outer header.
    pub ignore_df: bool,
    /// IPv6 underlay: the Tunnel Encapsulation Limit option sent in a
    /// destination-options header (RFC 2473), 4 by default as the kernel's
    /// ip6tnl and ip6gre; `None`: no option ("none").
    pub encap_limit: Option<u8>,
    /// `None`: the underlay's MTU less the tunnel overhead, found at start,
    /// and no more than [`TunnelConfig::max_mtu`] (see
    /// [`TunnelConfig::auto_mtu`]). When set, validation keeps it within
    /// `max_mtu`.
    pub mtu: Option<u16>,
    pub device: String,
    pub device_kind: DeviceKind,
    pub address: Option<IpAddr>,
    pub peer: Option<IpAddr>,
    /// Inner source prefixes accepted besides `peer`.
    pub accept_from: Vec<crate::datapath::tunnel::Prefix>,
    /// Keep the device when the gateway stops.
    pub persistent: bool,
}

impl TunnelConfig {
    /// Bytes the outer headers add (outer IP + GRE with its options).
    pub fn overhead(&self) -> u16 {
        self.headers(
            self.encap_limit.is_some(),
            [self.okey.is_some(), self.ocsum, self.oseq],
        )
    }

    /// The most bytes of headers a packet of this tunnel carries either
    /// way: the packets the peer sends have the receive options (`ikey`,
    /// `icsum`, `iseq`) and, on an IPv6 underlay, the peer's
    /// encapsulation-limit option whatever this end sends (Linux sends it
    /// by default), which may be more than [`Self::overhead`] counts for
    /// the way out.
    fn largest_overhead(&self) -> u16 {
        let rx = self.headers(true, [self.ikey.is_some(), self.icsum, self.iseq]);
        self.overhead().max(rx)
    }

    /// Outer IP (with the encapsulation-limit option on an IPv6 underlay
    /// when `encap_limit`), GRE with the options `gre` (key, checksum,
    /// sequence number), and for gretap the inner Ethernet header (the
    /// kernel's gretap MTU is the underlay's less 38).
    fn headers(&self, encap_limit: bool, gre: [bool; 3]) -> u16 {
        let ip = match self.local {
            IpAddr::V4(_) => 20,
            IpAddr::V6(_) => 40 + if encap_limit { 8 } else { 0 },
        };
        let gre = match self.mode {
            Mode::Ipip | Mode::Sit => 0,
            Mode::Gre | Mode::Gretap => 4 + 4 * gre.iter().map(|&o| u16::from(o)).sum::<u16>(),
        };
        let eth = if self.mode == Mode::Gretap { 14 } else { 0 };
        ip + gre + eth
    }

    /// Bytes a packet of `mtu` bytes takes of a UMEM frame at most, outer
    /// Ethernet header included: the longest frame the tunnel sends.
    ///
    /// A packet read from the device is copied into a frame at
    /// [`crate::datapath::encap::TunnelTx::read_offset`] and must end inside the
    /// frame's [`FRAME_DATA_LEN`] bytes (`Worker::take_read` drops it as
    /// `tx_malformed` otherwise, with no ICMP back):
    /// - tun: the read offset is the outer headers (Ethernet, outer IP with
    ///   the encapsulation-limit option, GRE with its options), and the
    ///   packet the inner IP packet, up to `mtu`;
    /// - tap carrying IP (gre, ipip, sit): the tap's Ethernet header is read
    ///   in front of the inner IP packet and overwritten by the outer
    ///   headers, so the offset is one Ethernet header less and the packet
    ///   one longer: the same sum;
    /// - gretap: the whole tap frame is carried, its Ethernet header
    ///   (counted in [`Self::overhead`]) and one VLAN tag included.
    ///
    /// The virtio-net header ([`crate::datapath::offload::VNET_HDR_LEN`]) stays in the
    /// io_uring read buffer, and on the way into the device it is written
    /// where the outer headers were, so it takes no room of its own.
    pub fn outer_frame_len(&self, mtu: u16) -> usize {
        ethernet::HEADER_LEN
            + usize::from(self.largest_overhead())
            + self.vlan_len()
            + usize::from(mtu)
    }

    /// The outer IP payload (all after the fixed IPv4 or IPv6 header: the
    /// encapsulation-limit option, GRE, and what the tunnel carries) of a
    /// packet of `mtu` bytes at most: what reassembly of an outer packet
    /// fragmented on the way has to hold ([`crate::datapath::reasm::MAX_PAYLOAD`]).
    pub fn outer_ip_payload_len(&self, mtu: u16) -> usize {
        let fixed = match self.local {
            IpAddr::V4(_) => ipv4::HEADER_LEN,
            IpAddr::V6(_) => ipv6::HEADER_LEN,
        };
        usize::from(self.largest_overhead()) - fixed + self.vlan_len() + usize::from(mtu)
    }

    /// The largest MTU the gateway can carry on this tunnel: the largest
    /// `mtu` whose packets fit a UMEM frame with the outer headers
    /// ([`Self::outer_frame_len`] within [`FRAME_DATA_LEN`]), and whose
    /// outer IP payload, should a router fragment it, fits reassembly
    /// ([`Self::outer_ip_payload_len`] within [`crate::datapath::reasm::MAX_PAYLOAD`]).
    /// For instance 3796 for gre over IPv4 (the reassembly bound: the frame
    /// alone would allow 3802), 3774 for ip6gre with its encapsulation
    /// limit (the frame bound), 3778 for gretap over IPv4.
    pub fn max_mtu(&self) -> u16 {
        let frame = FRAME_DATA_LEN.saturating_sub(self.outer_frame_len(0));
        let reassembly =
            crate::datapath::reasm::MAX_PAYLOAD.saturating_sub(self.outer_ip_payload_len(0));
        frame.min(reassembly).min(usize::from(u16::MAX)) as u16
    }

    /// The MTU when `mtu` is not set: the underlay's less
    /// [`Self::overhead`]. A jumbo underlay would give more than a UMEM
    /// frame can carry (9000 less 24 for gre, where every packet the device
    /// sent would be dropped as `tx_malformed`): such a default is clamped
    /// to [`Self::max_mtu`] with a warning, not refused, since the
    /// underlay's MTU is known only at start (a configured `mtu` past the
    /// limit is refused by validation instead).
    pub fn auto_mtu(&self, underlay_mtu: u32) -> Result<u16, ConfigError> {
        let m = underlay_mtu.saturating_sub(u32::from(self.overhead()));
        if m < 68 {
            return Err(err(
                format!("tunnel {:?}.mtu", self.name),
                format!("the underlay MTU {underlay_mtu} leaves no room; set mtu explicitly"),
            ));
        }
        let max = self.max_mtu();
        if m > u32::from(max) {
            tracing::warn!(
                "tunnel {:?}: the underlay MTU {underlay_mtu} less the tunnel's headers ({m}) is more than a {}-byte UMEM frame can carry; using mtu {max} (set mtu = {max} to say so)",
                self.name,
                crate::io::xsk::FRAME_SIZE
            );
            return Ok(max);
        }
        Ok(m as u16)
    }

    /// gretap frames may carry one 802.1Q tag past the MTU (encap and
    /// decap accept `mtu + 4` bytes behind the tap frame's Ethernet header).
    fn vlan_len(&self) -> usize {
        if self.mode == Mode::Gretap {
            ethernet::VLAN_TAG_LEN
        } else {
            0
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub iface: Option<String>,
    pub queues: Queues,
    pub cores: Cores,
    pub batch_size: usize,
    pub poll: PollMode,
    pub xdp_attach: XdpAttach,
    pub xsk_bind: XskBind,
    pub frames_per_queue: u32,
    pub ring_size: u32,
    /// Kernel busy polling of the NIC queue from the worker
    /// (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL_BUDGET`): packets per poll,
    /// 0 when off.
    pub busy_poll_budget: u16,
    /// Device writes spread over all workers by inner flow (see
    /// [`crate::engine::handover`]).
    pub spread_writes: bool,
    pub tunnels: Vec<TunnelConfig>,
}

impl Config {
    /// Reads and validates a file. The error names the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(
                path.display().to_string(),
                format!("cannot read it ({e}); give an existing file with --config FILE"),
            )
        })?;
        Config::parse(&text).map_err(|e| err(format!("{}: {}", path.display(), e.field), e.message))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .unwrap_or(0);
            err(
                format!("line {line}"),
                e.message().trim().replace('\n', " "),
            )
        })?;
        validate(raw)
    }
}

fn enum_field<T: Copy>(
    field: &str,
    value: Option<&str>,
    default: T,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            err(
                field,
                format!("{v:?} is not a choice; use one of {}", names.join(", ")),
            )
        })
}

fn validate(raw: RawFile) -> Result<Config, ConfigError> {
    let g = raw.gateway;
    let queues = match g.queues {
        None => Queues::All,
        Some(toml::Value::String(s)) if s == "all" => Queues::All,
        Some(toml::Value::Array(a)) => {
            let mut list = Vec::new();
            for v in a {
                match v.as_integer() {
                    Some(n) if (0..i64::from(gateway_common::MAX_QUEUES)).contains(&n) => {
                        list.push(n as u32)
                    }
                    _ => {
                        return Err(err(
                            "gateway.queues",
                            format!(
                                "{} is not a queue number; use integers 0..{}",
                                show(&v),
                                gateway_common::MAX_QUEUES
                            ),
                        ))
                    }
                }
            }
            if list.is_empty() {
                return Err(err("gateway.queues", "is empty; use \"all\" or e.g. [0]"));
            }
            list.sort_unstable();
            list.dedup();
            Queues::List(list)
        }
        Some(v) => {
            return Err(err(
                "gateway.queues",
                format!(
                    "{} is not valid; use \"all\" or a list such as [0, 1]",
                    show(&v)
                ),
            ))
        }
    };
    let cores = match g.cores {
        None => Cores::Auto,
        Some(toml::Value::String(s)) if s == "auto" => Cores::Auto,
        Some(toml::Value::Array(a)) => {
            let mut list = Vec::new();
            for v in a {
                match v.as_integer() {
                    Some(n) if (0..4096).contains(&n) => list.push(n as usize),
                    _ => {
                        return Err(err(
                            "gateway.cores",
                            format!(
                                "{} is not a core number; use integers such as [1]",
                                show(&v)
                            ),
                        ))
                    }
                }
            }
            if list.is_empty() {
                return Err(err("gateway.cores", "is empty; use \"auto\" or e.g. [1]"));
            }
            Cores::List(list)
        }
        Some(v) => {
            return Err(err(
                "gateway.cores",
                format!(
                    "{} is not valid; use \"auto\" or a list such as [1]",
                    show(&v)
                ),
            ))
        }
    };
    let batch_size = match g.batch_size {
        None => 64,
        Some(n) if (1..=256).contains(&n) => n as usize,
        Some(n) => {
            return Err(err(
                "gateway.batch_size",
                format!("{n} is out of range; use 1..=256 (64 is the default)"),
            ))
        }
    };
    let busy_poll_budget = match g.busy_poll_budget {
        None => 0,
        Some(n) if (0..=1024).contains(&n) => n as u16,
        Some(n) => {
            return Err(err(
                "gateway.busy_poll_budget",
                format!("{n} is out of range; use 0 (off, the default) to 1024, e.g. 64"),
            ))
        }
    };
    let poll = enum_field(
        "gateway.poll",
        g.poll.as_deref(),
        PollMode::Busy,
        &[("busy", PollMode::Busy), ("adaptive", PollMode::Adaptive)],
    )?;
    let xdp_attach = enum_field(
        "gateway.xdp_mode",
        g.xdp_mode.as_deref(),
        XdpAttach::Auto,
        &[
            ("auto", XdpAttach::Auto),
            ("native", XdpAttach::Native),
            ("generic", XdpAttach::Generic),
        ],
    )?;
    let xsk_bind = enum_field(
        "gateway.xsk_bind",
        g.xsk_bind.as_deref(),
        XskBind::Auto,
        &[
            ("auto", XskBind::Auto),
            ("copy", XskBind::Copy),
            ("zerocopy", XskBind::ZeroCopy),
        ],
    )?;
    let ring_size = match g.ring_size {
        None => 2048,
        Some(n) if (64..=16384).contains(&n) && (n as u64).is_power_of_two() => n as u32,
        Some(n) => {
            return Err(err(
                "gateway.ring_size",
                format!("{n} is not valid; use a power of two in 64..=16384 (2048 is the default)"),
            ))
        }
    };
    let frames_per_queue = match g.frames_per_queue {
        None => ring_size * 2,
        Some(n) if n > i64::from(ring_size) && n <= 1 << 20 => n as u32,
        Some(n) => {
            return Err(err(
                "gateway.frames_per_queue",
                format!(
                    "{n} is not valid; it must exceed ring_size ({ring_size}) so frames in flight \
                     do not starve the fill ring; use at least {}",
                    ring_size * 2
                ),
            ))
        }
    };
    if let Some(iface) = &g.iface {
        check_ifname("gateway.iface", iface)?;
    }

    if raw.tunnel.is_empty() {
        return Err(err(
            "tunnel",
            "no [[tunnel]] is configured; add one (see configs/ in the repository for examples)",
        ));
    }
    if raw.tunnel.len() > crate::datapath::tunnel::MAX_TUNNELS {
        return Err(err(
            "tunnel",
            format!(
                "{} tunnels are configured; the gateway takes at most {}",
                raw.tunnel.len(),
                crate::datapath::tunnel::MAX_TUNNELS
            ),
        ));
    }
    let mut tunnels = Vec::new();
    for (i, t) in raw.tunnel.into_iter().enumerate() {
        tunnels.push(validate_tunnel(i, t)?);
    }
    let mut names = HashSet::new();
    let mut devices = HashSet::new();
    let mut endpoints = HashSet::new();
    for t in &tunnels {
        let f = format!("tunnel {:?}", t.name);
        if !names.insert(t.name.clone()) {
            return Err(err(f, "name is used twice; give each tunnel its own name"));
        }
        if !devices.insert(t.device.clone()) {
            return Err(err(
                format!("{f}.device"),
                format!(
                    "{:?} is already another tunnel's device; give each tunnel its own",
                    t.device
                ),
            ));
        }
        if let Some(p) = t.peer {
            if let Some(other) = tunnels
                .iter()
                .find(|o| o.name != t.name && o.peer == Some(p))
            {
                return Err(err(
                    format!("{f}.peer"),
                    format!("{p} is also tunnel {:?}'s peer; one inner address can be routed into one device only", other.name),
                ));
            }
        }
        // gre and gretap share protocol 47: told apart by key only.
        if !endpoints.insert((t.local, t.remote, t.mode.ip_protocol(), t.ikey)) {
            return Err(err(
                f,
                "another tunnel has the same local, remote, key and IP protocol \
                 (gre and gretap both use 47); tell them apart with different keys",
            ));
        }
    }
    Ok(Config {
        iface: g.iface,
        queues,
        cores,
        batch_size,
        poll,
        xdp_attach,
        xsk_bind,
        frames_per_queue,
        ring_size,
        busy_poll_budget,
        spread_writes: g.spread_writes.unwrap_or(false),
        tunnels,
    })
}

/// A TOML value as it appears in a one-line message: strings quoted with
/// escapes, anything else in TOML's words with line breaks flattened.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string().replace(['\n', '\r'], " "),
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), ConfigError> {
    // The kernel's rule (dev_valid_name): no '/', ':' or whitespace; and
    // nothing that would break a one-line message either.
    if name.is_empty()
        || name.len() > 15
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        || name == "."
        || name == ".."
    {
        return Err(err(
            field,
            format!("{name:?} is not a valid interface name; use 1 to 15 characters without '/', ':', spaces or control characters"),
        ));
    }
    Ok(())
}

fn parse_ip(field: &str, v: &str) -> Result<IpAddr, ConfigError> {
    if let Some((a, _)) = v.split_once('/') {
        if a.parse::<IpAddr>().is_ok() {
            return Err(err(
                field,
                format!("{v:?} has a prefix length; give the bare address {a:?} (the gateway adds it as a host address with a peer)"),
            ));
        }
    }
    v.parse().map_err(|_| {
        err(
            field,
            format!("{v:?} is not an IP address; write one such as \"192.168.0.58\""),
        )
    })
}

fn parse_key(field: &str, v: &toml::Value) -> Result<u32, ConfigError> {
    match v {
        toml::Value::Integer(n) if (0..=i64::from(u32::MAX)).contains(n) => Ok(*n as u32),
        toml::Value::String(s) => s
            .parse::<Ipv4Addr>()
            .map(u32::from)
            .or_else(|_| s.parse::<u32>())
            .map_err(|_| {
                err(
                    field,
                    format!("{s:?} is not a key; use a number 0..=4294967295 or a dotted quad like \"0.0.0.100\""),
                )
            }),
        other => Err(err(
            field,
            format!("{} is not a key; use a number 0..=4294967295 or a dotted quad", show(other)),
        )),
    }
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

fn validate_tunnel(i: usize, t: RawTunnel) -> Result<TunnelConfig, ConfigError> {
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
    if let (Ttl::Fixed(n), false) = (ttl, pmtudisc) {
        return Err(err(
            f("ttl"),
            format!("{n} needs pmtudisc (a fixed TTL implies DF, as the kernel says: \"ttl != 0 and nopmtudisc are incompatible\"); use ttl = \"inherit\" or remove pmtudisc = false"),
        ));
    }
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

#[cfg(test)]
mod tests {
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
            let at =
                |mtu: u16| Config::parse(&one_tunnel(mode, v6, &format!("{extra}mtu = {mtu}\n")));
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
}
