//! io_uring reads and writes of packets between tap/tun queues and the
//! worker's memory.
//!
//! The UMEM is registered as one fixed buffer and the device queues as
//! registered files, so each write is a `WriteFixed` with no copy and no
//! per-write page pinning, or for a coalesced run of packets one `Writev`
//! of iovecs into their frames. The writer, not its caller, keeps the
//! memory alive until the kernel is done: it holds a handle on the UMEM and
//! owns each [`Frame`] while its write is in flight, handing it back only
//! with the completion.
//!
//! Reads from the devices are multishot (`IORING_OP_READ_MULTISHOT`), one
//! per device queue, taking buffers from a provided-buffer ring: one armed
//! read per queue drains every packet the device holds when it wakes, and
//! no two reads race for one packet. (With several plain reads parked on
//! one queue, each packet woke them all; the losers, having been polled
//! once, were handed to io_uring's worker threads to block there, and every
//! reply then crossed a thread: 25 µs round trips where the bare veth took
//! 4.7.) Kernels before 6.7 get one plain read per queue at a time from the
//! same ring. The read buffers are not UMEM frames: with segmentation
//! offload a packet read can be 64 KiB, and the worker cuts it into frames
//! anyway (a small one is copied into one).

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, types, IoUring};
use xsk_rs::Umem;

use super::xsk::{Frame, Region, Xsk};

/// Which operation a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A packet written into a device.
    Write,
    /// A packet read from a device into the frame.
    Read,
}

/// Bytes of one read buffer: a virtio-net header and the largest GSO
/// packet a device hands over (64 KiB), with room to spare.
pub const READ_BUF: usize = 68 * 1024;

/// Buffer group of the read frames.
const BGID: u16 = 0;

/// More of a coalesced write: `len` bytes of `frame` from `offset` (of its
/// packet data).
#[derive(Debug)]
pub struct Piece<F = Frame> {
    pub frame: F,
    pub offset: usize,
    pub len: usize,
}

/// An operation whose completion has arrived.
#[derive(Debug)]
pub struct Completed<F = Frame> {
    pub op: Op,
    /// The frame of a write.
    pub frame: Option<F>,
    /// The buffer a read filled (see [`DeviceIo::read_data`]); a read that
    /// ended without data (cancelled, out of buffers, failed) has none.
    pub buf: Option<u16>,
    /// Caller's tag (the tunnel id).
    pub tag: u16,
    /// Bytes the write offered (0 for a read).
    pub expected: u32,
    /// Bytes written or read, or the negated errno.
    pub result: i32,
    /// Packets the write carried (1 unless coalesced).
    pub packets: u16,
    /// The other frames of a coalesced write; give the vector back with
    /// [`DeviceIo::recycle`].
    pub rest: Vec<Piece<F>>,
    /// The worker whose frames a write carried, when not this one's (see
    /// [`DeviceIo::push_foreign`]).
    pub peer: Option<usize>,
}

struct InFlight {
    op: Op,
    frame: Frame,
    tag: u16,
    expected: u32,
    packets: u16,
    rest: Vec<Piece>,
    /// The iovecs of a coalesced write, alive until its completion.
    iov: Vec<libc::iovec>,
}

impl InFlight {
    /// The completion of this write, with `result`; its iovec array goes
    /// back to `spare_iov`.
    fn completed(
        self,
        result: i32,
        peer: Option<usize>,
        spare_iov: &mut Vec<Vec<libc::iovec>>,
    ) -> Completed {
        if self.iov.capacity() > 0 {
            spare_iov.push(self.iov);
        }
        Completed {
            op: self.op,
            frame: Some(self.frame),
            buf: None,
            tag: self.tag,
            expected: self.expected,
            result,
            packets: self.packets,
            rest: self.rest,
            peer,
        }
    }
}

/// user_data of cancel requests; not a frame index.
const CANCEL_TAG: u64 = u64::MAX;
/// user_data bit of multishot reads (the device's file slot below it).
const READ_TAG: u64 = 1 << 62;
/// user_data bit of writes from another worker's frames (the slot in
/// `DeviceIo::foreign` below it).
const FOREIGN_TAG: u64 = 1 << 61;

