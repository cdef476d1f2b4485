//! io_uring reads and writes of packets straight between UMEM frames and
//! tap/tun queues.
//!
//! The UMEM is registered as one fixed buffer and the device queues as
//! registered files, so each write is a `WriteFixed` with no copy and no
//! per-write page pinning. The writer, not its caller, keeps the memory
//! alive until the kernel is done: it holds a handle on the UMEM and owns
//! each [`Frame`] while its write is in flight, handing it back only with
//! the completion.
//!
//! Reads from the devices are multishot (`IORING_OP_READ_MULTISHOT`), one
//! per device queue, taking UMEM frames from a provided-buffer ring: one
//! armed read per queue drains every packet the device holds when it wakes,
//! and no two reads race for one packet. (With several plain reads parked
//! on one queue, each packet woke them all; the losers, having been polled
//! once, were handed to io_uring's worker threads to block there, and every
//! reply then crossed a thread: 25 µs round trips where the bare veth took
//! 4.7.)

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

/// Where a read puts a packet in its frame: past room for any tunnel's
/// outer headers and a virtio-net header. The worker moves the packet to
/// its tunnel's offset.
pub const READ_BASE: usize = 192;

/// Buffer group of the read frames.
const BGID: u16 = 0;

/// An operation whose completion has arrived.
#[derive(Debug)]
pub struct Completed {
    pub op: Op,
    /// The frame; a read that ended without data (cancelled, out of
    /// buffers, failed) has none.
    pub frame: Option<Frame>,
    /// Caller's tag (the tunnel id).
    pub tag: u16,
    /// Bytes the write offered (0 for a read).
    pub expected: u32,
    /// Bytes written or read, or the negated errno.
    pub result: i32,
}

struct InFlight {
    op: Op,
    frame: Frame,
    tag: u16,
    expected: u32,
}

/// user_data of cancel requests; not a frame index.
const CANCEL_TAG: u64 = u64::MAX;
/// user_data bit of multishot reads (the device's file slot below it).
const READ_TAG: u64 = 1 << 62;

/// The provided-buffer ring: frames the kernel may read packets into.
struct ReadPool {
    /// `entries` `io_uring_buf`s, page-aligned (mmap).
    ring: NonNull<types::BufRingEntry>,
    entries: u16,
    tail: u16,
    /// Frames in the ring, by buffer id.
    slots: Vec<Option<Frame>>,
    free_slots: Vec<u16>,
}

impl ReadPool {
    fn bytes(entries: u16) -> usize {
        usize::from(entries) * std::mem::size_of::<types::BufRingEntry>()
    }

    fn new(entries: u16) -> io::Result<ReadPool> {
        // SAFETY: an anonymous private mapping; no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(entries),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(ReadPool {
            ring,
            entries,
            tail: 0,
            slots: (0..entries).map(|_| None).collect(),
            free_slots: (0..entries).rev().collect(),
        })
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Publishes the entries written since the last call.
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
        // SAFETY: the mapping made in `new`; the ring was unregistered (or
        // the io_uring closed) before the pool drops.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), Self::bytes(self.entries)) };
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
    unsubmitted: usize,
    pool: ReadPool,
    /// Which file slots have a multishot read armed.
    armed: Vec<bool>,
    armed_count: usize,
}

