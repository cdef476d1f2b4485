//! Announcing the shared endpoint addresses (`[anycast]`), and draining.
//!
//! The gateway does not speak BGP: it puts the addresses on a tun device of
//! its own while it can carry traffic and takes them off when it cannot, and
//! the host's routing daemon announces what is there (BIRD's `protocol
//! direct`, FRR's `redistribute connected`; examples in `gateway/dist/`).
//! The gateway holds the device's only queue and the device is not
//! persistent, so when the process goes, however it goes, the kernel
//! deletes the device, its addresses and their routes, and the daemon
//! withdraws them: no health-check script to fail open.
//!
//! "Can carry traffic" is the alive checks (every worker running, the XDP
//! program attached) and the underlay up. It leaves out what `/readyz` asks
//! of each tunnel (its device, its next hop): one peer that is unreachable
//! must not withdraw the endpoint from every other peer.
//!
//! A drain (`gateway drain`, SIGUSR2) withdraws the addresses, makes
//! `/readyz` fail (for a daemon that follows it instead), and stops the
//! gateway once no packet has arrived on the drained tunnels for
//! `drain_quiet` (the routers have moved the peers to other gateways), or
//! after `drain_timeout`. Until then it carries what still arrives, so a
//! drain loses nothing the routers send it.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Gateway;
use crate::control::config::Anycast;
use crate::io::netlink::{LinkInfo, Netlink};
use crate::io::tap;
use crate::telemetry::metrics::Audience;

/// How long a starting gateway waits for its tunnels' next hops before it
/// announces anyway.
const FIRST_ANNOUNCE_WAIT: Duration = Duration::from_secs(5);

/// The device that carries the shared addresses, and whether they are on it.
pub(super) struct Announcer {
    cfg: Anycast,
    /// Until the first announcement: when the gateway started. The routers
    /// send it peers the moment it announces, so it first waits (a little)
    /// for every tunnel's next hop, or its first answers would find none.
    starting: Option<Instant>,
    /// The device's one queue: the device lives as long as this does.
    _queue: OwnedFd,
    link: LinkInfo,
    announced: bool,
    announcements: u64,
    withdrawals: u64,
    /// Times the device or its addresses were found gone while announced
    /// (deleted or flushed by someone else) and put back.
    restored: u64,
    /// When a failure was last logged (failures are retried every tick,
    /// and logged every 10 s).
    complained: Option<Instant>,
}

impl Announcer {
    /// Creates (or takes over) the device, not persistent, up, with none of
    /// the addresses on it yet.
    pub(super) fn open(cfg: &Anycast, nl: &Netlink) -> anyhow::Result<Announcer> {
        let dev = &cfg.device;
        // Someone else's (another gateway's, with the same anycast.device)
        // would be shared, and withdrawn under it: refused.
        if let Some(st) = nl.tun_state(dev)? {
            if st.queues > 0 {
                anyhow::bail!("anycast.device: {dev} is held by another process (another gateway?); give each gateway in this network namespace its own anycast.device");
            }
        }
        // Single-queue: a second opener gets EBUSY.
        let queue =
            tap::open_single_tun(dev).map_err(|e| anyhow::anyhow!("anycast.device: {dev}: {e}"))?;
        // A device left persistent by someone else would outlive us and
        // keep announcing: it goes with this process.
        tap::set_persistent(&queue, dev, false)
            .map_err(|e| anyhow::anyhow!("[anycast] device {dev}: {e}"))?;
        let link = nl
            .link(dev)?
            .ok_or_else(|| anyhow::anyhow!("[anycast] device {dev} vanished as it was made"))?;
        let mut a = Announcer {
            cfg: cfg.clone(),
            starting: Some(Instant::now()),
            _queue: queue,
            link,
            announced: true,
            announcements: 0,
            withdrawals: 0,
            restored: 0,
            complained: None,
        };
        // Nothing announced until the gateway runs.
        a.withdraw(nl)?;
        a.withdrawals = 0;
        nl.set_up(&a.link, None)?;
        Ok(a)
    }

