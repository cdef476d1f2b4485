//! A worker: owns one AF_XDP socket (one NIC RX queue), its UMEM, one
//! io_uring and one queue fd of every tunnel device. Nothing on its path is
//! shared or locked; it publishes counters with relaxed stores.
//!
//! Inbound: take a batch from the RX ring → decapsulate each frame in place
//! → queue a `WriteFixed` per packet, or one `Writev` per run of TCP
//! segments of one flow coalesced into a GSO packet ([`crate::gro`]) → one
//! submit per loop → the frames go back to the fill ring when the write
//! completes. Every write starts with a virtio-net header, written into the
//! room the outer headers leave.
//!
//! Outbound: each device queue has one multishot read armed, taking
//! buffers from the worker's read pool (an io_uring provided-buffer ring).
//! A packet read is copied into a free UMEM frame at the offset that leaves
//! room for its tunnel's outer headers (a GSO packet is cut into segments,
//! one frame each), encapsulated in place, and the frame goes to the TX
//! ring; the completion ring hands it back. The fill ring never takes the
//! last [`TX_RESERVE`] free frames, so replies find frames under any load. ARP,
//! neighbour solicitations and too-big packets are answered with a write
//! back into the device from the same frame.
//!
//! Every frame is always in exactly one place (see [`FrameCounts`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};

use crate::datapath::decap::{decap, Delivery, Kind, RxState};
use crate::datapath::drop_reason::DropReason;
use crate::datapath::encap::{encap, NextHop, TunnelTx, TxContext, Verdict};
use crate::datapath::flow::l3_of;
use crate::datapath::next_hop::NextHops;
use crate::datapath::offload::{self, Run, Segmenter, VnetHdr, VNET_HDR_LEN};
use crate::datapath::ratelimit::RateLimit;
use crate::datapath::reasm::{Outcome, Reassembler};
use crate::datapath::tunnel::{DeviceKind, TunnelTable, MAX_TUNNELS};
use crate::engine::handover::{Job, Link, Returned};
use crate::engine::ports::{Devices, Socket};
use crate::io::uring::{Completed, Op, Piece};
use crate::io::xsk::Xsk;
use crate::telemetry::stats::{FrameCounts, LocalStats, TunnelCounters, WorkerStats};

/// Empty polls before an adaptive worker blocks in poll(2).
const ADAPTIVE_SPINS: u32 = 2048;
/// How long an adaptive worker blocks at most before looking at its
/// completions and the stop flag again.
const ADAPTIVE_SLEEP_MS: i32 = 10;
/// Idle polls between yields of a busy-polling worker.
const BUSY_YIELD_EVERY: u32 = 64;
/// Loop iterations between looks for fragments past their timeout.
const EXPIRE_EVERY: u32 = 1024;
/// Idle polls between refreshes of the kernel's socket statistics.
const IDLE_REFRESH: u32 = 4096;
/// Busy iterations between publications of the counters.
const PUBLISH_EVERY: u32 = 64;
/// Busy iterations between refreshes of the kernel's socket statistics.
const XSK_REFRESH_BUSY: u32 = 1024;
/// Iterations under load between looks for a new tunnel list.
const CONTROL_EVERY: u32 = 64;
/// Free frames the fill ring leaves for packets read from the devices (at
/// most a quarter of the UMEM).
const TX_RESERVE: u64 = 512;
/// Read buffers per worker (of 68 KiB: a GSO packet fits in one).
const READ_BUFS: u16 = 64;
/// What the devices may hand over: partial checksums, TCP segmentation
/// (IPv4, IPv6, with ECN) and UDP segmentation (IPv4, IPv6).
pub const DEVICE_OFFLOADS: u32 = crate::io::tap::TUN_F_CSUM
    | crate::io::tap::TUN_F_TSO4
    | crate::io::tap::TUN_F_TSO6
    | crate::io::tap::TUN_F_TSO_ECN
    | crate::io::tap::TUN_F_USO4
    | crate::io::tap::TUN_F_USO6;
/// Tag bit of writes that answer the device (ARP, ND) rather than deliver a
/// decapsulated packet.
const REPLY: u16 = 0x8000;
/// Tag bit of writes of an ICMP "too big" error into the device.
const REPLY_ICMP: u16 = 0x4000;
/// Flows coalesced at once in an RX batch (the kernel's GRO holds 8
/// packets per NAPI context; twice that here, since a batch of 64 from a
/// queue a NIC hashes many flows onto interleaves them).
const GRO_FLOWS: usize = 16;
/// ICMP "fragmentation needed" / "packet too big" a worker takes per
/// second: each can only lower a path MTU, but a stream of them (from
/// anyone who can address the tunnel's local address) costs work.
const PMTU_UPDATES_PER_SECOND: u32 = 100;

/// How a worker waits when its rings are empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on the rings; the worker's core is given to it.
    Busy,
    /// Spin briefly, then block in poll(2) until packets arrive.
    Adaptive,
}

impl std::fmt::Display for PollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PollMode::Busy => "busy",
            PollMode::Adaptive => "adaptive",
        })
    }
}

/// A run of TCP segments of one flow waiting to be written as one.
struct OpenRun<F> {
    tunnel: u16,
    run: Run,
    /// The first segment: its frame, where it starts and how long it is,
    /// and where its IP header starts.
    first: F,
    offset: usize,
    len: usize,
    l3: usize,
    /// The payloads of the others.
    rest: Vec<Piece<F>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue {queue}: io_uring setup failed ({io}); the kernel must allow io_uring (sysctl kernel.io_uring_disabled=0)")]
    Uring { queue: u32, io: std::io::Error },
    #[error("queue {queue}: {what} failed ({io})")]
    Io {
        queue: u32,
        what: &'static str,
        io: std::io::Error,
    },
}

