//! What the worker needs of the kernel, as two small traits: the AF_XDP
//! socket with its UMEM ([`Socket`]) and the device queues behind one
//! io_uring ([`Devices`]). The gateway runs on [`Xsk`] and [`DeviceIo`];
//! the engine's unit tests run on in-memory fakes of both (see
//! `engine/worker/tests/fake.rs`), without root.
//!
//! Frame ownership is in the types: a frame is a value that is neither
//! `Copy` nor `Clone`, handed to the socket's rings or to a device write
//! by moving it, and handed back the same way.

use std::io;
use std::os::fd::RawFd;

use crate::io::uring::{Completed, DeviceIo, Piece};
use crate::io::xsk::{Frame, Xsk, XskStats};

/// The AF_XDP socket: its four rings and the memory of its frames.
pub trait Socket {
    /// A frame of the socket's UMEM, owned by whoever holds the value.
    type Frame;

    /// Moves up to `max` received frames from the RX ring into `out`.
    fn receive(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// Hands frames from the end of `frames` to the fill ring, leaving
    /// `keep` behind. Returns how many moved.
    fn fill(&mut self, frames: &mut Vec<Self::Frame>, keep: usize) -> usize;
    /// Tells the kernel about new fill-ring entries if it asked to be told.
    fn wake_fill_if_needed(&mut self) -> io::Result<()>;
    /// Hands frames from the front of `frames` to the TX ring (as many as
    /// it has room for) and kicks the kernel; `outstanding` frames are in
    /// the ring already. Returns how many moved.
    fn transmit(&mut self, frames: &mut Vec<Self::Frame>, outstanding: u64) -> io::Result<usize>;
    /// Takes the frames the kernel has sent back from the completion ring.
    fn complete(&mut self, out: &mut Vec<Self::Frame>) -> usize;
    /// The packet bytes of a frame.
    fn data_mut<'a>(&'a self, frame: &'a mut Self::Frame) -> &'a mut [u8];
    /// The whole data area of a frame, to its end (its length set to all
    /// of it until [`Socket::set_len`]).
    fn buffer_mut<'a>(&'a self, frame: &'a mut Self::Frame) -> &'a mut [u8];
    /// Sets the number of packet bytes in a frame.
    fn set_len(&self, frame: &mut Self::Frame, len: usize);
    /// One busy poll of the NIC queue.
    fn busy_poll(&self);
    /// The fd to wait on for received packets (-1: none).
    fn fd(&self) -> RawFd;
    /// The kernel's counters of the socket.
    fn stats(&self) -> io::Result<XskStats>;
}

/// The worker's device queues behind one io_uring: writes of frames into
/// devices (one frame, a gathered run, or another worker's frames), one
/// armed read per device into a pool of read buffers, and completions.
/// A write holds its frames until its completion hands them back.
#[allow(clippy::too_many_arguments)]
pub trait Devices<F> {
    /// Queues a write of `len` bytes of `frame` from `offset` into device
    /// queue `file`. A full submission queue hands the frame back.
    fn push(&mut self, file: u32, frame: F, offset: usize, len: usize, tag: u16) -> Result<(), F>;
    /// Queues one write of `frame`'s bytes followed by every piece's.
    fn push_gather(
        &mut self,
        file: u32,
        frame: F,
        offset: usize,
        len: usize,
        rest: Vec<Piece<F>>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (F, Vec<Piece<F>>)>;
    /// As [`Devices::push_gather`], of frames worker `peer` handed over.
    fn push_foreign(
        &mut self,
        peer: usize,
        file: u32,
        frame: F,
        offset: usize,
        len: usize,
        rest: Vec<Piece<F>>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (F, Vec<Piece<F>>)>;
    /// An empty vector of pieces (reused).
    fn pieces(&mut self) -> Vec<Piece<F>>;
    /// Gives a vector of pieces back for reuse.
    fn recycle(&mut self, v: Vec<Piece<F>>);
    /// Hands the kernel what is queued.
    fn submit(&mut self) -> io::Result<()>;
    /// Lets completions the kernel holds for this thread land (io_uring's
    /// task work, run at a system call); a no-op where there is none.
    fn run_task_work(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Takes the completions that have arrived (a read that ends for good,
    /// for want of buffers or by a cancel, comes without a buffer and is
    /// armed again by [`Devices::arm_reads`]).
    fn reap(&mut self, done: impl FnMut(Completed<F>)) -> usize;
    /// Cancels everything in flight (reads, and writes the kernel has not
    /// finished, which end with ECANCELED) and waits for every completion.
    fn drain(&mut self, done: impl FnMut(Completed<F>)) -> io::Result<()>;
    /// The bytes read buffer `bid` holds.
    fn read_data(&self, bid: u16, len: usize) -> &[u8];
    /// Gives read buffer `bid` back to the pool.
    fn release_read(&mut self, bid: u16);
    /// Arms a read on every device queue that has none, except the files
    /// `gone` marks (or past its end), as far as there is room to queue
    /// them (the rest on a later call). Costs the number of reads that
    /// ended since the last call, not the number of devices.
    fn arm_reads(&mut self, gone: &[bool]);
    /// Read buffers in the pool.
    fn reads_ready(&self) -> usize;
    /// Frames held by this worker's own writes, from their push to the
    /// reaping of their completion (a gathered write holds several): the
    /// ledger's `in_flight`. Not a count of operations.
    fn in_flight(&self) -> usize;
    /// Writes of other workers' frames in flight.
    fn foreign_in_flight(&self) -> usize;
    /// The fd to wait on for completions (-1: none).
    fn fd(&self) -> RawFd;
    /// Ends the reads of file slots `slots` and waits until none is armed
    /// and no write (own or another worker's) is in flight, handing back
    /// what completes meanwhile; the reads of other slots go on.
    fn settle(&mut self, slots: &[u32], done: impl FnMut(Completed<F>)) -> io::Result<()>;
    /// Replaces the device queues of the slots given (-1: none there), and
    /// arms reads on the new ones. Only after [`Devices::settle`] of those
    /// slots: an operation names its file by slot.
    fn replace_files(&mut self, changed: &[(u32, RawFd)]) -> io::Result<()>;
}

impl Socket for Xsk {
    type Frame = Frame;

    #[inline]
    fn receive(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        Xsk::receive(self, out, max)
    }
    #[inline]
    fn fill(&mut self, frames: &mut Vec<Frame>, keep: usize) -> usize {
        Xsk::fill(self, frames, keep)
    }
    #[inline]
    fn wake_fill_if_needed(&mut self) -> io::Result<()> {
        Xsk::wake_fill_if_needed(self)
    }
    #[inline]
    fn transmit(&mut self, frames: &mut Vec<Frame>, outstanding: u64) -> io::Result<usize> {
        Xsk::transmit(self, frames, outstanding)
    }
    #[inline]
    fn complete(&mut self, out: &mut Vec<Frame>) -> usize {
        Xsk::complete(self, out)
    }
    #[inline]
    fn data_mut<'a>(&'a self, frame: &'a mut Frame) -> &'a mut [u8] {
        Xsk::data_mut(self, frame)
    }
    #[inline]
    fn buffer_mut<'a>(&'a self, frame: &'a mut Frame) -> &'a mut [u8] {
        Xsk::buffer_mut(self, frame)
    }
    #[inline]
    fn set_len(&self, frame: &mut Frame, len: usize) {
        Xsk::set_len(self, frame, len)
    }
    #[inline]
    fn busy_poll(&self) {
        Xsk::busy_poll(self)
    }
    fn fd(&self) -> RawFd {
        Xsk::fd(self)
    }
    fn stats(&self) -> io::Result<XskStats> {
        Xsk::stats(self)
    }
}

impl Devices<Frame> for DeviceIo {
    #[inline]
    fn push(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        tag: u16,
    ) -> Result<(), Frame> {
        DeviceIo::push(self, file, frame, offset, len, tag)
    }
    #[inline]
    fn push_gather(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        rest: Vec<Piece>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (Frame, Vec<Piece>)> {
        DeviceIo::push_gather(self, file, frame, offset, len, rest, tag, packets)
    }
    #[inline]
    fn push_foreign(
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
        DeviceIo::push_foreign(self, peer, file, frame, offset, len, rest, tag, packets)
    }
    #[inline]
    fn pieces(&mut self) -> Vec<Piece> {
        DeviceIo::pieces(self)
    }
    #[inline]
    fn recycle(&mut self, v: Vec<Piece>) {
        DeviceIo::recycle(self, v)
    }
    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        DeviceIo::submit(self)
    }
    #[inline]
    fn run_task_work(&mut self) -> io::Result<()> {
        DeviceIo::run_task_work(self)
    }
    #[inline]
    fn reap(&mut self, done: impl FnMut(Completed)) -> usize {
        DeviceIo::reap(self, done)
    }
    fn drain(&mut self, done: impl FnMut(Completed)) -> io::Result<()> {
        DeviceIo::drain(self, done)
    }
    #[inline]
    fn read_data(&self, bid: u16, len: usize) -> &[u8] {
        DeviceIo::read_data(self, bid, len)
    }
    #[inline]
    fn release_read(&mut self, bid: u16) {
        DeviceIo::release_read(self, bid)
    }
    #[inline]
    fn arm_reads(&mut self, gone: &[bool]) {
        DeviceIo::arm_reads(self, gone)
    }
    #[inline]
    fn reads_ready(&self) -> usize {
        DeviceIo::reads_ready(self)
    }
    #[inline]
    fn in_flight(&self) -> usize {
        DeviceIo::in_flight(self)
    }
    #[inline]
    fn foreign_in_flight(&self) -> usize {
        DeviceIo::foreign_in_flight(self)
    }
    fn fd(&self) -> RawFd {
        DeviceIo::fd(self)
    }
    fn settle(&mut self, slots: &[u32], done: impl FnMut(Completed)) -> io::Result<()> {
        DeviceIo::settle(self, slots, done)
    }
    fn replace_files(&mut self, changed: &[(u32, RawFd)]) -> io::Result<()> {
        DeviceIo::replace_files(self, changed)
    }
}
