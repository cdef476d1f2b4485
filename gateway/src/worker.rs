//! A worker: owns one AF_XDP socket (one NIC RX queue), its UMEM, one
//! io_uring and one queue fd of every tunnel device. Nothing on its path is
//! shared or locked; it publishes counters with relaxed stores.
//!
//! Loop: reap write completions (frames back to the free list) → take a
//! batch from the RX ring → decapsulate each frame in place → queue a
//! `WriteFixed` per packet → one submit for the batch → top up the fill
//! ring. Every frame taken from the RX ring is either written (and counted
//! delivered once its write completes) or dropped under a named reason.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::PollMode;
use crate::decap::decap;
use crate::drop_reason::DropReason;
use crate::stats::{LocalStats, WorkerStats};
use crate::sys::uring::{Completed, DeviceWriter};
use crate::sys::xsk::{Frame, Xsk};
use crate::tunnel::TunnelTable;

/// Empty polls before an adaptive worker blocks in poll(2).
const ADAPTIVE_SPINS: u32 = 2048;
/// How long an adaptive worker blocks at most before looking at its
/// completions and the stop flag again.
const ADAPTIVE_SLEEP_MS: i32 = 10;
/// Idle polls between refreshes of the kernel's socket statistics.
const IDLE_REFRESH: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue {queue}: io_uring setup failed ({source}); the kernel must allow io_uring (sysctl kernel.io_uring_disabled=0)")]
    Uring { queue: u32, source: std::io::Error },
    #[error("queue {queue}: {what} failed ({source})")]
    Io {
        queue: u32,
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Worker {
    pub queue: u32,
    pub core: Option<usize>,
    pub batch: usize,
    pub poll: PollMode,
    xsk: Xsk,
    free: Vec<Frame>,
    /// This worker's queue of each tunnel's device, in tunnel order.
    devices: Vec<OwnedFd>,
    table: Arc<TunnelTable>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: u32,
        core: Option<usize>,
        batch: usize,
        poll: PollMode,
        xsk: Xsk,
        frames: Vec<Frame>,
        devices: Vec<OwnedFd>,
        table: Arc<TunnelTable>,
        stats: Arc<WorkerStats>,
        stop: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            queue,
            core,
            batch,
            poll,
            xsk,
            free: frames,
            devices,
            table,
            stats,
            stop,
        }
    }

    /// Runs until the stop flag is set. Returns with every frame back in the
    /// free list or the kernel's fill/RX rings, none in flight.
    pub fn run(mut self) -> Result<(), WorkerError> {
        if let Some(core) = self.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(queue = self.queue, core, "could not pin worker to core");
            }
        }
        let queue = self.queue;
        let fds: Vec<_> = self.devices.iter().map(|d| d.as_raw_fd()).collect();
        let entries = (self.batch as u32 * 4).next_power_of_two().max(64);
        let mut writer = DeviceWriter::new(entries, &fds, &self.xsk)
            .map_err(|source| WorkerError::Uring { queue, source })?;

        let total = self.free.len() as u64;
        let mut in_kernel: u64 = 0;
        in_kernel += self.xsk.fill(&mut self.free) as u64;
        self.xsk
            .wake_fill_if_needed()
            .map_err(|source| WorkerError::Io {
                queue,
                what: "fill-ring wakeup",
                source,
            })?;

        let mut local = LocalStats::new(self.table.len());
        let mut rx: Vec<Frame> = Vec::with_capacity(self.batch);
        let mut idle: u32 = 0;

        loop {
            let reaped = writer.reap(|c| complete(c, &mut local, &mut self.free));

            let n = self.xsk.receive(&mut rx, self.batch);
            if n > 0 {
                in_kernel -= n as u64;
                local.rx_frames += n as u64;
                local.batches += 1;
                for mut frame in rx.drain(..) {
                    let data = self.xsk.data_mut(&mut frame);
                    match decap(data, &self.table) {
                        Ok(d) => {
                            let mut res =
                                writer.push(u32::from(d.tunnel), frame, d.offset, d.len, d.tunnel);
                            if let Err(f) = res {
                                // Submission queue full: hand the kernel what
                                // is queued and try once more.
                                writer.submit().map_err(|source| WorkerError::Io {
                                    queue,
                                    what: "io_uring submit",
                                    source,
                                })?;
                                res =
                                    writer.push(u32::from(d.tunnel), f, d.offset, d.len, d.tunnel);
                            }
                            if let Err(f) = res {
                                local.drop(DropReason::DeviceWriteError);
                                self.free.push(f);
                            }
                        }
                        Err(reason) => {
                            local.drop(reason);
                            self.free.push(frame);
                        }
                    }
                }
                writer.submit().map_err(|source| WorkerError::Io {
                    queue,
                    what: "io_uring submit",
                    source,
                })?;
            }

            let filled = self.xsk.fill(&mut self.free);
            in_kernel += filled as u64;
            if filled > 0 || n == 0 {
                self.xsk
                    .wake_fill_if_needed()
                    .map_err(|source| WorkerError::Io {
                        queue,
                        what: "fill-ring wakeup",
                        source,
                    })?;
            }

            if n > 0 || reaped > 0 {
                idle = 0;
                local.busy_polls += 1;
                self.publish(&local, total, in_kernel, writer.in_flight());
                continue;
            }

            idle = idle.wrapping_add(1);
            local.idle_polls += 1;
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            if idle.is_multiple_of(IDLE_REFRESH) {
                self.publish(&local, total, in_kernel, writer.in_flight());
                self.refresh_xsk_stats();
            }
            match self.poll {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Adaptive => {
                    if idle >= ADAPTIVE_SPINS && writer.in_flight() == 0 {
                        self.publish(&local, total, in_kernel, 0);
                        self.refresh_xsk_stats();
                        local.sleeps += 1;
                        // EINTR and the like only shorten the sleep.
                        let _ = self.xsk.wait_rx(ADAPTIVE_SLEEP_MS);
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }

        writer
            .drain(|c| complete(c, &mut local, &mut self.free))
            .map_err(|source| WorkerError::Io {
                queue,
                what: "draining io_uring",
                source,
            })?;
        self.publish(&local, total, in_kernel, writer.in_flight());
        self.refresh_xsk_stats();
        Ok(())
    }

    fn publish(&self, local: &LocalStats, total: u64, in_kernel: u64, in_flight: usize) {
        self.stats.publish(local);
        self.stats
            .publish_frames(total, self.free.len() as u64, in_kernel, in_flight as u64);
        debug_assert_eq!(
            self.free.len() as u64 + in_kernel + in_flight as u64,
            total,
            "a UMEM frame went missing"
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

/// Accounts for one finished device write and takes its frame back.
#[inline]
fn complete(c: Completed, local: &mut LocalStats, free: &mut Vec<Frame>) {
    if c.result < 0 {
        local.drop(DropReason::DeviceWriteError);
    } else if c.result as u32 != c.expected {
        local.drop(DropReason::DeviceWriteShort);
    } else {
        let t = usize::from(c.tag);
        local.delivered += 1;
        local.tunnel_rx_packets[t] += 1;
        local.tunnel_rx_bytes[t] += u64::from(c.expected);
    }
    free.push(c.frame);
}
