//! The reload transaction: the new configuration checked, new devices
//! opened and changed ones adjusted, the XDP endpoint table updated, every
//! worker switched; on a failure before the switch, everything put back.

use super::*;
use std::collections::{HashMap, HashSet};

/// A change a reload made to a device it carries over, and how to put it
/// back.
pub(super) enum DeviceChange {
    /// The MTU it had.
    Mtu(LinkInfo, u16),
    /// An address added (to remove).
    AddressAdded(LinkInfo, IpAddr),
    /// An address and peer removed (to add back).
    AddressRemoved(LinkInfo, IpAddr, IpAddr),
    /// The persistence it had.
    Persistent(TunnelConfig, bool),
}

/// What a reload changed before it could fail.
#[derive(Default)]
pub(super) struct Undo {
    endpoints_added: Vec<EndpointKey>,
    endpoints_removed: Vec<EndpointKey>,
    devices: Vec<DeviceChange>,
}

/// Why a reload did not happen.
pub(super) enum ReloadError {
    /// Refused before anything changed: the running configuration stays.
    Refused(anyhow::Error),
    /// A worker did not take the new list; the gateway must stop.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for ReloadError {
    fn from(e: anyhow::Error) -> Self {
        ReloadError::Refused(e)
    }
}

/// The first `[gateway]` setting that differs (they need a restart).
pub(super) fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    [
        ("iface", old.iface != new.iface),
        ("queues", old.queues != new.queues),
        ("cores", old.cores != new.cores),
        ("batch_size", old.batch_size != new.batch_size),
        (
            "busy_poll_budget",
            old.busy_poll_budget != new.busy_poll_budget,
        ),
        ("spread_writes", old.spread_writes != new.spread_writes),
        ("poll", old.poll != new.poll),
        ("xdp_mode", old.xdp_attach != new.xdp_attach),
        ("xsk_bind", old.xsk_bind != new.xsk_bind),
        (
            "frames_per_queue",
            old.frames_per_queue != new.frames_per_queue,
        ),
        ("ring_size", old.ring_size != new.ring_size),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(f, _)| f)
}

#[derive(Default)]
pub(super) struct Summary {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    unchanged: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added {}; removed {}; changed {}; {} unchanged",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            self.unchanged
        )
    }
}

