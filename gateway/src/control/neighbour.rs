//! The outer destination MAC of each tunnel, from the kernel's routing and
//! neighbour tables (never a hard-coded MAC). A resolver thread follows the
//! tables through rtnetlink and publishes each tunnel's next-hop MAC in an
//! atomic the workers read per packet; a worker that finds none drops the
//! packet (counted as `tx_no_neighbour`) and asks for resolution.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::datapath::next_hop::{format_mac, NextHops};
use crate::io::netlink::{NeighState, Netlink};

/// What the resolver follows: each tunnel's name and remote, and where to
/// publish the MACs. Replaced whole when a reload changes the tunnels.
pub struct Targets {
    pub remotes: Vec<(String, IpAddr)>,
    pub hops: Arc<NextHops>,
}

/// Follows the route and neighbour entry of each tunnel's remote until
/// `stop` is set: every `interval`, or at once when a worker asks.
pub fn run_resolver(
    targets: Arc<Mutex<Targets>>,
    underlay_index: u32,
    underlay_name: String,
    stop: Arc<AtomicBool>,
    interval: Duration,
) {
    let current = || {
        let t = targets.lock().unwrap_or_else(|p| p.into_inner());
        (t.remotes.clone(), t.hops.clone())
    };
    let (mut remotes, mut hops) = current();
    let nl = match Netlink::new() {
        Ok(nl) => nl,
        Err(e) => {
            tracing::error!("neighbour resolver: {e}; tunnels cannot send");
            return;
        }
    };
    let mut warned = vec![false; remotes.len()];
    let mut last = vec![None; remotes.len()];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (r, h) = current();
        if !Arc::ptr_eq(&h, &hops) {
            // A reload: the new list starts from what the control thread
            // carried over, and is resolved at once.
            (remotes, hops) = (r, h);
            warned = vec![false; remotes.len()];
            last = (0..remotes.len()).map(|i| hops.get(i)).collect();
            next = Instant::now();
        }
        let asked = hops.take_request();
        if !asked && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        next = Instant::now() + interval;
        for (i, (name, remote)) in remotes.iter().enumerate() {
            let mac = resolve_one(&nl, *remote, underlay_index, &underlay_name, &mut warned[i]);
            if mac != last[i] {
                match mac {
                    Some(m) => tracing::info!(
                        tunnel = %name,
                        remote = %remote,
                        mac = %format_mac(&m),
                        "next hop resolved"
                    ),
                    None => tracing::info!(tunnel = %name, remote = %remote, "next hop unresolved"),
                }
                last[i] = mac;
            }
            hops.set(i, mac);
        }
    }
}

fn resolve_one(
    nl: &Netlink,
    remote: IpAddr,
    underlay_index: u32,
    underlay_name: &str,
    warned: &mut bool,
) -> Option<[u8; 6]> {
    let (gateway, oif) = match nl.route_to(remote) {
        Ok(Some(r)) => r,
        Ok(None) => {
            if !*warned {
                tracing::warn!(
                    "no route to {remote}; add one (it must leave through {underlay_name})"
                );
                *warned = true;
            }
            return None;
        }
        Err(e) => {
            tracing::warn!("{e}");
            return None;
        }
    };
    if oif != underlay_index {
        if !*warned {
            tracing::warn!("the route to {remote} leaves through interface #{oif}, not {underlay_name}; the gateway only sends on {underlay_name}");
            *warned = true;
        }
        return None;
    }
    *warned = false;
    let hop = gateway.unwrap_or(remote);
    match nl.neighbour(oif, hop) {
        Ok((NeighState::Valid, mac)) => mac,
        Ok((NeighState::Stale, mac)) => {
            let _ = nl.resolve(oif, hop);
            mac
        }
        Ok((NeighState::Missing, _)) => {
            if let Err(e) = nl.resolve(oif, hop) {
                tracing::warn!("{e}");
            }
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}
