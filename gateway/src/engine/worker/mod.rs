//! A worker: owns one AF_XDP socket (one NIC RX queue), its UMEM, one
//! io_uring and one queue fd of every tunnel device. Nothing on its path is
//! shared or locked; it publishes counters with relaxed stores.
//!
//! Inbound: take a batch from the RX ring → decapsulate each frame in place
//! → queue a `WriteFixed` per packet, or one `Writev` per run of TCP
//! segments of one flow coalesced into a GSO packet ([`crate::datapath::offload::Run`]) → one
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
//!
//! The rooms: [`step`] the loop, [`inbound`] the way in (with coalescing),
//! [`outbound`] the way out (device reads, encapsulation), [`spread`] the
//! hand-over of writes to other workers, [`reload`] the switch to a new
//! tunnel list, [`ledger`] the frame and packet accounting. The worker
//! moves packets only through [`crate::engine::ports`], so its decisions
//! run in the unit tests on fakes. Outside the ports it still pins its core,
//! reads the coarse clock and `Instant`, waits in poll(2) when adaptive, and
//! wakes its peers with eventfds (see [`crate::engine::handover`]): the
//! timeouts and the adaptive sleep are not what the fakes test.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};

use crate::datapath::decap::{decap, Delivery, Kind, RxState};
use crate::datapath::drop_reason::DropReason;
use crate::datapath::encap::{encap, keepalive_probe, NextHop, TunnelTx, TxContext, Verdict};
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
use crate::telemetry::capture::{Tap, Taps, TraceBuf};
use crate::telemetry::stats::{FrameCounts, LocalStats, TunnelCounters, WorkerStats};
/// Adds a stage to the trace in hand, if a packet is being traced; the
/// text and fields are built only then.
macro_rules! note {
    ($st:expr, $stage:expr, $text:expr, $fields:expr) => {
        if let Some(t) = &mut $st.trace {
            t.step($stage, $text, $fields);
        }
    };
}

mod inbound;
mod ledger;
mod outbound;
mod reload;
mod spread;
mod step;
#[cfg(test)]
mod tests;

use ledger::{account_write, raw_fds};

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
    #[error("queue {queue}: io_uring setup failed ({io}); {}", uring_hint(io))]
    Uring { queue: u32, io: std::io::Error },
    #[error("queue {queue}: {what} failed ({io})")]
    Io {
        queue: u32,
        what: &'static str,
        io: std::io::Error,
    },
}

/// What to do about an io_uring that could not be set up.
fn uring_hint(io: &std::io::Error) -> &'static str {
    match io.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            "the process may open too few files for its devices: raise RLIMIT_NOFILE (LimitNOFILE= in the service, `ulimit -n` as root)"
        }
        Some(libc::ENOMEM) => {
            "the process may lock too little memory: raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the service, `ulimit -l` as root)"
        }
        Some(libc::EINVAL) => {
            "the kernel refused an io_uring setting; the gateway asks for COOP_TASKRUN and buffer rings, which need Linux 5.19 or later"
        }
        _ => "the kernel must allow io_uring (sysctl kernel.io_uring_disabled=0)",
    }
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
    /// The tunnels' names (for captures and traces).
    pub names: Arc<Vec<Arc<str>>>,
}

/// What a worker shares with the rest of the gateway.
pub struct Shared {
    pub tunnels: Tunnels,
    pub stop: Arc<AtomicBool>,
    /// Reconfigurations from the control thread.
    pub control: Receiver<Reconfig>,
    /// The captures and traces running.
    pub taps: Arc<Taps>,
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
    /// This worker sends the tunnels' GRE keepalives (one worker does).
    pub keepalives: bool,
    /// The secret of the IPv6 flow labels ([`TxContext::flow_seed`]),
    /// the same for every worker.
    pub flow_seed: u32,
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

/// A worker at work: its state, its device queues and the loop's own
/// counters. [`Running::step`] runs one iteration of the loop;
/// [`Running::finish`] takes every frame back.
pub struct Running<S: Socket, D> {
    // (Dropped in this order, as the locals of the loop were: the state,
    // its hand-over link with it, then the io_uring, which waits for the
    // kernel, then the worker with its socket and device queues.)
    rx: Vec<S::Frame>,
    done: Vec<Completed<S::Frame>>,
    st: State<S::Frame>,
    io: D,
    w: Worker<S>,
    idle: u32,
    t0: std::time::Instant,
    busy_polls: u32,
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
    /// Frames for the TX ring that are not tunnel packets read from a
    /// device (counted in `tx_sent`): keepalives reflected and keepalive
    /// probes. Kept apart so that the way down drops only what it counted.
    tx_control: Vec<F>,
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
    /// When each tunnel's next keepalive is due (clock seconds), and the
    /// second they were last looked at.
    keepalive_due: Vec<u32>,
    keepalive_second: u32,
    /// This worker's side of the captures and traces.
    tap: Tap,
    /// The trace of the packet in hand, when a trace session picked it.
    trace: Option<TraceBuf>,
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
            tx_control: Vec::new(),
            tx_cx: TxContext {
                flow_seed: self.settings.flow_seed,
                ..TxContext::new((queue as u16).wrapping_mul(0x9e37))
            },
            pmtu_updates: RateLimit::new(PMTU_UPDATES_PER_SECOND),
            gro: Vec::with_capacity(GRO_FLOWS),
            coalesce_udp: self.settings.coalesce_udp,
            spread,
            jobs_in: (0..workers).map(|_| Default::default()).collect(),
            answers_in: Vec::new(),
            jobs_per_poll: (entries as usize / 2).max(1),
            keepalive_due: vec![0; ntun],
            keepalive_second: u32::MAX,
            tap: Tap::new(self.shared.taps.clone(), queue),
            trace: None,
        };
        // The fill ring first: received packets are what we must not lose.
        st.frames.in_kernel += self.xsk.fill(&mut self.free, st.tx_reserve) as u64;
        st.frames.free = self.free.len() as u64;
        self.xsk
            .wake_fill_if_needed()
            .map_err(self.io_err("fill-ring wakeup"))?;
        // The device reads armed (10,000 devices take a while) ...
        let mut io = io;
        self.post_reads(&mut io, &mut st);
        io.submit().map_err(self.io_err("arming device reads"))?;
        // ... and from here packets are taken: the control thread may say so.
        self.stats
            .started
            .store(true, std::sync::atomic::Ordering::Release);
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
