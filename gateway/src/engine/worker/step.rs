//! The loop: one iteration at a time ([`Running::step`]), and the end
//! ([`Running::finish`]).

use super::*;

impl<S: Socket, D: Devices<S::Frame>> Running<S, D> {
    /// One iteration of the loop: completions, a batch from the RX ring,
    /// the TX ring, reads and the fill ring, then (when nothing moved) the
    /// poll mode's wait. False: the stop flag is set.
    #[inline]
    pub fn step(&mut self) -> Result<bool, WorkerError> {
        let Running {
            w,
            io,
            st,
            rx,
            done,
            idle,
            t0,
            busy_polls,
        } = self;
        // 0. A new tunnel list from the control thread (looked for every
        // CONTROL_EVERY iterations under load, every one when idle).
        if *idle > 0 || st.loops.is_multiple_of(CONTROL_EVERY) {
            // (Under load too: a worker that never idles must stop.)
            if w.shared.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            if !w.shared.control.is_empty() {
                if let Ok(r) = w.shared.control.try_recv() {
                    w.reconfigure(io, st, r)?;
                }
            }
        }

        // The coarse clock, once per iteration, for what the way out
        // times (path MTU expiry, the ICMP budget).
        st.tx_cx.now = crate::io::clock::now();
        // Captures and traces started or stopped.
        st.tap.refresh();
        if w.settings.keepalives {
            w.keepalives(st);
        }

        // 1. io_uring completions: finished writes and reads.
        io.run_task_work().map_err(w.io_err("io_uring task work"))?;
        io.reap(|c| done.push(c));
        let mut progressed = !done.is_empty();
        for c in done.drain(..) {
            w.completed(c, io, st)?;
        }
        // Writes other workers handed over, and their answers.
        if st.spread.is_some() {
            progressed |= w.spread_poll(io, st)?;
        }

        // 2. Inbound batch.
        let n = w.xsk.receive(rx, w.settings.batch);
        if n > 0 {
            st.frames.in_kernel -= n as u64;
            st.local.rx_frames += n as u64;
            st.local.batches += 1;
            if st.local.rx_frames >= w.settings.faults.panic_after_rx {
                panic!("fault injection: GATEWAY_FAULT_PANIC_AFTER_RX reached");
            }
            for frame in rx.drain(..) {
                w.receive_one(io, st, frame)?;
            }
            while let Some(last) = st.gro.len().checked_sub(1) {
                w.flush_run(io, st, last)?;
            }
        }
        st.loops = st.loops.wrapping_add(1);
        if st.loops.is_multiple_of(EXPIRE_EVERY) {
            let stale = st.reasm.expire(crate::io::clock::now());
            for _ in 0..stale {
                st.local.drop(DropReason::FragmentTimeout);
            }
            st.local.fragments_pending = st.reasm.pending();
        }

        // 3. Outbound: hand encapsulated frames to the TX ring, take
        // back the ones it has sent.
        let completed = w.xsk.complete(&mut w.free);
        st.frames.in_tx -= completed as u64;
        if !st.deferred.is_empty() {
            w.process_reads(io, st, false)?;
        }
        if !st.tx_control.is_empty() {
            let sent = w
                .xsk
                .transmit(&mut st.tx_control, st.frames.in_tx)
                .map_err(w.io_err("TX kick"))?;
            st.frames.in_tx += sent as u64;
        }
        let sent = w
            .xsk
            .transmit(&mut st.tx_pending, st.frames.in_tx)
            .map_err(w.io_err("TX kick"))?;
        st.frames.in_tx += sent as u64;

        // 4. Reads back on every device first, then the fill ring topped
        // up with the rest. In that order: under overload the fill ring
        // would take every free frame, starve the reads, and the
        // replies the kernel sends into the devices would be lost
        // (seen in the bench: 2k of 650k answered).
        w.post_reads(io, st);
        let filled = w.xsk.fill(&mut w.free, st.tx_reserve);
        st.frames.in_kernel += filled as u64;
        if filled > 0 || n == 0 {
            w.xsk
                .wake_fill_if_needed()
                .map_err(w.io_err("fill-ring wakeup"))?;
        }
        io.submit().map_err(w.io_err("io_uring submit"))?;
        w.spread_flush(st);

        st.frames.free = (w.free.len() + st.tx_pending.len() + st.tx_control.len()) as u64;
        st.frames.in_flight = io.in_flight() as u64;
        let t1 = std::time::Instant::now();
        let spent = t1.duration_since(*t0).as_nanos() as u64;
        *t0 = t1;
        if n > 0 || progressed || sent > 0 || completed > 0 {
            *idle = 0;
            st.local.busy_polls += 1;
            st.local.busy_ns += spent;
            // The counters: every PUBLISH_EVERY iterations under load,
            // and on the first idle one.
            *busy_polls = busy_polls.wrapping_add(1);
            if busy_polls.is_multiple_of(PUBLISH_EVERY) {
                w.publish(st);
            }
            // The kernel's counters of the socket too, now and then: a
            // worker under a steady flood never idles, and its socket's
            // drops would otherwise show only once the flood ends.
            if busy_polls.is_multiple_of(XSK_REFRESH_BUSY) {
                w.refresh_xsk_stats();
            }
            return Ok(true);
        }
        st.local.idle_ns += spent;
        if *idle == 0 {
            w.publish(st);
        }

        *idle = idle.wrapping_add(1);
        st.local.idle_polls += 1;
        if w.shared.stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if idle.is_multiple_of(IDLE_REFRESH) {
            w.publish(st);
            w.refresh_xsk_stats();
        }
        match w.settings.poll {
            PollMode::Busy => {
                // Kernel work this core owes (softirq processing
                // deferred to ksoftirqd: the tap's backlog, veth NAPI)
                // would otherwise wait a whole scheduler slice behind
                // this spinning thread; let it run when idle.
                if idle.is_multiple_of(BUSY_YIELD_EVERY) {
                    std::thread::yield_now();
                } else if w.settings.busy_poll {
                    w.xsk.busy_poll();
                } else {
                    std::hint::spin_loop();
                }
            }
            PollMode::Adaptive => {
                if *idle >= ADAPTIVE_SPINS
                    && st.writes_in_flight == 0
                    && st.tx_pending.is_empty()
                    && st.tx_control.is_empty()
                    && st.frames.in_tx == 0
                    && st.frames.at_peers == 0
                    && st.jobs_in.iter().all(|q| q.is_empty())
                    && st.spread.as_ref().is_none_or(|l| l.sent() && l.may_sleep())
                {
                    w.publish(st);
                    w.refresh_xsk_stats();
                    st.local.sleeps += 1;
                    // Wake on received packets, on io_uring completions
                    // (a read from a device finishing) or on writes
                    // another worker hands over.
                    let wake = st.spread.as_ref().map_or(-1, Link::wake_fd);
                    let _ =
                        crate::io::wait_readable(&[w.xsk.fd(), io.fd(), wake], ADAPTIVE_SLEEP_MS);
                    if let Some(link) = &st.spread {
                        link.woke();
                    }
                    // The sleep is idle time, whatever the next
                    // iteration finds.
                    let now = std::time::Instant::now();
                    st.local.idle_ns += now.duration_since(*t0).as_nanos() as u64;
                    *t0 = now;
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        Ok(true)
    }

    /// Ends the loop: hands back what other workers handed over, cancels
    /// the reads, waits for the writes and takes every frame back.
    pub fn finish(self) -> Result<(), WorkerError> {
        let Running {
            mut w,
            mut io,
            mut st,
            ..
        } = self;
        let (io, st) = (&mut io, &mut st);
        // Every write handed over comes back, and every other worker's is
        // written, before the ring goes.
        if st.spread.is_some() {
            w.spread_stop(io, st)?;
        }
        // Cancel the reads, wait for the writes, take every frame back.
        let mut rest = Vec::new();
        io.drain(|c| rest.push(c))
            .map_err(w.io_err("draining io_uring"))?;
        for c in rest {
            w.account_drained(c, st);
        }
        // Packets read and not yet sent: counted as read and dropped.
        while let Some((_, bid, _)) = st.deferred.pop_front() {
            st.local.tx_read += 1;
            st.local.drop(DropReason::TxShutdown);
            io.release_read(bid);
        }
        // Frames still waiting for TX room are not sent.
        let pending = st.tx_pending.len();
        w.free.append(&mut st.tx_pending);
        st.local.tx_sent = st.local.tx_sent.saturating_sub(pending as u64);
        for _ in 0..pending {
            st.local.drop(DropReason::TxShutdown);
        }
        // Keepalives (reflected: counted on the way in; probes: counted
        // as sent only once built) not sent: their frames go home.
        w.free.append(&mut st.tx_control);
        st.frames.in_tx -= w.xsk.complete(&mut w.free) as u64;
        st.frames.free = w.free.len() as u64;
        st.frames.in_flight = io.in_flight() as u64;
        w.publish(st);
        w.refresh_xsk_stats();
        Ok(())
    }
}
