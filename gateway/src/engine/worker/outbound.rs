//! The way out: reads from the devices, each packet (or each segment of
//! a GSO packet) copied into a free frame, encapsulated in place and put
//! on the TX ring, or answered back into the device; and the completions
//! of device writes and reads.

use super::*;
use crate::telemetry::capture::{Link, Point};
use serde_json::json;

impl<S: Socket> Worker<S> {
    /// Arms a read on every device that has none.
    pub(super) fn post_reads<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
    ) {
        // A read armed on an empty pool would end at once (ENOBUFS) and be
        // armed again, round and round; wait for buffers instead.
        if io.reads_ready() == 0 {
            return;
        }
        io.arm_reads(&st.gone);
    }

    pub(super) fn completed<D: Devices<S::Frame>>(
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
    pub(super) fn process_reads<D: Devices<S::Frame>>(
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
            let outbound = st.frames.in_tx as usize + st.tx_pending.len() + st.tx_control.len();
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
            if let Some(trace) = st.trace.take() {
                st.tap.finish(trace);
            }
        }
        Ok(())
    }

    /// Frames the packet a read returned will take: one per segment.
    pub(super) fn frames_needed(&self, t: usize, data: &[u8]) -> usize {
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
    pub(super) fn take_read(&mut self, st: &mut State<S::Frame>, t: usize, data: &[u8]) {
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
        if st.tap.active() {
            self.watch_read(st, t, pkt, &vnet);
        }
        if pkt.is_empty() {
            st.local.tx_read += 1;
            self.tx_drop(st, t, DropReason::TxMalformed, pkt);
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
                self.free.push(frame);
                self.tx_drop(st, t, DropReason::TxMalformed, pkt);
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
            self.tx_drop(st, t, DropReason::TxMalformed, pkt);
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

    /// A packet read from tunnel `t`'s device, while a capture or trace
    /// runs: copied at `device-in`, and its trace started.
    #[cold]
    fn watch_read(&self, st: &mut State<S::Frame>, t: usize, pkt: &[u8], vnet: &VnetHdr) {
        let names = &self.shared.tunnels.names;
        let link = Link::of(self.shared.tunnels.tx[t].device_kind);
        st.tap.copy(Point::DeviceIn, link, names.get(t), None, pkt);
        st.trace = st.tap.tx_begin(link, pkt, t, names);
        let segments = if vnet.gso_type == offload::GSO_NONE {
            String::new()
        } else {
            format!(", a GSO packet (segment size {})", vnet.gso_size)
        };
        note!(
            st,
            "device-in",
            format!(
                "{} bytes read from {}'s device{segments}",
                pkt.len(),
                names.get(t).map_or("?", |n| n)
            ),
            json!({ "len": pkt.len(), "tunnel": names.get(t).map(|n| n.to_string()), "gso_size": vnet.gso_size })
        );
    }

    /// Drops a packet read from tunnel `t`'s device for `reason`.
    fn tx_drop(&self, st: &mut State<S::Frame>, t: usize, reason: DropReason, pkt: &[u8]) {
        st.local.drop(reason);
        if st.tap.active() {
            let names = &self.shared.tunnels.names;
            let link = Link::of(self.shared.tunnels.tx[t].device_kind);
            st.tap
                .copy(Point::Drop, link, names.get(t), Some(reason), pkt);
        }
        if let Some(tr) = &mut st.trace {
            tr.dropped(reason);
        }
    }

    /// Encapsulates a packet of tunnel `t` read into `frame` (`len` bytes
    /// at the tunnel's read offset) and sends it on, or answers the device.
    pub(super) fn encap_one<D: Devices<S::Frame>>(
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
        let read_at = tunnel.read_offset();
        if st.tap.active() {
            // The packet before encapsulation overwrites what lies in front
            // of it, kept for the `drop` point.
            st.tap.hold(buf.get(read_at..read_at + len).unwrap_or(&[]));
        }
        match encap(buf, len, tunnel, hop, &mut st.tx_cx) {
            Verdict::Transmit { len } => {
                if st.tap.active() {
                    let name = self.shared.tunnels.names.get(t);
                    st.tap
                        .copy(Point::WireOut, Link::Ethernet, name, None, &buf[..len]);
                }
                note!(
                    st,
                    "encap",
                    format!(
                        "encapsulated for {} (remote {}): {len} bytes on the wire",
                        self.shared.tunnels.names.get(t).map_or("?", |n| n),
                        tunnel.remote
                    ),
                    json!({ "len": len, "remote": tunnel.remote.to_string() })
                );
                note!(
                    st,
                    "wire-out",
                    format!("on the TX ring of queue {}", self.queue),
                    json!({ "verdict": "sent", "queue": self.queue })
                );
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
                note!(
                    st,
                    "reply",
                    match reason {
                        Some(r) => format!(
                            "not sent ({}): an ICMP error goes back into the device",
                            r.name()
                        ),
                        None =>
                            "answered back into the device (ARP or neighbour discovery)".to_string(),
                    },
                    json!({ "verdict": "reply", "reason": reason.map(|r| r.name()) })
                );
                let tag = if reason.is_some() { REPLY_ICMP } else { REPLY };
                self.xsk.set_len(&mut frame, offset + len);
                self.write(io, st, t as u32, frame, offset, len, tag | t as u16)?;
            }
            Verdict::Drop(r) => {
                if r == DropReason::TxNoNeighbour {
                    self.shared.tunnels.next_hops.request();
                }
                if st.tap.active() {
                    let name = self.shared.tunnels.names.get(t);
                    st.tap
                        .copy_held(Point::Drop, Link::of(tunnel.device_kind), name, Some(r));
                }
                if let Some(tr) = &mut st.trace {
                    tr.dropped(r);
                }
                st.local.drop(r);
                self.xsk.set_len(&mut frame, 0);
                self.free.push(frame);
            }
        }
        Ok(())
    }

    /// The worker that sends keepalives ([`super::Settings::keepalives`]),
    /// once a second: a probe for each tunnel with `keepalive` whose
    /// interval has passed, built in a free frame and sent to the
    /// tunnel's next hop. (No next hop yet: asked for, and tried again
    /// next interval.)
    pub(super) fn keepalives(&mut self, st: &mut State<S::Frame>) {
        let now = st.tx_cx.now;
        if now == st.keepalive_second {
            return;
        }
        st.keepalive_second = now;
        for t in 0..self.shared.tunnels.tx.len() {
            let Some(k) = self.shared.tunnels.tx[t].keepalive else {
                continue;
            };
            match st.keepalive_due.get_mut(t) {
                Some(due) if *due <= now => *due = now + u32::from(k.interval),
                _ => continue,
            }
            let Some(mut frame) = self.free.pop() else {
                return;
            };
            let hops = &self.shared.tunnels.next_hops;
            let hop = match (hops.get(t), hops.local()) {
                (Some(dst), Some(src)) => Some(NextHop { dst, src }),
                _ => None,
            };
            st.tx_cx.ident = st.tx_cx.ident.wrapping_add(1);
            let buf = self.xsk.buffer_mut(&mut frame);
            match keepalive_probe(buf, &self.shared.tunnels.tx[t], hop, &mut st.tx_cx) {
                Verdict::Transmit { len } => {
                    if st.tap.active() {
                        let name = self.shared.tunnels.names.get(t);
                        st.tap
                            .copy(Point::WireOut, Link::Ethernet, name, None, &buf[..len]);
                    }
                    self.xsk.set_len(&mut frame, len);
                    if let Some(n) = st.local.tunnel_keepalives_sent.get_mut(t) {
                        *n += 1;
                    }
                    st.tx_control.push(frame);
                }
                _ => {
                    if hop.is_none() {
                        hops.request();
                    }
                    self.free.push(frame);
                }
            }
        }
    }
}
