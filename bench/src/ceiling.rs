//! The machine's own ceilings, measured in the same run as the gateway so
//! every gateway figure is also a ratio:
//! - the wire: what the generator pushes into the gateway side's veth with
//!   an XDP program that counts and drops (no gateway);
//! - the device: one core writing the same inner frames into a tap, one
//!   write(2) per packet, and in io_uring batches;
//! - latency: the bare veth's round trip (the gateway host's kernel
//!   answers ping) at the rates the tunnel's latency was measured at.
//!
//! The ceilings section of the run, and `--device-ceiling` (the device
//! ceiling alone, e.g. on the gateway host of a two-host run).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use gateway::datapath::tunnel::DeviceKind;
use gateway::io::netlink::Netlink;
use gateway::io::tap;
use gateway::io::xdp::Steering;
use gateway::io::xdp::XdpAttach;
use gateway_common::{bench_programs, XdpCounter};

use serde_json::json;

use crate::gen::{self, Template};
use crate::harness::{say, Bench, GW_CORE};
use crate::ns::NetNs;
use crate::report::machine;
use crate::round_trip::core_wait;
use crate::Args;

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

/// Ceiling (a), the wire: the generator's tunnel packets into the gateway's
/// veth in `gw_ns`, counted and dropped by XDP there (no gateway).
pub(crate) fn wire_section(bench: &Bench, gw_ns: &NetNs, udp: &Template) -> Result<f64> {
    say("ceiling: the wire (generator into the gateway's veth, XDP drop, no gateway)");
    let probe = DropProbe::attach(gw_ns, "ens0")?;
    let s0 = probe.seen()?;
    let out = bench.run(udp, None)?;
    let s1 = probe.seen()?;
    let pps = (s1 - s0) as f64 / out.elapsed.as_secs_f64();
    say(&format!(
        "  wire: {:.0} pps (generator offered {:.0})",
        pps,
        out.sent as f64 / out.elapsed.as_secs_f64()
    ));
    Ok(pps)
}

/// Ceiling (b), the device: one core (the gateway's) writing the same inner
/// frames into a tap in `gw_ns`.
pub(crate) fn device_section(bench: &Bench, gw_ns: &NetNs) -> Result<DeviceCeiling> {
    say("ceiling: one core writing the same inner frames into a tap");
    let dev = device(Some(gw_ns), GW_CORE, bench.args.payload, bench.trial)?;
    say(&format!(
        "  tap write(2): {:.0} pps; io_uring batches of {}: {:.0} pps",
        dev.write_pps, dev.batch, dev.uring_pps
    ));
    Ok(dev)
}

/// Ceiling (c) for latency: the bare veth's round trip per level (percent
/// of the no-drop rate, rate, outcome), and per level how long the
/// generator was kept off its core while runnable, in ms.
pub(crate) struct BareRoundTrip {
    pub(crate) levels: Vec<(u32, f64, gen::Outcome)>,
    pub(crate) waits: Vec<f64>,
}

/// The bare veth's round trip (the gateway host's kernel answers `bare`'s
/// ping) at the rates of the tunnel's `levels`.
pub(crate) fn bare_round_trip(
    bench: &Bench,
    bare: &Template,
    levels: &[(u32, f64, gen::Outcome)],
) -> Result<BareRoundTrip> {
    say("ceiling: bare veth round trip (the gateway host's kernel answers ping), same rates");
    let mut bare_lat = Vec::new();
    let mut bare_waits = Vec::new();
    for (pct, rate, _) in levels {
        let gen0 = core_wait(std::process::id(), "bench-gen");
        let o = bench.run(bare, Some(*rate))?;
        let gen_wait = core_wait(std::process::id(), "bench-gen")
            .0
            .saturating_sub(gen0.0);
        bare_waits.push(gen_wait as f64 / 1e6);
        say(&format!(
            "  bare at {rate:.0} pps: p50 {:.1} µs p99 {:.1} µs; generator kept off its core while runnable {:.1} ms",
            o.rtt.value_at_quantile(0.5) as f64 / 1000.0,
            o.rtt.value_at_quantile(0.99) as f64 / 1000.0,
            gen_wait as f64 / 1e6
        ));
        bare_lat.push((*pct, *rate, o));
    }
    Ok(BareRoundTrip {
        levels: bare_lat,
        waits: bare_waits,
    })
}

/// `--device-ceiling`: only this host's device ceiling, on its last core,
/// printed as JSON.
pub(crate) fn device_only(args: &Args) -> Result<()> {
    let trial = if args.quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(3)
    };
    let core = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let d = device(None, core, args.payload, trial)?;
    println!(
        "{}",
        json!({
            "tap_write_pps": d.write_pps,
            "tap_io_uring_pps": d.uring_pps,
            "tap_io_uring_batch": d.batch,
            "payload_bytes": args.payload,
            "core": core,
            "machine": machine(),
        })
    );
    Ok(())
}