/// The provided-buffer ring and the buffers it hands to reads.
struct ReadPool {
    /// `entries` `io_uring_buf`s, page-aligned (mmap).
    ring: NonNull<types::BufRingEntry>,
    /// `entries` buffers of [`READ_BUF`] bytes (mmap).
    bufs: NonNull<u8>,
    entries: u16,
    tail: u16,
    /// Buffers in the ring (the rest are being read out by the worker).
    in_ring: usize,
    /// Left mapped at drop: the kernel may still write into them.
    leak: bool,
}

fn map(bytes: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("null mapping"))
}

impl ReadPool {
    fn ring_bytes(entries: u16) -> usize {
        usize::from(entries) * std::mem::size_of::<types::BufRingEntry>()
    }

    fn new(entries: u16) -> io::Result<ReadPool> {
        let ring: NonNull<types::BufRingEntry> = map(Self::ring_bytes(entries))?.cast();
        let bufs = match map(usize::from(entries) * READ_BUF) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: the mapping just made, not used by anyone.
                unsafe { libc::munmap(ring.as_ptr().cast(), Self::ring_bytes(entries)) };
                return Err(e);
            }
        };
        let mut pool = ReadPool {
            ring,
            bufs,
            entries,
            tail: 0,
            in_ring: 0,
            leak: false,
        };
        for bid in 0..entries {
            pool.add(bid);
        }
        pool.publish();
        Ok(pool)
    }

    /// Puts buffer `bid` in the ring (visible after [`ReadPool::publish`]).
    fn add(&mut self, bid: u16) {
        let i = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `i` < entries, inside the ring mapping; the kernel only
        // reads entries before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.ring.as_ptr().add(i) };
        entry.set_addr(self.bufs.as_ptr() as u64 + (usize::from(bid) * READ_BUF) as u64);
        entry.set_len(READ_BUF as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Publishes the entries added since the last call.
    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, inside
        // the mapping; the kernel reads it, so it is written atomically with
        // release ordering after the entries.
        let tail = unsafe { &*types::BufRingEntry::tail(self.ring.as_ptr()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: the mappings made in `new`. No read can still write into
        // them: `DeviceIo::drop` drained the ring (every read cancelled and
        // its completion reaped) before its fields drop, and set `leak`
        // instead when it could not. (That drain is what keeps them alive;
        // the order of DeviceIo's fields is not relied on.)
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), Self::ring_bytes(self.entries));
            libc::munmap(
                self.bufs.as_ptr().cast(),
                usize::from(self.entries) * READ_BUF,
            );
        }
    }
}

/// One ring per worker.
pub struct DeviceIo {
    ring: IoUring,
    /// Keeps the registered UMEM mapped while writes are in flight.
    _umem: Umem,
    region: Region,
    /// Indexed by frame index; a frame is in flight at most once.
    in_flight: Vec<Option<InFlight>>,
    /// Writes in flight.
    count: usize,
    /// Frames those writes hold (a coalesced write holds several).
    write_frames: usize,
    unsubmitted: usize,
    pool: ReadPool,
    /// Which file slots have a multishot read armed.
    armed: Vec<bool>,
    armed_count: usize,
    spare_pieces: Vec<Vec<Piece>>,
    spare_iov: Vec<Vec<libc::iovec>>,
    /// Reads are multishot (else one plain read per queue at a time).
    multishot: bool,
    /// Writes of other workers' frames in flight, by slot, with the worker.
    foreign: Vec<Option<(usize, InFlight)>>,
    foreign_free: Vec<usize>,
    /// Other workers' UMEMs, by worker: where their frames are, and a
    /// handle that keeps them mapped while a write of them is in flight.
    peers: Vec<Option<(Region, Umem)>>,
}