impl Gateway {
    /// Reads the configuration again and applies it. The answer is one
    /// line: what changed, or why nothing did. Errs only when the gateway
    /// cannot go on.
    pub(super) fn reload_from(&mut self, path: &Path) -> anyhow::Result<String> {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                self.events.reload_failures += 1;
                let line = format!("error: reload refused, the running configuration stays: {e}");
                tracing::error!("{line}");
                return Ok(line);
            }
        };
        match self.apply(new, None) {
            Ok(summary) => {
                self.events.reloads += 1;
                let line = format!("reloaded {}: {summary}", path.display());
                tracing::info!("{line}");
                Ok(line)
            }
            Err(ReloadError::Refused(e)) => {
                self.events.reload_failures += 1;
                let line = format!("error: reload refused, the running configuration stays: {e:#}");
                tracing::error!("{line}");
                Ok(line)
            }
            Err(ReloadError::Fatal(e)) => Err(e),
        }
    }

    /// Switches to `new`. Devices of tunnels that keep their device stay
    /// open (their workers never stop reading them); `renew` names a
    /// tunnel whose device must be opened afresh (it was deleted).
    pub(super) fn apply(
        &mut self,
        new: Config,
        renew: Option<usize>,
    ) -> Result<String, ReloadError> {
        if let Some(field) = restart_only_change(&self.cfg, &new) {
            return Err(anyhow!(
                "gateway.{field} changed, and [gateway] settings take effect only when the gateway restarts; restart it, or reload with the old value"
            )
            .into());
        }
        if self.cfg.anycast != new.anycast {
            return Err(anyhow!(
                "[anycast] changed, and it takes effect only when the gateway restarts (drain it first: gateway drain); restart it, or reload with the old value"
            )
            .into());
        }
        if new.tunnels.len() > self.file_slots as usize {
            return Err(anyhow!(
                "{} tunnels, and this gateway started with room for {} (RLIMIT_NOFILE was {} when it started); raise the limit (LimitNOFILE= in the service, `ulimit -n` as root) and restart, or configure fewer tunnels",
                new.tunnels.len(), self.file_slots, self.file_slots
            )
            .into());
        }
        // Which running tunnel each new one continues, by device. (Maps
        // by device and name keep a reload linear in the tunnels.)
        let by_device: HashMap<&str, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(j, s)| (s.cfg.device.as_str(), j))
            .collect();
        let by_name: HashMap<String, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(j, s)| (s.cfg.name.clone(), j))
            .collect();
        let mut reuse: Vec<Option<usize>> = Vec::with_capacity(new.tunnels.len());
        for t in &new.tunnels {
            tunnel_mtu(t, self.underlay.mtu)?;
            let old = by_device
                .get(t.device.as_str())
                .copied()
                .filter(|&j| Some(j) != renew);
            if let Some(j) = old {
                if self.slots[j].cfg.device_kind != t.device_kind {
                    return Err(anyhow!(
                        "tunnel \"{}\": device {} would change from {} to {}; remove the tunnel in one reload and add it back in the next, or restart",
                        t.name, t.device, self.slots[j].cfg.device_kind, t.device_kind
                    )
                    .into());
                }
            }
            reuse.push(old);
        }

        // Open the new devices; on failure close what was opened.
        let workers = self.workers.len();
        let opening = reuse.iter().filter(|r| r.is_none()).count();
        ensure_open_files(self.slots.len() + opening, workers)?;
        let mut opened: Vec<Option<(Slot, Vec<OwnedFd>)>> = Vec::new();
        let mut next_peer = self.next_peer;
        for (t, r) in new.tunnels.iter().zip(&reuse) {
            if r.is_some() {
                opened.push(None);
                continue;
            }
            match open_slot(&self.nl, t, self.underlay.mtu, workers, next_peer) {
                Ok(o) => {
                    next_peer += 1;
                    opened.push(Some(o));
                }
                Err(e) => {
                    for (s, _) in opened.into_iter().flatten() {
                        s.release(&self.nl);
                    }
                    return Err(e.into());
                }
            }
        }

        // The new slots. A device opened again (`renew`) stays ours if it
        // was, but only once the reload has gone through: until then a
        // failure must not delete a device the workers still use.
        let mut slots = Vec::with_capacity(new.tunnels.len());
        let mut queues: Vec<Option<Vec<OwnedFd>>> = Vec::with_capacity(new.tunnels.len());
        let mut renewed_created = None;
        for (i, ((t, r), o)) in new.tunnels.iter().zip(&reuse).zip(opened).enumerate() {
            match (r, o) {
                (Some(j), _) => {
                    let old = &self.slots[*j];
                    slots.push(Slot {
                        cfg: t.clone(),
                        mtu: tunnel_mtu(t, self.underlay.mtu)?,
                        link: old.link.clone(),
                        created: old.created,
                        device_mac: old.device_mac,
                        peer_mac: old.peer_mac,
                        // The numbering goes on across a reload.
                        oseq: t.oseq.then(|| {
                            old.oseq
                                .clone()
                                .unwrap_or_else(|| Arc::new(AtomicU32::new(0)))
                        }),
                        // The path is the same as long as the endpoints are.
                        path_mtu: if (old.cfg.local, old.cfg.remote) == (t.local, t.remote) {
                            old.path_mtu.clone()
                        } else {
                            Default::default()
                        },
                        ident: path_ident(t.local, t.remote),
                    });
                    queues.push(None);
                }
                (None, Some((slot, q))) => {
                    if let Some(old) = renew.and_then(|j| self.slots.get(j)) {
                        if old.cfg.device == slot.cfg.device && old.created {
                            renewed_created = Some(i);
                        }
                    }
                    slots.push(slot);
                    queues.push(Some(q));
                }
                (None, None) => unreachable!("a tunnel not carried over was opened"),
            }
        }

        // Everything below that can fail is undone when it does, so a
        // refused reload leaves the host as it found it.
        let mut undo = Undo::default();
        let result = self.prepare(&slots, &reuse, &mut undo);
        let tunnels = match result {
            Ok(t) => t,
            Err(e) => {
                self.undo(undo);
                for (s, q) in slots.iter().zip(&queues) {
                    if q.is_some() {
                        s.release(&self.nl);
                    }
                }
                return Err(e.into());
            }
        };
        if let Some(i) = renewed_created {
            slots[i].created = true;
        }
        let next_hops = tunnels.next_hops.clone();

        // Switch the workers, all of them, then tidy up.
        let counters_from: Vec<Option<usize>> = slots
            .iter()
            .map(|s| by_name.get(s.cfg.name.as_str()).copied())
            .collect();
        let (done_tx, done_rx) = crossbeam::channel::unbounded();
        let mut fatal = None;
        for w in &self.workers {
            let devices = reuse
                .iter()
                .zip(queues.iter_mut())
                .map(|(r, q)| match (r, q) {
                    (Some(j), _) => DeviceQueue::Keep(*j),
                    (None, Some(q)) => DeviceQueue::New(q.pop().expect("one queue per worker")),
                    (None, None) => unreachable!(),
                })
                .collect();
            let msg = Reconfig {
                tunnels: tunnels.clone(),
                devices,
                counters_from: counters_from.clone(),
                done: done_tx.clone(),
            };
            if w.control.send(msg).is_err() {
                fatal = Some(anyhow!("a worker stopped during a reload"));
                break;
            }
        }
        if fatal.is_none() {
            for _ in &self.workers {
                match done_rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        fatal = Some(anyhow!("reload: {e}"));
                        break;
                    }
                    Err(_) => {
                        fatal = Some(anyhow!(
                            "reload: a worker did not take the new tunnels within 5 s"
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(e) = fatal {
            // The gateway stops; the devices this reload made go too.
            for (s, q) in slots.into_iter().zip(&queues) {
                if q.is_some() {
                    self.orphans.push(s);
                }
            }
            return Err(ReloadError::Fatal(e));
        }
        {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            *t = Targets {
                remotes: slots
                    .iter()
                    .map(|s| (s.cfg.name.clone(), s.cfg.remote))
                    .collect(),
                hops: next_hops,
            };
        }
        let mut summary = Summary::default();
        let mut reused = vec![false; self.slots.len()];
        for &j in reuse.iter().flatten() {
            reused[j] = true;
        }
        let new_names: HashSet<&str> = new.tunnels.iter().map(|t| t.name.as_str()).collect();
        for (j, old) in self.slots.iter().enumerate() {
            if !reused[j] {
                if Some(j) != renew {
                    old.release(&self.nl);
                }
                if !new_names.contains(old.cfg.name.as_str()) {
                    summary.removed.push(old.cfg.name.clone());
                }
            }
        }
        for s in &slots {
            match by_name.get(s.cfg.name.as_str()).map(|&j| &self.slots[j]) {
                None => summary.added.push(s.cfg.name.clone()),
                Some(o) if o.cfg != s.cfg || o.link.index != s.link.index => {
                    summary.changed.push(s.cfg.name.clone())
                }
                Some(_) => summary.unchanged += 1,
            }
        }
        self.recreate_failed = slots.iter().map(|_| None).collect();
        let tunnels_cfg: Vec<_> = slots.iter().map(|s| s.cfg.clone()).collect();
        self.liveness = carry_over(&self.liveness, &tunnels_cfg, crate::io::clock::now());
        self.slots = slots;
        self.tunnels = tunnels;
        self.taps
            .set_tunnel_names(self.slots.iter().map(|s| s.cfg.name.clone()).collect());
        self.cfg = new;
        self.next_peer = next_peer;
        self.sync_carriers();
        Ok(summary.to_string())
    }

    /// The steps of a reload that can fail, each recorded in `undo`:
    /// endpoints in the XDP program (stale ones out first, so both lists
    /// need not fit in the table at once), then the settings of devices
    /// carried over. Returns the new tables.
    pub(super) fn prepare(
        &mut self,
        slots: &[Slot],
        reuse: &[Option<usize>],
        undo: &mut Undo,
    ) -> anyhow::Result<Tunnels> {
        // New tables; next hops carried over by remote so no packet waits
        // for resolution.
        let next_hops = Arc::new(NextHops::new(slots.len()));
        if let Some(m) = self.tunnels.next_hops.local() {
            next_hops.set_local(m);
        }
        let mut by_remote: HashMap<IpAddr, usize> = HashMap::new();
        for (j, o) in self.slots.iter().enumerate() {
            by_remote.entry(o.cfg.remote).or_insert(j);
        }
        for (i, s) in slots.iter().enumerate() {
            if let Some(&j) = by_remote.get(&s.cfg.remote) {
                next_hops.set(i, self.tunnels.next_hops.get(j));
            }
        }
        let tunnels = tunnels_of(slots, next_hops);
        let (new_rx, old_rx) = (tunnels.rx.clone(), self.tunnels.rx.clone());
        let stale: Vec<EndpointKey> = old_rx
            .endpoint_keys()
            .filter(|k| !new_rx.has_endpoint(k))
            .copied()
            .collect();
        let wanted: Vec<EndpointKey> = new_rx
            .endpoint_keys()
            .filter(|k| !old_rx.has_endpoint(k))
            .copied()
            .collect();
        for key in &stale {
            self.steering.remove_endpoint(key)?;
            undo.endpoints_removed.push(*key);
        }
        for key in &wanted {
            self.steering.add_endpoint(key)?;
            undo.endpoints_added.push(*key);
        }
        for (s, r) in slots.iter().zip(reuse) {
            let Some(j) = r else { continue };
            self.adjust_device(j.to_owned(), &s.cfg, s.mtu, undo)?;
        }
        Ok(tunnels)
    }

    /// Puts back what a refused reload changed, newest first.
    pub(super) fn undo(&mut self, undo: Undo) {
        for change in undo.devices.into_iter().rev() {
            let r = match change {
                DeviceChange::Mtu(link, mtu) => self
                    .nl
                    .set_up(&link, Some(u32::from(mtu)))
                    .map_err(anyhow::Error::from),
                DeviceChange::AddressAdded(link, a) => self
                    .nl
                    .del_peer_address(&link, a)
                    .map_err(anyhow::Error::from),
                DeviceChange::AddressRemoved(link, a, p) => self
                    .nl
                    .add_peer_address(&link, a, p)
                    .map_err(anyhow::Error::from),
                DeviceChange::Persistent(t, was) => set_persistent(&t, was),
            };
            if let Err(e) = r {
                tracing::warn!("putting a device back after a refused reload: {e:#}");
            }
        }
        for key in &undo.endpoints_added {
            if let Err(e) = self.steering.remove_endpoint(key) {
                tracing::warn!("{e}");
            }
        }
        for key in &undo.endpoints_removed {
            if let Err(e) = self.steering.add_endpoint(key) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Brings the device of running tunnel `j` in line with its new
    /// settings, recording each change in `undo`.
    pub(super) fn adjust_device(
        &self,
        j: usize,
        t: &TunnelConfig,
        mtu: u16,
        undo: &mut Undo,
    ) -> anyhow::Result<()> {
        let old = &self.slots[j];
        if mtu != old.mtu {
            self.nl.set_up(&old.link, Some(u32::from(mtu)))?;
            undo.devices
                .push(DeviceChange::Mtu(old.link.clone(), old.mtu));
        }
        if (t.address, t.peer) != (old.cfg.address, old.cfg.peer) {
            if let (Some(a), Some(p)) = (old.cfg.address, old.cfg.peer) {
                self.nl.del_peer_address(&old.link, a)?;
                undo.devices
                    .push(DeviceChange::AddressRemoved(old.link.clone(), a, p));
            }
            if let (Some(a), Some(p)) = (t.address, t.peer) {
                self.nl.add_peer_address(&old.link, a, p)?;
                undo.devices
                    .push(DeviceChange::AddressAdded(old.link.clone(), a));
            }
        }
        if t.persistent != old.cfg.persistent {
            set_persistent(t, t.persistent)?;
            undo.devices
                .push(DeviceChange::Persistent(t.clone(), old.cfg.persistent));
        }
        Ok(())
    }
}
