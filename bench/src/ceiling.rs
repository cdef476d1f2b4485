//! The machine's own ceilings, measured in the same run as the gateway so
//! every gateway figure is also a ratio:
//! - the wire: what the generator pushes into the gateway side's veth with
//!   an XDP program that counts and drops (no gateway);
//! - the device: one core writing the same inner frames into a tap, one
//!   write(2) per packet, and in io_uring batches.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use gateway::control::config::XdpAttach;
use gateway::datapath::tunnel::DeviceKind;
use gateway::io::netlink::Netlink;
use gateway::io::tap;
use gateway::io::xdp::Steering;
use gateway_common::{bench_programs, XdpCounter};

use crate::ns::NetNs;

/// An XDP program that counts and drops everything on `iface` in `ns`,
/// attached until dropped.
pub struct DropProbe {
    ask: Sender<Option<Sender<u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DropProbe {
    pub fn attach(ns: &NetNs, iface: &str) -> Result<DropProbe> {
        let (ask_tx, ask_rx) = channel::<Option<Sender<u64>>>();
        let (ready_tx, ready_rx) = channel::<Result<(), String>>();
        let iface = iface.to_string();
        let handle = ns.spawn("bench-drop", move || {
            let prog = (|| -> Result<Steering> {
                let mut p = Steering::load_program(bench_programs::DROP)?;
                p.attach(&iface, XdpAttach::Native)?;
                Ok(p)
            })();
            let prog = match prog {
                Ok(p) => {
                    let _ = ready_tx.send(Ok(()));
                    p
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            while let Ok(Some(reply)) = ask_rx.recv() {
                let _ = reply.send(prog.counters()[XdpCounter::Seen as usize]);
            }
        });
        ready_rx
            .recv()
            .map_err(|_| anyhow!("drop probe died"))?
            .map_err(|e| anyhow!("wire ceiling: {e}"))?;
        Ok(DropProbe {
            ask: ask_tx,
            handle: Some(handle),
        })
    }

    /// Packets the program has seen.
    pub fn seen(&self) -> Result<u64> {
        let (tx, rx) = channel();
        self.ask
            .send(Some(tx))
            .map_err(|_| anyhow!("drop probe gone"))?;
        rx.recv().map_err(|_| anyhow!("drop probe gone"))
    }
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        let _ = self.ask.send(None);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Packets per second one core writes into a tap: with write(2) per
/// packet, and with io_uring batches of `batch`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceCeiling {
    pub write_pps: f64,
    pub uring_pps: f64,
    pub batch: usize,
}

/// Creates a tap in `ns` (10.9.9.1 peer 10.9.9.2), and on `core` writes
/// frames addressed to its own IP, like the gateway's decapsulated ones.
pub fn device(
    ns: Option<&NetNs>,
    core: usize,
    payload: usize,
    duration: Duration,
) -> Result<DeviceCeiling> {
    let body = move || -> Result<DeviceCeiling> {
        crate::ns::pin(core);
        let fd: OwnedFd = tap::open_queue("bench0", DeviceKind::Tap)?;
        let nl = Netlink::new()?;
        let link = nl.link("bench0")?.ok_or_else(|| anyhow!("no bench0"))?;
        nl.set_up(&link, Some(1500))?;
        nl.add_peer_address(&link, "10.9.9.1".parse()?, "10.9.9.2".parse()?)?;
        let mac = link.mac.ok_or_else(|| anyhow!("bench0 has no MAC"))?;
        // The queue is opened as the gateway opens it (with a virtio-net
        // header before each packet), so each write carries a plain one.
        let mut frame = vec![0u8; gateway::datapath::offload::VNET_HDR_LEN];
        frame.extend(crate::templates::tap_frame(
            mac,
            [10, 9, 9, 2],
            [10, 9, 9, 1],
            payload,
        ));
        let mut file = std::fs::File::from(fd.try_clone()?);

        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            for _ in 0..64 {
                file.write_all(&frame)?;
            }
            n += 64;
        }
        let write_pps = n as f64 / start.elapsed().as_secs_f64();

        let batch = 64usize;
        let mut ring = io_uring::IoUring::new(256)?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            for i in 0..batch {
                let sqe = io_uring::opcode::Write::new(
                    io_uring::types::Fd(fd.as_raw_fd()),
                    frame.as_ptr(),
                    frame.len() as u32,
                )
                .offset(0)
                .build()
                .user_data(i as u64);
                // SAFETY: `frame` outlives the writes: every one is waited
                // for below, before the next batch and before `frame` drops.
                #[allow(unsafe_code)]
                unsafe {
                    ring.submission()
                        .push(&sqe)
                        .map_err(|_| anyhow!("sq full"))?;
                }
            }
            ring.submit_and_wait(batch)?;
            for cqe in ring.completion() {
                if cqe.result() < 0 {
                    return Err(anyhow!(
                        "io_uring write: {}",
                        std::io::Error::from_raw_os_error(-cqe.result())
                    ));
                }
                n += 1;
            }
        }
        let uring_pps = n as f64 / start.elapsed().as_secs_f64();
        drop(file);
        let _ = nl.delete(&link);
        Ok(DeviceCeiling {
            write_pps,
            uring_pps,
            batch,
        })
    };
    let handle = match ns {
        Some(ns) => ns.spawn("bench-tap", body),
        None => std::thread::spawn(body),
    };
    handle
        .join()
        .map_err(|_| anyhow!("device ceiling thread panicked"))?
}
