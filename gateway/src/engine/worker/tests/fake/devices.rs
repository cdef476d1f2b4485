//! The fake device queues behind one io_uring: writes held until the test
//! finishes them, refused as the real ring refuses them; multishot or
//! one-shot reads into a pool of buffers, ended when the pool is dry.

use super::*;

/// A device write, from its push to its reaping.
#[derive(Debug)]
pub struct Write {
    pub file: u32,
    pub frame: FakeFrame,
    pub offset: usize,
    pub len: usize,
    pub rest: Vec<Piece<FakeFrame>>,
    pub tag: u16,
    pub packets: u16,
    pub peer: Option<usize>,
}

impl Write {
    /// The bytes the write carries: the first frame's, then each piece's.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = self.frame.buf[self.offset..self.offset + self.len].to_vec();
        for p in &self.rest {
            v.extend_from_slice(&p.frame.buf[p.offset..p.offset + p.len]);
        }
        v
    }

    fn frames(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.frame.id).chain(self.rest.iter().map(|p| p.frame.id))
    }

    /// The completion of this write: written whole (`None`), or with
    /// this result.
    pub fn into_completed(self, result: Option<i32>) -> Completed<FakeFrame> {
        let expected = (self.len + self.rest.iter().map(|p| p.len).sum::<usize>()) as u32;
        Completed {
            op: Op::Write,
            frame: Some(self.frame),
            buf: None,
            tag: self.tag,
            expected,
            result: result.unwrap_or(expected as i32),
            packets: self.packets,
            rest: self.rest,
            peer: self.peer,
        }
    }
}

/// What the device side saw happen, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write finished (the file, its packets).
    WriteDone(u32, u16),
    /// The device queues were replaced.
    FilesUpdated,
}

/// The device queues and io_uring of a fake worker.
pub struct DevState {
    /// Submission queue entries.
    pub sq: usize,
    /// Pushed, not submitted (writes, and reads armed).
    pub queued: Vec<Write>,
    pub queued_reads: usize,
    /// Submitted, not finished.
    pub in_flight: VecDeque<Write>,
    /// Finished, not reaped.
    pub done: VecDeque<Completed<FakeFrame>>,
    /// What each finished write carried: file, packets, bytes.
    pub written: Vec<(u32, u16, Vec<u8>)>,
    /// Files with a read armed.
    pub armed: BTreeSet<u32>,
    /// What reads took, by buffer, until the worker reaps them.
    pub incoming: Vec<(u16, Vec<u8>)>,
    /// Read buffers in the pool.
    pub pool: Vec<u16>,
    pub events: Vec<Event>,
    /// A read to finish with data when the reads are cancelled (the kernel
    /// had it before the cancel arrived).
    pub read_at_cancel: Option<(u32, Vec<u8>)>,
    /// The file slots whose reads a reload cancelled, in order.
    pub cancelled: Vec<u32>,
    /// Reads stay armed after a packet (Linux 6.7 on); otherwise each read
    /// ends with its packet, as the plain reads of older kernels do.
    pub multishot: bool,
    /// The drain cancels writes in flight too (they end with ECANCELED),
    /// rather than letting them finish.
    pub drain_cancels_writes: bool,
    /// The frame numbers of this worker's UMEM, and of each other
    /// worker's (by worker).
    pub own: std::ops::Range<u32>,
    pub peers: Vec<std::ops::Range<u32>>,
    /// Writes refused as the real ring refuses them (a frame of the wrong
    /// UMEM, nothing to write, bytes past the frame's packet): each one is
    /// a bug in the engine.
    pub refused: u64,
}

/// The worker's handle owns the read buffers (the worker borrows their
/// bytes); the test's clone shares the rest.
#[derive(Clone)]
pub struct FakeDevices {
    pub state: Arc<Mutex<DevState>>,
    bufs: Vec<Vec<u8>>,
}

