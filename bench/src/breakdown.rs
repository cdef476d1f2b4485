//! Where the round trip's time goes, stage by stage: the bench's ICMP echo
//! through the tunnel at a low rate, with `perf record` on the kernel's
//! tracepoints along the path, every round trip's events put in order and
//! the time between consecutive stages taken.
//!
//! The stages of one round trip (one packet at a time at this rate, so the
//! events of one round trip do not interleave with the next's):
//!
//! | event | where |
//! |---|---|
//! | `syscalls:sys_enter_sendto` (the generator) | the generator kicks its AF_XDP TX ring (copy mode sends in that call) |
//! | `xdp:xdp_redirect` (the gateway's program) | the gateway's XDP program redirected it to the AF_XDP socket |
//! | `io_uring:io_uring_submit_req` (a gateway worker) | the worker took it from the RX ring, decapsulated it and its write reached the kernel |
//! | `net:netif_rx` / `net:netif_receive_skb` dev=tap1 | the tap took the inner packet |
//! | `net:net_dev_start_xmit` dev=tap1 | the kernel's echo reply went into the tap |
//! | `io_uring:io_uring_complete` (a device read) | the worker's read of the tap completed |
//! | `syscalls:sys_enter_sendto` (a gateway worker) | the worker encapsulated it and kicks its TX ring |
//! | `xdp:xdp_redirect` (the generator's program) | the generator's XDP program redirected the answer to its socket |
//!
//! The rest of the measured round trip (the generator stamping the packet
//! before its send, and finding the answer in its RX ring after its XDP
//! program) is what the generator's own histogram has beyond the traced
//! stages. Tracing adds its own cost to every event; the section reports
//! the round trip with and without it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::gen::{self, Template, Trial};
use crate::harness::{say, Bench};
use crate::ns::NetNs;

/// The round trips per second the section sends: few enough that one has
/// ended long before the next starts.
const RATE: f64 = 1000.0;

/// The stages, each named by the event that ends it.
const STAGES: [&str; 7] = [
    "wire and the gateway's XDP program",
    "RX ring, worker, decapsulation, write submitted",
    "write into the tap",
    "kernel: the echo answered into the tap",
    "device read completed (io_uring)",
    "worker: encapsulation, TX ring, kick",
    "wire back and the generator's XDP program",
];

const EVENTS: &str = "syscalls:sys_enter_sendto,net:net_dev_start_xmit,xdp:xdp_redirect,io_uring:io_uring_submit_req,io_uring:io_uring_complete,net:netif_rx,net:netif_receive_skb";

/// One traced event, as much of it as the stages need.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A thread entered sendto(2) (an AF_XDP TX kick).
    Send { comm: String },
    /// A packet handed to a device's transmit.
    Xmit { dev: String },
    /// An XDP program redirected a packet.
    Redirect { prog_id: u32 },
    /// An io_uring request reached the kernel.
    Submit { comm: String },
    /// An io_uring request completed.
    Complete { user_data: u64, result: i64 },
    /// A device took a packet into the stack.
    Receive { dev: String },
}

/// Which stage an event ends, given the two XDP programs' ids; `None`
/// for events no stage ends.
fn stage_of(e: &Event, gw_prog: u32, gen_prog: u32) -> Option<usize> {
    match e {
        Event::Send { comm } if comm.starts_with("bench-gen") => Some(0),
        Event::Redirect { prog_id } if *prog_id == gw_prog => Some(1),
        Event::Submit { comm } if comm.starts_with("gw-q") => Some(2),
        Event::Receive { dev } if dev == "tap1" => Some(3),
        Event::Xmit { dev } if dev == "tap1" => Some(4),
        // Reads carry bit 62 in their user data (the gateway's READ_TAG).
        // (u64::MAX is a cancel's.)
        Event::Complete { user_data, result }
            if user_data & (1 << 62) != 0 && *user_data != u64::MAX && *result > 0 =>
        {
            Some(5)
        }
        Event::Send { comm } if comm.starts_with("gw-q") => Some(6),
        Event::Redirect { prog_id } if *prog_id == gen_prog => Some(7),
        _ => None,
    }
}

