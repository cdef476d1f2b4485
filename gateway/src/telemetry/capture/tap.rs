//! A worker's side of the captures and traces: the sessions it serves,
//! each with its own compiled filter, and the copies it takes.

use std::sync::Arc;

use super::filter::Filter;
use super::session::{Session, Taps};
use super::trace::TraceBuf;
use super::{Item, Link, Point, Record};
use crate::datapath::drop_reason::DropReason;

/// The time now, since the Unix epoch (for the copies' timestamps).
pub(super) fn now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A session as one worker serves it.
#[derive(Debug)]
struct Attached {
    s: Arc<Session>,
    /// This worker's copy of its filter (`None`: every packet).
    filter: Option<Filter>,
}

impl Attached {
    #[inline]
    fn matches(&self, link: Link, bytes: &[u8]) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(link, bytes))
    }

    #[inline]
    fn takes_tunnel(&self, tunnel: Option<&Arc<str>>) -> bool {
        match &self.s.tunnel {
            None => true,
            Some(n) => tunnel.is_some_and(|t| **t == **n),
        }
    }

    #[inline]
    fn takes_reason(&self, reason: Option<DropReason>) -> bool {
        self.s.reason.is_none_or(|r| Some(r) == reason)
    }

    /// Copies `bytes` (of a packet `len` long) into the session's queue,
    /// or counts it lost there.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        queue: u16,
        point: Point,
        link: Link,
        tunnel: Option<&Arc<str>>,
        reason: Option<DropReason>,
        bytes: &[u8],
        len: usize,
        time: Option<std::time::Duration>,
    ) {
        let keep = bytes.len().min(self.s.snaplen);
        if !self.s.claim(keep) {
            return;
        }
        let record = Record {
            point,
            link,
            queue,
            tunnel: tunnel.cloned(),
            reason,
            time: time.unwrap_or_else(now),
            len: u32::try_from(len).unwrap_or(u32::MAX),
            data: bytes[..keep].to_vec(),
        };
        self.s.push(Item::Packet(record), keep);
    }
}

/// One worker's taps. With no session attached every call but
/// [`Tap::refresh`] is a test of an empty list.
#[derive(Debug)]
pub struct Tap {
    taps: Arc<Taps>,
    seen: u64,
    /// Where this worker says which epoch it has seen.
    acked: Arc<std::sync::atomic::AtomicU64>,
    attached: Vec<Attached>,
    queue: u16,
    /// The received frame in hand, copied before decapsulation rewrites
    /// it, when a session wants it at `wire-in` or `drop`.
    held: Vec<u8>,
    held_len: usize,
    /// When the frame in hand was taken from the RX ring.
    held_time: std::time::Duration,
    /// Which attached sessions (by bit) took the frame in hand for
    /// `wire-in`, and which for `drop`.
    want_in: u32,
    want_drop: u32,
    /// The session the trace in hand is for.
    tracing: usize,
}

impl Tap {
    pub fn new(taps: Arc<Taps>, queue: u32) -> Tap {
        Tap {
            acked: taps.register(),
            taps,
            seen: u64::MAX,
            attached: Vec::new(),
            queue: queue as u16,
            held: Vec::new(),
            held_len: 0,
            held_time: std::time::Duration::ZERO,
            want_in: 0,
            want_drop: 0,
            tracing: 0,
        }
    }

    /// Looks for sessions started or stopped (once per loop iteration).
    #[inline]
    pub fn refresh(&mut self) {
        let e = self.taps.epoch();
        if e != self.seen {
            self.reattach();
        }
    }

    #[cold]
    fn reattach(&mut self) {
        let (epoch, list) = self.taps.sessions();
        self.attached
            .retain(|a| list.iter().any(|s| Arc::ptr_eq(s, &a.s)));
        for s in list {
            if self.attached.iter().any(|a| Arc::ptr_eq(&a.s, &s)) {
                continue;
            }
            if let Some(filter) = s.take_filter() {
                self.attached.push(Attached { s, filter });
            }
        }
        self.seen = epoch;
        self.acked
            .store(epoch, std::sync::atomic::Ordering::Release);
    }

    /// True when some session is attached.
    #[inline]
    pub fn active(&self) -> bool {
        !self.attached.is_empty()
    }

    /// A frame received, before decapsulation: keeps a copy for the
    /// sessions that want it at `wire-in` or `drop` (sent by
    /// [`Tap::rx_end`], once the tunnel or the drop reason is known), and
    /// starts a trace when a trace session picks it.
    pub fn rx_begin(&mut self, frame: &[u8], names: &Arc<Vec<Arc<str>>>) -> Option<TraceBuf> {
        self.want_in = 0;
        self.want_drop = 0;
        let mut trace = None;
        let mut keep = 0;
        for (i, a) in self.attached.iter().enumerate() {
            if a.s.is_trace() {
                if trace.is_none() && a.s.open() && a.matches(Link::Ethernet, frame) && a.s.claim(0)
                {
                    self.tracing = i;
                    trace = Some(TraceBuf::new(self.queue, "in", names.clone()));
                }
                continue;
            }
            let (w, d) = (a.s.wants(Point::WireIn), a.s.wants(Point::Drop));
            if !(w || d) || !a.s.open() || !a.matches(Link::Ethernet, frame) {
                continue;
            }
            keep = keep.max(a.s.snaplen);
            self.want_in |= u32::from(w) << i;
            self.want_drop |= u32::from(d) << i;
        }
        if self.want_in | self.want_drop != 0 {
            self.held.clear();
            self.held.extend_from_slice(&frame[..frame.len().min(keep)]);
            self.held_len = frame.len();
            self.held_time = now();
        }
        if let Some(t) = &mut trace {
            t.step(
                "wire-in",
                format!(
                    "{} bytes, steered by the XDP program to the AF_XDP socket of queue {}",
                    frame.len(),
                    self.queue
                ),
                serde_json::json!({ "len": frame.len(), "queue": self.queue }),
            );
        }
        trace
    }