/// The tunnel list in force, in one piece: replaced whole on a reload.
#[derive(Clone)]
pub struct Tunnels {
    pub rx: Arc<TunnelTable>,
    pub tx: Arc<Vec<TunnelTx>>,
    /// Next-hop MACs per tunnel, and the underlay's own MAC.
    pub next_hops: Arc<NextHops>,
    /// Tells tunnel lists apart: a write one worker hands another names
    /// its tunnel by index, valid only in the list of this generation.
    pub generation: u64,
}

/// What a worker shares with the rest of the gateway.
pub struct Shared {
    pub tunnels: Tunnels,
    pub stop: Arc<AtomicBool>,
    /// Reconfigurations from the control thread.
    pub control: Receiver<Reconfig>,
}

/// A device queue of the new tunnel list.
pub enum DeviceQueue {
    /// The worker's queue of old tunnel `i`'s device.
    Keep(usize),
    /// A newly opened queue.
    New(OwnedFd),
}

/// A new tunnel list for a running worker. The worker finishes with the
/// old devices (cancels its reads, waits for its writes), switches, and
/// answers on `done`. Packets in the RX ring wait meanwhile; none is lost.
pub struct Reconfig {
    pub tunnels: Tunnels,
    /// One per new tunnel, in order.
    pub devices: Vec<DeviceQueue>,
    /// For each new tunnel, the old tunnel whose counters it continues.
    pub counters_from: Vec<Option<usize>>,
    pub done: Sender<Result<(), String>>,
}

/// How a worker runs: fixed for its life.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The NIC RX queue (and AF_XDP socket) it serves.
    pub queue: u32,
    /// The core it is pinned to.
    pub core: Option<usize>,
    /// Frames taken from the RX ring at once.
    pub batch: usize,
    pub poll: PollMode,
    /// Drive the kernel's busy polling of the NIC queue when idle.
    pub busy_poll: bool,
    /// Coalesce UDP too (the devices take UDP GSO packets).
    pub coalesce_udp: bool,
    pub faults: Faults,
}

/// Faults injected on purpose, for the failure tests.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Panic once this many frames were received
    /// (`GATEWAY_FAULT_PANIC_AFTER_RX`).
    pub panic_after_rx: u64,
    /// Keep a frame another worker handed over, as a bug would
    /// (`GATEWAY_FAULT_KEEP_FOREIGN_FRAME`).
    pub keep_foreign_frame: bool,
}

impl Faults {
    /// None.
    pub const NONE: Faults = Faults {
        panic_after_rx: u64::MAX,
        keep_foreign_frame: false,
    };

    /// The faults the environment asks for.
    pub fn from_env() -> Faults {
        Faults {
            panic_after_rx: std::env::var("GATEWAY_FAULT_PANIC_AFTER_RX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX),
            keep_foreign_frame: std::env::var_os("GATEWAY_FAULT_KEEP_FOREIGN_FRAME").is_some(),
        }
    }
}

/// What a worker's io_uring needs to be set up (see [`Worker::run`]).
pub struct DeviceSetup<'a> {
    /// Submission queue entries.
    pub entries: u32,
    /// The worker's queue of each tunnel's device, in tunnel order.
    pub files: &'a [RawFd],
    /// Read buffers.
    pub read_bufs: u16,
}

/// One worker, before it runs: its socket, its frames, its device queues.
pub struct Worker<S: Socket = Xsk> {
    pub queue: u32,
    settings: Settings,
    xsk: S,
    free: Vec<S::Frame>,
    /// This worker's queue of each tunnel's device, in tunnel order;
    /// `None` once the device was deleted from under the gateway.
    devices: Vec<Option<OwnedFd>>,
    shared: Shared,
    stats: Arc<WorkerStats>,
    tunnel_counters: Arc<TunnelCounters>,
    /// The other workers, when device writes are spread over them.
    spread: Option<Link<S::Frame>>,
}

/// The worker's loop state.
struct State<F> {
    local: LocalStats,
    rx: RxState,
    /// Outer fragments waiting for the rest of their datagram.
    reasm: Reassembler,
    loops: u32,
    frames: FrameCounts,
    /// Free frames the fill ring leaves for packets read from the devices.
    tx_reserve: usize,
    /// Most frames the way out may hold at once (waiting for or in the TX
    /// ring): the rest stay with the way in, so an outbound backlog that the
    /// TX ring drains slowly cannot starve the fill ring (seen under a flood:
    /// every frame in TX, the fill ring empty, received packets lost).
    tx_cap: usize,
    /// Frames holding packets just read, before encapsulation.
    from_device: Vec<(F, usize)>,
    /// Reads (tunnel, buffer, bytes) waiting for enough free frames, in
    /// the order they completed.
    deferred: std::collections::VecDeque<(usize, u16, usize)>,
    /// Devices deleted from under the gateway: no reads, writes dropped.
    gone: Vec<bool>,
    writes_in_flight: usize,
    tx_pending: Vec<F>,
    /// Outer IPv4 IDs, the time and the ICMP budget, for encapsulation.
    tx_cx: TxContext,
    /// Path MTU updates this worker takes per second.
    pmtu_updates: RateLimit,
    /// Runs being coalesced in the current RX batch.
    gro: Vec<OpenRun<F>>,
    /// UDP is coalesced too (the kernel takes UDP GSO packets).
    coalesce_udp: bool,
    /// The other workers, when device writes are spread over them.
    spread: Option<Link<F>>,
    /// Writes other workers handed to this one, by the worker they came
    /// from. (Jobs from a worker already on a newer tunnel list wait here,
    /// in order, until this one switches too; the other workers' go on
    /// meanwhile.)
    jobs_in: Vec<std::collections::VecDeque<Job<F>>>,
    /// Answers to this one's hand-overs (a vector kept for reuse).
    answers_in: Vec<Returned<F>>,
    /// Jobs taken per call, at most (the completion queue's room).
    jobs_per_poll: usize,
}