/// Parses one line of `perf script --ns -F comm,pid,time,event,trace`:
/// `gw-q0  4242 1234.567890123: net:net_dev_start_xmit: dev=ens0 ...`,
/// into the time, the process and the event.
pub(crate) fn parse_line(line: &str) -> Option<(u64, u32, Event)> {
    let (head, rest) = line.split_once(": ")?;
    let (event, trace) = rest
        .split_once(": ")
        .unwrap_or((rest.trim_end_matches(':'), ""));
    let mut words = head.split_whitespace();
    let time = words.next_back()?;
    let pid_text = words.next_back()?;
    let pid: u32 = pid_text.parse().ok()?;
    let comm = head[..head.rfind(pid_text)?].trim().to_string();
    let (s, ns) = time.split_once('.')?;
    let t = s.parse::<u64>().ok()? * 1_000_000_000 + ns.parse::<u64>().ok()?;
    let field = |name: &str| -> Option<&str> {
        trace
            .split([' ', ','])
            .find_map(|w| w.strip_prefix(name))
            .map(|v| v.trim())
    };
    let e = match event.trim() {
        "syscalls:sys_enter_sendto" => Event::Send { comm },
        "net:net_dev_start_xmit" => Event::Xmit {
            dev: field("dev=")?.to_string(),
        },
        "net:netif_rx" | "net:netif_receive_skb" => Event::Receive {
            dev: field("dev=")?.to_string(),
        },
        "xdp:xdp_redirect" => Event::Redirect {
            prog_id: field("prog_id=")?.parse().ok()?,
        },
        "io_uring:io_uring_submit_req" => Event::Submit { comm },
        "io_uring:io_uring_complete" => {
            // "user_data 0x4000000000000000, result 98, ..."
            let ud = trace.split("user_data 0x").nth(1)?.split(',').next()?;
            let res = trace.split("result ").nth(1)?.split(',').next()?;
            Event::Complete {
                user_data: u64::from_str_radix(ud.trim(), 16).ok()?,
                result: res.trim().parse().ok()?,
            }
        }
        _ => return None,
    };
    Some((t, pid, e))
}

/// Every complete round trip's stage times (ns), in the order the events
/// came: a round trip starts at the generator's send and ends at its XDP
/// program; one that misses a stage, or meets the next send first, is
/// left out.
pub(crate) fn round_trips(
    events: &[(u64, Event)],
    gw_prog: u32,
    gen_prog: u32,
) -> (Vec<[u64; 7]>, usize) {
    let mut done = Vec::new();
    let mut incomplete = 0;
    // The time of each stage's event so far, in the round trip under way.
    let mut current: Option<Vec<u64>> = None;
    for (t, e) in events {
        let Some(stage) = stage_of(e, gw_prog, gen_prog) else {
            continue;
        };
        if stage == 0 {
            if current.take().is_some() {
                incomplete += 1;
            }
            current = Some(vec![*t]);
            continue;
        }
        if let Some(times) = current.as_mut() {
            // The first event of the stage that comes next; others (a
            // second submit, a write's completion) are not this path's.
            if times.len() == stage {
                times.push(*t);
                if stage == 7 {
                    let mut d = [0u64; 7];
                    for i in 0..7 {
                        d[i] = times[i + 1].saturating_sub(times[i]);
                    }
                    done.push(d);
                    current = None;
                }
            }
        }
    }
    if current.is_some() {
        incomplete += 1;
    }
    (done, incomplete)
}

/// `perf record` on the path's tracepoints, all CPUs, into `file`.
fn start_perf(file: &Path) -> Result<Child> {
    let child = Command::new("perf")
        .args(["record", "-q", "-a", "-e", EVENTS, "-o"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running perf (Debian package linux-perf; cargo xtask setup installs it)")?;
    Ok(child)
}

fn stop_perf(mut child: Child, file: &Path) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() && !file.exists() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("perf record failed ({status}): {err}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("perf record did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "p50_ns": h.value_at_quantile(0.5),
        "p90_ns": h.value_at_quantile(0.9),
        "p99_ns": h.value_at_quantile(0.99),
    })
}

