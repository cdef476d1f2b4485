//! Spreading device writes over the workers by inner flow (`spread_writes`).
//!
//! A NIC hashes the outer addresses only, so one tunnel lands on one queue
//! and one worker, whatever it carries. The expensive part of delivering a
//! packet is the kernel's work in the device write, not the decapsulation;
//! with spreading on, the worker that received a packet hashes its inner
//! flow and, when the hash picks another worker, hands it the write: the
//! frame (of the receiver's UMEM), where the packet is in it and which
//! tunnel it is for. The other worker writes it into its own queue of the
//! device and hands the frame back with the result, and the receiver
//! counts it as if it had written it itself.
//!
//! Every packet of one flow takes the same worker, and each hand-over is
//! one FIFO queue written by one worker, so a flow is never reordered. The
//! hash is over the inner addresses, protocol and ports (addresses only for
//! fragments, which carry no ports), like a NIC's receive hashing; as
//! there, a flow that mixes fragments and whole packets may see the two
//! kinds reordered against each other.
//!
//! A write names its tunnel by index in a tunnel list, so it carries the
//! list's generation. During a reload the workers switch lists one after
//! the other: a write from a list older than the writer's comes back
//! unwritten and its sender writes it (a sender switches once all its
//! writes are back, or after 3 s without an answer, when what comes back
//! later is dropped as `reload_stale`); one from a newer list waits, with
//! the rest from the same sender, until the writer has switched too.
//!
//! The queues between workers are crossbeam channels, carrying a batch of
//! writes per message (one per worker and loop iteration, not one per
//! packet); the vectors travel back and forth, so none is allocated once
//! the traffic is steady. A worker asleep in adaptive mode is woken by an
//! eventfd.

use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender, TrySendError};

use crate::io::uring::{Completed, Piece};
use crate::io::xsk::Frame;
use crate::io::EventFd;

/// Messages a queue between two workers holds.
const QUEUE_DEPTH: usize = 256;
/// Spare vectors a worker keeps.
const SPARES: usize = 32;

/// A device write handed to another worker: bytes `offset..offset + len`
/// of `frame` (a virtio-net header and a packet), then every piece, into
/// tunnel `tunnel`'s device.
#[derive(Debug)]
pub struct Job<F = Frame> {
    pub tunnel: u16,
    /// The tunnel list `tunnel` indexes (see `Tunnels::generation`).
    pub generation: u64,
    pub frame: F,
    pub offset: usize,
    pub len: usize,
    pub rest: Vec<Piece<F>>,
    pub packets: u16,
}

impl<F> Job<F> {
    /// UMEM frames the job holds.
    pub fn frames(&self) -> u64 {
        1 + self.rest.len() as u64
    }
}

/// What comes back to the worker that handed a write over.
#[derive(Debug)]
pub enum Returned<F = Frame> {
    /// Written (or failed): the completion, as the writer's io_uring gave
    /// it, and the tunnel list it was written with.
    Written(Completed<F>, u64),
    /// Not written: the other worker has another tunnel list than the one
    /// the job names (a reload is under way); the sender writes it itself.
    Bounced(Job<F>),
}

impl<F> Returned<F> {
    pub fn frames(&self) -> u64 {
        match self {
            Returned::Written(c, _) => u64::from(c.frame.is_some()) + c.rest.len() as u64,
            Returned::Bounced(j) => j.frames(),
        }
    }
}

/// Writes from worker `from`, with an empty vector for the answers.
struct Batch<F> {
    from: usize,
    jobs: Vec<Job<F>>,
    spare: Vec<Returned<F>>,
}

/// Answers, with an empty vector for the next batch.
struct Answers<F> {
    done: Vec<Returned<F>>,
    spare: Vec<Job<F>>,
}

/// What every worker can reach of every other.
struct Peer<F> {
    jobs: Sender<Batch<F>>,
    answers: Sender<Answers<F>>,
    wake: EventFd,
    sleeping: AtomicBool,
}

