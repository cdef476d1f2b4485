//! The traffic generator: an AF_XDP socket on the generator's side of the
//! wire (the gateway's own `Xsk` wrapper), sending pre-built packets in
//! batches at a paced or maximum rate, every one stamped with a sequence
//! number and its send time, and receiving what comes back (the bench's
//! redirect-all XDP program hands every packet to the socket).
//!
//! It runs on one thread inside the generator's namespace, pinned to one
//! core; trials are requested over a channel.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use gateway::io::xdp::Steering;
use gateway::io::xdp::XdpAttach;
use gateway::io::xsk::XskBind;
use gateway::io::xsk::{Frame, Xsk};
use gateway::wire::checksum;
use gateway_common::bench_programs;
use hdrhistogram::Histogram;

/// Marks the bench's payload: magic, sequence number, send time (ns).
pub const MAGIC: &[u8; 8] = b"GWBENCH!";

/// A packet to send, and where in it the stamp goes.
#[derive(Clone, Debug)]
pub struct Template {
    pub bytes: Vec<u8>,
    /// Offset of [`MAGIC`]; the sequence number and time follow it.
    pub stamp_at: usize,
    /// Offset of an ICMP header whose checksum covers the stamp.
    pub icmp_at: Option<usize>,
    /// Offset of a 16-bit field varied per flow (ICMP id or UDP port).
    pub flow_at: usize,
    /// Offset of an outer IPv4 header whose checksum covers the flow field
    /// (the flow varies the outer source address): computed per packet.
    pub ipv4_at: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Trial {
    pub template: Template,
    /// Packets per second; `None` for as fast as the generator can.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub flows: u16,
}

#[derive(Debug)]
pub struct Outcome {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
    /// Round-trip times in nanoseconds of every stamped packet that came back.
    pub rtt: Histogram<u64>,
}

enum Cmd {
    Run(Trial),
    Stop,
}

pub struct Generator {
    cmd: Sender<Cmd>,
    out: Receiver<Result<Outcome, String>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What the generator's XDP program hands to its socket.
#[derive(Clone, Copy, Debug)]
pub enum Capture {
    /// Everything (a veth in a namespace of the bench's own).
    All,
    /// Only GRE/IPIP from the gateway to us: safe on a host's real NIC,
    /// where ARP, SSH and the rest must still reach the kernel.
    Tunnel {
        local: [u8; 4],
        remote: [u8; 4],
        proto: u8,
        mac: [u8; 6],
    },
}

impl Generator {
    /// Starts the generator thread on interface `iface`, inside `ns` (or
    /// in the current namespace), pinned to `core`. Fails if the socket or
    /// the XDP program cannot be set up.
    pub fn start(
        ns: Option<&crate::ns::NetNs>,
        iface: &str,
        core: usize,
        capture: Capture,
    ) -> Result<Generator> {
        let (cmd_tx, cmd_rx) = channel::<Cmd>();
        let (out_tx, out_rx) = channel::<Result<Outcome, String>>();
        let iface = iface.to_string();
        let body = move || {
            crate::ns::pin(core);
            let setup = (|| -> Result<(Xsk, Vec<Frame>, Steering)> {
                let (xsk, frames) = Xsk::new(&iface, 0, 8192, 2048, XskBind::Auto)?;
                let mut prog = match capture {
                    Capture::All => Steering::load_program(bench_programs::REDIRECT_ALL)?,
                    Capture::Tunnel {
                        local,
                        remote,
                        proto,
                        mac,
                    } => {
                        let mut p = Steering::load()?;
                        p.add_endpoint(&gateway_common::EndpointKey::v4(local, remote, proto))?;
                        p.set_mac(mac)?;
                        p
                    }
                };
                prog.set_socket(0, xsk.fd())?;
                prog.attach(&iface, XdpAttach::Auto)?;
                Ok((xsk, frames, prog))
            })();
            let (mut xsk, frames, _prog) = match setup {
                Ok(v) => {
                    let _ = out_tx.send(Ok(empty()));
                    v
                }
                Err(e) => {
                    let _ = out_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let mut state = State::new(&mut xsk, frames);
            while let Ok(Cmd::Run(trial)) = cmd_rx.recv() {
                let r = state.trial(&mut xsk, &trial);
                if out_tx.send(Ok(r)).is_err() {
                    break;
                }
            }
        };
        let handle = match ns {
            Some(ns) => ns.spawn("bench-gen", body),
            None => std::thread::Builder::new()
                .name("bench-gen".into())
                .spawn(body)
                .map_err(|e| anyhow!("spawning the generator: {e}"))?,
        };
        match out_rx.recv() {
            Ok(Ok(_)) => Ok(Generator {
                cmd: cmd_tx,
                out: out_rx,
                handle: Some(handle),
            }),
            Ok(Err(e)) => Err(anyhow!("generator: {e}")),
            Err(_) => Err(anyhow!("generator thread died")),
        }
    }

    pub fn run(&self, trial: Trial) -> Result<Outcome> {
        self.cmd
            .send(Cmd::Run(trial))
            .map_err(|_| anyhow!("generator gone"))?;
        self.out
            .recv()
            .map_err(|_| anyhow!("generator gone"))?
            .map_err(|e| anyhow!(e))
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn empty() -> Outcome {
    Outcome {
        sent: 0,
        received: 0,
        elapsed: Duration::ZERO,
        rtt: new_histogram(),
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 100 ns .. 10 s, three significant digits.
    Histogram::new_with_bounds(100, 10_000_000_000, 3).expect("histogram bounds")
}

struct State {
    base: Instant,
    rx_free: Vec<Frame>,
    tx_free: Vec<Frame>,
    /// Frames set aside for sending (free, or in the TX/completion ring).
    tx_total: usize,
    seq: u64,
}

const BATCH: usize = 64;

impl State {
    fn new(xsk: &mut Xsk, mut frames: Vec<Frame>) -> State {
        // Half the frames receive, half send.
        let tx_free = frames.split_off(frames.len() / 2);
        let mut rx_free = frames;
        xsk.fill(&mut rx_free, 0);
        let _ = xsk.wake_fill_if_needed();
        State {
            base: Instant::now(),
            rx_free,
            tx_total: tx_free.len(),
            tx_free,
            seq: 0,
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn receive(&mut self, xsk: &mut Xsk, rx: &mut Vec<Frame>, out: &mut Outcome) {
        let n = xsk.receive(rx, BATCH);
        if n == 0 {
            return;
        }
        let now = self.now_ns();
        for mut f in rx.drain(..) {
            if let Some(ts) = stamp_of(xsk.data_mut(&mut f)) {
                out.received += 1;
                let _ = out.rtt.record(now.saturating_sub(ts).max(100));
            }
            self.rx_free.push(f);
        }
        xsk.fill(&mut self.rx_free, 0);
        let _ = xsk.wake_fill_if_needed();
    }

    fn trial(&mut self, xsk: &mut Xsk, t: &Trial) -> Outcome {
        let mut out = empty();
        let mut rx = Vec::with_capacity(BATCH);
        let mut tx: Vec<Frame> = Vec::with_capacity(BATCH);
        let start = Instant::now();
        let tpl = &t.template;
        let flows = t.flows.max(1);
        loop {
            let elapsed = start.elapsed();
            if elapsed >= t.duration {
                break;
            }
            self.receive(xsk, &mut rx, &mut out);
            xsk.complete(&mut self.tx_free);
            let due = match t.rate {
                Some(r) => ((elapsed.as_secs_f64() * r) as u64).saturating_sub(out.sent),
                None => BATCH as u64,
            };
            let k = (due as usize).min(BATCH).min(self.tx_free.len());
            for _ in 0..k {
                let mut f = self.tx_free.pop().expect("counted");
                let buf = xsk.buffer_mut(&mut f);
                let len = tpl.bytes.len();
                buf[..len].copy_from_slice(&tpl.bytes);
                self.seq += 1;
                let flow = (self.seq % u64::from(flows)) as u16;
                buf[tpl.flow_at..tpl.flow_at + 2]
                    .copy_from_slice(&(tpl.bytes_flow_base() + flow).to_be_bytes());
                let s = tpl.stamp_at;
                buf[s + 8..s + 16].copy_from_slice(&self.seq.to_be_bytes());
                let now = self.base.elapsed().as_nanos() as u64;
                buf[s + 16..s + 24].copy_from_slice(&now.to_be_bytes());
                if let Some(i) = tpl.ipv4_at {
                    buf[i + 10..i + 12].copy_from_slice(&[0, 0]);
                    let c = checksum::checksum(&buf[i..i + 20]);
                    buf[i + 10..i + 12].copy_from_slice(&c.to_be_bytes());
                }
                if let Some(i) = tpl.icmp_at {
                    buf[i + 2..i + 4].copy_from_slice(&[0, 0]);
                    let c = checksum::checksum(&buf[i..len]);
                    buf[i + 2..i + 4].copy_from_slice(&c.to_be_bytes());
                }
                xsk.set_len(&mut f, len);
                tx.push(f);
            }
            if !tx.is_empty() {
                let before = tx.len();
                let outstanding = (self.tx_total - self.tx_free.len() - tx.len()) as u64;
                let _ = xsk.transmit(&mut tx, outstanding);
                out.sent += (before - tx.len()) as u64;
                // Frames the TX ring had no room for go back to the pool.
                self.tx_free.append(&mut tx);
            }
        }
        out.elapsed = start.elapsed();
        // Stragglers: keep receiving a little while, sending nothing.
        let drain = Instant::now();
        while drain.elapsed() < Duration::from_millis(300) {
            self.receive(xsk, &mut rx, &mut out);
            xsk.complete(&mut self.tx_free);
            // Frames still in the TX ring go out too.
            let outstanding = (self.tx_total - self.tx_free.len()) as u64;
            let _ = xsk.transmit(&mut Vec::new(), outstanding);
        }
        out
    }
}

impl Template {
    fn bytes_flow_base(&self) -> u16 {
        u16::from_be_bytes([self.bytes[self.flow_at], self.bytes[self.flow_at + 1]])
    }
}

/// The send time stamped in a packet that came back: ICMP echo replies,
/// bare or inside GRE/IPIP.
pub fn stamp_of(p: &[u8]) -> Option<u64> {
    let mut at = 14;
    if p.len() < at + 20 || p[12..14] != [0x08, 0x00] {
        return None;
    }
    for _ in 0..2 {
        let ihl = usize::from(p.get(at)? & 0x0f) * 4;
        let proto = *p.get(at + 9)?;
        at += ihl;
        match proto {
            47 => {
                let flags = u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]);
                at += 4
                    + 4 * ((flags >> 15) & 1) as usize
                    + 4 * ((flags >> 13) & 1) as usize
                    + 4 * ((flags >> 12) & 1) as usize;
            }
            4 => {}
            1 => {
                let icmp = p.get(at..)?;
                if icmp.len() < 8 + 24 || icmp[0] != 0 {
                    return None;
                }
                let s = &icmp[8..];
                if &s[..8] != MAGIC {
                    return None;
                }
                return Some(u64::from_be_bytes(s[16..24].try_into().ok()?));
            }
            _ => return None,
        }
    }
    None
}
