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

mod reads;
mod writes;

use reads::ReadPool;

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
    /// The device's file slot.
    file: u32,
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

/// The slots of `files` that hold a device (-1: none), last first.
fn listed(files: &[RawFd]) -> Vec<u32> {
    (0..files.len() as u32)
        .rev()
        .filter(|&i| files[i as usize] >= 0)
        .collect()
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
    /// Writes in flight (own and other workers') per file slot.
    writes_on: Vec<u32>,
    /// File slots with a device and no read armed: those registered, and
    /// those whose read ended since (see [`DeviceIo::arm_reads`]).
    to_arm: Vec<u32>,
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
        // Completions of device reads are task work the kernel queues for
        // this thread. Without COOP_TASKRUN it interrupts the thread (an
        // IPI, a VM exit under a hypervisor) to run it; with it, the work
        // waits for this thread's next system call, and TASKRUN_FLAG says
        // in the ring when some is waiting, which the loop looks at
        // ([`DeviceIo::run_task_work`]). A sleeping thread is still woken.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)?;
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
            ring.submitter()
                .register_buf_ring_with_flags(pool.ring_addr(), read_bufs, BGID, 0)?
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
            writes_on: vec![0; file_slots as usize],
            armed_count: 0,
            to_arm: listed(files),
            spare_pieces: Vec::new(),
            spare_iov: Vec::new(),
            multishot,
            foreign: Vec::new(),
            foreign_free: Vec::new(),
            peers: Vec::new(),
        })
    }

    /// Ends the reads of file slots `slots` (one cancel each) and waits
    /// until none of them has a read armed or a write in flight, handing
    /// back what completes meanwhile. The other slots' reads and writes go
    /// on: a reload that touches one device of 10,000 cancels one read.
    pub fn settle(&mut self, slots: &[u32], mut done: impl FnMut(Completed)) -> io::Result<()> {
        self.submit()?;
        let armed = |me: &Self, s: u32| me.armed.get(s as usize).copied().unwrap_or(false);
        for &s in slots {
            if armed(self, s) {
                let cancel =
                    opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(s)).all())
                        .build()
                        .user_data(CANCEL_TAG);
                // SAFETY: a cancel request references no memory.
                while unsafe { self.ring.submission().push(&cancel) }.is_err() {
                    self.ring.submit()?;
                }
                self.unsubmitted += 1;
            }
        }
        let busy = |me: &Self, s: u32| {
            armed(me, s) || me.writes_on.get(s as usize).is_some_and(|&w| w > 0)
        };
        while slots.iter().any(|&s| busy(self, s)) {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                // A signal for the process landed on this thread: wait again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            self.reap(&mut done);
        }
        Ok(())
    }

    /// Puts each `(slot, fd)` in the registered file table (-1 empties the
    /// slot) and arms reads on the new ones. Only once [`DeviceIo::settle`]
    /// has ended the slots' reads and writes: an operation names its file
    /// by slot, and its completion its tunnel by number (which, for the
    /// slots that stay, stays).
    pub fn replace_files(&mut self, changed: &[(u32, RawFd)]) -> io::Result<()> {
        let busy = |s: u32| {
            self.armed.get(s as usize).copied().unwrap_or(false)
                || self.writes_on.get(s as usize).is_some_and(|&w| w > 0)
        };
        if changed.iter().any(|&(s, _)| busy(s)) {
            return Err(io::Error::other(
                "files replaced with operations on them in flight",
            ));
        }
        for &(slot, fd) in changed {
            self.ring.submitter().register_files_update(slot, &[fd])?;
            if fd >= 0 {
                self.to_arm.push(slot);
            }
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

    /// Hands every queued operation to the kernel in one system call.
    #[inline]
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Enters the kernel when it has completions queued for this thread
    /// to run (device reads that found a packet), so that they land in
    /// the completion queue now rather than at the next system call.
    #[inline]
    pub fn run_task_work(&mut self) -> io::Result<()> {
        if self.ring.submission().taskrun() {
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
                            self.to_arm.push(file as u32);
                        }
                    }
                }
                let buf = cqueue::buffer_select(cqe.flags());
                if buf.is_some() {
                    pool.taken();
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
                    if let Some(w) = self.writes_on.get_mut(f.file as usize) {
                        *w -= 1;
                    }
                    self.foreign_free.push(slot);
                    done(f.completed(cqe.result(), Some(peer), &mut self.spare_iov));
                }
                continue;
            }
            let idx = ud as usize;
            if let Some(f) = in_flight.get_mut(idx).and_then(Option::take) {
                n += 1;
                if let Some(w) = self.writes_on.get_mut(f.file as usize) {
                    *w -= 1;
                }
                self.write_frames -= 1 + f.rest.len();
                done(f.completed(cqe.result(), None, &mut self.spare_iov));
            }
        }
        self.count -= n;
        n
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
            self.pool.leak();
        }
    }
}