    /// The frame [`Tap::rx_begin`] kept belongs to `tunnel` (`None`: to
    /// none, or not known yet, as for an outer fragment): its `wire-in`
    /// copies go, before what decapsulation makes of it.
    pub fn rx_decided(&mut self, tunnel: Option<&Arc<str>>) {
        if self.want_in == 0 {
            return;
        }
        for (i, a) in self.attached.iter().enumerate() {
            if self.want_in & (1 << i) != 0 && a.s.reason.is_none() && a.takes_tunnel(tunnel) {
                a.emit(
                    self.queue,
                    Point::WireIn,
                    Link::Ethernet,
                    tunnel,
                    None,
                    &self.held,
                    self.held_len,
                    Some(self.held_time),
                );
            }
        }
        self.want_in = 0;
    }

    /// The frame [`Tap::rx_begin`] kept is done with: dropped for
    /// `reason`, if any.
    pub fn rx_end(&mut self, tunnel: Option<&Arc<str>>, reason: Option<DropReason>) {
        self.rx_decided(tunnel);
        if self.want_drop == 0 {
            return;
        }
        if reason.is_some() {
            for (i, a) in self.attached.iter().enumerate() {
                if self.want_drop & (1 << i) != 0
                    && a.takes_tunnel(tunnel)
                    && a.takes_reason(reason)
                {
                    a.emit(
                        self.queue,
                        Point::Drop,
                        Link::Ethernet,
                        tunnel,
                        reason,
                        &self.held,
                        self.held_len,
                        None,
                    );
                }
            }
        }
        self.want_drop = 0;
    }

    /// A copy of `bytes` at `point`, for the sessions that want it.
    #[inline]
    pub fn copy(
        &mut self,
        point: Point,
        link: Link,
        tunnel: Option<&Arc<str>>,
        reason: Option<DropReason>,
        bytes: &[u8],
    ) {
        for a in &self.attached {
            if a.s.wants(point)
                && a.s.open()
                && a.takes_tunnel(tunnel)
                && a.takes_reason(reason)
                && a.matches(link, bytes)
            {
                a.emit(
                    self.queue,
                    point,
                    link,
                    tunnel,
                    reason,
                    bytes,
                    bytes.len(),
                    None,
                );
            }
        }
    }

    /// Keeps a copy of `bytes` for [`Tap::copy_held`], when a session
    /// takes drops (encapsulation rewrites the packet in place, and may
    /// drop it after).
    pub fn hold(&mut self, bytes: &[u8]) {
        let keep = self
            .attached
            .iter()
            .filter(|a| a.s.wants(Point::Drop))
            .map(|a| a.s.snaplen)
            .max();
        if let Some(keep) = keep {
            self.held.clear();
            self.held.extend_from_slice(&bytes[..bytes.len().min(keep)]);
            self.held_len = bytes.len();
        }
    }

    /// [`Tap::copy`] of what [`Tap::hold`] kept.
    pub fn copy_held(
        &mut self,
        point: Point,
        link: Link,
        tunnel: Option<&Arc<str>>,
        reason: Option<DropReason>,
    ) {
        for a in &self.attached {
            if a.s.wants(point)
                && a.s.open()
                && a.takes_tunnel(tunnel)
                && a.takes_reason(reason)
                && a.matches(link, &self.held)
            {
                a.emit(
                    self.queue,
                    point,
                    link,
                    tunnel,
                    reason,
                    &self.held,
                    self.held_len,
                    None,
                );
            }
        }
    }

    /// A packet read from tunnel `t`'s device: a trace starts when a trace
    /// session picks it.
    pub fn tx_begin(
        &mut self,
        link: Link,
        pkt: &[u8],
        t: usize,
        names: &Arc<Vec<Arc<str>>>,
    ) -> Option<TraceBuf> {
        for (i, a) in self.attached.iter().enumerate() {
            if a.s.is_trace()
                && a.s.open()
                && a.takes_tunnel(names.get(t))
                && a.matches(link, pkt)
                && a.s.claim(0)
            {
                self.tracing = i;
                let mut trace = TraceBuf::new(self.queue, "out", names.clone());
                // Its tunnel is known from the start.
                trace.tunnel(t);
                return Some(trace);
            }
        }
        None
    }

    /// Hands a finished trace to its session; one of another tunnel than
    /// the session asked for (known only after the lookup) is let go, and
    /// the session waits for another packet.
    pub fn finish(&mut self, t: TraceBuf) {
        if let Some(a) = self.attached.get(self.tracing) {
            if !a.s.is_trace() {
                return;
            }
            match (&a.s.tunnel, &t.tunnel) {
                (Some(want), Some(got)) if want != got => a.s.give_back(),
                (Some(_), None) => a.s.give_back(),
                _ => a.s.push(Item::Trace(t.trace), 0),
            }
        }
    }
}