impl<S: Socket> Worker<S> {
    pub fn new(
        settings: Settings,
        xsk: S,
        frames: Vec<S::Frame>,
        devices: Vec<OwnedFd>,
        shared: Shared,
        stats: Arc<WorkerStats>,
    ) -> Worker<S> {
        let tunnel_counters = stats.tunnels();
        Worker {
            queue: settings.queue,
            settings,
            xsk,
            free: frames,
            devices: devices.into_iter().map(Some).collect(),
            shared,
            stats,
            tunnel_counters,
            spread: None,
        }
    }

    /// The socket (to register its UMEM with the io_uring of another
    /// worker that writes from it).
    pub fn socket(&self) -> &S {
        &self.xsk
    }

    /// Spreads this worker's device writes over the workers of the mesh
    /// `link` belongs to, by inner flow (see [`crate::engine::handover`]).
    pub fn set_spread(&mut self, link: Link<S::Frame>) {
        self.spread = Some(link);
    }

    fn io_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> WorkerError {
        let queue = self.queue;
        move |io| WorkerError::Io { queue, what, io }
    }

    /// Runs until the stop flag is set, on the device queues `open` sets
    /// up (on this thread). Returns with no frame in flight.
    pub fn run<D: Devices<S::Frame>>(
        self,
        open: impl FnOnce(&S, &DeviceSetup<'_>) -> std::io::Result<D>,
    ) -> Result<(), WorkerError> {
        if let Some(core) = self.settings.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(queue = self.queue, core, "could not pin worker to core");
            }
        }
        let mut running = self.start(open)?;
        while running.step()? {}
        running.finish()
    }

    /// Sets up the device queues with `open`, fills the fill ring, and
    /// returns the worker ready for its loop.
    pub fn start<D: Devices<S::Frame>>(
        mut self,
        open: impl FnOnce(&S, &DeviceSetup<'_>) -> std::io::Result<D>,
    ) -> Result<Running<S, D>, WorkerError> {
        let queue = self.queue;
        let batch = self.settings.batch;
        let ntun = self.shared.tunnels.rx.len();
        let total = self.free.len() as u64;
        let tx_reserve = (total / 4).clamp(1, TX_RESERVE) as usize;
        let tx_cap = (total as usize / 2).max(tx_reserve);
        // Room for a few batches of writes and one read per device, with
        // as many devices as a reload may bring.
        let entries = (batch as u32 * 4 + MAX_TUNNELS as u32)
            .next_power_of_two()
            .clamp(64, 32768);
        let io = open(
            &self.xsk,
            &DeviceSetup {
                entries,
                files: &raw_fds(&self.devices),
                read_bufs: READ_BUFS,
            },
        )
        .map_err(|io| WorkerError::Uring { queue, io })?;
        let spread = self.spread.take();
        let workers = spread.as_ref().map_or(0, Link::workers);

        let mut st = State {
            local: LocalStats::new(ntun),
            rx: RxState::new(ntun),
            reasm: Reassembler::new(),
            loops: 0,
            frames: FrameCounts {
                total,
                ..Default::default()
            },
            tx_reserve,
            tx_cap,
            from_device: Vec::with_capacity(64),
            deferred: std::collections::VecDeque::with_capacity(usize::from(READ_BUFS)),
            gone: vec![false; ntun],
            writes_in_flight: 0,
            tx_pending: Vec::with_capacity(batch * 2),
            tx_cx: TxContext::new((queue as u16).wrapping_mul(0x9e37)),
            pmtu_updates: RateLimit::new(PMTU_UPDATES_PER_SECOND),
            gro: Vec::with_capacity(GRO_FLOWS),
            coalesce_udp: self.settings.coalesce_udp,
            spread,
            jobs_in: (0..workers).map(|_| Default::default()).collect(),
            answers_in: Vec::new(),
            jobs_per_poll: (entries as usize / 2).max(1),
        };
        // The fill ring first: received packets are what we must not lose.
        st.frames.in_kernel += self.xsk.fill(&mut self.free, st.tx_reserve) as u64;
        self.xsk
            .wake_fill_if_needed()
            .map_err(self.io_err("fill-ring wakeup"))?;
        Ok(Running {
            rx: Vec::with_capacity(batch),
            done: Vec::with_capacity(entries as usize),
            w: self,
            io,
            st,
            idle: 0,
            // One clock read per loop iteration (not per packet): how the
            // worker's time splits between moving packets and waiting for
            // them, as a poll-mode driver reports it.
            t0: std::time::Instant::now(),
            busy_polls: 0,
        })
    }
}

/// A worker at work: its state, its device queues and the loop's own
/// counters. [`Running::step`] runs one iteration of the loop;
/// [`Running::finish`] takes every frame back.
pub struct Running<S: Socket, D> {
    w: Worker<S>,
    io: D,
    st: State<S::Frame>,
    rx: Vec<S::Frame>,
    done: Vec<Completed<S::Frame>>,
    idle: u32,
    t0: std::time::Instant,
    busy_polls: u32,
}

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

        // 1. io_uring completions: finished writes and reads.
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

        st.frames.free = (w.free.len() + st.tx_pending.len()) as u64;
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
        st.frames.in_tx -= w.xsk.complete(&mut w.free) as u64;
        st.frames.free = w.free.len() as u64;
        st.frames.in_flight = io.in_flight() as u64;
        w.publish(st);
        w.refresh_xsk_stats();
        Ok(())
    }
}

