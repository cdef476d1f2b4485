//! The worker's side of the hand-over of device writes (see
//! [`crate::engine::handover`]): writing what others hand over, taking
//! back the answers, and the hand-over at the stop.

use super::*;

impl<S: Socket> Worker<S> {
    /// Writes the packets other workers handed to this one into this
    /// one's device queues, and takes back the answers to what this one
    /// handed over. Returns whether there was anything.
    pub(super) fn spread_poll<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
    ) -> Result<bool, WorkerError> {
        let Some(link) = st.spread.as_mut() else {
            return Ok(false);
        };
        let mut answers = std::mem::take(&mut st.answers_in);
        link.take_answers(&mut answers);
        link.take_jobs_into(&mut st.jobs_in);
        let any = !answers.is_empty() || st.jobs_in.iter().any(|q| !q.is_empty());
        let generation = self.shared.tunnels.generation;
        for r in answers.drain(..) {
            st.frames.at_peers -= r.frames();
            match r {
                // After a reload forced through (a worker did not answer
                // in 3 s), the tunnel index of an answer may name another
                // tunnel now: not written, or counted, as one.
                Returned::Bounced(j) if j.generation != generation => {
                    for _ in 0..j.packets {
                        st.local.drop(DropReason::ReloadStale);
                    }
                    self.take_back(io, Some(j.frame), j.rest);
                }
                Returned::Written(c, g) => {
                    let failed = c.result < 0 || c.result as u32 != c.expected;
                    if g == generation || failed {
                        account_write(&c, &mut st.local);
                    } else {
                        st.local.delivered += u64::from(c.packets);
                    }
                    self.take_back(io, c.frame, c.rest);
                }
                // Written here after all, in the order handed over.
                Returned::Bounced(j) => {
                    st.local.spread_bounced += u64::from(j.packets);
                    self.write_prepared(io, st, j)?;
                }
            }
        }
        st.answers_in = answers;
        let mut budget = st.jobs_per_poll;
        for from in 0..st.jobs_in.len() {
            while budget > 0 {
                let Some(j) = st.jobs_in[from].pop_front() else {
                    break;
                };
                if j.generation > generation {
                    // The sender is on a newer tunnel list already; this
                    // worker switches in a moment (the control thread sent
                    // it the list too). Its jobs wait, in order, until then.
                    st.jobs_in[from].push_front(j);
                    break;
                }
                budget -= 1;
                self.write_for(io, st, from, j, generation)?;
            }
        }
        Ok(any)
    }

    /// Writes a job worker `from` handed over (on this worker's list, or
    /// an older one: then it goes back).
    pub(super) fn write_for<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        from: usize,
        j: Job<S::Frame>,
        generation: u64,
    ) -> Result<(), WorkerError> {
        let t = usize::from(j.tunnel);
        let link = st.spread.as_mut().expect("spread is on");
        // An older list (this worker switched first; the sender writes its
        // jobs itself until it switches too), or no queue of this device
        // here: back to the sender, which writes it.
        if j.generation < generation || st.gone.get(t).is_none_or(|&g| g) {
            link.answer(from, Returned::Bounced(j));
            return Ok(());
        }
        let mut j = j;
        if self.settings.faults.keep_foreign_frame {
            // The injected bug: another worker's frame swapped for one of
            // this one's (every count stays right). The writer refuses the
            // wrong frame and it goes back; whichever socket a frame of the
            // other UMEM reaches first (a fill ring, or its bytes read as
            // this UMEM's), that worker must stop.
            if let Some(mine) = self.free.pop() {
                let theirs = std::mem::replace(&mut j.frame, mine);
                self.free.push(theirs);
            }
        }
        let packets = j.packets;
        st.local.spread_in += u64::from(packets);
        let mut res = io.push_foreign(
            from, t as u32, j.frame, j.offset, j.len, j.rest, j.tunnel, packets,
        );
        if let Err((frame, rest)) = res {
            io.submit().map_err(self.io_err("io_uring submit"))?;
            res = io.push_foreign(
                from, t as u32, frame, j.offset, j.len, rest, j.tunnel, packets,
            );
        }
        if let Err((frame, rest)) = res {
            // Not a write this ring can make: counted by the sender as a
            // write error.
            let c = Completed {
                op: Op::Write,
                frame: Some(frame),
                buf: None,
                tag: j.tunnel,
                expected: j.len as u32,
                result: -libc::EINVAL,
                packets,
                rest,
                peer: Some(from),
            };
            st.spread
                .as_mut()
                .expect("spread is on")
                .answer(from, Returned::Written(c, generation));
        }
        Ok(())
    }

    /// Sends what is waiting for the other workers; writes handed to a
    /// worker that is gone (its thread ended) are counted as write errors.
    pub(super) fn spread_flush(&mut self, st: &mut State<S::Frame>) {
        let Some(link) = st.spread.as_mut() else {
            return;
        };
        link.flush();
        for j in link.take_undeliverable() {
            st.frames.at_peers -= j.frames();
            for _ in 0..j.packets {
                st.local.drop(DropReason::DeviceWriteError);
            }
            self.free.push(j.frame);
            self.free.extend(j.rest.into_iter().map(|p| p.frame));
        }
    }

    /// Puts the frames of a finished write back on the free list, and its
    /// vector of pieces back for reuse.
    pub(super) fn take_back<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        frame: Option<S::Frame>,
        mut rest: Vec<Piece<S::Frame>>,
    ) {
        self.free.extend(frame);
        self.free.extend(rest.drain(..).map(|p| p.frame));
        io.recycle(rest);
    }

    /// Writes a job whose virtio-net header is in place (one that came
    /// back from another worker unwritten).
    pub(super) fn write_prepared<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        j: Job<S::Frame>,
    ) -> Result<(), WorkerError> {
        let file = u32::from(j.tunnel);
        let res = if j.rest.is_empty() {
            io.push(file, j.frame, j.offset, j.len, j.tunnel)
                .map_err(|f| (f, Vec::new()))
        } else {
            io.push_gather(file, j.frame, j.offset, j.len, j.rest, j.tunnel, j.packets)
        };
        let res = match res {
            Err((frame, rest)) => {
                io.submit().map_err(self.io_err("io_uring submit"))?;
                if rest.is_empty() {
                    io.push(file, frame, j.offset, j.len, j.tunnel)
                        .map_err(|f| (f, Vec::new()))
                } else {
                    io.push_gather(file, frame, j.offset, j.len, rest, j.tunnel, j.packets)
                }
            }
            ok => ok,
        };
        match res {
            Ok(()) => st.writes_in_flight += 1,
            Err((frame, mut rest)) => {
                for _ in 0..j.packets {
                    st.local.drop(DropReason::DeviceWriteError);
                }
                self.free.push(frame);
                self.free.extend(rest.drain(..).map(|p| p.frame));
                io.recycle(rest);
            }
        }
        Ok(())
    }

    /// At the stop: hands over what is left, says this worker hands over
    /// no more, and writes what the others hand over until every worker
    /// says so and every frame handed over is back (or 2 s pass: a worker
    /// that died keeps what it held, and the counts say where).
    pub(super) fn spread_stop<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
    ) -> Result<(), WorkerError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut done = Vec::new();
        loop {
            io.reap(|c| done.push(c));
            for c in done.drain(..) {
                self.completed(c, io, st)?;
            }
            self.spread_poll(io, st)?;
            // Jobs from a newer tunnel list than this worker will see:
            // back to their senders.
            let generation = self.shared.tunnels.generation;
            for (from, q) in st.jobs_in.iter_mut().enumerate() {
                while q.front().is_some_and(|j| j.generation > generation) {
                    if let (Some(j), Some(link)) = (q.pop_front(), &mut st.spread) {
                        link.answer(from, Returned::Bounced(j));
                    }
                }
            }
            io.submit().map_err(self.io_err("io_uring submit"))?;
            self.spread_flush(st);
            let link = st.spread.as_mut().expect("spread is on");
            if link.sent() {
                link.finish();
            }
            if link.all_finished()
                && link.quiet()
                && st.jobs_in.iter().all(|q| q.is_empty())
                && st.frames.at_peers == 0
                && io.foreign_in_flight() == 0
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    queue = self.queue,
                    frames = st.frames.at_peers,
                    "stopping with writes handed to another worker unanswered"
                );
                return Ok(());
            }
            std::thread::yield_now();
        }
    }
}
