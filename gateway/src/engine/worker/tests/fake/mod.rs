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

mod devices;
pub use devices::{Event, FakeDevices};

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