impl FakeDevices {
    pub fn new(sq: usize, read_bufs: u16, own: std::ops::Range<u32>) -> FakeDevices {
        let state = Arc::new(Mutex::new(DevState {
            sq,
            queued: Vec::new(),
            queued_reads: 0,
            in_flight: VecDeque::new(),
            done: VecDeque::new(),
            written: Vec::new(),
            armed: BTreeSet::new(),
            incoming: Vec::new(),
            pool: (0..read_bufs).rev().collect(),
            events: Vec::new(),
            read_at_cancel: None,
            cancelled: Vec::new(),
            multishot: true,
            drain_cancels_writes: false,
            own,
            peers: Vec::new(),
            refused: 0,
        }));
        FakeDevices {
            state,
            bufs: vec![Vec::new(); usize::from(read_bufs)],
        }
    }

    /// Arms a read on device queue `file` unless one is armed. False: no
    /// room to queue it.
    fn arm_read(&mut self, file: u32) -> bool {
        let mut d = self.state.lock().unwrap();
        if d.armed.contains(&file) {
            return true;
        }
        if d.full() {
            return false;
        }
        d.armed.insert(file);
        d.queued_reads += 1;
        true
    }

    /// Finishes the oldest `n` writes submitted: written whole (`None`) or
    /// with this result.
    pub fn finish_writes(&self, n: usize, result: Option<i32>) -> usize {
        let mut d = self.state.lock().unwrap();
        let mut k = 0;
        while k < n {
            let Some(w) = d.in_flight.pop_front() else {
                break;
            };
            d.finish(w, result);
            k += 1;
        }
        k
    }

    /// A packet arrives in device queue `file`: an armed read takes it,
    /// with a buffer from the pool. False: no read armed, or no buffer.
    pub fn device_sends(&self, file: u32, bytes: &[u8]) -> bool {
        let mut d = self.state.lock().unwrap();
        if !d.armed.contains(&file) {
            return false;
        }
        let Some(bid) = d.pool.pop() else {
            // The pool ran dry: the read ends without a packet, as the
            // kernel ends it (ENOBUFS); the packet stays in the device.
            d.armed.remove(&file);
            d.done.push_back(Completed {
                op: Op::Read,
                frame: None,
                buf: None,
                tag: file as u16,
                expected: 0,
                result: -libc::ENOBUFS,
                packets: 1,
                rest: Vec::new(),
                peer: None,
            });
            return false;
        };
        if !d.multishot {
            d.armed.remove(&file);
        }
        d.incoming.push((bid, bytes.to_vec()));
        d.done.push_back(Completed {
            op: Op::Read,
            frame: None,
            buf: Some(bid),
            tag: file as u16,
            expected: 0,
            result: bytes.len() as i32,
            packets: 1,
            rest: Vec::new(),
            peer: None,
        });
        true
    }

    /// Queues a write as the real ring would: refused (and counted) if
    /// the ring could not make it, handed back if the submission queue is
    /// full.
    fn queue(&self, w: Write) -> Result<(), Write> {
        let mut d = self.state.lock().unwrap();
        let umem = match w.peer {
            None => d.own.clone(),
            Some(p) => d.peers.get(p).cloned().unwrap_or(0..0),
        };
        if !d.valid(&umem, &w.frame, w.offset, w.len, &w.rest) {
            d.refused += 1;
            return Err(w);
        }
        if d.full() {
            return Err(w);
        }
        d.queued.push(w);
        Ok(())
    }

    /// The frames the fake holds, in writes not yet reaped.
    pub fn ids(&self) -> Vec<u32> {
        let d = self.state.lock().unwrap();
        let mut v: Vec<u32> = d
            .queued
            .iter()
            .chain(&d.in_flight)
            .flat_map(Write::frames)
            .collect();
        for c in &d.done {
            v.extend(c.frame.iter().map(|f| f.id));
            v.extend(c.rest.iter().map(|p| p.frame.id));
        }
        v
    }

    /// Packets written into devices, all told.
    pub fn packets_written(&self) -> u64 {
        self.state
            .lock()
            .unwrap()
            .written
            .iter()
            .map(|w| u64::from(w.1))
            .sum()
    }
}

