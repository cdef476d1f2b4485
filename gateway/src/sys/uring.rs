//! io_uring reads and writes of packets straight between UMEM frames and
//! tap/tun queues.
//!
//! The UMEM is registered as one fixed buffer and the device queues as
//! registered files, so each write is a `WriteFixed` with no copy and no
//! per-write page pinning. The writer, not its caller, keeps the memory
//! alive until the kernel is done: it holds a handle on the UMEM and owns
//! each [`Frame`] while its write is in flight, handing it back only with
//! the completion.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
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

/// An operation whose completion has arrived.
#[derive(Debug)]
pub struct Completed {
    pub op: Op,
    pub frame: Frame,
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

/// One ring per worker.
pub struct DeviceIo {
    ring: IoUring,
    /// Keeps the registered UMEM mapped while writes are in flight.
    _umem: Umem,
    region: Region,
    /// Indexed by frame index; a frame is in flight at most once.
    in_flight: Vec<Option<InFlight>>,
    count: usize,
    unsubmitted: usize,
}

impl DeviceIo {
    /// Creates a ring with `entries` submission slots, a table of
    /// `file_slots` registered files holding `files` (the worker's device
    /// queue fds, in tunnel order) and the UMEM of `xsk` as fixed buffer 0.
    pub fn new(entries: u32, file_slots: u32, files: &[RawFd], xsk: &Xsk) -> io::Result<DeviceIo> {
        let ring = IoUring::builder().build(entries)?;
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
        })
    }

    /// Puts `files` in the registered file table from slot 0 (-1 empties a
    /// slot). Only with nothing in flight: an operation holds its file by
    /// slot number.
    pub fn update_files(&mut self, files: &[RawFd]) -> io::Result<()> {
        if self.count > 0 {
            return Err(io::Error::other("files replaced with operations in flight"));
        }
        if !files.is_empty() {
            self.ring.submitter().register_files_update(0, files)?;
        }
        Ok(())
    }

    /// Operations (reads and writes) in flight.
    pub fn in_flight(&self) -> usize {
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

    /// Queues a read from registered file `file` into `frame` at `offset`,
    /// up to the end of the frame. When the submission queue is full the
    /// frame comes back as `Err`.
    #[inline]
    pub fn push_read(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        tag: u16,
    ) -> Result<(), Frame> {
        let idx = Xsk::frame_index(&frame);
        let cap = Xsk::capacity(&frame);
        let start = frame.addr() + offset;
        if offset >= cap
            || frame.addr() + cap > self.region.len
            || idx >= self.in_flight.len()
            || self.in_flight[idx].is_some()
        {
            return Err(frame);
        }
        let len = cap - offset;
        let ptr = self.region.base.as_ptr().wrapping_add(start);
        let sqe = opcode::ReadFixed::new(types::Fixed(file), ptr, len as u32, 0)
            .offset(0)
            .build()
            .user_data(idx as u64);
        // SAFETY: `ptr..ptr + len` lies inside fixed buffer 0 and inside
        // `frame` (checked above); `queue` hands the frame to this writer
        // until the completion arrives, and the writer holds the UMEM mapped.
        unsafe { self.queue(&sqe, idx, Op::Read, frame, tag, 0) }
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

    /// Hands every queued write to the kernel in one system call.
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
        for cqe in self.ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(f) = in_flight.get_mut(idx).and_then(Option::take) {
                n += 1;
                done(Completed {
                    op: f.op,
                    frame: f.frame,
                    tag: f.tag,
                    expected: f.expected,
                    result: cqe.result(),
                });
            }
        }
        self.count -= n;
        n
    }

    /// Cancels outstanding reads (a read from an idle device would wait
    /// forever), waits for everything in flight and hands the frames back.
    pub fn drain(&mut self, mut done: impl FnMut(Completed)) -> io::Result<()> {
        self.submit()?;
        if self.count > 0 {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel request references no memory.
            while unsafe { self.ring.submission().push(&cancel) }.is_err() {
                self.ring.submit()?;
            }
        }
        while self.count > 0 {
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