    /// Whether the device is still there with the addresses it should
    /// have; puts back what someone else took away (an `ip link del`, an
    /// `ip addr flush`), and says so. Called every half second.
    pub(super) fn check(&mut self, nl: &Netlink) {
        let dev = self.cfg.device.clone();
        let link = match nl.link(&dev) {
            Ok(l) => l,
            Err(e) => return self.complain(&format!("anycast: looking at {dev}: {e}")),
        };
        if link.as_ref().is_none_or(|l| l.index != self.link.index) {
            // Deleted (perhaps re-created by someone else): ours again.
            let cfg = self.cfg.clone();
            let was = self.announced;
            match Announcer::open(&cfg, nl) {
                Ok(fresh) => {
                    tracing::warn!("anycast: {dev} was deleted by someone else; created again");
                    let (a, w, r) = (self.announcements, self.withdrawals, self.restored);
                    *self = fresh;
                    (self.announcements, self.withdrawals, self.restored) = (a, w, r + 1);
                    // Announced again by the next steering, if it should be.
                    if was {
                        self.withdrawals += 1;
                    }
                }
                Err(e) => self.complain(&format!(
                    "anycast: {dev} was deleted, and cannot be made again: {e:#}"
                )),
            }
            return;
        }
        if !self.announced {
            return;
        }
        match nl.has_addresses(&self.link, &self.cfg.addresses) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("anycast: an address was taken off {dev} by someone else; put back");
                self.restored += 1;
                if let Err(e) = self.put(nl) {
                    self.complain(&format!("anycast: putting back {}: {e:#}", self.list()));
                }
            }
            Err(e) => self.complain(&format!("anycast: looking at {dev}'s addresses: {e}")),
        }
    }

    fn complain(&mut self, what: &str) {
        if self
            .complained
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.complained = Some(Instant::now());
            tracing::error!("{what}");
        }
    }

    fn put(&self, nl: &Netlink) -> anyhow::Result<()> {
        for &a in &self.cfg.addresses {
            nl.add_peer_address(&self.link, a, a)?;
        }
        Ok(())
    }

    pub(super) fn announced(&self) -> bool {
        self.announced
    }

    pub(super) fn addresses(&self) -> &[IpAddr] {
        &self.cfg.addresses
    }

    fn list(&self) -> String {
        let v: Vec<String> = self.cfg.addresses.iter().map(|a| a.to_string()).collect();
        v.join(", ")
    }

    /// Puts every address on the device; announced only once all are (a
    /// failure is tried again at the next tick).
    pub(super) fn announce(&mut self, nl: &Netlink) -> anyhow::Result<()> {
        self.put(nl)?;
        if !self.announced {
            self.announcements += 1;
        }
        self.announced = true;
        self.starting = None;
        Ok(())
    }

    /// Takes every address off the device; withdrawn only once all are (a
    /// failure is tried again at the next tick, and at the stop).
    pub(super) fn withdraw(&mut self, nl: &Netlink) -> anyhow::Result<()> {
        for &a in &self.cfg.addresses {
            nl.del_peer_address(&self.link, a)?;
        }
        if self.announced {
            self.withdrawals += 1;
        }
        self.announced = false;
        Ok(())
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "device": self.cfg.device,
            "addresses": self.cfg.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "announced": self.announced,
            "announcements": self.announcements,
            "withdrawals": self.withdrawals,
            "restored": self.restored,
        })
    }
}

/// A drain under way.
pub(super) struct Drain {
    started: Instant,
    /// Packets received on the drained tunnels, when last looked at (a
    /// reload may carry fewer counters over: only growth counts), and when
    /// that figure last moved.
    seen: u64,
    moved: Instant,
    /// Packets that arrived since the drain began.
    since: u64,
    quiet: Duration,
    timeout: Duration,
    /// Whoever asked (`gateway drain`): told how it goes, and at the end
    /// that the gateway has stopped.
    pub(super) audience: Option<Audience>,
}

impl Drain {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "since_ms": self.started.elapsed().as_millis() as u64,
            "packets_since": self.since,
            "quiet_ms": self.moved.elapsed().as_millis() as u64,
        })
    }

    pub(super) fn started(&self) -> Instant {
        self.started
    }
}

