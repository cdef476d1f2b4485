//! In-memory fakes of the worker's two ports ([`Socket`], [`Devices`]), as
//! the kernel behaves behind them: rings of bounded size, writes that hold
//! their frames until the test completes them, multishot reads into a pool
//! of buffers. A test holds a second handle on each fake's state to play
//! the kernel's part (receive a packet, send the TX ring, finish writes,
//! hand a read its packet) and to see where every frame is.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::engine::ports::{Devices, Socket};
use crate::io::uring::{Completed, Op, Piece};
use crate::io::xsk::XskStats;

/// Bytes of a frame's data area, as the real UMEM hands out.
pub const FRAME_DATA: usize = crate::control::config::FRAME_DATA_LEN;

/// A frame of a fake UMEM: its number and its own bytes.
#[derive(Debug)]
pub struct FakeFrame {
    pub id: u32,
    len: usize,
    buf: Box<[u8]>,
}

/// The four rings of a fake AF_XDP socket.
#[derive(Default)]
pub struct Rings {
    pub size: usize,
    pub fill: VecDeque<FakeFrame>,
    pub rx: VecDeque<FakeFrame>,
    pub tx: VecDeque<FakeFrame>,
    pub comp: VecDeque<FakeFrame>,
    /// What the "NIC" sent, in order.
    pub sent: Vec<Vec<u8>>,
    /// Packets the "kernel" dropped for want of a fill-ring frame or RX
    /// room (reported as the socket's `rx_dropped`).
    pub dropped: u64,
    /// The frame numbers of this socket's UMEM.
    pub ids: std::ops::Range<u32>,
}

#[derive(Clone)]
pub struct FakeSocket {
    pub state: Arc<Mutex<Rings>>,
}

impl FakeSocket {
    /// A socket with rings of `ring` entries and a UMEM of `frames` frames
    /// numbered from `first`, all handed to the caller.
    pub fn new(first: u32, count: u32, ring: usize) -> (FakeSocket, Vec<FakeFrame>) {
        let frames = (first..first + count)
            .map(|id| FakeFrame {
                id,
                len: 0,
                buf: vec![0u8; FRAME_DATA].into_boxed_slice(),
            })
            .collect();
        let rings = Rings {
            size: ring,
            ids: first..first + count,
            ..Default::default()
        };
        (
            FakeSocket {
                state: Arc::new(Mutex::new(rings)),
            },
            frames,
        )
    }

    /// The NIC receives `pkt`: the next fill-ring frame takes it to the RX
    /// ring. False: dropped (no frame, no room), as the kernel would.
    pub fn receive_packet(&self, pkt: &[u8]) -> bool {
        let mut r = self.state.lock().unwrap();
        if r.rx.len() >= r.size || pkt.len() > FRAME_DATA {
            r.dropped += 1;
            return false;
        }
        let Some(mut f) = r.fill.pop_front() else {
            r.dropped += 1;
            return false;
        };
        f.buf[..pkt.len()].copy_from_slice(pkt);
        f.len = pkt.len();
        r.rx.push_back(f);
        true
    }

    /// The NIC sends up to `n` frames of the TX ring; they go to the
    /// completion ring (as far as it has room).
    pub fn send(&self, n: usize) -> usize {
        let mut r = self.state.lock().unwrap();
        let mut moved = 0;
        while moved < n && r.comp.len() < r.size {
            let Some(f) = r.tx.pop_front() else { break };
            let bytes = f.buf[..f.len].to_vec();
            r.sent.push(bytes);
            r.comp.push_back(f);
            moved += 1;
        }
        moved
    }

    /// The frames the rings hold.
    pub fn ids(&self) -> Vec<u32> {
        let r = self.state.lock().unwrap();
        r.fill
            .iter()
            .chain(&r.rx)
            .chain(&r.tx)
            .chain(&r.comp)
            .map(|f| f.id)
            .collect()
    }

    /// Frames in the fill and RX rings (the kernel's, on the way in).
    pub fn in_kernel(&self) -> usize {
        let r = self.state.lock().unwrap();
        r.fill.len() + r.rx.len()
    }

    /// Frames in the TX and completion rings.
    pub fn in_tx(&self) -> usize {
        let r = self.state.lock().unwrap();
        r.tx.len() + r.comp.len()
    }
}

