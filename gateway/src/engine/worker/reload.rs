//! The switch to a new tunnel list: finish with the old devices (reads
//! cancelled and sent, writes waited for, hand-overs answered), then
//! switch; and a device deleted from under the gateway.

use super::*;

impl<S: Socket> Worker<S> {
    /// The device of tunnel `tag` failed under us (most likely deleted):
    /// stop using it and tell the control thread, which opens a new queue.
    pub(super) fn device_gone(&mut self, st: &mut State<S::Frame>, tag: u16) {
        let t = usize::from(tag & !(REPLY | REPLY_ICMP));
        if let Some(g) = st.gone.get_mut(t) {
            if !*g {
                *g = true;
                // Our queue is dead: a reload that keeps this device keeps
                // it gone, until the control thread opens a new one. (The
                // registered file holds its own reference meanwhile.)
                self.devices[t] = None;
                if let Some(f) = self.tunnel_counters.device_failed.get(t) {
                    f.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Switches to a new tunnel list (see [`Reconfig`]).
    pub(super) fn reconfigure<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        r: Reconfig,
    ) -> Result<(), WorkerError> {
        // A device that stays in its slot (the same queue, the same tunnel
        // number) keeps its read armed through the switch: its packets are
        // taken with the list in force when they are read. Every other slot
        // (a device removed, new, or moved to another number) is finished
        // with: its read cancelled, and packets read before the cancel
        // encapsulated and sent with the old list. Every write is waited for
        // (its completion counts against a tunnel by number); answers they
        // produce (ARP, ICMP) are written and waited for in the next round.
        // Writes handed to other workers come back first (written, or to
        // be written here); what others hand over meanwhile is written
        // with the old list, and after the switch sent back to them.
        let old_len = self.devices.len();
        let ntun = r.devices.len();
        let stays: Vec<bool> = (0..old_len.max(ntun))
            .map(|i| {
                matches!(r.devices.get(i), Some(DeviceQueue::Keep(j)) if *j == i)
                    && self.devices.get(i).is_some_and(Option::is_some)
            })
            .collect();
        let changed: Vec<u32> = (0..stays.len() as u32)
            .filter(|&i| !stays[i as usize])
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            // Reads of the old devices are sent before the list changes.
            self.process_reads(io, st, true)?;
            self.spread_poll(io, st)?;
            self.spread_flush(st);
            let mut rest = Vec::new();
            io.settle(&changed, |c| rest.push(c))
                .map_err(self.io_err("finishing with the old devices"))?;
            let mut spread_done =
                st.frames.at_peers == 0 && st.spread.as_ref().is_none_or(Link::sent);
            if !spread_done
                && (std::time::Instant::now() > deadline
                    || self.shared.stop.load(Ordering::Relaxed))
            {
                // Another worker does not answer (it died, or is stopping):
                // switch anyway; what it answers later is of the old list
                // and is not written or counted against a tunnel of the
                // new one (see `spread_poll`).
                tracing::warn!(
                    queue = self.queue,
                    frames = st.frames.at_peers,
                    "reload: writes handed to another worker unanswered"
                );
                spread_done = true;
            }
            // Reads of devices that stay do not hold the switch up (their
            // traffic may never pause); anything else must be seen to.
            let holding = rest.iter().any(|c| {
                !(c.op == Op::Read && stays.get(usize::from(c.tag)).copied().unwrap_or(false))
            });
            for c in rest {
                self.completed(c, io, st)?;
            }
            if !holding && spread_done {
                break;
            }
            if !spread_done {
                std::thread::yield_now();
            }
        }
        let mut old = std::mem::take(&mut self.devices);
        self.devices = r
            .devices
            .into_iter()
            .map(|d| match d {
                DeviceQueue::Keep(i) => old.get_mut(i).and_then(Option::take),
                DeviceQueue::New(fd) => Some(fd),
            })
            .collect();
        let ntun = self.devices.len();
        let fds = raw_fds(&self.devices);
        let swap: Vec<(u32, RawFd)> = changed
            .iter()
            .map(|&s| (s, fds.get(s as usize).copied().unwrap_or(-1)))
            .collect();
        let result = io.replace_files(&swap);
        // The old queues not carried over close here.
        drop(old);
        if let Err(e) = result {
            let _ = r.done.send(Err(format!("queue {}: {e}", self.queue)));
            return Err(WorkerError::Io {
                queue: self.queue,
                what: "replacing io_uring files",
                io: e,
            });
        }
        st.gone = self.devices.iter().map(Option::is_none).collect();
        // Keepalives: tunnels that stay with the same keepalive keep their
        // schedule; new ones, and ones whose keepalive changed (a shorter
        // interval must not wait out the old one), send at once.
        let old_due = std::mem::take(&mut st.keepalive_due);
        let (old_tx, new_tx) = (&self.shared.tunnels.tx, &r.tunnels.tx);
        st.keepalive_due = r
            .counters_from
            .iter()
            .enumerate()
            .map(|(new, o)| {
                o.filter(|&old| {
                    old_tx.get(old).map(|t| t.keepalive) == new_tx.get(new).map(|t| t.keepalive)
                })
                .and_then(|i| old_due.get(i).copied())
                .unwrap_or(0)
            })
            .collect();
        st.local.remap_tunnels(&r.counters_from);
        // Sequence numbers expected go on for tunnels that stay.
        let old_seq = std::mem::take(&mut st.rx.next_seq);
        st.rx.next_seq = r
            .counters_from
            .iter()
            .map(|o| o.and_then(|i| old_seq.get(i).copied()).unwrap_or(0))
            .collect();
        self.shared.tunnels = r.tunnels;
        self.tunnel_counters = Arc::new(TunnelCounters::new(ntun));
        // Frames moved while the old devices were finished with.
        st.frames.free = (self.free.len() + st.tx_pending.len() + st.tx_control.len()) as u64;
        st.frames.in_flight = io.in_flight() as u64;
        self.publish(st);
        self.stats.set_tunnels(self.tunnel_counters.clone());
        let _ = r.done.send(Ok(()));
        Ok(())
    }
}
