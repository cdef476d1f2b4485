//! Reading the file: serde's raw shape (unknown keys refused), then its
//! validation into a [`Config`]: the `[gateway]` table, and the checks
//! across tunnels. Each problem is one line naming the field and the fix.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::Deserialize;

use super::anycast::{check_tunnels, validate_anycast, RawAnycast};
use super::tunnel::{validate_tunnel, RawTunnel};
use super::{err, Config, ConfigError, Cores, PollMode, Queues, XdpAttach, XskBind};

// ---------------------------------------------------------------- raw shape

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    gateway: RawGlobal,
    #[serde(default)]
    tunnel: Vec<RawTunnel>,
    anycast: Option<RawAnycast>,
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

pub(super) fn enum_field<T: Copy>(
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
                "{} tunnels are configured and one gateway serves at most {}; remove {} or split them over gateways on more hosts",
                raw.tunnel.len(),
                crate::datapath::tunnel::MAX_TUNNELS,
                raw.tunnel.len() - crate::datapath::tunnel::MAX_TUNNELS
            ),
        ));
    }
    let mut tunnels = Vec::new();
    for (i, t) in raw.tunnel.into_iter().enumerate() {
        tunnels.push(validate_tunnel(i, t)?);
    }
    // One pass with hash sets: linear in the number of tunnels.
    let mut names = HashSet::with_capacity(tunnels.len());
    let mut devices = HashSet::with_capacity(tunnels.len());
    let mut endpoints = HashSet::with_capacity(tunnels.len());
    let mut peers: HashMap<IpAddr, &str> = HashMap::new();
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
            if let Some(other) = peers.insert(p, &t.name) {
                return Err(err(
                    format!("{f}.peer"),
                    format!("{p} is also tunnel {other:?}'s peer; one inner address can be routed into one device only"),
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
    let anycast = raw.anycast.map(validate_anycast).transpose()?;
    if let Some(a) = &anycast {
        check_tunnels(a, &tunnels)?;
        if g.iface.as_deref() == Some(a.device.as_str()) {
            return Err(err(
                "anycast.device",
                format!("{:?} is gateway.iface, the underlay; give [anycast] a device of its own (the default is \"gw-anycast\")", a.device),
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
        anycast,
    })
}

/// A TOML value as it appears in a one-line message: strings quoted with
/// escapes, anything else in TOML's words with line breaks flattened.
pub(super) fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string().replace(['\n', '\r'], " "),
    }
}

pub(super) fn check_ifname(field: &str, name: &str) -> Result<(), ConfigError> {
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

pub(super) fn parse_ip(field: &str, v: &str) -> Result<IpAddr, ConfigError> {
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

pub(super) fn parse_key(field: &str, v: &toml::Value) -> Result<u32, ConfigError> {
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