/// The section: the gateway (running in `gw_ns`) and the generator of
/// `bench`; `echo` is the tunnel's echo template.
pub(crate) fn section(
    bench: &Bench,
    gw_ns: &NetNs,
    gen_ns: &NetNs,
    gw_pid: u32,
    echo: &Template,
    out_dir: &Path,
) -> Result<Value> {
    say(&format!(
        "breakdown: the round trip at {RATE:.0} pps, untraced, then with perf on the path's tracepoints"
    ));
    let trial = |duration| Trial {
        template: echo.clone(),
        rate: Some(RATE),
        duration,
        flows: 1,
    };
    let duration = if bench.args.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    bench.check()?;
    let plain = bench.gen.run(trial(duration))?;
    let gw_prog = gw_ns.xdp_prog_id("ens0")?;
    let gen_prog = gen_ns.xdp_prog_id("gen0")?;
    let file = out_dir.join("breakdown.perf.data");
    let mut perf = start_perf(&file)?;
    // perf is recording once its file has a header.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&file).map_or(0, |m| m.len()) == 0 {
        if Instant::now() > deadline || perf.try_wait()?.is_some() {
            let _ = perf.kill();
            let _ = perf.wait();
            bail!("perf record did not start recording within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let traced = bench.gen.run(trial(duration));
    stop_perf(perf, &file)?;
    let traced = traced?;
    let script = Command::new("perf")
        .args(["script", "--ns", "-F", "comm,pid,time,event,trace", "-i"])
        .arg(&file)
        .output()
        .context("perf script")?;
    if !script.status.success() {
        bail!(
            "perf script failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
    }
    let text = String::from_utf8_lossy(&script.stdout);
    // Only the gateway's and this bench's threads (other processes may
    // have threads of the same names); XDP redirects, which run in
    // whichever thread's context, are told apart by program id; the tap's
    // packets are taken in any thread's context (an echo reply deferred
    // to ksoftirqd, say: leaving those trips out would keep only the fast
    // ones). That assumes no other `tap1` carries packets meanwhile (the
    // bench owns the machine while it runs; the integration tests' labs
    // have taps of that name too).
    let me = std::process::id();
    let events: Vec<(u64, Event)> = text
        .lines()
        .filter_map(parse_line)
        .filter(|(_, pid, e)| match e {
            Event::Redirect { .. } => true,
            Event::Receive { dev } | Event::Xmit { dev } if dev == "tap1" => true,
            _ => *pid == gw_pid || *pid == me,
        })
        .map(|(t, _, e)| (t, e))
        .collect();
    let (trips, incomplete) = round_trips(&events, gw_prog, gen_prog);
    let _ = std::fs::remove_file(&file);
    if trips.is_empty() {
        bail!(
            "breakdown: no complete round trip among {} events ({incomplete} incomplete)",
            events.len()
        );
    }
    let mut per_stage: Vec<Histogram<u64>> = (0..7).map(|_| gen::new_histogram()).collect();
    let mut traced_sum = gen::new_histogram();
    // Stages under 100 ns (the histograms' floor; events on two CPUs can
    // come out in the wrong order by a little) are recorded as 100 ns and
    // counted.
    let mut floored = 0u64;
    for t in &trips {
        for (h, d) in per_stage.iter_mut().zip(t) {
            floored += u64::from(*d < 100);
            let _ = h.record((*d).max(100));
        }
        let _ = traced_sum.record(t.iter().sum::<u64>().max(100));
    }
    let rtt_plain = plain.rtt.value_at_quantile(0.5);
    let rtt_traced = traced.rtt.value_at_quantile(0.5);
    let stages_sum = traced_sum.value_at_quantile(0.5);
    say(&format!(
        "  {} complete round trips ({incomplete} left out, {floored} stage times under 100 ns taken as 100); round trip p50 {:.2} µs untraced, {:.2} µs traced",
        trips.len(),
        rtt_plain as f64 / 1e3,
        rtt_traced as f64 / 1e3
    ));
    let mut rows = Vec::new();
    for (name, h) in STAGES.iter().zip(&per_stage) {
        say(&format!(
            "  {:<48} p50 {:>7.2} µs  p99 {:>7.2} µs",
            name,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3
        ));
        let mut q = quantiles(h);
        q["stage"] = json!(name);
        rows.push(q);
    }
    // A difference of medians (of the generator's round trips, and of the
    // sums of the traced stages), not a median of differences; it may be
    // negative.
    let rest = rtt_traced as i64 - stages_sum as i64;
    say(&format!(
        "  {:<48} {:>7.2} µs  (the traced round trip's p50 less the p50 of the stages' sums)",
        "generator: stamp to send, XDP to its RX ring",
        rest as f64 / 1e3
    ));
    Ok(json!({
        "rate_pps": RATE,
        "round_trips": trips.len(),
        "left_out": incomplete,
        "stage_times_floored_to_100ns": floored,
        "events": events.len(),
        "rtt_p50_untraced_ns": rtt_plain,
        "rtt_p99_untraced_ns": plain.rtt.value_at_quantile(0.99),
        "rtt_p50_traced_ns": rtt_traced,
        "stages_p50_sum_ns": stages_sum,
        "generator_rest_p50_ns": rest,
        "stages": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_script_lines_parse() {
        let l = "         gw-q0  4242 12345.000001234: net:net_dev_start_xmit: dev=ens0 queue_mapping=0 skbaddr=0xff len=98";
        assert_eq!(
            parse_line(l),
            Some((
                12345 * 1_000_000_000 + 1234,
                4242,
                Event::Xmit { dev: "ens0".into() }
            ))
        );
        let l = "bench-gen 77 2.000000003: syscalls:sys_enter_sendto: fd: 0x00000005, buff: 0x00000000, len: 0x00000000";
        assert_eq!(
            parse_line(l),
            Some((
                2_000_000_003,
                77,
                Event::Send {
                    comm: "bench-gen".into()
                }
            ))
        );
        let l = "bench-gen 77 7.000000010: io_uring:io_uring_complete: ring 0xff, req 0xee, user_data 0x4000000000000003, result 98, cflags 0x3 extra1 0 extra2 0 ";
        assert_eq!(
            parse_line(l),
            Some((
                7_000_000_010,
                77,
                Event::Complete {
                    user_data: 0x4000_0000_0000_0003,
                    result: 98
                }
            ))
        );
        let l = "swapper 0 1.000000001: xdp:xdp_redirect: prog_id=42 action=REDIRECT ifindex=2 to_ifindex=0 err=0 map_id=7 map_index=0";
        assert_eq!(
            parse_line(l),
            Some((1_000_000_001, 0, Event::Redirect { prog_id: 42 }))
        );
    }

    #[test]
    fn a_round_trip_is_its_stages_in_order_and_a_broken_one_is_left_out() {
        let send = |comm: &str| Event::Send { comm: comm.into() };
        let x = |dev: &str| Event::Xmit { dev: dev.into() };
        let read = Event::Complete {
            user_data: 1 << 62,
            result: 98,
        };
        let write = Event::Complete {
            user_data: 5,
            result: 98,
        };
        let events = vec![
            // Broken: a second send before the first came back.
            (0, send("bench-gen")),
            (5, Event::Redirect { prog_id: 1 }),
            (100, send("bench-gen")),
            (110, Event::Redirect { prog_id: 1 }),
            (
                130,
                Event::Submit {
                    comm: "gw-q0".into(),
                },
            ),
            (
                131,
                Event::Submit {
                    comm: "gw-q0".into(),
                },
            ),
            (140, Event::Receive { dev: "tap1".into() }),
            (150, x("tap1")),
            (155, write),
            (170, read),
            (200, send("gw-q0")),
            (230, Event::Redirect { prog_id: 2 }),
        ];
        let (trips, left_out) = round_trips(&events, 1, 2);
        assert_eq!(left_out, 1);
        assert_eq!(trips, vec![[10, 20, 10, 10, 20, 30, 30]]);
    }
}