impl Gateway {
    /// Announces or withdraws the shared addresses as the gateway can
    /// carry traffic or not. Called every control tick.
    pub(super) fn steer_announcement(&mut self) {
        let mut want = self.drain.is_none() && self.underlay.up && self.alive();
        let Some(a) = self.anycast.as_ref() else {
            return;
        };
        if let Some(since) = a.starting {
            let resolved = (0..self.slots.len()).all(|i| self.tunnels.next_hops.get(i).is_some());
            want &= resolved || since.elapsed() >= FIRST_ANNOUNCE_WAIT;
        }
        let Some(a) = self.anycast.as_mut() else {
            return;
        };
        if want == a.announced() {
            return;
        }
        let why = if self.drain.is_some() {
            "draining"
        } else if !self.underlay.up {
            "the underlay is down"
        } else {
            "the gateway is not alive (see /healthz)"
        };
        let list = a.list();
        let res = if want {
            a.announce(&self.nl)
        } else {
            a.withdraw(&self.nl)
        };
        self.readyz_cache = None;
        match (res, want) {
            (Ok(()), true) => tracing::info!(
                "anycast: {list} on {} (announced by the routing daemon)",
                self.cfg.anycast.as_ref().map_or("", |c| c.device.as_str())
            ),
            (Ok(()), false) => tracing::warn!("anycast: {list} withdrawn: {why}"),
            (Err(e), true) => a.complain(&format!("anycast: cannot announce {list}: {e:#}")),
            (Err(e), false) => a.complain(&format!("anycast: cannot withdraw {list}: {e:#}")),
        }
    }

    /// Packets received so far on the tunnels a drain waits on: those on
    /// the shared addresses, or every tunnel when there are none.
    fn drained_packets(&self) -> u64 {
        let shared = self.anycast.as_ref().map(|a| a.addresses());
        let ids: Vec<usize> = (0..self.tunnels.rx.len())
            .filter(|&i| {
                let t = self.tunnels.rx.get(i as u16);
                shared.is_none_or(|s| s.contains(&t.local))
            })
            .collect();
        self.workers
            .iter()
            .map(|w| {
                let c = w.stats.tunnels();
                ids.iter()
                    .map(|&i| c.rx_packets.get(i).map_or(0, |a| a.load(Relaxed)))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Begins a drain (once; asking again is answered with how it goes).
    pub(super) fn start_drain(&mut self, mut audience: Option<Audience>) {
        if let Some(d) = &self.drain {
            if let Some(a) = &mut audience {
                a.say(&format!(
                    "error: already draining for {:.1} s\n",
                    d.started.elapsed().as_secs_f64()
                ));
            }
            return;
        }
        let (quiet, timeout) = self
            .cfg
            .anycast
            .as_ref()
            .map_or((Duration::from_secs(2), Duration::from_secs(60)), |a| {
                (a.drain_quiet, a.drain_timeout)
            });
        let seen = self.drained_packets();
        let now = Instant::now();
        self.readyz_cache = None;
        self.drain = Some(Drain {
            started: now,
            seen,
            moved: now,
            since: 0,
            quiet,
            timeout,
            audience: None,
        });
        self.steer_announcement();
        let what = match &self.anycast {
            Some(a) if !a.announced() => format!("withdrew {} from {}", a.list(), a.cfg.device),
            Some(a) => format!("could not withdraw {} (see the log)", a.list()),
            None => "no [anycast] addresses to withdraw; /readyz fails from now".into(),
        };
        let msg = format!(
            "draining: {what}; stopping once no tunnel packet has arrived for {} s (at most {} s)",
            quiet.as_secs(),
            timeout.as_secs()
        );
        tracing::warn!("{msg}");
        if let Some(a) = &mut audience {
            a.say(&format!("{msg}\n"));
        }
        if let Some(d) = &mut self.drain {
            d.audience = audience;
        }
    }

    /// Whether a drain under way is over: quiet long enough, or out of
    /// time. Said in the log and to whoever asked.
    pub(super) fn drain_over(&mut self) -> bool {
        let now_seen = match &self.drain {
            Some(_) => self.drained_packets(),
            None => return false,
        };
        let Some(d) = self.drain.as_mut() else {
            return false;
        };
        if now_seen != d.seen {
            d.since += now_seen.saturating_sub(d.seen);
            d.seen = now_seen;
            d.moved = Instant::now();
        }
        let since = d.started.elapsed();
        let msg = if d.moved.elapsed() >= d.quiet && since >= d.quiet {
            format!(
                "drained after {:.1} s: {} packets arrived after the withdrawal, none for the last {} s; stopping",
                since.as_secs_f64(),
                d.since,
                d.quiet.as_secs()
            )
        } else if since >= d.timeout {
            format!(
                "drain timed out after {} s: packets still arrive ({} since the withdrawal); stopping anyway",
                d.timeout.as_secs(),
                d.since
            )
        } else {
            return false;
        };
        tracing::warn!("{msg}");
        if let Some(a) = &mut d.audience {
            a.say(&format!("{msg}\n"));
        }
        true
    }
}