impl Rings {
    /// As the real socket: a frame of another UMEM reaching this one's
    /// rings is a bug in the gateway, and stops it.
    fn check(&self, f: &FakeFrame, place: &str) {
        assert!(
            self.ids.contains(&f.id),
            "frame {} of another UMEM handed to the {place}",
            f.id
        );
    }
}

impl Socket for FakeSocket {
    type Frame = FakeFrame;

    fn receive(&mut self, out: &mut Vec<FakeFrame>, max: usize) -> usize {
        let mut r = self.state.lock().unwrap();
        let n = max.min(r.rx.len());
        out.extend(r.rx.drain(..n));
        n
    }

    fn fill(&mut self, frames: &mut Vec<FakeFrame>, keep: usize) -> usize {
        let mut r = self.state.lock().unwrap();
        let room = r.size - r.fill.len();
        let n = frames.len().saturating_sub(keep).min(room);
        let start = frames.len() - n;
        for f in &frames[start..] {
            r.check(f, "fill ring");
        }
        r.fill.extend(frames.drain(start..));
        n
    }

    fn wake_fill_if_needed(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn transmit(&mut self, frames: &mut Vec<FakeFrame>, _outstanding: u64) -> io::Result<usize> {
        let mut r = self.state.lock().unwrap();
        let n = frames.len().min(r.size - r.tx.len());
        for f in &frames[..n] {
            r.check(f, "TX ring");
        }
        r.tx.extend(frames.drain(..n));
        Ok(n)
    }

    fn complete(&mut self, out: &mut Vec<FakeFrame>) -> usize {
        let mut r = self.state.lock().unwrap();
        let n = r.comp.len();
        out.extend(r.comp.drain(..));
        n
    }

    fn data_mut<'a>(&'a self, frame: &'a mut FakeFrame) -> &'a mut [u8] {
        &mut frame.buf[..frame.len]
    }

    fn buffer_mut<'a>(&'a self, frame: &'a mut FakeFrame) -> &'a mut [u8] {
        frame.len = frame.buf.len();
        &mut frame.buf[..]
    }

    fn set_len(&self, frame: &mut FakeFrame, len: usize) {
        frame.len = len.min(frame.buf.len());
    }

    fn busy_poll(&self) {}

    fn fd(&self) -> RawFd {
        -1
    }

    fn stats(&self) -> io::Result<XskStats> {
        Ok(XskStats {
            rx_dropped: self.state.lock().unwrap().dropped,
            ..Default::default()
        })
    }
}

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
        let mut d = self.state.lock().unwrap();
        if !d.valid(&d.own.clone(), &frame, offset, len, &[]) {
            d.refused += 1;
            return Err(frame);
        }
        if d.full() {
            return Err(frame);
        }
        d.queued.push(Write {
            file,
            frame,
            offset,
            len,
            rest: Vec::new(),
            tag,
            packets: 1,
            peer: None,
        });
        Ok(())
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
        let mut d = self.state.lock().unwrap();
        if !d.valid(&d.own.clone(), &frame, offset, len, &rest) {
            d.refused += 1;
            return Err((frame, rest));
        }
        if d.full() {
            return Err((frame, rest));
        }
        d.queued.push(Write {
            file,
            frame,
            offset,
            len,
            rest,
            tag,
            packets,
            peer: None,
        });
        Ok(())
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
        let mut d = self.state.lock().unwrap();
        let theirs = d.peers.get(peer).cloned().unwrap_or(0..0);
        if !d.valid(&theirs, &frame, offset, len, &rest) {
            d.refused += 1;
            return Err((frame, rest));
        }
        if d.full() {
            return Err((frame, rest));
        }
        d.queued.push(Write {
            file,
            frame,
            offset,
            len,
            rest,
            tag,
            packets,
            peer: Some(peer),
        });
        Ok(())
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

    fn update_files(&mut self, _files: &[RawFd]) -> io::Result<()> {
        let mut d = self.state.lock().unwrap();
        if !d.queued.is_empty()
            || !d.in_flight.is_empty()
            || !d.armed.is_empty()
            || !d.done.is_empty()
        {
            return Err(io::Error::other("files replaced with operations in flight"));
        }
        d.events.push(Event::FilesUpdated);
        Ok(())
    }
}
