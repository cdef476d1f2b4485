//! Counters shared between a worker (the only writer) and the control
//! thread (which prints them). Workers count into plain locals on the hot
//! path and publish with relaxed stores once per loop iteration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::datapath::drop_reason::DropReason;

/// Where a worker's UMEM frames are. `free + in_kernel + in_flight +
/// in_tx + at_peers == total` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub total: u64,
    /// Held by the worker: the free list and frames waiting for TX room.
    pub free: u64,
    /// In the fill or RX ring.
    pub in_kernel: u64,
    /// In an io_uring write.
    pub in_flight: u64,
    /// In the TX or completion ring.
    pub in_tx: u64,
    /// Handed to other workers to write (`spread_writes`).
    pub at_peers: u64,
}

impl FrameCounts {
    pub fn balanced(&self) -> bool {
        self.free + self.in_kernel + self.in_flight + self.in_tx + self.at_peers == self.total
    }
}

/// Published counters of one worker.
pub struct WorkerStats {
    pub queue: u32,
    pub core: Option<usize>,
    pub rx_frames: AtomicU64,
    pub delivered: AtomicU64,
    pub keepalives: AtomicU64,
    pub keepalive_replies: AtomicU64,
    pub coalesced: AtomicU64,
    pub tx_gso_packets: AtomicU64,
    pub coalesced_writes: AtomicU64,
    pub spread_out: AtomicU64,
    pub spread_in: AtomicU64,
    pub spread_bounced: AtomicU64,
    pub path_mtu_updates: AtomicU64,
    pub fragments_merged: AtomicU64,
    pub fragments_pending: AtomicU64,
    pub batches: AtomicU64,
    pub drops: [AtomicU64; DropReason::COUNT],
    /// Per-tunnel counters of the tunnel list in force; replaced whole when
    /// a reload changes the list (the worker keeps its own handle and
    /// publishes into it; the lock is taken once per reload and per read).
    tunnels: Mutex<Arc<TunnelCounters>>,
    pub tx_read: AtomicU64,
    pub tx_sent: AtomicU64,
    pub tx_replies: AtomicU64,
    pub frames_total: AtomicU64,
    /// Set once the worker has filled its fill ring and armed its device
    /// reads: packets steered to it from then on are taken.
    pub started: AtomicBool,
    pub frames_free: AtomicU64,
    pub frames_in_kernel: AtomicU64,
    pub frames_in_flight: AtomicU64,
    pub frames_in_tx: AtomicU64,
    pub frames_at_peers: AtomicU64,
    pub busy_polls: AtomicU64,
    pub idle_polls: AtomicU64,
    pub sleeps: AtomicU64,
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub xsk_rx_dropped: AtomicU64,
    pub xsk_rx_ring_full: AtomicU64,
    pub xsk_fill_ring_empty: AtomicU64,
    pub xsk_rx_invalid_descs: AtomicU64,
}