impl<S: Socket> Worker<S> {
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn write<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        file: u32,
        frame: S::Frame,
        offset: usize,
        len: usize,
        tag: u16,
    ) -> Result<(), WorkerError> {
        // A plain virtio-net header (no offload) before the packet, in the
        // room the outer headers (or a read's) leave.
        let mut frame = frame;
        let Some(start) = offset.checked_sub(VNET_HDR_LEN) else {
            st.local.drop(DropReason::DeviceWriteError);
            self.free.push(frame);
            return Ok(());
        };
        let data = self.xsk.data_mut(&mut frame);
        VnetHdr::default().emit(&mut data[start..offset]);
        let to = if tag & (REPLY | REPLY_ICMP) == 0 {
            self.writer_for(st, tag, &data[offset..offset + len])
        } else {
            None
        };
        let (offset, len) = (start, len + VNET_HDR_LEN);
        if let (Some(to), Some(link)) = (to, &mut st.spread) {
            link.hand_over(
                to,
                Job {
                    tunnel: tag,
                    generation: self.shared.tunnels.generation,
                    frame,
                    offset,
                    len,
                    rest: Vec::new(),
                    packets: 1,
                },
            );
            st.frames.at_peers += 1;
            st.local.spread_out += 1;
            return Ok(());
        }
        let mut res = io.push(file, frame, offset, len, tag);
        if let Err(f) = res {
            // Submission queue full: hand the kernel what is queued and
            // try once more.
            io.submit().map_err(self.io_err("io_uring submit"))?;
            res = io.push(file, f, offset, len, tag);
        }
        match res {
            Ok(()) => st.writes_in_flight += 1,
            Err(f) => {
                st.local.drop(DropReason::DeviceWriteError);
                self.free.push(f);
            }
        }
        Ok(())
    }

    /// Writes a decapsulated packet (`offset..offset + len` of the frame)
    /// into tunnel `t`'s device, or holds it to coalesce with the TCP
    /// segments of its flow that follow in the batch.
    #[allow(clippy::too_many_arguments)]
    fn deliver<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        mut frame: S::Frame,
        t: u16,
        offset: usize,
        len: usize,
    ) -> Result<(), WorkerError> {
        let kind = self.device_kind(t);
        let data = self.xsk.data_mut(&mut frame);
        let pkt = &data[offset..offset + len];
        let udp = st.coalesce_udp;
        let Some((l3, seg)) =
            l3_of(kind, pkt).and_then(|l3| Some((l3, offload::parse(pkt, l3, udp)?)))
        else {
            // Not for coalescing; but a run of the same addresses (an
            // unusual packet of a flow being coalesced) must go first.
            if st.gro.iter().any(|r| r.tunnel == t) {
                let mut i = 0;
                while i < st.gro.len() {
                    if st.gro[i].tunnel == t {
                        self.flush_run(io, st, i)?;
                    } else {
                        i += 1;
                    }
                }
            }
            return self.write(io, st, u32::from(t), frame, offset, len, t);
        };
        if let Some(i) = st
            .gro
            .iter()
            .position(|r| r.tunnel == t && r.run.same_flow(&seg))
        {
            if st.gro[i].run.accepts(&seg) {
                let r = &mut st.gro[i];
                r.run.add(&seg);
                r.rest.push(Piece {
                    frame,
                    offset: offset + seg.hdr_len,
                    len: seg.payload,
                });
                if r.run.closed {
                    self.flush_run(io, st, i)?;
                }
                return Ok(());
            }
            // The flow's earlier segments go first.
            self.flush_run(io, st, i)?;
        }
        if !seg.mergeable || seg.push {
            return self.write(io, st, u32::from(t), frame, offset, len, t);
        }
        if st.gro.len() == GRO_FLOWS {
            self.flush_run(io, st, 0)?;
        }
        let rest = io.pieces();
        st.gro.push(OpenRun {
            tunnel: t,
            run: Run::start(seg),
            first: frame,
            offset,
            len,
            l3,
            rest,
        });
        Ok(())
    }

    /// Writes run `i`: one packet as it is, or several as one GSO packet.
    fn flush_run<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        i: usize,
    ) -> Result<(), WorkerError> {
        let mut r = st.gro.swap_remove(i);
        let file = u32::from(r.tunnel);
        if r.rest.is_empty() || r.offset < VNET_HDR_LEN {
            // Alone: written as it came. (Decapsulation always leaves room
            // for the header; were it not so, the others would be counted
            // as write errors, since their pieces lack their headers.)
            let mut rest = std::mem::take(&mut r.rest);
            self.write(io, st, file, r.first, r.offset, r.len, r.tunnel)?;
            for p in rest.drain(..) {
                st.local.drop(DropReason::DeviceWriteError);
                self.free.push(p.frame);
            }
            io.recycle(rest);
            return Ok(());
        }
        let data = self.xsk.data_mut(&mut r.first);
        let vnet = r.run.finish(&mut data[r.offset..r.offset + r.len], r.l3);
        let start = r.offset - VNET_HDR_LEN;
        vnet.emit(&mut data[start..r.offset]);
        let packets = r.run.segments;
        let to = self.writer_for(st, r.tunnel, &data[r.offset..r.offset + r.len]);
        if let (Some(to), Some(link)) = (to, &mut st.spread) {
            st.frames.at_peers += 1 + r.rest.len() as u64;
            st.local.spread_out += u64::from(packets);
            st.local.coalesced += u64::from(packets) - 1;
            st.local.coalesced_writes += 1;
            link.hand_over(
                to,
                Job {
                    tunnel: r.tunnel,
                    generation: self.shared.tunnels.generation,
                    frame: r.first,
                    offset: start,
                    len: r.len + VNET_HDR_LEN,
                    rest: r.rest,
                    packets,
                },
            );
            return Ok(());
        }
        let mut res = io.push_gather(
            file,
            r.first,
            start,
            r.len + VNET_HDR_LEN,
            r.rest,
            r.tunnel,
            packets,
        );
        if let Err((first, rest)) = res {
            // Submission queue full: hand the kernel what is queued and
            // try once more.
            io.submit().map_err(self.io_err("io_uring submit"))?;
            res = io.push_gather(
                file,
                first,
                start,
                r.len + VNET_HDR_LEN,
                rest,
                r.tunnel,
                packets,
            );
        }
        match res {
            Ok(()) => {
                st.writes_in_flight += 1;
                st.local.coalesced += u64::from(packets) - 1;
                st.local.coalesced_writes += 1;
            }
            Err((first, mut rest)) => {
                for _ in 0..packets {
                    st.local.drop(DropReason::DeviceWriteError);
                }
                self.free.push(first);
                self.free.extend(rest.drain(..).map(|p| p.frame));
                io.recycle(rest);
            }
        }
        Ok(())
    }

    /// The other worker that writes this packet of tunnel `t` into its
    /// device, when writes are spread and the flow hashes to another.
    #[inline]
    fn writer_for(&self, st: &State<S::Frame>, t: u16, pkt: &[u8]) -> Option<usize> {
        let link = st.spread.as_ref()?;
        let w = link.writer_of(crate::datapath::flow::flow_hash(self.device_kind(t), pkt));
        (w != link.me).then_some(w)
    }

    /// The kind of tunnel `t`'s device.
    #[inline]
    fn device_kind(&self, t: u16) -> DeviceKind {
        self.shared
            .tunnels
            .tx
            .get(usize::from(t))
            .map_or(DeviceKind::Tun, |x| x.device_kind)
    }

    /// Writes the packets other workers handed to this one into this
    /// one's device queues, and takes back the answers to what this one
    /// handed over. Returns whether there was anything.
    fn spread_poll<D: Devices<S::Frame>>(
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
    fn write_for<D: Devices<S::Frame>>(
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
    fn spread_flush(&mut self, st: &mut State<S::Frame>) {
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
    fn take_back<D: Devices<S::Frame>>(
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
    fn write_prepared<D: Devices<S::Frame>>(
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
    fn spread_stop<D: Devices<S::Frame>>(
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

    /// Arms a read on every device that has none.
    fn post_reads<D: Devices<S::Frame>>(&mut self, io: &mut D, st: &mut State<S::Frame>) {
        // A read armed on an empty pool would end at once (ENOBUFS) and be
        // armed again, round and round; wait for buffers instead.
        if io.reads_ready() == 0 {
            return;
        }
        for t in 0..self.devices.len() {
            if !st.gone[t] && !io.arm_read(t as u32) {
                return;
            }
        }
    }

    fn completed<D: Devices<S::Frame>>(
        &mut self,
        c: Completed<S::Frame>,
        io: &mut D,
        st: &mut State<S::Frame>,
    ) -> Result<(), WorkerError> {
        match c.op {
            Op::Write if c.peer.is_some() => {
                // Another worker's packets, written here: the answer goes
                // back with the frames.
                if c.result == -libc::EBADFD {
                    self.device_gone(st, c.tag);
                }
                let peer = c.peer.unwrap_or_default();
                // (A worker switches lists only with no write in flight.)
                let generation = self.shared.tunnels.generation;
                if let Some(link) = &mut st.spread {
                    link.answer(peer, Returned::Written(c, generation));
                }
            }
            Op::Write => {
                st.writes_in_flight -= 1;
                if c.result == -libc::EBADFD {
                    self.device_gone(st, c.tag);
                }
                account_write(&c, &mut st.local);
                self.take_back(io, c.frame, c.rest);
            }
            Op::Read => {
                let t = usize::from(c.tag);
                let Some(bid) = c.buf else {
                    match -c.result {
                        // Cancelled (a reload or the stop), or the pool ran
                        // dry: no packet was taken; armed again when there
                        // are buffers.
                        libc::ECANCELED | libc::EINTR | libc::ENOBUFS => {}
                        // The device was deleted: a read in progress ends
                        // with EFAULT, later ones with EBADFD. No packet
                        // was lost.
                        libc::EBADFD | libc::EFAULT => self.device_gone(st, c.tag),
                        _ => {
                            // Reading again at once would fail again (and
                            // spin); the control thread opens a new queue.
                            st.local.drop(DropReason::TxDeviceReadError);
                            self.device_gone(st, c.tag);
                        }
                    }
                    return Ok(());
                };
                let n = usize::try_from(c.result).unwrap_or(0);
                st.deferred.push_back((t, bid, n));
                self.process_reads(io, st, false)?;
            }
        }
        Ok(())
    }

    /// Encapsulates and sends what the reads waiting in `st.deferred`
    /// returned, oldest first, as long as there are free frames for all of
    /// a read's packets (a GSO packet needs one per segment); the rest wait,
    /// their buffers out of the ring, so the device holds further packets
    /// rather than the gateway dropping them. `force`: all of them now,
    /// counting packets that find no frame as `tx_ring_full` (before the
    /// tunnel list changes, and at the stop).
    fn process_reads<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        force: bool,
    ) -> Result<(), WorkerError> {
        while let Some(&(t, bid, n)) = st.deferred.front() {
            let data = io.read_data(bid, n);
            // Never more than the fill ring leaves free: a packet of more
            // segments than that (a tiny MSS) goes when the reserve is
            // there, and what finds no frame is counted as `tx_ring_full`,
            // rather than holding every read behind it for ever.
            let need = self.frames_needed(t, data).min(st.tx_reserve);
            let outbound = st.frames.in_tx as usize + st.tx_pending.len();
            if !force && (self.free.len() < need || outbound + need > st.tx_cap) {
                break;
            }
            st.deferred.pop_front();
            self.take_read(st, t, data);
            io.release_read(bid);
            let mut ready = std::mem::take(&mut st.from_device);
            for (frame, len) in ready.drain(..) {
                self.encap_one(io, st, t, frame, len)?;
            }
            st.from_device = ready;
        }
        Ok(())
    }

    /// Frames the packet a read returned will take: one per segment.
    fn frames_needed(&self, t: usize, data: &[u8]) -> usize {
        let (Some(vnet), Some(pkt), Some(tunnel)) = (
            VnetHdr::parse(data),
            data.get(VNET_HDR_LEN..),
            self.shared.tunnels.tx.get(t),
        ) else {
            return 1;
        };
        if vnet.gso_type == offload::GSO_NONE {
            return 1;
        }
        l3_of(tunnel.device_kind, pkt)
            .and_then(|l3| Segmenter::new(pkt, l3, &vnet).ok())
            .map_or(1, |s| s.count())
    }

    /// Copies what one read from tunnel `t`'s device returned (a
    /// virtio-net header and a packet) into free frames, at the offset that
    /// leaves room for the outer headers: one frame, or one per segment of
    /// a GSO packet. They go to `st.from_device` with their lengths; every
    /// packet is counted in `tx_read`, a GSO packet as its segments.
    fn take_read(&mut self, st: &mut State<S::Frame>, t: usize, data: &[u8]) {
        let Some(tunnel) = self.shared.tunnels.tx.get(t) else {
            st.local.tx_read += 1;
            st.local.drop(DropReason::TxMalformed);
            return;
        };
        let off = tunnel.read_offset();
        let (Some(vnet), Some(pkt)) = (VnetHdr::parse(data), data.get(VNET_HDR_LEN..)) else {
            st.local.tx_read += 1;
            st.local.drop(DropReason::TxMalformed);
            return;
        };
        if pkt.is_empty() {
            st.local.tx_read += 1;
            st.local.drop(DropReason::TxMalformed);
            return;
        }
        if vnet.gso_type == offload::GSO_NONE {
            st.local.tx_read += 1;
            let Some(mut frame) = self.free.pop() else {
                st.local.drop(DropReason::TxRingFull);
                return;
            };
            let buf = self.xsk.buffer_mut(&mut frame);
            let fits = off + pkt.len() <= buf.len();
            if fits {
                buf[off..off + pkt.len()].copy_from_slice(pkt);
            }
            if !fits || !offload::complete_checksum(&mut buf[off..off + pkt.len()], &vnet) {
                st.local.drop(DropReason::TxMalformed);
                self.free.push(frame);
                return;
            }
            st.from_device.push((frame, pkt.len()));
            return;
        }
        // A GSO packet: cut it as the kernel's GSO would have.
        let Some(seg) =
            l3_of(tunnel.device_kind, pkt).and_then(|l3| Segmenter::new(pkt, l3, &vnet).ok())
        else {
            st.local.tx_read += 1;
            st.local.drop(DropReason::TxMalformed);
            return;
        };
        st.local.tx_gso_packets += 1;
        for i in 0..seg.count() {
            st.local.tx_read += 1;
            let Some(mut frame) = self.free.pop() else {
                st.local.drop(DropReason::TxRingFull);
                continue;
            };
            let buf = self.xsk.buffer_mut(&mut frame);
            let len = seg.len(i);
            if off + len > buf.len() {
                st.local.drop(DropReason::TxMalformed);
                self.free.push(frame);
                continue;
            }
            seg.write(i, &mut buf[off..]);
            st.from_device.push((frame, len));
        }
    }

    /// Encapsulates a packet of tunnel `t` read into `frame` (`len` bytes
    /// at the tunnel's read offset) and sends it on, or answers the device.
    fn encap_one<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        t: usize,
        mut frame: S::Frame,
        len: usize,
    ) -> Result<(), WorkerError> {
        let tunnel = &self.shared.tunnels.tx[t];
        let hops = &self.shared.tunnels.next_hops;
        let hop = match (hops.get(t), hops.local()) {
            (Some(dst), Some(src)) => Some(NextHop { dst, src }),
            _ => None,
        };
        st.tx_cx.ident = st.tx_cx.ident.wrapping_add(1);
        let buf = self.xsk.buffer_mut(&mut frame);
        match encap(buf, len, tunnel, hop, &mut st.tx_cx) {
            Verdict::Transmit { len } => {
                self.xsk.set_len(&mut frame, len);
                st.local.tx_sent += 1;
                st.local.tunnel_tx_packets[t] += 1;
                st.local.tunnel_tx_bytes[t] += len as u64;
                st.tx_pending.push(frame);
            }
            Verdict::Reply {
                offset,
                len,
                reason,
            } => {
                // Counted when the write completes.
                let tag = if reason.is_some() { REPLY_ICMP } else { REPLY };
                self.xsk.set_len(&mut frame, offset + len);
                self.write(io, st, t as u32, frame, offset, len, tag | t as u16)?;
            }
            Verdict::Drop(r) => {
                if r == DropReason::TxNoNeighbour {
                    self.shared.tunnels.next_hops.request();
                }
                st.local.drop(r);
                self.xsk.set_len(&mut frame, 0);
                self.free.push(frame);
            }
        }
        Ok(())
    }

    /// Decapsulates one received frame and sends it where it belongs. An
    /// outer fragment goes to reassembly; when it completes a datagram,
    /// the whole datagram, written into this frame, is decapsulated: a
    /// second pass, never more (reassembly never puts out a fragment, and a
    /// fragment on the second pass would be dropped), and no recursion on
    /// what a packet says.
    #[inline]
    fn receive_one<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        mut frame: S::Frame,
    ) -> Result<(), WorkerError> {
        for pass in 0..2 {
            let data = self.xsk.data_mut(&mut frame);
            match decap(data, &self.shared.tunnels.rx, &mut st.rx) {
                Ok(d) if d.kind == Kind::Keepalive => {
                    self.keepalive(st, frame, d.tunnel, d.offset, d.len)
                }
                Ok(Delivery {
                    tunnel,
                    kind: Kind::PathMtu { mtu },
                    ..
                }) => {
                    if st.pmtu_updates.allow(crate::io::clock::now()) {
                        self.path_mtu(usize::from(tunnel), mtu);
                        st.local.path_mtu_updates += 1;
                    } else {
                        st.local.drop(DropReason::IcmpRateLimited);
                    }
                    self.free.push(frame);
                }
                Ok(d) if st.gone[usize::from(d.tunnel)] => {
                    st.local.drop(DropReason::DeviceGone);
                    self.free.push(frame);
                }
                Ok(d) => self.deliver(io, st, frame, d.tunnel, d.offset, d.len)?,
                Err(DropReason::OuterFragment) if pass == 0 => {
                    let data = self.xsk.data_mut(&mut frame);
                    let outcome = st.reasm.add(data, crate::io::clock::now());
                    st.local.fragments_pending = st.reasm.pending();
                    match outcome {
                        Outcome::Held => self.free.push(frame),
                        Outcome::Dropped { reason, also } => {
                            for _ in 0..=also {
                                st.local.drop(reason);
                            }
                            self.free.push(frame);
                        }
                        Outcome::Complete { merged } => {
                            let buf = self.xsk.buffer_mut(&mut frame);
                            match st.reasm.take(buf) {
                                Some(len) => {
                                    self.xsk.set_len(&mut frame, len);
                                    st.local.fragments_merged += u64::from(merged);
                                    // Whole now: decapsulated on the next
                                    // pass.
                                    continue;
                                }
                                None => {
                                    self.xsk.set_len(&mut frame, 0);
                                    for _ in 0..=merged {
                                        st.local.drop(DropReason::FragmentTooBig);
                                    }
                                    self.free.push(frame);
                                }
                            }
                        }
                    }
                }
                // A reassembled datagram that is a fragment again (which
                // reassembly rules out; counted, never looped on).
                Err(DropReason::OuterFragment) => {
                    st.local.drop(DropReason::FragmentMalformed);
                    self.free.push(frame);
                }
                Err(reason) => {
                    st.local.drop(reason);
                    self.free.push(frame);
                }
            }
            return Ok(());
        }
        Ok(())
    }

    /// The underlay says the path of tunnel `t` carries at most `mtu`
    /// bytes: every tunnel on that path (same endpoints) takes it.
    fn path_mtu(&self, t: usize, mtu: u16) {
        let tx = &self.shared.tunnels.tx;
        let Some(this) = tx.get(t) else { return };
        let now = crate::io::clock::now();
        for other in tx
            .iter()
            .filter(|o| (o.local, o.remote) == (this.local, this.remote))
        {
            if other.path_mtu.lower(mtu, now) {
                tracing::info!(queue = self.queue, path_mtu = mtu, remote = %this.remote, "path MTU lowered by the underlay");
            }
        }
    }

    /// Sends a GRE keepalive's inner packet, `offset..offset + len` of the
    /// frame, back on the underlay to the tunnel's next hop.
    fn keepalive(
        &mut self,
        st: &mut State<S::Frame>,
        mut frame: S::Frame,
        tunnel: u16,
        offset: usize,
        len: usize,
    ) {
        let hops = &self.shared.tunnels.next_hops;
        let (Some(dst), Some(src)) = (hops.get(usize::from(tunnel)), hops.local()) else {
            hops.request();
            st.local.drop(DropReason::KeepaliveNoNeighbour);
            self.free.push(frame);
            return;
        };
        let data = self.xsk.data_mut(&mut frame);
        let eth = crate::wire::ethernet::HEADER_LEN;
        data.copy_within(offset..offset + len, eth);
        crate::wire::ethernet::Repr {
            dst,
            src,
            ethertype: crate::wire::ethernet::EtherType::Ipv4,
        }
        .emit(&mut crate::wire::ethernet::Frame::new_unchecked(
            &mut data[..eth],
        ));
        self.xsk.set_len(&mut frame, eth + len);
        st.local.keepalives += 1;
        st.tx_pending.push(frame);
    }

    /// The device of tunnel `tag` failed under us (most likely deleted):
    /// stop using it and tell the control thread, which opens a new queue.
    fn device_gone(&mut self, st: &mut State<S::Frame>, tag: u16) {
        let t = usize::from(tag & !(REPLY | REPLY_ICMP));
        if let Some(g) = st.gone.get_mut(t) {
            if !*g {
                *g = true;
                // Our queue is dead: a reload that keeps this device keeps
                // it gone, until the control thread opens a new one. (The
                // registered file holds its own reference meanwhile.)
                self.devices[t] = None;
                if let Some(f) = self.tunnel_counters.device_failed.get(t) {
                    f.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Switches to a new tunnel list (see [`Reconfig`]).
    fn reconfigure<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        r: Reconfig,
    ) -> Result<(), WorkerError> {
        // Finish with the old devices. Reads cancelled with data in them
        // are encapsulated and sent as usual, and answers they produce
        // (ARP, ICMP) are written and waited for in the next round.
        // Writes handed to other workers come back first (written, or to
        // be written here); what others hand over meanwhile is written
        // with the old list, and after the switch sent back to them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            // Reads of the old devices are sent before the list changes.
            self.process_reads(io, st, true)?;
            self.spread_poll(io, st)?;
            self.spread_flush(st);
            let mut rest = Vec::new();
            io.drain(|c| rest.push(c))
                .map_err(self.io_err("draining io_uring"))?;
            let mut spread_done =
                st.frames.at_peers == 0 && st.spread.as_ref().is_none_or(Link::sent);
            if !spread_done
                && (std::time::Instant::now() > deadline
                    || self.shared.stop.load(Ordering::Relaxed))
            {
                // Another worker does not answer (it died, or is stopping):
                // switch anyway; what it answers later is of the old list
                // and is not written or counted against a tunnel of the
                // new one (see `spread_poll`).
                tracing::warn!(
                    queue = self.queue,
                    frames = st.frames.at_peers,
                    "reload: writes handed to another worker unanswered"
                );
                spread_done = true;
            }
            if rest.is_empty() && st.deferred.is_empty() && spread_done {
                break;
            }
            for c in rest {
                self.completed(c, io, st)?;
            }
            if !spread_done {
                std::thread::yield_now();
            }
        }
        let old_len = self.devices.len();
        let mut old = std::mem::take(&mut self.devices);
        self.devices = r
            .devices
            .into_iter()
            .map(|d| match d {
                DeviceQueue::Keep(i) => old.get_mut(i).and_then(Option::take),
                DeviceQueue::New(fd) => Some(fd),
            })
            .collect();
        let ntun = self.devices.len();
        let mut fds = raw_fds(&self.devices);
        fds.resize(old_len.max(ntun), -1);
        let result = io.update_files(&fds);
        // The old queues not carried over close here.
        drop(old);
        if let Err(e) = result {
            let _ = r.done.send(Err(format!("queue {}: {e}", self.queue)));
            return Err(WorkerError::Io {
                queue: self.queue,
                what: "replacing io_uring files",
                io: e,
            });
        }
        st.gone = self.devices.iter().map(Option::is_none).collect();
        st.local.remap_tunnels(&r.counters_from);
        // Sequence numbers expected go on for tunnels that stay.
        let old_seq = std::mem::take(&mut st.rx.next_seq);
        st.rx.next_seq = r
            .counters_from
            .iter()
            .map(|o| o.and_then(|i| old_seq.get(i).copied()).unwrap_or(0))
            .collect();
        self.shared.tunnels = r.tunnels;
        self.tunnel_counters = Arc::new(TunnelCounters::new(ntun));
        // Frames moved while the old devices were finished with.
        st.frames.free = (self.free.len() + st.tx_pending.len()) as u64;
        st.frames.in_flight = io.in_flight() as u64;
        self.publish(st);
        self.stats.set_tunnels(self.tunnel_counters.clone());
        let _ = r.done.send(Ok(()));
        Ok(())
    }

    fn account_drained(&mut self, c: Completed<S::Frame>, st: &mut State<S::Frame>) {
        if let Some(peer) = c.peer {
            // Another worker's frames: back to it.
            let generation = self.shared.tunnels.generation;
            if let Some(link) = &mut st.spread {
                link.answer(peer, Returned::Written(c, generation));
                // The other worker may still be taking answers.
                for _ in 0..1000 {
                    link.flush();
                    if link.sent() {
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            return;
        }
        match c.op {
            Op::Write => {
                st.writes_in_flight -= 1;
                account_write(&c, &mut st.local);
                self.free.extend(c.rest.into_iter().map(|p| p.frame));
            }
            Op::Read => {
                // A read that completed with data just before the cancel is
                // counted as read and dropped: the gateway is stopping.
                if c.buf.is_some() {
                    st.local.tx_read += 1;
                    st.local.drop(DropReason::TxShutdown);
                }
            }
        }
        self.free.extend(c.frame);
    }

    fn publish(&self, st: &State<S::Frame>) {
        self.stats.publish(&st.local, &self.tunnel_counters);
        self.stats.publish_frames(&st.frames);
        debug_assert!(
            st.frames.balanced(),
            "a UMEM frame went missing: {:?}",
            st.frames
        );
    }

    fn refresh_xsk_stats(&self) {
        if let Ok(s) = self.xsk.stats() {
            let st = &self.stats;
            st.xsk_rx_dropped.store(s.rx_dropped, Ordering::Relaxed);
            st.xsk_rx_ring_full.store(s.rx_ring_full, Ordering::Relaxed);
            st.xsk_fill_ring_empty
                .store(s.fill_ring_empty, Ordering::Relaxed);
            st.xsk_rx_invalid_descs
                .store(s.rx_invalid_descs, Ordering::Relaxed);
        }
    }
}

fn raw_fds(devices: &[Option<OwnedFd>]) -> Vec<RawFd> {
    devices
        .iter()
        .map(|d| d.as_ref().map_or(-1, |f| f.as_raw_fd()))
        .collect()
}

/// Accounts for one finished device write: an inbound delivery, or an
/// answer to something read from the device.
#[inline]
fn account_write<F>(c: &Completed<F>, local: &mut LocalStats) {
    let ok = c.result >= 0 && c.result as u32 == c.expected;
    let packets = u64::from(c.packets);
    if c.tag & (REPLY | REPLY_ICMP) != 0 {
        if !ok {
            local.drop(DropReason::TxReplyWriteError);
        } else if c.tag & REPLY_ICMP != 0 {
            local.drop(DropReason::TxTooBigIcmpSent);
        } else {
            local.tx_replies += 1;
        }
    } else if !ok {
        let reason = match -c.result {
            libc::EBADFD => DropReason::DeviceGone,
            libc::EIO => DropReason::DeviceDown,
            e if e > 0 => DropReason::DeviceWriteError,
            _ => DropReason::DeviceWriteShort,
        };
        for _ in 0..packets {
            local.drop(reason);
        }
    } else {
        let t = usize::from(c.tag);
        local.delivered += packets;
        // (Indices are of the tunnel list in force; a miss is not a panic.)
        if let (Some(p), Some(b)) = (
            local.tunnel_rx_packets.get_mut(t),
            local.tunnel_rx_bytes.get_mut(t),
        ) {
            *p += packets;
            *b += u64::from(c.expected).saturating_sub(VNET_HDR_LEN as u64);
        }
    }
}