/// One worker's end of the mesh.
pub struct Link<F = Frame> {
    pub me: usize,
    peers: Arc<Vec<Peer<F>>>,
    jobs: Receiver<Batch<F>>,
    answers: Receiver<Answers<F>>,
    /// Workers that will hand over no more writes (they are stopping).
    finished: Arc<AtomicUsize>,
    /// Writes for each worker, sent at the end of the loop iteration.
    outbox: Vec<Vec<Job<F>>>,
    /// Answers for each worker.
    done: Vec<Vec<Returned<F>>>,
    spare_jobs: Vec<Vec<Job<F>>>,
    spare_done: Vec<Vec<Returned<F>>>,
    said_finished: bool,
    /// Jobs for a worker whose thread has ended.
    undeliverable: Vec<Job<F>>,
}

/// Builds the links of `n` workers, one per worker, in order. (Each
/// worker's io_uring must also be able to write from the others' UMEMs:
/// the caller registers them.)
pub fn mesh<F>(n: usize) -> std::io::Result<Vec<Link<F>>> {
    let mut peers = Vec::with_capacity(n);
    let mut ends = Vec::with_capacity(n);
    for _ in 0..n {
        let (jt, jr) = crossbeam::channel::bounded(QUEUE_DEPTH);
        let (at, ar) = crossbeam::channel::bounded(QUEUE_DEPTH);
        peers.push(Peer {
            jobs: jt,
            answers: at,
            wake: EventFd::new()?,
            sleeping: AtomicBool::new(false),
        });
        ends.push((jr, ar));
    }
    let peers = Arc::new(peers);
    let finished = Arc::new(AtomicUsize::new(0));
    Ok(ends
        .into_iter()
        .enumerate()
        .map(|(me, (jobs, answers))| Link {
            me,
            peers: peers.clone(),
            jobs,
            answers,
            finished: finished.clone(),
            outbox: (0..n).map(|_| Vec::new()).collect(),
            done: (0..n).map(|_| Vec::new()).collect(),
            spare_jobs: Vec::new(),
            spare_done: Vec::new(),
            said_finished: false,
            undeliverable: Vec::new(),
        })
        .collect())
}

impl<F> Link<F> {
    pub fn workers(&self) -> usize {
        self.peers.len()
    }

    /// The worker that writes a packet of this hash.
    #[inline]
    pub fn writer_of(&self, hash: u32) -> usize {
        crate::datapath::flow::writer_of(hash, self.peers.len())
    }

    /// Queues a write for worker `to`.
    #[inline]
    pub fn hand_over(&mut self, to: usize, job: Job<F>) {
        self.outbox[to].push(job);
    }

    /// Queues an answer for worker `to`.
    #[inline]
    pub fn answer(&mut self, to: usize, r: Returned<F>) {
        self.done[to].push(r);
    }

    /// Sends what the outbox and answer boxes hold; what finds a full
    /// queue waits for the next call (in order, behind nothing).
    pub fn flush(&mut self) {
        for to in 0..self.peers.len() {
            if !self.outbox[to].is_empty() {
                let jobs = std::mem::replace(
                    &mut self.outbox[to],
                    self.spare_jobs.pop().unwrap_or_default(),
                );
                let msg = Batch {
                    from: self.me,
                    jobs,
                    spare: self.spare_done.pop().unwrap_or_default(),
                };
                match self.peers[to].jobs.try_send(msg) {
                    Ok(()) => self.wake(to),
                    Err(TrySendError::Full(m)) => {
                        let spare = std::mem::replace(&mut self.outbox[to], m.jobs);
                        self.keep_jobs(spare);
                        self.keep_done(m.spare);
                    }
                    // Its thread ended (a panic; the process is going):
                    // the jobs go back to the caller to count.
                    Err(TrySendError::Disconnected(mut m)) => {
                        self.undeliverable.append(&mut m.jobs);
                        self.keep_jobs(m.jobs);
                        self.keep_done(m.spare);
                    }
                }
            }
            if !self.done[to].is_empty() {
                let done = std::mem::replace(
                    &mut self.done[to],
                    self.spare_done.pop().unwrap_or_default(),
                );
                let msg = Answers {
                    done,
                    spare: self.spare_jobs.pop().unwrap_or_default(),
                };
                match self.peers[to].answers.try_send(msg) {
                    Ok(()) => self.wake(to),
                    Err(TrySendError::Full(m)) => {
                        let spare = std::mem::replace(&mut self.done[to], m.done);
                        self.keep_done(spare);
                        self.keep_jobs(m.spare);
                    }
                    // Its thread ended: its frames are nobody's now.
                    Err(TrySendError::Disconnected(m)) => {
                        self.keep_jobs(m.spare);
                    }
                }
            }
        }
    }

