//! The outer destination MAC of each tunnel, from the kernel's routing and
//! neighbour tables (never a hard-coded MAC). A resolver thread follows the
//! tables through rtnetlink and publishes each tunnel's next-hop MAC in an
//! atomic the workers read per packet; a worker that finds none drops the
//! packet (counted as `tx_no_neighbour`) and asks for resolution.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::datapath::next_hop::{format_mac, NextHops};
use crate::io::netlink::{NeighState, Neighbours, Netlink};

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
    let mut routes = Routes::default();
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
        routes.refresh(&nl, remotes.iter().map(|(_, r)| *r));
        // One dump of the neighbour table a round, whatever the number of
        // tunnels; on a failure the MACs stay as they were.
        let neighbours = match nl.neighbours() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        let mut resolving = HashSet::new();
        for (i, (name, remote)) in remotes.iter().enumerate() {
            let mac = resolve_one(
                &nl,
                routes.get(*remote),
                &neighbours,
                &mut resolving,
                *remote,
                underlay_index,
                &underlay_name,
                &mut warned[i],
            );
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

/// Route lookups one round makes at most once every remote has been
/// looked up: with thousands of distinct remotes each route is read again
/// every few rounds (5,000 remotes: every 10), while every neighbour
/// entry is read every round (one dump).
const ROUTES_PER_ROUND: usize = 512;

/// The kernel's route to each distinct remote (`None`: no route), looked
/// up once and then again in turns of [`ROUTES_PER_ROUND`].
#[derive(Default)]
struct Routes {
    routes: HashMap<IpAddr, Option<(Option<IpAddr>, u32)>>,
    order: Vec<IpAddr>,
    cursor: usize,
}

impl Routes {
    fn refresh(&mut self, nl: &Netlink, remotes: impl Iterator<Item = IpAddr>) {
        let mut seen = HashSet::new();
        self.order = remotes.filter(|r| seen.insert(*r)).collect();
        self.routes.retain(|r, _| seen.contains(r));
        let mut budget = ROUTES_PER_ROUND.min(self.order.len());
        // New remotes first, all of them (at start and after a reload).
        for r in &self.order {
            if !self.routes.contains_key(r) {
                if let Some(route) = lookup_route(nl, *r) {
                    self.routes.insert(*r, route);
                }
                budget = budget.saturating_sub(1);
            }
        }
        for _ in 0..budget {
            self.cursor = (self.cursor + 1) % self.order.len();
            let r = self.order[self.cursor];
            if let Some(route) = lookup_route(nl, r) {
                self.routes.insert(r, route);
            }
        }
    }

    fn get(&self, remote: IpAddr) -> Option<Option<(Option<IpAddr>, u32)>> {
        self.routes.get(&remote).copied()
    }
}

/// The route to `remote`: `Some(None)` when there is none, `None` when
/// the lookup failed (logged; tried again next round).
fn lookup_route(nl: &Netlink, remote: IpAddr) -> Option<Option<(Option<IpAddr>, u32)>> {
    match nl.route_to(remote) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn resolve_one(
    nl: &Netlink,
    route: Option<Option<(Option<IpAddr>, u32)>>,
    neighbours: &Neighbours,
    resolving: &mut HashSet<(u32, IpAddr)>,
    remote: IpAddr,
    underlay_index: u32,
    underlay_name: &str,
    warned: &mut bool,
) -> Option<[u8; 6]> {
    let (gateway, oif) = match route {
        Some(Some(r)) => r,
        Some(None) => {
            if !*warned {
                tracing::warn!(
                    "no route to {remote}; add one (it must leave through {underlay_name})"
                );
                *warned = true;
            }
            return None;
        }
        None => return None,
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
    let (state, mac) = neighbours
        .get(&(oif, hop))
        .copied()
        .unwrap_or((NeighState::Missing, None));
    // Each next hop asked for once a round, however many tunnels use it.
    match state {
        NeighState::Valid => mac,
        NeighState::Stale => {
            if resolving.insert((oif, hop)) {
                let _ = nl.resolve(oif, hop);
            }
            mac
        }
        NeighState::Missing => {
            if resolving.insert((oif, hop)) {
                if let Err(e) = nl.resolve(oif, hop) {
                    tracing::warn!("{e}");
                }
            }
            None
        }
    }
}