impl DeviceIo {
    /// Creates a ring with `entries` submission slots, a table of
    /// `file_slots` registered files holding `files` (the worker's device
    /// queue fds, in tunnel order), the UMEM of `xsk` as fixed buffer 0, and
    /// room for `read_frames` frames (a power of two) for device reads.
    pub fn new(
        entries: u32,
        file_slots: u32,
        files: &[RawFd],
        xsk: &Xsk,
        read_frames: u16,
    ) -> io::Result<DeviceIo> {
        let ring = IoUring::builder().build(entries)?;
        let pool = ReadPool::new(read_frames)?;
        // SAFETY: the ring memory is `read_frames` entries, page-aligned,
        // and lives in `pool` until after the io_uring is closed (fields
        // drop in order: `ring` before `pool`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.ring.as_ptr() as u64,
                read_frames,
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
            unsubmitted: 0,
            pool,
            armed: vec![false; file_slots as usize],
            armed_count: 0,
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

    /// Frames held by io_uring: in writes in flight and waiting for reads.
    pub fn in_flight(&self) -> usize {
        self.count + self.pool.len()
    }

    /// Frames waiting in the read pool for packets from the devices.
    pub fn in_reads(&self) -> usize {
        self.pool.len()
    }

    /// Writes in flight.
    pub fn writes(&self) -> usize {
        self.count
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
        if len == 0
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

    /// Gives `frame` to the read pool (a packet lands at [`READ_BASE`]).
    /// When the pool is full the frame comes back as `Err`. Call
    /// [`DeviceIo::publish_reads`] after a run of these.
    #[inline]
    pub fn provide(&mut self, frame: Frame) -> Result<(), Frame> {
        let cap = Xsk::capacity(&frame);
        if cap <= READ_BASE + 64 || frame.addr() + cap > self.region.len {
            return Err(frame);
        }
        let Some(bid) = self.pool.free_slots.pop() else {
            return Err(frame);
        };
        let addr = self.region.base.as_ptr() as u64 + (frame.addr() + READ_BASE) as u64;
        let i = usize::from(self.pool.tail & (self.pool.entries - 1));
        // SAFETY: `i` < entries, inside the mapping; the kernel only reads
        // entries before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.pool.ring.as_ptr().add(i) };
        entry.set_addr(addr);
        entry.set_len((cap - READ_BASE) as u32);
        entry.set_bid(bid);
        self.pool.tail = self.pool.tail.wrapping_add(1);
        // The pool owns the frame until a read completion names its bid;
        // the memory lies in the registered UMEM, kept mapped by `self`.
        self.pool.slots[usize::from(bid)] = Some(frame);
        Ok(())
    }

    /// Makes frames given with [`DeviceIo::provide`] visible to the kernel.
    #[inline]
    pub fn publish_reads(&mut self) {
        self.pool.publish();
    }

    /// Frames the read pool has room for.
    pub fn read_room(&self) -> usize {
        self.pool.free_slots.len()
    }

    /// Arms a multishot read on registered file `file` unless one is armed.
    /// Returns false when the submission queue is full.
    #[inline]
    pub fn arm_read(&mut self, file: u32) -> bool {
        let f = file as usize;
        if f >= self.armed.len() || self.armed[f] {
            return true;
        }
        let sqe = opcode::ReadMulti::new(types::Fixed(file), 0, BGID)
            .build()
            .user_data(READ_TAG | u64::from(file));
        // SAFETY: the read's buffers come from the pool, all inside the
        // registered UMEM and owned by the pool until their completions.
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
        });
        self.count += 1;
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
                let frame = cqueue::buffer_select(cqe.flags()).and_then(|bid| {
                    let f = pool.slots.get_mut(usize::from(bid))?.take()?;
                    pool.free_slots.push(bid);
                    Some(f)
                });
                done(Completed {
                    op: Op::Read,
                    frame,
                    tag: file as u16,
                    expected: 0,
                    result: cqe.result(),
                });
                continue;
            }
            let idx = ud as usize;
            if let Some(f) = in_flight.get_mut(idx).and_then(Option::take) {
                n += 1;
                done(Completed {
                    op: f.op,
                    frame: Some(f.frame),
                    tag: f.tag,
                    expected: f.expected,
                    result: cqe.result(),
                });
            }
        }
        self.count -= n;
        n
    }

    /// Takes every frame back from the read pool. Only with no read armed
    /// (after [`DeviceIo::drain`]): the buffer ring is unregistered and
    /// registered again empty.
    pub fn reclaim_reads(&mut self, out: &mut Vec<Frame>) -> io::Result<()> {
        if self.armed_count > 0 {
            return Err(io::Error::other("read pool reclaimed with reads armed"));
        }
        self.ring.submitter().unregister_buf_ring(BGID)?;
        for (bid, slot) in self.pool.slots.iter_mut().enumerate() {
            if let Some(f) = slot.take() {
                out.push(f);
                self.pool.free_slots.push(bid as u16);
            }
        }
        self.pool.tail = 0;
        self.pool.publish();
        // SAFETY: as in `new`: the same mapping, still owned by the pool.
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                self.pool.ring.as_ptr() as u64,
                self.pool.entries,
                BGID,
                0,
            )
        }
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
            self.ring.submit_and_wait(1)?;
            self.reap(&mut done);
        }
        Ok(())
    }
}

impl Drop for DeviceIo {
    fn drop(&mut self) {
        // The kernel may still be reading frames; wait for it before the
        // ring (and with it our hold on the UMEM) goes away.
        let _ = self.drain(|_| {});
    }
}
