//! Application-to-application latency: a UDP ping-pong between kernel
//! sockets on two hosts, through two gateways and over the bare veth, in
//! the same run.
//!
//! Topology: the TCP section's ([`crate::ns::underlay_pair`] and
//! [`crate::harness::start_gateway_pair`]): namespaces `gwb-app-a` and
//! `gwb-app-b` joined by a veth; for the tunnel, a gateway in each with
//! tun100 (GRE) into tap1, 10.1.1.1 in A and 10.1.1.2 in B. Host A's
//! application (the client) and gateway worker share core 0, host B's (the
//! server) and worker core 1, in every case, the bare veth's included.
//!
//! The ping-pong: the client sends a 64-byte datagram carrying a sequence
//! number, the server sends it back, the client waits for the echo of that
//! number, then sends the next; a warm-up, then up to N round trips, each
//! recorded in a histogram (reported as half the round trip). An echo not
//! back within a second is counted lost and the next datagram sent. The
//! warm-up and the recorded round trips each stop at a time limit if they
//! take longer: a spinning application beside a spinning worker on one
//! core gets that core only in the scheduler's slices, and such a case
//! ends at its limit with fewer round trips.
//!
//! The cases: the bare veth (the underlay addresses, no gateway), then the
//! tunnel with both gateways in `poll = "busy"` and again in
//! `poll = "adaptive"`; each with blocking applications (recv(2) sleeps
//! until the datagram arrives) and with spinning ones (non-blocking
//! recv(2) in a loop: no wake-up on the application's side). With every
//! case, how long the applications' threads and the gateways' workers were
//! runnable but kept off their cores (schedstat): on a 2-core machine two
//! busy-polling workers and two applications compete for the cores.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::harness::{say, start_gateway_pair};
use crate::ns::{self, NetNs, PAIR_A, PAIR_B};
use crate::report::hgrm;
use crate::round_trip::core_wait;
use crate::Args;

/// Host A's core: the client and gateway A's worker.
const CORE_A: usize = 0;
/// Host B's core: the server and gateway B's worker.
const CORE_B: usize = 1;
/// The server's UDP port.
const PORT: u16 = 47_000;
/// The UDP payload of every datagram.
const DATAGRAM: usize = 64;
/// An echo not back by then is counted lost, and the next datagram sent.
const LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// No echo at all by then fails the section (the path is broken).
const FIRST_ECHO_LIMIT: Duration = Duration::from_secs(10);
/// How often a blocking server looks at its stop flag.
const SERVER_TICK: Duration = Duration::from_millis(50);

/// How the applications wait for a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AppWait {
    /// recv(2) sleeps until the datagram arrives.
    Blocking,
    /// Non-blocking recv(2) in a loop.
    Spinning,
}

impl AppWait {
    fn name(self) -> &'static str {
        match self {
            AppWait::Blocking => "blocking",
            AppWait::Spinning => "busy_poll",
        }
    }

    fn words(self) -> &'static str {
        match self {
            AppWait::Blocking => "blocking apps",
            AppWait::Spinning => "busy-polling apps",
        }
    }
}

/// How long each case runs.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Unrecorded round trips first, for at most `warmup_limit` (once one
    /// echo has come back).
    warmup: u64,
    warmup_limit: Duration,
    /// Recorded round trips, for at most `limit`.
    round_trips: u64,
    limit: Duration,
}

/// What one case measured.
struct PingPong {
    /// Round trips in nanoseconds.
    rtt: Histogram<u64>,
    lost: u64,
    time_limited: bool,
    elapsed: Duration,
    /// Runnable but kept off their cores during the measured round trips,
    /// in ns: the client, the server, gateway A's and B's workers.
    off_core: [u64; 4],
}

/// The client: sends a datagram, waits for its echo, `plan.warmup` times
/// unrecorded and then up to `plan.round_trips` times recorded.
struct Client {
    sock: UdpSocket,
    wait: AppWait,
    seq: u64,
    tx: [u8; DATAGRAM],
    rx: [u8; 2048],
}

impl Client {
    fn new(local: Ipv4Addr, server: SocketAddrV4, wait: AppWait) -> Result<Client> {
        let sock = UdpSocket::bind((local, 0)).with_context(|| format!("binding to {local}"))?;
        sock.connect(server)?;
        match wait {
            AppWait::Blocking => sock.set_read_timeout(Some(LOSS_TIMEOUT))?,
            AppWait::Spinning => sock.set_nonblocking(true)?,
        }
        Ok(Client {
            sock,
            wait,
            seq: 0,
            tx: [0; DATAGRAM],
            rx: [0; 2048],
        })
    }