impl DevState {
    fn finish(&mut self, w: Write, result: Option<i32>) {
        if result.is_none() {
            self.written.push((w.file, w.packets, w.bytes()));
        }
        self.events.push(Event::WriteDone(w.file, w.packets));
        let c = w.into_completed(result);
        self.done.push_back(c);
    }

    /// Whether the real ring would take this write: every frame of
    /// `umem`, something to write, no byte past a frame's packet.
    fn valid(
        &self,
        umem: &std::ops::Range<u32>,
        frame: &FakeFrame,
        offset: usize,
        len: usize,
        rest: &[Piece<FakeFrame>],
    ) -> bool {
        let ok =
            |f: &FakeFrame, off: usize, n: usize| umem.contains(&f.id) && n > 0 && off + n <= f.len;
        ok(frame, offset, len) && rest.iter().all(|p| ok(&p.frame, p.offset, p.len))
    }

    fn full(&self) -> bool {
        self.queued.len() + self.queued_reads >= self.sq
    }

    fn own_frames(&self) -> usize {
        let writes = self
            .queued
            .iter()
            .chain(&self.in_flight)
            .filter(|w| w.peer.is_none())
            .map(|w| 1 + w.rest.len())
            .sum::<usize>();
        let done = self
            .done
            .iter()
            .filter(|c| c.op == Op::Write && c.peer.is_none())
            .map(|c| 1 + c.rest.len())
            .sum::<usize>();
        writes + done
    }
}

impl Devices<FakeFrame> for FakeDevices {
    fn push(
        &mut self,
        file: u32,
        frame: FakeFrame,
        offset: usize,
        len: usize,
        tag: u16,
    ) -> Result<(), FakeFrame> {
        let w = Write {
            file,
            frame,
            offset,
            len,
            rest: Vec::new(),
            tag,
            packets: 1,
            peer: None,
        };
        self.queue(w).map_err(|w| w.frame)
    }

