//! Watching what the gateway stands on: the underlay link (up, down, its
//! MAC and MTU), the XDP program still attached, and the devices still
//! there (re-created when deleted).

use super::*;

impl Gateway {
    /// Looks at the underlay, the XDP attachment and the devices.
    pub(super) fn watch(&mut self) -> anyhow::Result<()> {
        let iface = self.iface.clone();
        let link = match self.nl.link(&iface) {
            Ok(Some(l)) => l,
            Ok(None) => bail!("{iface} disappeared; the gateway cannot go on without its underlay"),
            Err(e) => {
                tracing::warn!("{e}");
                return Ok(());
            }
        };
        // The underlay's MAC: the outer source, and what the XDP program
        // takes as ours.
        if let Some(m) = link.mac {
            if Some(m) != self.underlay.mac {
                tracing::info!(
                    "{iface} changed its MAC to {}",
                    crate::control::neighbour::format_mac(&m)
                );
                self.tunnels.next_hops.set_local(m);
            }
            // Until the program holds it everywhere (a failed set_mac is
            // tried again at the next look, whatever the MAC is by then):
            // a slot left with another MAC would take frames sent to it.
            if self.steering.mac_applied() != Some(m) {
                if let Err(e) = self.steering.set_mac(m) {
                    tracing::warn!("{e}; trying again");
                }
            }
        }
        if link.up != self.underlay.up {
            if link.up {
                tracing::info!("{iface} is up again; tunnel traffic resumes");
            } else {
                self.events.underlay_down += 1;
                tracing::warn!("{iface} went down; no tunnel traffic until it is up");
            }
        }
        // Our XDP program, still attached? Reported at each change.
        if link.xdp_prog != self.xdp_seen {
            let ours = self.xdp_id == Some(link.xdp_prog);
            if ours {
                tracing::info!("the gateway's XDP program is attached to {iface} again");
            } else {
                if self.xdp_attached {
                    self.events.xdp_lost += 1;
                }
                if link.xdp_prog == 0 {
                    tracing::error!("the gateway's XDP program was detached from {iface} by something else; tunnel packets now go to the kernel; restart the gateway to attach it again");
                } else {
                    tracing::error!("another XDP program (id {}) is attached to {iface} in place of the gateway's; tunnel packets now go to it; detach it and restart the gateway", link.xdp_prog);
                }
            }
            self.xdp_attached = ours;
            self.xdp_seen = link.xdp_prog;
        }
        self.underlay = link;

        // Devices deleted from under us (or failing) come back.
        let failed: Vec<bool> = {
            let counters: Vec<_> = self.workers.iter().map(|w| w.stats.tunnels()).collect();
            (0..self.slots.len())
                .map(|i| {
                    counters.iter().any(|c| {
                        c.device_failed
                            .get(i)
                            .is_some_and(|f| f.load(Ordering::Relaxed))
                    })
                })
                .collect()
        };
        // Every device's index in one dump (not one request per device).
        let links = match self.nl.links() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        };
        for (i, &failed) in failed.iter().enumerate() {
            let s = &self.slots[i];
            let present = links.as_ref().is_none_or(|l| {
                l.get(&s.cfg.device)
                    .is_some_and(|l| l.index == s.link.index)
            });
            if present && !failed {
                continue;
            }
            if self.recreate_failed[i].is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            let name = s.cfg.name.clone();
            let device = s.cfg.device.clone();
            let what = if present { "failed" } else { "was deleted" };
            match self.apply(self.cfg.clone(), Some(i)) {
                Ok(_) => {
                    self.events.devices_recreated += 1;
                    tracing::warn!(tunnel = %name, "device {device} {what} under the gateway; opened it again");
                }
                Err(ReloadError::Refused(e)) => {
                    if self.recreate_failed[i].is_none() {
                        tracing::error!(tunnel = %name, "device {device} {what} and cannot be opened again yet: {e:#}");
                    }
                    self.recreate_failed[i] = Some(std::time::Instant::now());
                }
                Err(ReloadError::Fatal(e)) => return Err(e),
            }
            // The slots changed; look again next time.
            break;
        }
        Ok(())
    }
}