    /// One round trip: its time in ns, or `None` if the echo was lost.
    fn round_trip(&mut self) -> Result<Option<u64>> {
        self.seq += 1;
        self.tx[..8].copy_from_slice(&self.seq.to_be_bytes());
        let t0 = Instant::now();
        self.sock.send(&self.tx)?;
        let deadline = t0 + LOSS_TIMEOUT;
        loop {
            match self.sock.recv(&mut self.rx) {
                Ok(n) => {
                    let t1 = Instant::now();
                    if n == DATAGRAM && self.rx[..8] == self.seq.to_be_bytes() {
                        return Ok(Some((t1 - t0).as_nanos() as u64));
                    }
                    // A late echo of a datagram counted lost: not this one.
                    if t1 > deadline {
                        return Ok(None);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.wait == AppWait::Blocking || Instant::now() > deadline {
                        return Ok(None);
                    }
                }
                // The server's port unreachable (from an earlier run's
                // last datagram), or the like: count it lost.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The server: echoes every datagram to its sender until `stop`.
fn serve(sock: &UdpSocket, wait: AppWait, stop: &AtomicBool) -> std::io::Result<u64> {
    match wait {
        AppWait::Blocking => sock.set_read_timeout(Some(SERVER_TICK))?,
        AppWait::Spinning => sock.set_nonblocking(true)?,
    }
    let mut buf = [0u8; 2048];
    let mut echoed = 0;
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                sock.send_to(&buf[..n], from)?;
                echoed += 1;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(echoed)
}

/// How long, so far, the client and server threads and the workers of
/// gateways A and B (their pids, if any) were runnable off their cores.
fn off_core(gateways: &[u32], me: u32) -> [u64; 4] {
    let gw = |i: usize| gateways.get(i).map_or(0, |p| core_wait(*p, "gw-q").0);
    [
        core_wait(me, "app-cli").0,
        core_wait(me, "app-srv").0,
        gw(0),
        gw(1),
    ]
}

/// The client's part of a case: the warm-up, then the recorded round
/// trips, with the time the applications and the workers of `gateways`
/// were kept off their cores meanwhile.
fn measure(
    c: &mut Client,
    plan: Plan,
    gateways: &[u32],
    interrupted: &AtomicBool,
) -> Result<PingPong> {
    let me = std::process::id();
    let warm = Instant::now();
    let mut answered = 0;
    while answered < plan.warmup {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if answered > 0 && warm.elapsed() > plan.warmup_limit {
            break;
        }
        if answered == 0 && warm.elapsed() > FIRST_ECHO_LIMIT {
            bail!(
                "no echo from {} within {} s",
                c.sock.peer_addr()?,
                FIRST_ECHO_LIMIT.as_secs()
            );
        }
        answered += u64::from(c.round_trip()?.is_some());
    }
    let mut rtt = crate::gen::new_histogram();
    let (mut lost, mut time_limited) = (0, false);
    let off0 = off_core(gateways, me);
    let start = Instant::now();
    while rtt.len() < plan.round_trips {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if start.elapsed() > plan.limit {
            time_limited = true;
            break;
        }
        match c.round_trip()? {
            Some(ns) => rtt.record(ns.max(100))?,
            None => lost += 1,
        }
    }
    let elapsed = start.elapsed();
    let off1 = off_core(gateways, me);
    Ok(PingPong {
        rtt,
        lost,
        time_limited,
        elapsed,
        off_core: std::array::from_fn(|i| off1[i].saturating_sub(off0[i])),
    })
}

/// One case: a server on `server_ip` in `b` (core B), a client from
/// `client_ip` in `a` (core A); `gateways`: the pids of gateways A and B
/// (none over the bare veth), for their workers' time off their cores.
fn ping_pong(
    (a, b): (&NetNs, &NetNs),
    (client_ip, server_ip): (Ipv4Addr, Ipv4Addr),
    wait: AppWait,
    plan: Plan,
    gateways: &[u32],
    interrupted: &Arc<AtomicBool>,
) -> Result<PingPong> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = channel::<Result<(), String>>();
    let server = {
        let stop = stop.clone();
        b.spawn("app-srv", move || -> Result<u64, String> {
            ns::pin(CORE_B);
            let sock = match UdpSocket::bind((server_ip, PORT)) {
                Ok(s) => s,
                Err(e) => {
                    let e = format!("binding the server to {server_ip}:{PORT}: {e}");
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            serve(&sock, wait, &stop).map_err(|e| format!("server: {e}"))
        })
    };
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = server.join();
            bail!("{e}");
        }
        Err(_) => {
            stop.store(true, Ordering::Relaxed);
            bail!("the ping-pong server did not start within 10 s");
        }
    }
    let client = {
        let interrupted = interrupted.clone();
        let gateways = gateways.to_vec();
        let server = SocketAddrV4::new(server_ip, PORT);
        a.spawn("app-cli", move || -> Result<PingPong> {
            ns::pin(CORE_A);
            let mut c = Client::new(client_ip, server, wait)?;
            measure(&mut c, plan, &gateways, &interrupted)
        })
    };
    let measured = client
        .join()
        .map_err(|_| anyhow!("the ping-pong client panicked"));
    // A blocking server sees the flag within its tick.
    stop.store(true, Ordering::Relaxed);
    let served = server
        .join()
        .map_err(|_| anyhow!("the ping-pong server panicked"))?;
    let measured = measured??;
    served.map_err(|e| anyhow!(e))?;
    Ok(measured)
}

/// Half the round trip at quantile `q`, in µs.
fn half_us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 2000.0
}

/// The application-to-application section: see the module's comment.
/// Prints its progress, writes a `.hgrm` per case into `out_dir`, and
/// returns its results.
pub(crate) fn section(args: &Args, out_dir: &Path, interrupted: &Arc<AtomicBool>) -> Result<Value> {
    let plan = if args.quick {
        Plan {
            warmup: 200,
            warmup_limit: Duration::from_secs(1),
            round_trips: 2_000,
            limit: Duration::from_secs(2),
        }
    } else {
        Plan {
            warmup: 1_000,
            warmup_limit: Duration::from_secs(3),
            round_trips: 20_000,
            limit: Duration::from_secs(10),
        }
    };
    say(&format!(
        "app to app: UDP ping-pong, {DATAGRAM}-byte datagrams, {} round trips (at most {} s) after {} of warm-up; client with gateway A on core {CORE_A}, server with gateway B on core {CORE_B}",
        plan.round_trips,
        plan.limit.as_secs(),
        plan.warmup
    ));
    let (a, b) = ns::underlay_pair("gwb-app-a", "gwb-app-b", 1)?;
    let bare_ips = (PAIR_A.parse()?, PAIR_B.parse()?);
    let inner_ips = (Ipv4Addr::new(10, 1, 1, 1), Ipv4Addr::new(10, 1, 1, 2));
    let waits = [AppWait::Blocking, AppWait::Spinning];
    let mut cases: Vec<Value> = Vec::new();
    let mut record = |gateway_poll: Option<&str>, wait: AppWait, p: PingPong| -> Result<()> {
        let name = format!(
            "{}-{}",
            gateway_poll.map_or("bare".to_string(), |g| format!("tunnel-{g}")),
            wait.name()
        );
        let file = format!("app-{name}.hgrm");
        std::fs::write(out_dir.join(&file), hgrm(&p.rtt))?;
        let ms = |ns: u64| ns as f64 / 1e6;
        let (h, [cli, srv, gwa, gwb]) = (&p.rtt, p.off_core);
        let mut v = json!({
            "case": name,
            "path": if gateway_poll.is_some() { "tunnel" } else { "bare veth" },
            "gateway_poll": gateway_poll,
            "app_wait": wait.name(),
            "round_trips": h.len(),
            "lost": p.lost,
            "stopped_at_time_limit": p.time_limited,
            "elapsed_s": p.elapsed.as_secs_f64(),
            "half_round_trip_us": {
                "p50": half_us(h, 0.5),
                "p90": half_us(h, 0.9),
                "p99": half_us(h, 0.99),
                "p99_9": half_us(h, 0.999),
                "max": h.max() as f64 / 2000.0,
                "mean": h.mean() / 2000.0,
            },
            "round_trip_hgrm": file,
            "runnable_off_core_ms": {
                "client": ms(cli),
                "server": ms(srv),
                "gateway_a_workers": gateway_poll.map(|_| ms(gwa)),
                "gateway_b_workers": gateway_poll.map(|_| ms(gwb)),
            },
        });
        if gateway_poll.is_some() {
            let bare = cases
                .iter()
                .find(|c| c["path"] == "bare veth" && c["app_wait"] == wait.name())
                .map(|c| &c["half_round_trip_us"])
                .context("the bare veth's case goes first")?;
            let ratio = |q: &str| {
                v["half_round_trip_us"][q].as_f64().unwrap_or(0.0)
                    / bare[q].as_f64().unwrap_or(0.0).max(1e-9)
            };
            let (r50, r99) = (ratio("p50"), ratio("p99"));
            v["ratio_p50_to_bare"] = json!(r50);
            v["ratio_p99_to_bare"] = json!(r99);
            v["p50_within_4x_bare"] = json!(r50 <= 4.0);
        }
        say(&format!("  {}", line(&v)));
        cases.push(v);
        Ok(())
    };

    say("  the bare veth (no gateway)");
    for wait in waits {
        let p = ping_pong((&a, &b), bare_ips, wait, plan, &[], interrupted)?;
        record(None, wait, p)?;
    }
    for poll in ["busy", "adaptive"] {
        say(&format!(
            "  through two gateways, poll \"{poll}\", workers on cores {CORE_A} and {CORE_B}"
        ));
        let cores = [CORE_A.to_string(), CORE_B.to_string()];
        let (ga, gb) = start_gateway_pair(
            (&a, &b),
            &args.gateway,
            poll,
            [&cores[0], &cores[1]],
            out_dir,
            &format!("app-{poll}"),
        )?;
        let pids = [ga.child.id(), gb.child.id()];
        for wait in waits {
            let p = ping_pong((&a, &b), inner_ips, wait, plan, &pids, interrupted)?;
            record(Some(poll), wait, p)?;
        }
    }
    Ok(json!({
        "settings": {
            "datagram_bytes": DATAGRAM,
            "warmup_round_trips": plan.warmup,
            "warmup_time_limit_s": plan.warmup_limit.as_secs_f64(),
            "round_trips": plan.round_trips,
            "time_limit_s": plan.limit.as_secs_f64(),
            "loss_timeout_s": LOSS_TIMEOUT.as_secs_f64(),
            "client_and_gateway_a_core": CORE_A,
            "server_and_gateway_b_core": CORE_B,
            "topology": "namespaces gwb-app-a and gwb-app-b joined by a veth (192.168.0.8, 192.168.0.58); the tunnel: a gateway in each, tun100 GRE into tap1, 10.1.1.1 <-> 10.1.1.2",
        },
        "cases": cases,
    }))
}

/// One case in words and figures: a progress line, and the summary's.
fn line(c: &Value) -> String {
    let h = &c["half_round_trip_us"];
    let f = |q: &str| h[q].as_f64().unwrap_or(0.0);
    let what = match c["gateway_poll"].as_str() {
        Some(p) => format!("tunnel, gateways poll {p}"),
        None => "bare veth".to_string(),
    };
    let app = match c["app_wait"].as_str() {
        Some("blocking") => AppWait::Blocking.words(),
        _ => AppWait::Spinning.words(),
    };
    let ratios = match (
        c["ratio_p50_to_bare"].as_f64(),
        c["ratio_p99_to_bare"].as_f64(),
    ) {
        (Some(r50), Some(r99)) => format!("; vs bare p50 {r50:.2}x p99 {r99:.2}x"),
        _ => String::new(),
    };
    let off = &c["runnable_off_core_ms"];
    let gw = match (
        off["gateway_a_workers"].as_f64(),
        off["gateway_b_workers"].as_f64(),
    ) {
        (Some(ga), Some(gb)) => format!(", workers A {ga:.1} B {gb:.1}"),
        _ => String::new(),
    };
    format!(
        "app to app, {what}, {app}: half round trip p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs{ratios} ({} round trips{}{}; off core ms: client {:.1} server {:.1}{gw})",
        f("p50"),
        f("p90"),
        f("p99"),
        f("p99_9"),
        f("max"),
        c["round_trips"],
        match c["lost"].as_u64() {
            Some(0) | None => String::new(),
            Some(n) => format!(", {n} lost"),
        },
        if c["stopped_at_time_limit"] == true {
            ", stopped at the time limit"
        } else {
            ""
        },
        off["client"].as_f64().unwrap_or(0.0),
        off["server"].as_f64().unwrap_or(0.0),
    )
}

/// The summary's lines: one per case.
pub(crate) fn summary(app: &Value) {
    for c in app["cases"].as_array().into_iter().flatten() {
        println!("{}", line(c));
    }
}

/// `--app-only`: this section alone, its results in `results.json`.
pub(crate) fn only(args: &Args, out_dir: &Path, interrupted: &Arc<AtomicBool>) -> Result<()> {
    let app = section(args, out_dir, interrupted)?;
    println!();
    summary(&app);
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json!({ "app": app }))?,
    )?;
    Ok(())
}
