//! The frame ledger and counters: where every frame is (see
//! [`FrameCounts`]), what each finished write counts, and publishing it.

use super::*;

impl<S: Socket> Worker<S> {
    pub(super) fn account_drained(&mut self, c: Completed<S::Frame>, st: &mut State<S::Frame>) {
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

    pub(super) fn publish(&self, st: &State<S::Frame>) {
        self.stats.publish(&st.local, &self.tunnel_counters);
        self.stats.publish_frames(&st.frames);
        debug_assert!(
            st.frames.balanced(),
            "a UMEM frame went missing: {:?}",
            st.frames
        );
    }

    pub(super) fn refresh_xsk_stats(&self) {
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

pub(super) fn raw_fds(devices: &[Option<OwnedFd>]) -> Vec<RawFd> {
    devices
        .iter()
        .map(|d| d.as_ref().map_or(-1, |f| f.as_raw_fd()))
        .collect()
}

/// Accounts for one finished device write: an inbound delivery, or an
/// answer to something read from the device.
#[inline]
pub(super) fn account_write<F>(c: &Completed<F>, local: &mut LocalStats) {
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