    fn push_gather(
        &mut self,
        file: u32,
        frame: FakeFrame,
        offset: usize,
        len: usize,
        rest: Vec<Piece<FakeFrame>>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (FakeFrame, Vec<Piece<FakeFrame>>)> {
        let w = Write {
            file,
            frame,
            offset,
            len,
            rest,
            tag,
            packets,
            peer: None,
        };
        self.queue(w).map_err(|w| (w.frame, w.rest))
    }

    fn push_foreign(
        &mut self,
        peer: usize,
        file: u32,
        frame: FakeFrame,
        offset: usize,
        len: usize,
        rest: Vec<Piece<FakeFrame>>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (FakeFrame, Vec<Piece<FakeFrame>>)> {
        let w = Write {
            file,
            frame,
            offset,
            len,
            rest,
            tag,
            packets,
            peer: Some(peer),
        };
        self.queue(w).map_err(|w| (w.frame, w.rest))
    }

    fn pieces(&mut self) -> Vec<Piece<FakeFrame>> {
        Vec::new()
    }

    fn recycle(&mut self, v: Vec<Piece<FakeFrame>>) {
        assert!(
            v.is_empty(),
            "a vector of pieces recycled with frames in it"
        );
    }

    fn submit(&mut self) -> io::Result<()> {
        let mut d = self.state.lock().unwrap();
        let q = std::mem::take(&mut d.queued);
        d.in_flight.extend(q);
        d.queued_reads = 0;
        Ok(())
    }

    fn reap(&mut self, mut done: impl FnMut(Completed<FakeFrame>)) -> usize {
        let (taken, incoming): (Vec<_>, Vec<_>) = {
            let mut d = self.state.lock().unwrap();
            (d.done.drain(..).collect(), d.incoming.drain(..).collect())
        };
        for (bid, bytes) in incoming {
            self.bufs[usize::from(bid)] = bytes;
        }
        let n = taken.iter().filter(|c| c.op == Op::Write).count();
        for c in taken {
            done(c);
        }
        n
    }

    fn drain(&mut self, mut done: impl FnMut(Completed<FakeFrame>)) -> io::Result<()> {
        self.submit()?;
        {
            let mut d = self.state.lock().unwrap();
            if let Some((file, bytes)) = d.read_at_cancel.take() {
                drop(d);
                self.device_sends(file, &bytes);
                d = self.state.lock().unwrap();
            }
            // The cancel: every armed read ends without data.
            let armed = std::mem::take(&mut d.armed);
            for file in armed {
                d.done.push_back(Completed {
                    op: Op::Read,
                    frame: None,
                    buf: None,
                    tag: file as u16,
                    expected: 0,
                    result: -libc::ECANCELED,
                    packets: 1,
                    rest: Vec::new(),
                    peer: None,
                });
            }
            // The writes finish, as the kernel finishes them, or are
            // cancelled.
            let result = d.drain_cancels_writes.then_some(-libc::ECANCELED);
            while let Some(w) = d.in_flight.pop_front() {
                d.finish(w, result);
            }
        }
        self.reap(&mut done);
        Ok(())
    }

    fn read_data(&self, bid: u16, len: usize) -> &[u8] {
        let b = &self.bufs[usize::from(bid)];
        &b[..len.min(b.len())]
    }

    fn release_read(&mut self, bid: u16) {
        let mut d = self.state.lock().unwrap();
        assert!(!d.pool.contains(&bid), "read buffer {bid} released twice");
        d.pool.push(bid);
    }

    fn arm_reads(&mut self, gone: &[bool]) {
        for (file, &g) in gone.iter().enumerate() {
            if !g && !self.arm_read(file as u32) {
                return;
            }
        }
    }

    fn reads_ready(&self) -> usize {
        self.state.lock().unwrap().pool.len()
    }

    fn in_flight(&self) -> usize {
        self.state.lock().unwrap().own_frames()
    }

    fn foreign_in_flight(&self) -> usize {
        let d = self.state.lock().unwrap();
        d.queued
            .iter()
            .chain(&d.in_flight)
            .filter(|w| w.peer.is_some())
            .count()
            + d.done.iter().filter(|c| c.peer.is_some()).count()
    }

    fn fd(&self) -> RawFd {
        -1
    }

    fn settle(
        &mut self,
        slots: &[u32],
        mut done: impl FnMut(Completed<FakeFrame>),
    ) -> io::Result<()> {
        self.submit()?;
        {
            let mut d = self.state.lock().unwrap();
            if let Some((file, bytes)) = d.read_at_cancel.take() {
                if slots.contains(&file) {
                    drop(d);
                    self.device_sends(file, &bytes);
                    d = self.state.lock().unwrap();
                } else {
                    d.read_at_cancel = Some((file, bytes));
                }
            }
            // The cancel: the slots' armed reads end without data.
            for &file in slots {
                if d.armed.remove(&file) {
                    d.cancelled.push(file);
                    d.done.push_back(Completed {
                        op: Op::Read,
                        frame: None,
                        buf: None,
                        tag: file as u16,
                        expected: 0,
                        result: -libc::ECANCELED,
                        packets: 1,
                        rest: Vec::new(),
                        peer: None,
                    });
                }
            }
            // The slots' writes finish, as the kernel finishes them (the
            // others' too: the fake finishes in order).
            while d.in_flight.iter().any(|w| slots.contains(&w.file)) {
                let Some(w) = d.in_flight.pop_front() else {
                    break;
                };
                d.finish(w, None);
            }
        }
        self.reap(&mut done);
        Ok(())
    }

    fn replace_files(&mut self, changed: &[(u32, RawFd)]) -> io::Result<()> {
        let mut d = self.state.lock().unwrap();
        let on = |s: u32| d.queued.iter().chain(&d.in_flight).any(|w| w.file == s);
        if changed.iter().any(|&(s, _)| d.armed.contains(&s) || on(s)) {
            return Err(io::Error::other(
                "files replaced with operations on them in flight",
            ));
        }
        d.events.push(Event::FilesUpdated);
        Ok(())
    }
}