/// The worker's private copy, written per packet.
#[derive(Debug, Clone)]
pub struct LocalStats {
    pub rx_frames: u64,
    pub delivered: u64,
    /// GRE keepalives answered (sent back on the underlay).
    pub keepalives: u64,
    /// Replies to this gateway's own keepalives, received.
    pub keepalive_replies: u64,
    /// Delivered packets that went into the device in another one's write
    /// (TCP segments coalesced into one GSO packet).
    pub coalesced: u64,
    /// Device writes that carried coalesced segments.
    pub coalesced_writes: u64,
    /// Large (GSO) packets read from the devices and cut into segments.
    pub tx_gso_packets: u64,
    /// Packets handed to another worker to write into the device, and
    /// packets written here for another worker (`spread_writes`).
    pub spread_out: u64,
    pub spread_in: u64,
    /// Of `spread_out`, packets that came back unwritten (the other worker
    /// was on another tunnel list, during a reload) and were written here.
    pub spread_bounced: u64,
    /// ICMP "fragmentation needed" about tunnel packets, taken.
    pub path_mtu_updates: u64,
    /// Outer fragments merged into a datagram delivered with another one.
    pub fragments_merged: u64,
    /// Outer fragments held for reassembly now.
    pub fragments_pending: u64,
    pub batches: u64,
    pub drops: [u64; DropReason::COUNT],
    pub tunnel_rx_packets: Vec<u64>,
    pub tunnel_rx_bytes: Vec<u64>,
    pub tunnel_tx_packets: Vec<u64>,
    pub tunnel_tx_bytes: Vec<u64>,
    /// Per tunnel: keepalives sent, replies received, and when the last
    /// reply came ([`crate::io::clock`] seconds, plus one: 0 is never).
    pub tunnel_keepalives_sent: Vec<u64>,
    pub tunnel_keepalive_replies: Vec<u64>,
    pub tunnel_keepalive_reply_at: Vec<u64>,
    pub tx_read: u64,
    pub tx_sent: u64,
    pub tx_replies: u64,
    pub busy_polls: u64,
    pub idle_polls: u64,
    pub sleeps: u64,
    /// Time in loop iterations that moved packets.
    pub busy_ns: u64,
    /// Time in loop iterations that found nothing (spinning or asleep).
    pub idle_ns: u64,
}

impl LocalStats {
    pub fn new(tunnels: usize) -> Self {
        LocalStats {
            rx_frames: 0,
            delivered: 0,
            keepalives: 0,
            keepalive_replies: 0,
            coalesced: 0,
            tx_gso_packets: 0,
            coalesced_writes: 0,
            spread_out: 0,
            spread_in: 0,
            spread_bounced: 0,
            path_mtu_updates: 0,
            fragments_merged: 0,
            fragments_pending: 0,
            batches: 0,
            drops: [0; DropReason::COUNT],
            tunnel_rx_packets: vec![0; tunnels],
            tunnel_rx_bytes: vec![0; tunnels],
            tunnel_tx_packets: vec![0; tunnels],
            tunnel_tx_bytes: vec![0; tunnels],
            tunnel_keepalives_sent: vec![0; tunnels],
            tunnel_keepalive_replies: vec![0; tunnels],
            tunnel_keepalive_reply_at: vec![0; tunnels],
            tx_read: 0,
            tx_sent: 0,
            tx_replies: 0,
            busy_polls: 0,
            idle_polls: 0,
            sleeps: 0,
            busy_ns: 0,
            idle_ns: 0,
        }
    }

    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }
}