    fn wake(&self, to: usize) {
        // Pairs with the fence in `may_sleep`: either the sleeper sees the
        // message, or this sees it asleep.
        fence(Ordering::SeqCst);
        let p = &self.peers[to];
        if p.sleeping.load(Ordering::Relaxed) {
            p.wake.wake();
        }
    }

    fn keep_jobs(&mut self, mut v: Vec<Job<F>>) {
        if v.capacity() > 0 && self.spare_jobs.len() < SPARES {
            v.clear();
            self.spare_jobs.push(v);
        }
    }

    fn keep_done(&mut self, mut v: Vec<Returned<F>>) {
        if v.capacity() > 0 && self.spare_done.len() < SPARES {
            v.clear();
            self.spare_done.push(v);
        }
    }

    /// Jobs that could not be handed over (their worker is gone).
    pub fn take_undeliverable(&mut self) -> std::vec::Drain<'_, Job<F>> {
        self.undeliverable.drain(..)
    }

    /// Takes every write handed to this worker onto the back of its
    /// sender's queue in `out` (one per worker).
    pub fn take_jobs_into(&mut self, out: &mut [std::collections::VecDeque<Job<F>>]) {
        while let Ok(mut b) = self.jobs.try_recv() {
            if let Some(q) = out.get_mut(b.from) {
                q.extend(b.jobs.drain(..));
            }
            self.keep_jobs(b.jobs);
            self.keep_done(b.spare);
        }
    }

    /// Takes every answer to this worker's hand-overs into `out`.
    pub fn take_answers(&mut self, out: &mut Vec<Returned<F>>) {
        while let Ok(mut a) = self.answers.try_recv() {
            out.append(&mut a.done);
            self.keep_done(a.done);
            self.keep_jobs(a.spare);
        }
    }

    /// Nothing of this worker's waits to be sent.
    pub fn sent(&self) -> bool {
        self.outbox.iter().all(Vec::is_empty) && self.done.iter().all(Vec::is_empty)
    }

    /// Nothing waits to be sent, and nothing was handed to this worker.
    pub fn quiet(&self) -> bool {
        self.sent() && self.jobs.is_empty() && self.answers.is_empty()
    }

    /// This worker hands over no more writes (it is stopping).
    pub fn finish(&mut self) {
        if !self.said_finished {
            self.said_finished = true;
            self.finished.fetch_add(1, Ordering::SeqCst);
            for to in 0..self.peers.len() {
                self.wake(to);
            }
        }
    }

    /// Every worker is stopping: none will hand this one a write again.
    pub fn all_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst) == self.peers.len()
    }

    /// Before blocking in adaptive mode: says so to the other workers, and
    /// returns false (not sleeping after all) if something arrived. Pair
    /// with [`Link::woke`].
    pub fn may_sleep(&self) -> bool {
        let p = &self.peers[self.me];
        p.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.jobs.is_empty() || !self.answers.is_empty() {
            p.sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The fd that wakes this worker.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.peers[self.me].wake.fd()
    }

    pub fn woke(&self) {
        let p = &self.peers[self.me];
        p.sleeping.store(false, Ordering::Relaxed);
        p.wake.clear();
    }
}
