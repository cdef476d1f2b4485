//! The way in: a received frame decapsulated (or reassembled first, or
//! answered as a keepalive, or taken as a path MTU update) and written
//! into its device, or held in a coalescing run with the segments of its
//! flow that follow in the batch.

use super::*;
use crate::datapath::decap::{decap_noted, Note, Notes};

/// Decapsulation's notes, keeping only the tunnel the lookup chose.
struct Chosen(Option<u16>);

impl Notes for Chosen {
    #[inline]
    fn note(&mut self, note: Note) {
        if let Note::Tunnel { id } = note {
            self.0 = Some(id);
        }
    }
}
use crate::telemetry::capture::{Link, Point};
use serde_json::json;

impl<S: Socket> Worker<S> {
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn write<D: Devices<S::Frame>>(
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
            if let Some(tr) = &mut st.trace {
                let dev = tr.tunnel(usize::from(tag));
                tr.step(
                    "device",
                    format!(
                        "handed to worker {to}, which writes its flow into {dev} (spread_writes)"
                    ),
                    json!({ "verdict": "handed_over", "worker": to, "tunnel": dev }),
                );
            }
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
            Ok(()) => {
                st.writes_in_flight += 1;
                if let Some(tr) = &mut st.trace {
                    let t = usize::from(tag & !(REPLY | REPLY_ICMP));
                    let dev = tr.tunnel(t);
                    tr.step(
                        "device",
                        format!(
                            "a write of {} bytes into {dev}'s device queued on io_uring",
                            len - VNET_HDR_LEN
                        ),
                        json!({ "verdict": "written", "tunnel": dev, "len": len - VNET_HDR_LEN }),
                    );
                }
            }
            Err(f) => {
                st.local.drop(DropReason::DeviceWriteError);
                if let Some(tr) = &mut st.trace {
                    tr.dropped(DropReason::DeviceWriteError);
                }
                self.free.push(f);
            }
        }
        Ok(())
    }

    /// Writes a decapsulated packet (`offset..offset + len` of the frame)
    /// into tunnel `t`'s device, or holds it to coalesce with the TCP
    /// segments of its flow that follow in the batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver<D: Devices<S::Frame>>(
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
        if st.tap.active() {
            let name = self.shared.tunnels.names.get(usize::from(t));
            st.tap
                .copy(Point::DeviceOut, Link::of(kind), name, None, pkt);
        }
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
                        self.flush_other(io, st, i)?;
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
                note!(
                    st,
                    "coalesce",
                    format!(
                        "joins the {} segments before it of its TCP/UDP flow: one GSO write",
                        st.gro[i].run.segments
                    ),
                    json!({ "coalesced_with": st.gro[i].run.segments })
                );
                let r = &mut st.gro[i];
                r.run.add(&seg);
                r.rest.push(Piece {
                    frame,
                    offset: offset + seg.hdr_len,
                    len: seg.payload,
                });
                if r.run.closed {
                    self.flush_other(io, st, i)?;
                }
                return Ok(());
            }
            // The flow's earlier segments go first.
            self.flush_other(io, st, i)?;
        }
        if !seg.mergeable || seg.push {
            return self.write(io, st, u32::from(t), frame, offset, len, t);
        }
        if st.gro.len() == GRO_FLOWS {
            self.flush_other(io, st, 0)?;
        }
        note!(st, "coalesce", "the first segment of its flow in this batch: held for the segments that may follow, written at the batch's end", json!({ "coalesced_with": 0 }));
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

    /// [`Self::flush_run`] of another packet's run while a packet is in
    /// hand: its writes are not the traced packet's stages.
    fn flush_other<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        i: usize,
    ) -> Result<(), WorkerError> {
        let trace = st.trace.take();
        let r = self.flush_run(io, st, i);
        st.trace = trace;
        r
    }

    /// Writes run `i`: one packet as it is, or several as one GSO packet.
    pub(super) fn flush_run<D: Devices<S::Frame>>(
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
    pub(super) fn writer_for(&self, st: &State<S::Frame>, t: u16, pkt: &[u8]) -> Option<usize> {
        let link = st.spread.as_ref()?;
        let w = link.writer_of(crate::datapath::flow::flow_hash(self.device_kind(t), pkt));
        (w != link.me).then_some(w)
    }

    /// The kind of tunnel `t`'s device.
    #[inline]
    pub(super) fn device_kind(&self, t: u16) -> DeviceKind {
        self.shared
            .tunnels
            .tx
            .get(usize::from(t))
            .map_or(DeviceKind::Tun, |x| x.device_kind)
    }

    /// Decapsulates one received frame and sends it where it belongs. An
    /// outer fragment goes to reassembly; when it completes a datagram,
    /// the whole datagram, written into this frame, is decapsulated: a
    /// second pass, never more (reassembly never puts out a fragment, and a
    /// fragment on the second pass would be dropped), and no recursion on
    /// what a packet says.
    #[inline]
    pub(super) fn receive_one<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        frame: S::Frame,
    ) -> Result<(), WorkerError> {
        if st.tap.active() {
            return self.receive_watched(io, st, frame);
        }
        self.receive(io, st, frame).map(|_| ())
    }

    /// [`Self::receive_one`] while a capture or trace runs: the frame is
    /// offered to the taps before decapsulation rewrites it, and told
    /// where it went after.
    #[cold]
    fn receive_watched<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        mut frame: S::Frame,
    ) -> Result<(), WorkerError> {
        let names = self.shared.tunnels.names.clone();
        st.trace = st.tap.rx_begin(self.xsk.data_mut(&mut frame), &names);
        let seen = self.receive(io, st, frame);
        let (tunnel, reason) = *seen.as_ref().unwrap_or(&(None, None));
        st.tap
            .rx_end(tunnel.and_then(|t| names.get(usize::from(t))), reason);
        if let Some(mut t) = st.trace.take() {
            if let Some(r) = reason {
                t.dropped(r);
            }
            st.tap.finish(t);
        }
        seen.map(|_| ())
    }

    /// Decapsulates one received frame and sends it where it belongs;
    /// returns the tunnel it belongs to and the reason it was dropped,
    /// where known.
    #[inline]
    fn receive<D: Devices<S::Frame>>(
        &mut self,
        io: &mut D,
        st: &mut State<S::Frame>,
        mut frame: S::Frame,
    ) -> Result<(Option<u16>, Option<DropReason>), WorkerError> {
        for pass in 0..2 {
            let data = self.xsk.data_mut(&mut frame);
            let mut chosen = Chosen(None);
            let decapped = match &mut st.trace {
                Some(t) => decap_noted(data, &self.shared.tunnels.rx, &mut st.rx, t),
                // A capture names the tunnel of a packet dropped after the
                // lookup too.
                None if st.tap.active() => {
                    decap_noted(data, &self.shared.tunnels.rx, &mut st.rx, &mut chosen)
                }
                None => decap(data, &self.shared.tunnels.rx, &mut st.rx),
            };
            let chosen = chosen
                .0
                .or_else(|| st.trace.as_ref().and_then(|t| t.tunnel_id()));
            let mut seen = (decapped.ok().map(|d| d.tunnel).or(chosen), decapped.err());
            if st.tap.active() {
                // The copy as received goes first, with its tunnel.
                let t = seen
                    .0
                    .and_then(|t| self.shared.tunnels.names.get(usize::from(t)));
                st.tap.rx_decided(t);
            }
            match decapped {
                Ok(d) if d.kind == Kind::Keepalive => {
                    note!(
                        st,
                        "verdict",
                        "a GRE keepalive: its inner packet goes back on the underlay to the peer",
                        json!({ "verdict": "keepalive_reflected" })
                    );
                    self.keepalive(st, frame, d.tunnel, d.offset, d.len)
                }
                Ok(Delivery {
                    tunnel,
                    kind: Kind::KeepaliveReply,
                    ..
                }) => {
                    note!(
                        st,
                        "verdict",
                        "a reply to this gateway's keepalive: the tunnel is alive",
                        json!({ "verdict": "keepalive_reply" })
                    );
                    let t = usize::from(tunnel);
                    st.local.keepalive_replies += 1;
                    if let Some(n) = st.local.tunnel_keepalive_replies.get_mut(t) {
                        *n += 1;
                    }
                    if let Some(at) = st.local.tunnel_keepalive_reply_at.get_mut(t) {
                        *at = u64::from(crate::io::clock::now()) + 1;
                    }
                    self.free.push(frame);
                }
                Ok(Delivery {
                    tunnel,
                    kind: Kind::PathMtu { mtu, locked },
                    ..
                }) => {
                    if st.pmtu_updates.allow(crate::io::clock::now()) {
                        note!(
                            st,
                            "verdict",
                            format!(
                                "ICMP about a packet of this tunnel: its path MTU is at most {mtu}"
                            ),
                            json!({ "verdict": "path_mtu", "mtu": mtu })
                        );
                        self.path_mtu(usize::from(tunnel), mtu, locked);
                        st.local.path_mtu_updates += 1;
                    } else {
                        st.local.drop(DropReason::IcmpRateLimited);
                        seen.1 = Some(DropReason::IcmpRateLimited);
                    }
                    self.free.push(frame);
                }
                Ok(d) if st.gone[usize::from(d.tunnel)] => {
                    st.local.drop(DropReason::DeviceGone);
                    seen.1 = Some(DropReason::DeviceGone);
                    self.free.push(frame);
                }
                Ok(d) => self.deliver(io, st, frame, d.tunnel, d.offset, d.len)?,
                Err(DropReason::OuterFragment) if pass == 0 => {
                    seen.1 = None;
                    let data = self.xsk.data_mut(&mut frame);
                    let outcome = st.reasm.add(data, crate::io::clock::now());
                    st.local.fragments_pending = st.reasm.pending();
                    match outcome {
                        Outcome::Held => {
                            note!(
                                st,
                                "reassembly",
                                "an outer fragment: held until its datagram is whole",
                                json!({ "verdict": "held" })
                            );
                            self.free.push(frame)
                        }
                        Outcome::Dropped { reason, also } => {
                            for _ in 0..=also {
                                st.local.drop(reason);
                            }
                            seen.1 = Some(reason);
                            self.free.push(frame);
                        }
                        Outcome::Complete { merged } => {
                            let buf = self.xsk.buffer_mut(&mut frame);
                            match st.reasm.take(buf) {
                                Some(len) => {
                                    note!(st, "reassembly", format!("the last fragment: the datagram ({len} bytes) is whole, and decapsulated"), json!({ "verdict": "complete", "len": len }));
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
                                    seen.1 = Some(DropReason::FragmentTooBig);
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
                    seen.1 = Some(DropReason::FragmentMalformed);
                    self.free.push(frame);
                }
                Err(reason) => {
                    st.local.drop(reason);
                    self.free.push(frame);
                }
            }
            return Ok(seen);
        }
        Ok((None, None))
    }

    /// The underlay says the path of tunnel `t` carries at most `mtu`
    /// bytes: every tunnel on that path (same endpoints) takes it.
    pub(super) fn path_mtu(&self, t: usize, mtu: u16, locked: bool) {
        let tx = &self.shared.tunnels.tx;
        let Some(this) = tx.get(t) else { return };
        let now = crate::io::clock::now();
        for other in tx
            .iter()
            .filter(|o| (o.local, o.remote) == (this.local, this.remote))
        {
            if other.path_mtu.lower_locked(mtu, locked, now) {
                tracing::info!(queue = self.queue, path_mtu = mtu, remote = %this.remote, "path MTU lowered by the underlay");
            }
        }
    }

    /// Sends a GRE keepalive's inner packet, `offset..offset + len` of the
    /// frame, back on the underlay to the tunnel's next hop.
    pub(super) fn keepalive(
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
        if st.tap.active() {
            let name = self.shared.tunnels.names.get(usize::from(tunnel));
            st.tap.copy(
                Point::WireOut,
                Link::Ethernet,
                name,
                None,
                &data[..eth + len],
            );
        }
        self.xsk.set_len(&mut frame, eth + len);
        st.local.keepalives += 1;
        st.tx_control.push(frame);
    }
}