fn atomics(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// One worker's per-tunnel counters, indexed by tunnel.
pub struct TunnelCounters {
    pub rx_packets: Vec<AtomicU64>,
    pub rx_bytes: Vec<AtomicU64>,
    pub tx_packets: Vec<AtomicU64>,
    pub tx_bytes: Vec<AtomicU64>,
    /// Set by the worker when the device failed under it (deleted, or a
    /// read error): it stopped using its queue, and the control thread
    /// opens a new one.
    pub device_failed: Vec<AtomicBool>,
    pub keepalives_sent: Vec<AtomicU64>,
    pub keepalive_replies: Vec<AtomicU64>,
    pub keepalive_reply_at: Vec<AtomicU64>,
}

impl TunnelCounters {
    pub fn new(tunnels: usize) -> Self {
        TunnelCounters {
            rx_packets: atomics(tunnels),
            rx_bytes: atomics(tunnels),
            tx_packets: atomics(tunnels),
            tx_bytes: atomics(tunnels),
            device_failed: (0..tunnels).map(|_| AtomicBool::new(false)).collect(),
            keepalives_sent: atomics(tunnels),
            keepalive_replies: atomics(tunnels),
            keepalive_reply_at: atomics(tunnels),
        }
    }
}

impl LocalStats {
    /// The per-tunnel counts carried over to a new tunnel list: new tunnel
    /// `i` continues old tunnel `from[i]`, or starts at zero.
    pub fn remap_tunnels(&mut self, from: &[Option<usize>]) {
        fn remap(v: &mut Vec<u64>, from: &[Option<usize>]) {
            let old = std::mem::take(v);
            *v = from
                .iter()
                .map(|o| o.and_then(|i| old.get(i).copied()).unwrap_or(0))
                .collect();
        }
        remap(&mut self.tunnel_rx_packets, from);
        remap(&mut self.tunnel_rx_bytes, from);
        remap(&mut self.tunnel_tx_packets, from);
        remap(&mut self.tunnel_tx_bytes, from);
        remap(&mut self.tunnel_keepalives_sent, from);
        remap(&mut self.tunnel_keepalive_replies, from);
        remap(&mut self.tunnel_keepalive_reply_at, from);
    }
}

impl WorkerStats {
    pub fn new(queue: u32, core: Option<usize>, tunnels: usize) -> Self {
        WorkerStats {
            queue,
            core,
            rx_frames: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            keepalives: AtomicU64::new(0),
            keepalive_replies: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            tx_gso_packets: AtomicU64::new(0),
            coalesced_writes: AtomicU64::new(0),
            spread_out: AtomicU64::new(0),
            spread_in: AtomicU64::new(0),
            spread_bounced: AtomicU64::new(0),
            path_mtu_updates: AtomicU64::new(0),
            fragments_merged: AtomicU64::new(0),
            fragments_pending: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            tunnels: Mutex::new(Arc::new(TunnelCounters::new(tunnels))),
            tx_read: AtomicU64::new(0),
            tx_sent: AtomicU64::new(0),
            tx_replies: AtomicU64::new(0),
            frames_total: AtomicU64::new(0),
            started: AtomicBool::new(false),
            frames_free: AtomicU64::new(0),
            frames_in_kernel: AtomicU64::new(0),
            frames_in_flight: AtomicU64::new(0),
            frames_in_tx: AtomicU64::new(0),
            frames_at_peers: AtomicU64::new(0),
            busy_polls: AtomicU64::new(0),
            idle_polls: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
            xsk_rx_dropped: AtomicU64::new(0),
            xsk_rx_ring_full: AtomicU64::new(0),
            xsk_fill_ring_empty: AtomicU64::new(0),
            xsk_rx_invalid_descs: AtomicU64::new(0),
        }
    }

    /// The per-tunnel counters in force.
    pub fn tunnels(&self) -> Arc<TunnelCounters> {
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts in the counters of a new tunnel list.
    pub fn set_tunnels(&self, t: Arc<TunnelCounters>) {
        *self.tunnels.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Copies the worker's locals into the shared counters.
    pub fn publish(&self, l: &LocalStats, tunnels: &TunnelCounters) {
        self.rx_frames.store(l.rx_frames, Relaxed);
        self.delivered.store(l.delivered, Relaxed);
        self.keepalives.store(l.keepalives, Relaxed);
        self.keepalive_replies.store(l.keepalive_replies, Relaxed);
        self.coalesced.store(l.coalesced, Relaxed);
        self.tx_gso_packets.store(l.tx_gso_packets, Relaxed);
        self.coalesced_writes.store(l.coalesced_writes, Relaxed);
        self.spread_out.store(l.spread_out, Relaxed);
        self.spread_in.store(l.spread_in, Relaxed);
        self.spread_bounced.store(l.spread_bounced, Relaxed);
        self.path_mtu_updates.store(l.path_mtu_updates, Relaxed);
        self.fragments_merged.store(l.fragments_merged, Relaxed);
        self.fragments_pending.store(l.fragments_pending, Relaxed);
        self.batches.store(l.batches, Relaxed);
        for (a, v) in self.drops.iter().zip(l.drops.iter()) {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels.rx_packets.iter().zip(&l.tunnel_rx_packets) {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels.rx_bytes.iter().zip(&l.tunnel_rx_bytes) {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels.tx_packets.iter().zip(&l.tunnel_tx_packets) {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels.tx_bytes.iter().zip(&l.tunnel_tx_bytes) {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels
            .keepalives_sent
            .iter()
            .zip(&l.tunnel_keepalives_sent)
        {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels
            .keepalive_replies
            .iter()
            .zip(&l.tunnel_keepalive_replies)
        {
            a.store(*v, Relaxed);
        }
        for (a, v) in tunnels
            .keepalive_reply_at
            .iter()
            .zip(&l.tunnel_keepalive_reply_at)
        {
            a.store(*v, Relaxed);
        }
        self.tx_read.store(l.tx_read, Relaxed);
        self.tx_sent.store(l.tx_sent, Relaxed);
        self.tx_replies.store(l.tx_replies, Relaxed);
        self.busy_polls.store(l.busy_polls, Relaxed);
        self.idle_polls.store(l.idle_polls, Relaxed);
        self.sleeps.store(l.sleeps, Relaxed);
        self.busy_ns.store(l.busy_ns, Relaxed);
        self.idle_ns.store(l.idle_ns, Relaxed);
    }

    pub fn publish_frames(&self, f: &FrameCounts) {
        self.frames_total.store(f.total, Relaxed);
        self.frames_free.store(f.free, Relaxed);
        self.frames_in_kernel.store(f.in_kernel, Relaxed);
        self.frames_in_flight.store(f.in_flight, Relaxed);
        self.frames_in_tx.store(f.in_tx, Relaxed);
        self.frames_at_peers.store(f.at_peers, Relaxed);
    }

    pub fn to_json(&self) -> Value {
        let mut drops = Map::new();
        for r in DropReason::ALL {
            drops.insert(r.name().into(), json!(self.drops[r as usize].load(Relaxed)));
        }
        json!({
            "queue": self.queue,
            "core": self.core,
            "rx_frames": self.rx_frames.load(Relaxed),
            "delivered": self.delivered.load(Relaxed),
            "keepalives": self.keepalives.load(Relaxed),
            "keepalive_replies": self.keepalive_replies.load(Relaxed),
            "coalesced": self.coalesced.load(Relaxed),
            "coalesced_writes": self.coalesced_writes.load(Relaxed),
            "spread_out": self.spread_out.load(Relaxed),
            "spread_in": self.spread_in.load(Relaxed),
            "spread_bounced": self.spread_bounced.load(Relaxed),
            "tx_gso_packets": self.tx_gso_packets.load(Relaxed),
            "path_mtu_updates": self.path_mtu_updates.load(Relaxed),
            "fragments_merged": self.fragments_merged.load(Relaxed),
            "fragments_pending": self.fragments_pending.load(Relaxed),
            "tx_read": self.tx_read.load(Relaxed),
            "tx_sent": self.tx_sent.load(Relaxed),
            "tx_replies": self.tx_replies.load(Relaxed),
            "batches": self.batches.load(Relaxed),
            "drops": drops,
            "polls": {
                "busy": self.busy_polls.load(Relaxed),
                "idle": self.idle_polls.load(Relaxed),
                "sleeps": self.sleeps.load(Relaxed),
                "busy_ns": self.busy_ns.load(Relaxed),
                "idle_ns": self.idle_ns.load(Relaxed),
            },
            "frames": {
                "total": self.frames_total.load(Relaxed),
                "free": self.frames_free.load(Relaxed),
                "in_kernel": self.frames_in_kernel.load(Relaxed),
                "in_flight": self.frames_in_flight.load(Relaxed),
                "in_tx": self.frames_in_tx.load(Relaxed),
                "at_peers": self.frames_at_peers.load(Relaxed),
            },
            "xsk": {
                "rx_dropped": self.xsk_rx_dropped.load(Relaxed),
                "rx_ring_full": self.xsk_rx_ring_full.load(Relaxed),
                "fill_ring_empty": self.xsk_fill_ring_empty.load(Relaxed),
                "rx_invalid_descs": self.xsk_rx_invalid_descs.load(Relaxed),
            },
        })
    }
}