impl DeviceIo {
    /// Creates a ring with `entries` submission slots, a table of
    /// `file_slots` registered files holding `files` (the worker's device
    /// queue fds, in tunnel order), the UMEM of `xsk` as fixed buffer 0, and
    /// `read_bufs` buffers (a power of two) for device reads.
    pub fn new(
        entries: u32,
        file_slots: u32,
        files: &[RawFd],
        xsk: &Xsk,
        read_bufs: u16,
    ) -> io::Result<DeviceIo> {
        let ring = IoUring::builder().build(entries)?;
        // Multishot reads came with Linux 6.7; before, one plain read per
        // device queue at a time, taking a buffer from the same ring
        // (Linux 5.19 on), armed again after each packet.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        // (GATEWAY_NO_MULTISHOT makes a test take the old kernels' way.)
        let multishot = probe.is_supported(opcode::ReadMulti::CODE)
            && std::env::var_os("GATEWAY_NO_MULTISHOT").is_none();
        if !multishot {
            tracing::warn!(
                "io_uring without multishot reads (before Linux 6.7): one read per device queue at a time, slower"
            );
        }
        let pool = ReadPool::new(read_bufs)?;
        // SAFETY: the ring memory is `read_bufs` entries, page-aligned, and
        // lives in `pool` (as do the buffers, which are not UMEM frames).
        // The pool is unmapped only after `DeviceIo::drop` drained the ring
        // (every read cancelled and its completion reaped), or never when
        // draining failed (`leak`); closing the ring alone would not do, as
        // io_uring tears down in-flight requests asynchronously.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.ring.as_ptr() as u64,
                read_bufs,
                BGID,
                0,
            )?
        };
        let region = xsk.region();
        ring.submitter().register_files_sparse(file_slots)?;
        if !files.is_empty() {
            ring.submitter().register_files_update(0, files)?;
        }
        let iov = libc::iovec {
            iov_base: region.base.as_ptr().cast(),
            iov_len: region.len,
        };
        // SAFETY: the iovec describes the UMEM mapping, which stays mapped
        // for as long as this writer lives: it holds a clone of the `Umem`
        // handle, and the mapping is only unmapped when the last one drops.
        unsafe { ring.submitter().register_buffers(&[iov])? };
        let mut in_flight = Vec::new();
        in_flight.resize_with(xsk.frame_count() as usize, || None);
        Ok(DeviceIo {
            ring,
            _umem: xsk.umem().clone(),
            region,
            in_flight,
            count: 0,
            write_frames: 0,
            unsubmitted: 0,
            pool,
            armed: vec![false; file_slots as usize],
            armed_count: 0,
            spare_pieces: Vec::new(),
            spare_iov: Vec::new(),
            multishot,
            foreign: Vec::new(),
            foreign_free: Vec::new(),
            peers: Vec::new(),
        })
    }

    /// Puts `files` in the registered file table from slot 0 (-1 empties a
    /// slot). Only with nothing in flight: an operation holds its file by
    /// slot number.
    pub fn update_files(&mut self, files: &[RawFd]) -> io::Result<()> {
        if self.count > 0 || self.armed_count > 0 {
            return Err(io::Error::other("files replaced with operations in flight"));
        }
        if !files.is_empty() {
            self.ring.submitter().register_files_update(0, files)?;
        }
        Ok(())
    }

    /// Frames held by io_uring (in writes in flight).
    pub fn in_flight(&self) -> usize {
        self.write_frames
    }

    /// Writes of other workers' frames in flight.
    pub fn foreign_in_flight(&self) -> usize {
        self.foreign.iter().filter(|f| f.is_some()).count()
    }

    /// The ring's fd: readable when completions are waiting.
    pub fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// Queues a write of `frame`'s bytes `offset..offset + len` to
    /// registered file `file`. Nothing reaches the kernel until
    /// [`DeviceIo::submit`]. When the submission queue is full the frame
    /// comes back as `Err`.
    #[inline]
    pub fn push(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        tag: u16,
    ) -> Result<(), Frame> {
        let start = frame.addr() + offset;
        let idx = Xsk::frame_index(&frame);
        if frame.umem() != self.region.id
            || len == 0
            || offset + len > frame.len()
            || start + len > self.region.len
            || idx >= self.in_flight.len()
            || self.in_flight[idx].is_some()
        {
            // Not a write this writer can make safely; the caller counts it.
            return Err(frame);
        }
        let ptr = self.region.base.as_ptr().wrapping_add(start);
        let sqe = opcode::WriteFixed::new(types::Fixed(file), ptr, len as u32, 0)
            .offset(0)
            .build()
            .user_data(idx as u64);
        // SAFETY: `ptr..ptr + len` lies inside fixed buffer 0 (checked
        // above) and belongs to `frame`, which `queue` hands to this writer
        // until the completion for `idx` arrives, so nothing else touches
        // the bytes; the UMEM handle held by `self` keeps them mapped.
        unsafe { self.queue(&sqe, idx, Op::Write, frame, tag, len as u32) }
    }

    /// An empty vector for the pieces of a coalesced write.
    pub fn pieces(&mut self) -> Vec<Piece> {
        self.spare_pieces.pop().unwrap_or_default()
    }

    /// Takes back a vector of pieces (emptied) for reuse.
    pub fn recycle(&mut self, mut v: Vec<Piece>) {
        if v.capacity() > 0 {
            v.clear();
            self.spare_pieces.push(v);
        }
    }

    /// Lets this ring write frames of worker `peer`'s UMEM.
    pub fn add_peer(&mut self, peer: usize, region: Region, umem: Umem) {
        if self.peers.len() <= peer {
            self.peers.resize_with(peer + 1, || None);
        }
        self.peers[peer] = Some((region, umem));
    }

    /// Queues a write, to registered file `file`, of bytes `offset..offset
    /// + len` of `frame` and then every piece, where the frames belong to
    /// worker `peer` (added with [`DeviceIo::add_peer`]); its completion
    /// carries `peer`. When it cannot (an unknown worker, a piece out of
    /// place, the queue full) every frame comes back in the `Err`.
    #[allow(clippy::result_large_err, clippy::too_many_arguments)]
    pub fn push_foreign(
        &mut self,
        peer: usize,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        rest: Vec<Piece>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (Frame, Vec<Piece>)> {
        let Some(Some((region, _))) = self.peers.get(peer) else {
            return Err((frame, rest));
        };
        let region = *region;
        // Of that worker's UMEM, and inside it.
        let in_place = |f: &Frame, off: usize, len: usize| {
            f.umem() == region.id
                && len > 0
                && off + len <= f.len()
                && f.addr() + off + len <= region.len
        };
        if !in_place(&frame, offset, len)
            || rest.iter().any(|p| !in_place(&p.frame, p.offset, p.len))
        {
            return Err((frame, rest));
        }
        let slot = match self.foreign_free.pop() {
            Some(s) => s,
            None => {
                self.foreign.push(None);
                self.foreign.len() - 1
            }
        };
        let base = region.base.as_ptr();
        let mut iov = Vec::new();
        let mut expected = len;
        let sqe = if rest.is_empty() {
            let ptr = base.wrapping_add(frame.addr() + offset);
            opcode::Write::new(types::Fixed(file), ptr, len as u32)
                .offset(0)
                .build()
        } else {
            iov = self.spare_iov.pop().unwrap_or_default();
            iov.clear();
            iov.push(libc::iovec {
                iov_base: base.wrapping_add(frame.addr() + offset).cast(),
                iov_len: len,
            });
            for p in &rest {
                iov.push(libc::iovec {
                    iov_base: base.wrapping_add(p.frame.addr() + p.offset).cast(),
                    iov_len: p.len,
                });
                expected += p.len;
            }
            opcode::Writev::new(types::Fixed(file), iov.as_ptr(), iov.len() as u32)
                .offset(0)
                .build()
        }
        .user_data(FOREIGN_TAG | slot as u64);
        // SAFETY: every byte written lies inside worker `peer`'s UMEM
        // (checked above) within frames handed to this ring with the entry,
        // which its owner does not touch until they come back with the
        // completion; `self.peers` holds a handle that keeps that UMEM
        // mapped, and the iovec array lives in the entry.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.foreign_free.push(slot);
            if iov.capacity() > 0 {
                self.spare_iov.push(iov);
            }
            return Err((frame, rest));
        }
        self.foreign[slot] = Some((
            peer,
            InFlight {
                op: Op::Write,
                frame,
                tag,
                expected: expected as u32,
                packets,
                rest,
                iov,
            },
        ));
        self.count += 1;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Queues one write of `frame`'s bytes `offset..offset + len` followed
    /// by every piece, carrying `packets` packets, to registered file
    /// `file`. When it cannot (a piece out of place, the queue full) every
    /// frame comes back in the `Err`.
    #[allow(clippy::result_large_err, clippy::too_many_arguments)]
    pub fn push_gather(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        rest: Vec<Piece>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (Frame, Vec<Piece>)> {
        let idx = Xsk::frame_index(&frame);
        // Of this worker's UMEM, and inside it.
        let in_place = |f: &Frame, off: usize, len: usize| {
            f.umem() == self.region.id
                && len > 0
                && off + len <= f.len()
                && f.addr() + off + len <= self.region.len
        };
        if !in_place(&frame, offset, len)
            || rest.iter().any(|p| !in_place(&p.frame, p.offset, p.len))
            || idx >= self.in_flight.len()
            || self.in_flight[idx].is_some()
        {
            return Err((frame, rest));
        }
        let base = self.region.base.as_ptr();
        let mut iov = self.spare_iov.pop().unwrap_or_default();
        iov.clear();
        iov.push(libc::iovec {
            iov_base: base.wrapping_add(frame.addr() + offset).cast(),
            iov_len: len,
        });
        let mut expected = len;
        for p in &rest {
            iov.push(libc::iovec {
                iov_base: base.wrapping_add(p.frame.addr() + p.offset).cast(),
                iov_len: p.len,
            });
            expected += p.len;
        }
        let frames = 1 + rest.len();
        let sqe = opcode::Writev::new(types::Fixed(file), iov.as_ptr(), iov.len() as u32)
            .offset(0)
            .build()
            .user_data(idx as u64);
        // SAFETY: every iovec lies inside the UMEM (checked above) within a
        // frame handed to this writer with the entry, and the iovec array
        // itself is kept in the entry; both live until the completion.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.spare_iov.push(iov);
            return Err((frame, rest));
        }
        self.in_flight[idx] = Some(InFlight {
            op: Op::Write,
            frame,
            tag,
            expected: expected as u32,
            packets,
            rest,
            iov,
        });
        self.count += 1;
        self.write_frames += frames;
        self.unsubmitted += 1;
        Ok(())
    }

    /// The first `len` bytes of read buffer `bid`, as a read completion
    /// left them.
    #[inline]
    pub fn read_data(&self, bid: u16, len: usize) -> &[u8] {
        let bid = usize::from(bid).min(usize::from(self.pool.entries) - 1);
        // SAFETY: the buffer lies in the pool's mapping; the kernel wrote
        // it before posting the completion and does not touch it again
        // until `release_read` puts it back in the ring, which needs
        // `&mut self` and so ends this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.bufs.as_ptr().add(bid * READ_BUF),
                len.min(READ_BUF),
            )
        }
    }

    /// Gives read buffer `bid` back to the ring.
    #[inline]
    pub fn release_read(&mut self, bid: u16) {
        if bid < self.pool.entries {
            self.pool.add(bid);
            self.pool.publish();
        }
    }

    /// Arms a multishot read on registered file `file` unless one is armed.
    /// Returns false when the submission queue is full.
    #[inline]
    pub fn arm_read(&mut self, file: u32) -> bool {
        let f = file as usize;
        if f >= self.armed.len() || self.armed[f] {
            return true;
        }
        let sqe = if self.multishot {
            opcode::ReadMulti::new(types::Fixed(file), 0, BGID).build()
        } else {
            opcode::Read::new(types::Fixed(file), std::ptr::null_mut(), READ_BUF as u32)
                .buf_group(BGID)
                .build()
                .flags(io_uring::squeue::Flags::BUFFER_SELECT)
        }
        .user_data(READ_TAG | u64::from(file));
        // SAFETY: the read's buffers come from the pool's provided-buffer
        // ring (the pool's own mappings, not the UMEM); the kernel owns a
        // buffer from the moment it picks it until the completion names it,
        // and the pool stays mapped until every read is drained (see
        // `ReadPool::drop`).
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        self.armed[f] = true;
        self.armed_count += 1;
        self.unsubmitted += 1;
        true
    }

    /// Pushes `sqe` and takes ownership of `frame` (index `idx`) until its
    /// completion arrives.
    ///
    /// # Safety
    /// The memory `sqe` points at must lie in the registered UMEM and
    /// belong to `frame`.
    unsafe fn queue(
        &mut self,
        sqe: &io_uring::squeue::Entry,
        idx: usize,
        op: Op,
        frame: Frame,
        tag: u16,
        expected: u32,
    ) -> Result<(), Frame> {
        // SAFETY: the caller guarantees the entry's buffer; it stays valid
        // because the frame is held in `in_flight` until its completion.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            return Err(frame);
        }
        self.in_flight[idx] = Some(InFlight {
            op,
            frame,
            tag,
            expected,
            packets: 1,
            rest: Vec::new(),
            iov: Vec::new(),
        });
        self.count += 1;
        self.write_frames += 1;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands every queued operation to the kernel in one system call.
    #[inline]
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Takes every completion that has arrived, handing each frame back.
    #[inline]
    pub fn reap(&mut self, mut done: impl FnMut(Completed)) -> usize {
        let mut n = 0;
        let in_flight = &mut self.in_flight;
        let pool = &mut self.pool;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL_TAG {
                continue;
            }
            if ud & READ_TAG != 0 {
                let file = (ud & 0xffff) as usize;
                if !cqueue::more(cqe.flags()) {
                    if let Some(a) = self.armed.get_mut(file) {
                        if *a {
                            *a = false;
                            self.armed_count -= 1;
                        }
                    }
                }
                let buf = cqueue::buffer_select(cqe.flags());
                if buf.is_some() {
                    pool.in_ring -= 1;
                }
                done(Completed {
                    op: Op::Read,
                    frame: None,
                    buf,
                    tag: file as u16,
                    expected: 0,
                    result: cqe.result(),
                    packets: 1,
                    rest: Vec::new(),
                    peer: None,
                });
                continue;
            }
            if ud & FOREIGN_TAG != 0 {
                let slot = (ud & 0xffff_ffff) as usize;
                if let Some((peer, f)) = self.foreign.get_mut(slot).and_then(Option::take) {
                    n += 1;
                    self.foreign_free.push(slot);
                    done(f.completed(cqe.result(), Some(peer), &mut self.spare_iov));
                }
                continue;
            }
            let idx = ud as usize;
            if let Some(f) = in_flight.get_mut(idx).and_then(Option::take) {
                n += 1;
                self.write_frames -= 1 + f.rest.len();
                done(f.completed(cqe.result(), None, &mut self.spare_iov));
            }
        }
        self.count -= n;
        n
    }

    /// Read buffers in the ring, waiting for packets.
    pub fn reads_ready(&self) -> usize {
        self.pool.in_ring
    }

    /// Cancels outstanding reads (a read from an idle device would wait
    /// forever), waits for everything in flight and hands the frames back.
    pub fn drain(&mut self, mut done: impl FnMut(Completed)) -> io::Result<()> {
        self.submit()?;
        if self.count > 0 || self.armed_count > 0 {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel request references no memory.
            while unsafe { self.ring.submission().push(&cancel) }.is_err() {
                self.ring.submit()?;
            }
        }
        while self.count > 0 || self.armed_count > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal for the process (SIGHUP, SIGUSR1, ...) landed
                // on this thread: wait again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            self.reap(&mut done);
        }
        Ok(())
    }
}

impl Drop for DeviceIo {
    fn drop(&mut self) {
        // The kernel may still be reading frames; wait for it before the
        // ring (and with it our hold on the UMEM) goes away.
        if self.drain(|_| {}).is_err() {
            // A read may still be armed: its buffers must outlive it.
            self.pool.leak = true;
        }
    }
}
