//! Tunnel liveness: whether each tunnel's far end answers.
//!
//! A tunnel with `keepalive = [INTERVAL, MISSES]` is **up** while a reply to
//! its keepalives came within the last INTERVAL x MISSES seconds (counted
//! from the gateway's start, or the tunnel's, until the first reply), and
//! **down** otherwise, as a Cisco router's line protocol follows its GRE
//! keepalives. Each change is logged and counted (`tunnel_down`,
//! `tunnel_up` events); with `carrier_follows` the tunnel device's carrier
//! follows it, so that the host's routes through the device go `linkdown`
//! and a routing daemon moves traffic elsewhere. A tunnel without
//! keepalives has no state; for every tunnel the time since anything last
//! arrived on it is shown.
//!
//! The workers count and time-stamp replies (per tunnel, in their
//! counters); the control thread reads them here every half second.

use std::sync::atomic::Ordering::Relaxed;

use super::Gateway;

/// What makes a tunnel's liveness its own: a reload that changes any of
/// it starts the tunnel's liveness afresh.
type Identity = (
    Option<crate::datapath::tunnel::Keepalive>,
    std::net::IpAddr,
    std::net::IpAddr,
    Option<u32>,
);

fn identity(cfg: &crate::control::config::TunnelConfig) -> Identity {
    (cfg.keepalive, cfg.local, cfg.remote, cfg.ikey)
}

/// What the control thread knows of one tunnel's liveness.
#[derive(Debug, Clone)]
pub(super) struct Live {
    name: String,
    identity: Identity,
    /// The gateway turned the device's carrier off (and must turn it on
    /// again, whatever the configuration says by then).
    carrier_off: bool,
    keepalive: Option<crate::datapath::tunnel::Keepalive>,
    /// Up (with keepalives), as last decided.
    up: bool,
    /// When the tunnel started being watched (clock seconds).
    since: u32,
    /// Packets and replies seen so far, and when that last changed.
    seen: u64,
    seen_at: Option<u32>,
}

impl Live {
    fn new(cfg: &crate::control::config::TunnelConfig, now: u32) -> Live {
        Live {
            name: cfg.name.clone(),
            identity: identity(cfg),
            carrier_off: false,
            keepalive: cfg.keepalive,
            up: true,
            since: now,
            seen: 0,
            seen_at: None,
        }
    }
}

/// The liveness of a new tunnel list: a tunnel that stays (same name,
/// keepalive, endpoints and key) keeps what was known of it; one that
/// changed starts afresh, but remembers whether its carrier is off
/// ([`Gateway::sync_carriers`] puts it right).
pub(super) fn carry_over(
    old: &[Live],
    tunnels: &[crate::control::config::TunnelConfig],
    now: u32,
) -> Vec<Live> {
    let by_name: std::collections::HashMap<&str, &Live> =
        old.iter().map(|l| (l.name.as_str(), l)).collect();
    tunnels
        .iter()
        .map(|t| {
            let before = by_name.get(t.name.as_str()).copied();
            match before {
                Some(l) if l.identity == identity(t) => l.clone(),
                Some(l) => Live {
                    carrier_off: l.carrier_off,
                    ..Live::new(t, now)
                },
                None => Live::new(t, now),
            }
        })
        .collect()
}

impl Gateway {
    pub(super) fn new_liveness(&self) -> Vec<Live> {
        let now = crate::io::clock::now();
        self.slots.iter().map(|s| Live::new(&s.cfg, now)).collect()
    }

    /// Reads the workers' counters and decides each tunnel's state.
    pub(super) fn watch_liveness(&mut self) {
        let now = crate::io::clock::now();
        let counters: Vec<_> = self.workers.iter().map(|w| w.stats.tunnels()).collect();
        for i in 0..self.liveness.len().min(self.slots.len()) {
            let sum = |f: &dyn Fn(
                &crate::telemetry::stats::TunnelCounters,
            ) -> &Vec<std::sync::atomic::AtomicU64>| {
                counters
                    .iter()
                    .map(|c| f(c).get(i).map_or(0, |a| a.load(Relaxed)))
                    .sum::<u64>()
            };
            let seen = sum(&|c| &c.rx_packets) + sum(&|c| &c.keepalive_replies);
            let reply_at = counters
                .iter()
                .filter_map(|c| c.keepalive_reply_at.get(i).map(|a| a.load(Relaxed)))
                .max()
                .unwrap_or(0);
            let live = &mut self.liveness[i];
            if seen != live.seen {
                live.seen = seen;
                live.seen_at = Some(now);
            }
            let Some(k) = live.keepalive else { continue };
            // The last reply (stamped as seconds + 1), or the start.
            let last = if reply_at > 0 {
                (reply_at - 1) as u32
            } else {
                live.since
            }
            .max(live.since);
            let up = now.saturating_sub(last) < k.dead_after();
            if up == live.up {
                continue;
            }
            live.up = up;
            let slot = &self.slots[i];
            if up {
                self.events.tunnel_up += 1;
                tracing::info!(tunnel = %slot.cfg.name, remote = %slot.cfg.remote, "tunnel up: its keepalives are answered again");
            } else {
                self.events.tunnel_down += 1;
                tracing::warn!(tunnel = %slot.cfg.name, remote = %slot.cfg.remote, "tunnel down: no keepalive answered for {} s ({} x {} s)", k.dead_after(), k.misses, k.interval);
            }
            self.sync_carrier(i);
        }
    }

    /// Sets tunnel `i`'s device carrier to what it should be: off while
    /// the tunnel is down and `carrier_follows`, on otherwise (and on again
    /// if the gateway turned it off before a reload changed the tunnel).
    fn sync_carrier(&mut self, i: usize) {
        let (Some(slot), Some(live)) = (self.slots.get(i), self.liveness.get_mut(i)) else {
            return;
        };
        let off = slot.cfg.carrier_follows && live.keepalive.is_some() && !live.up;
        if off == live.carrier_off {
            return;
        }
        match self.nl.set_carrier(&slot.link, !off) {
            Ok(()) => live.carrier_off = off,
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// [`Gateway::sync_carrier`] for every tunnel (after a reload).
    pub(super) fn sync_carriers(&mut self) {
        for i in 0..self.slots.len() {
            self.sync_carrier(i);
        }
    }

    /// Adds each tunnel's state to a snapshot's `tunnels[]`: `state`
    /// ("up", "down", or null without keepalives) and `idle_seconds` (since
    /// anything last arrived on it; null: nothing yet).
    pub(super) fn liveness_into(&self, snap: &mut serde_json::Value) {
        let now = crate::io::clock::now();
        let Some(tunnels) = snap["tunnels"].as_array_mut() else {
            return;
        };
        for (t, live) in tunnels.iter_mut().zip(&self.liveness) {
            t["state"] = match (live.keepalive, live.up) {
                (None, _) => serde_json::Value::Null,
                (Some(_), true) => "up".into(),
                (Some(_), false) => "down".into(),
            };
            t["idle_seconds"] = live.seen_at.map(|at| now.saturating_sub(at)).into();
        }
    }
}
