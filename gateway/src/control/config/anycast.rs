//! The `[anycast]` table: tunnel endpoint addresses this gateway shares
//! with others behind ECMP routers. The gateway puts them on a device of its
//! own while it can carry traffic, and takes them off when it cannot or is
//! drained; a routing daemon on the host (BIRD's `protocol direct`, FRR's
//! `redistribute connected`) announces what is there. The device is a tun
//! whose only queue the gateway holds, so it goes when the process does,
//! SIGKILL included, and the announcement with it.
//!
//! Checked here too: what does not survive a peer moving between gateways.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::parse::{check_ifname, parse_ip};
use super::{err, ConfigError, TunnelConfig};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnycast {
    addresses: Option<Vec<String>>,
    device: Option<String>,
    drain_quiet: Option<i64>,
    drain_timeout: Option<i64>,
}

/// Validated `[anycast]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anycast {
    /// The shared endpoint addresses, each put on `device` as a host
    /// address (/32, /128).
    pub addresses: Vec<IpAddr>,
    /// The device that carries them.
    pub device: String,
    /// A drained gateway stops once no packet has arrived on these
    /// addresses' tunnels for this long (the routers have moved the peers)...
    pub drain_quiet: Duration,
    /// ... or this long after the drain began, whatever still arrives.
    pub drain_timeout: Duration,
}

/// The device's name when `[anycast] device` is not given.
pub const DEFAULT_DEVICE: &str = "gw-anycast";

fn seconds(field: &str, v: Option<i64>, default: u64, max: i64) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(Duration::from_secs(default)),
        Some(n) if (1..=max).contains(&n) => Ok(Duration::from_secs(n as u64)),
        Some(n) => Err(err(
            field,
            format!("{n} is out of range; use seconds 1..={max} ({default} is the default)"),
        )),
    }
}

pub(super) fn validate_anycast(raw: RawAnycast) -> Result<Anycast, ConfigError> {
    let list = raw.addresses.unwrap_or_default();
    if list.is_empty() {
        return Err(err(
            "anycast.addresses",
            "is missing or empty; list the shared endpoint addresses, e.g. addresses = [\"192.0.2.1\"]",
        ));
    }
    let mut addresses = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let ip = parse_ip(&format!("anycast.addresses[{i}]"), a)?;
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(err(
                format!("anycast.addresses[{i}]"),
                format!("{ip} cannot be a tunnel endpoint; use a unicast address"),
            ));
        }
        if addresses.contains(&ip) {
            return Err(err(
                format!("anycast.addresses[{i}]"),
                format!("{ip} is listed twice; list it once"),
            ));
        }
        addresses.push(ip);
    }
    let device = raw.device.unwrap_or_else(|| DEFAULT_DEVICE.into());
    check_ifname("anycast.device", &device)?;
    let drain_quiet = seconds("anycast.drain_quiet", raw.drain_quiet, 2, 600)?;
    let drain_timeout = seconds("anycast.drain_timeout", raw.drain_timeout, 60, 3600)?;
    if drain_timeout < drain_quiet {
        return Err(err(
            "anycast.drain_timeout",
            format!(
                "{} s is shorter than drain_quiet ({} s); make it at least as long",
                drain_timeout.as_secs(),
                drain_quiet.as_secs()
            ),
        ));
    }
    Ok(Anycast {
        addresses,
        device,
        drain_quiet,
        drain_timeout,
    })
}

/// What a tunnel on a shared endpoint cannot have: state that the other
/// gateways do not share, and that the peer would hold against them when
/// the routers move it.
pub(super) fn check_tunnels(
    anycast: &Anycast,
    tunnels: &[TunnelConfig],
) -> Result<(), ConfigError> {
    for t in tunnels {
        if !anycast.addresses.contains(&t.local) {
            if t.device == anycast.device {
                return Err(err(
                    format!("tunnel {:?}.device", t.name),
                    format!(
                        "{:?} is [anycast]'s device; give the tunnel another",
                        t.device
                    ),
                ));
            }
            continue;
        }
        let f = |k: &str| format!("tunnel {:?}.{k}", t.name);
        if t.device == anycast.device {
            return Err(err(
                f("device"),
                format!(
                    "{:?} is [anycast]'s device; give the tunnel another",
                    t.device
                ),
            ));
        }
        if t.oseq {
            return Err(err(
                f("oseq"),
                format!(
                    "cannot be used on the anycast address {}: each gateway numbers its own packets, and a peer with iseq refuses the lower numbers of the gateway it moves to; remove oseq (or seq)",
                    t.local
                ),
            ));
        }
        if t.iseq {
            return Err(err(
                f("iseq"),
                format!(
                    "cannot be used on the anycast address {}: a gateway a peer comes back to remembers the number it last took, and refuses the peer's packets if more than 2^31 were sent meanwhile; remove iseq (or seq)",
                    t.local
                ),
            ));
        }
        if t.keepalive.is_some() {
            return Err(err(
                f("keepalive"),
                format!(
                    "cannot be used on the anycast address {}: the peer sends each reply to the address, and the routers hand it to whichever gateway they pick, so the sender would miss it; remove keepalive",
                    t.local
                ),
            ));
        }
    }
    Ok(())
}
