//! What a capture or trace is while it runs ([`Session`]), and where the
//! workers find the sessions running ([`Taps`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam::queue::ArrayQueue;

use super::filter::Filter;
use super::{Item, Point};
use crate::datapath::drop_reason::DropReason;

/// Sessions at once (captures and traces together).
pub const MAX_SESSIONS: usize = 4;
/// Copies a session's queue holds before the next is lost.
const QUEUE_ITEMS: usize = 8192;
/// Bytes of copies a session holds before the next is lost: a reader
/// that stalls costs the gateway at most this much memory per session.
const QUEUE_BYTES: usize = 32 << 20;

/// Every session running, shared by the workers and the client threads.
/// A worker compares [`Taps::epoch`] with the last one it saw, once per
/// loop iteration, and looks at the list only when it changed.
#[derive(Debug, Default)]
pub struct Taps {
    epoch: AtomicU64,
    sessions: Mutex<Vec<Arc<Session>>>,
    /// The workers, each with its own copy of a session's filter.
    workers: AtomicUsize,
    /// The tunnels' names, for requests that name one.
    names: Mutex<Vec<String>>,
    /// Copies taken and lost by the sessions that ended.
    ended_taken: AtomicU64,
    ended_lost: AtomicU64,
    /// The last epoch each worker has seen (see [`Taps::wait_for_workers`]).
    seen: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Taps {
    /// Taps for `workers` workers.
    pub fn new(workers: usize) -> Taps {
        Taps {
            workers: AtomicUsize::new(workers),
            ..Default::default()
        }
    }

    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// The tunnel names in force (set at the start and by each reload).
    pub fn set_tunnel_names(&self, names: Vec<String>) {
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    pub fn tunnel_names(&self) -> Vec<String> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes with every session attached or detached.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The sessions running, and the epoch they go with.
    pub fn sessions(&self) -> (u64, Vec<Arc<Session>>) {
        let list = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        (self.epoch(), list.clone())
    }

    /// Starts `s`; refused past [`MAX_SESSIONS`].
    pub fn attach(&self, s: Arc<Session>) -> Result<(), String> {
        let mut list = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= MAX_SESSIONS {
            return Err(format!(
                "{MAX_SESSIONS} captures or traces are running on this gateway already; stop one first"
            ));
        }
        list.push(s);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// A worker's place to say which epoch it has seen.
    pub(super) fn register(&self) -> Arc<AtomicU64> {
        let a = Arc::new(AtomicU64::new(0));
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(a.clone());
        a
    }

    /// Stops `s`: the workers let it go at their next loop iteration.
    /// Returns the epoch that says so.
    pub fn detach(&self, s: &Arc<Session>) -> u64 {
        let mut list = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|x| !Arc::ptr_eq(x, s));
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Waits (until `deadline`) for every worker to have seen `epoch`: past
    /// that, none takes another copy for a session detached before it. (A
    /// worker that stopped never says so: the deadline.)
    pub fn wait_for_workers(&self, epoch: u64, deadline: std::time::Instant) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        while std::time::Instant::now() < deadline
            && seen.iter().any(|s| s.load(Ordering::Acquire) < epoch)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Counts what a detached session took and lost into the totals.
    pub fn retire(&self, s: &Session) {
        self.ended_taken
            .fetch_add(s.taken.load(Ordering::Relaxed), Ordering::Relaxed);
        self.ended_lost
            .fetch_add(s.lost.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// For the stats: sessions running, and the copies taken and lost
    /// since the start (by every session, ended or running).
    pub fn figures(&self) -> serde_json::Value {
        let list = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let sum = |f: fn(&Session) -> &AtomicU64| -> u64 {
            list.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
        };
        serde_json::json!({
            "running": list.len(),
            "copies": self.ended_taken.load(Ordering::Relaxed) + sum(|s| &s.taken),
            "copies_lost": self.ended_lost.load(Ordering::Relaxed) + sum(|s| &s.lost),
        })
    }
}

/// What a session takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Copies at the points in this set ([`Point::bit`]).
    Capture { points: u8 },
    /// The path of single packets, from where they enter (the wire or a
    /// device).
    Trace,
}

/// One capture or trace, from the client's request to its end.
#[derive(Debug)]
pub struct Session {
    pub kind: Kind,
    /// Only this tunnel's packets.
    pub tunnel: Option<String>,
    /// Only drops for this reason (at the `drop` point).
    pub reason: Option<DropReason>,
    /// Bytes kept of each packet.
    pub snaplen: usize,
    /// The compiled filter, one per worker; `None`: every packet.
    filters: Option<Mutex<Vec<Filter>>>,
    /// Copies (or traces) still to take.
    remaining: AtomicU64,
    /// Claims made and not yet queued (or given back): a copy being made,
    /// a trace being followed.
    pending: AtomicU64,
    queue: ArrayQueue<Item>,
    bytes: AtomicUsize,
    /// Copies taken, and copies lost because the queue was full.
    pub taken: AtomicU64,
    pub lost: AtomicU64,
}

impl Session {
    /// A session whose filter `expr` (if any) is compiled once for each
    /// of `workers`. The error is libpcap's, about the expression.
    pub fn new(
        kind: Kind,
        expr: Option<&str>,
        workers: usize,
        tunnel: Option<String>,
        reason: Option<DropReason>,
        count: Option<u64>,
        snaplen: usize,
    ) -> Result<Session, String> {
        let filters = match expr.map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(e) => Some(Mutex::new(
                (0..workers.max(1))
                    .map(|_| Filter::compile(e))
                    .collect::<Result<_, _>>()?,
            )),
        };
        Ok(Session {
            kind,
            tunnel,
            reason,
            snaplen: snaplen.max(1),
            filters,
            remaining: AtomicU64::new(count.unwrap_or(u64::MAX)),
            pending: AtomicU64::new(0),
            queue: ArrayQueue::new(QUEUE_ITEMS),
            bytes: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// Whether this session copies at `p`.
    #[inline]
    pub fn wants(&self, p: Point) -> bool {
        match self.kind {
            Kind::Capture { points } => points & p.bit() != 0,
            Kind::Trace => false,
        }
    }

    pub fn is_trace(&self) -> bool {
        self.kind == Kind::Trace
    }

    /// A worker's own copy of the filter: `Some(None)` when the session
    /// has no filter; `None` when none is left (more workers than
    /// expected: the worker then takes nothing for this session).
    pub(super) fn take_filter(&self) -> Option<Option<Filter>> {
        match &self.filters {
            None => Some(None),
            Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()).pop().map(Some),
        }
    }

    /// True while copies are still wanted.
    #[inline]
    pub fn open(&self) -> bool {
        self.remaining.load(Ordering::Relaxed) > 0
    }

    /// Claims one of the copies still wanted, and room for `bytes` more;
    /// false (the copy lost, counted) when the queue is full. A claim is
    /// then [`Session::push`]ed or given back.
    #[inline]
    pub(super) fn claim(&self, bytes: usize) -> bool {
        // Pending first: while a claim is made, the session is never
        // both without copies to take and without claims in progress.
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        if self.queue.is_full() || self.bytes.load(Ordering::Relaxed) + bytes > QUEUE_BYTES {
            // Given back: what is lost is counted, not owed.
            self.lost.fetch_add(1, Ordering::Relaxed);
            self.give_back();
            return false;
        }
        true
    }

    /// Queues what a claim made room for.
    pub(super) fn push(&self, item: Item, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        match self.queue.push(item) {
            Ok(()) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
            Err(_) => {
                // Another worker filled the last place meanwhile.
                self.bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.lost.fetch_add(1, Ordering::Relaxed);
                self.give_back();
            }
        }
    }

    /// Gives back a claim that took nothing.
    pub(super) fn give_back(&self) {
        self.remaining.fetch_add(1, Ordering::SeqCst);
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// True when no claim is in progress.
    pub fn settled(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// The next copy, for the client's thread.
    pub fn pop(&self) -> Option<Item> {
        let item = self.queue.pop()?;
        let bytes = match &item {
            Item::Packet(r) => r.data.len(),
            Item::Trace(_) => 0,
        };
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        Some(item)
    }

    /// True when every copy wanted was taken and queued.
    pub fn complete(&self) -> bool {
        // Remaining first: a claim raises pending before it lowers
        // remaining, so one that lowered it to 0 is seen pending.
        self.remaining.load(Ordering::SeqCst) == 0 && self.pending.load(Ordering::SeqCst) == 0
    }

    /// True when nothing waits in the queue.
    pub fn drained(&self) -> bool {
        self.queue.is_empty()
    }
}
