//! The harness the sections share: the gateway under test as a process
//! (its configuration, its counters), and the bench's trials on the
//! generator with the no-drop rate's binary search.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::gen::{self, Generator, Template, Trial};
use crate::ns::NetNs;
use crate::Args;

pub(crate) const GEN_CORE: usize = 0;
pub(crate) const GW_CORE: usize = 1;

pub(crate) fn say(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// The gateway under test, with its counters on request.
pub(crate) struct GatewayProc {
    pub(crate) child: Child,
    lines: Receiver<String>,
    log: PathBuf,
}

impl GatewayProc {
    pub(crate) fn start(ns: &NetNs, bin: &Path, config: &Path, log: &Path) -> Result<GatewayProc> {
        Self::start_with(ns, bin, config, log, &[], Duration::from_secs(20))
    }

    /// As [`GatewayProc::start`], with more arguments and `patience` to
    /// wait until it runs.
    pub(crate) fn start_with(
        ns: &NetNs,
        bin: &Path,
        config: &Path,
        log: &Path,
        extra: &[&str],
        patience: Duration,
    ) -> Result<GatewayProc> {
        let err = std::fs::File::create(log)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin)
            .args(["--iface", "ens0", "--config"])
            .arg(config)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(err)
            // Its own process group: Ctrl-C reaches the bench, which then
            // stops the gateway in order (SIGTERM in `Drop`).
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let gp = GatewayProc {
            child,
            lines: rx,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + patience;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("gateway running") {
                return Ok(gp);
            }
            if text.contains("error:") || Instant::now() > deadline {
                bail!("the gateway did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stats(&self) -> Result<Value> {
        while self.lines.try_recv().is_ok() {}
        Command::new("kill")
            .args(["-USR1", &self.child.id().to_string()])
            .status()?;
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("no stats from the gateway; see {}", self.log.display()))?;
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 10 s) until the gateway has resolved its first tunnel's
/// next hop, so that a trial's first answers are not lost for want of it.
pub(crate) fn wait_next_hop(gw: &GatewayProc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.stats()?["tunnels"][0]["next_hop"].is_string() {
        if Instant::now() > deadline {
            bail!("the gateway did not resolve its next hop within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sums a per-worker field of a stats snapshot.
pub(crate) fn workers(s: &Value, path: &[&str]) -> u64 {
    s["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let mut v = w;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        })
        .sum()
}

pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) trial: Duration,
    pub(crate) steps: u32,
    pub(crate) gen: Generator,
    pub(crate) interrupted: Arc<AtomicBool>,
}

impl Bench {
    pub(crate) fn check(&self) -> Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }

    pub(crate) fn run(&self, template: &Template, rate: Option<f64>) -> Result<gen::Outcome> {
        self.run_flows(template, rate, self.args.flows)
    }

    /// As [`Bench::run`], cycling through `flows` flows instead of `--flows`.
    pub(crate) fn run_flows(
        &self,
        template: &Template,
        rate: Option<f64>,
        flows: u16,
    ) -> Result<gen::Outcome> {
        self.check()?;
        self.gen.run(Trial {
            template: template.clone(),
            rate,
            duration: self.trial,
            flows,
        })
    }

    /// Binary search for the highest rate with zero loss; `lossless(rate)`
    /// runs one trial.
    pub(crate) fn search(
        &self,
        what: &str,
        max: f64,
        mut lossless: impl FnMut(f64) -> Result<bool>,
    ) -> Result<f64> {
        let (mut lo, mut hi) = (0.0f64, max);
        for step in 0..self.steps {
            let mid = (lo + hi) / 2.0;
            let ok = lossless(mid)?;
            say(&format!(
                "{what}: step {}/{} at {:.0} pps: {}",
                step + 1,
                self.steps,
                mid,
                if ok { "no loss" } else { "loss" }
            ));
            if ok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// Writes the gateway's configuration into the output directory and starts
/// it in `ns`, pinned to the gateway core.
pub(crate) fn start_gateway(bench: &Bench, ns: &NetNs, out_dir: &Path) -> Result<GatewayProc> {
    start_gateway_polling(bench, ns, out_dir, &bench.args.poll, "gateway")
}

pub(crate) fn start_gateway_polling(
    bench: &Bench,
    ns: &NetNs,
    out_dir: &Path,
    poll: &str,
    name: &str,
) -> Result<GatewayProc> {
    let config = out_dir.join(format!("{name}.toml"));
    // The setting only when set: a gateway from before it existed can be
    // measured too.
    let extra = match bench.args.busy_poll_budget {
        0 => String::new(),
        n => format!("busy_poll_budget = {n}\n"),
    };
    let cores = GW_CORE.to_string();
    let addrs = ["192.168.0.8", "192.168.0.58", "10.1.1.1", "10.1.1.2"];
    std::fs::write(
        &config,
        gateway_config(poll, &cores, &extra, &bench.args.mode, addrs),
    )?;
    GatewayProc::start(
        ns,
        &bench.args.gateway,
        &config,
        &out_dir.join(format!("{name}.log")),
    )
}

/// A gateway in each of the two hosts of [`crate::ns::underlay_pair`]:
/// tun100 (GRE, MTU 1400) into tap1, 10.1.1.1 in `a` and 10.1.1.2 in `b`,
/// their workers pinned to `cores` (a TOML list's inside, for `a` and for
/// `b`), polling `poll`; configurations and logs in `out_dir` named
/// `{name}-gateway-{a,b}`. Returns once a ping from `a` to 10.1.1.2 has
/// passed (next hops resolved, the path up), within 10 s.
pub(crate) fn start_gateway_pair(
    (a, b): (&NetNs, &NetNs),
    bin: &Path,
    poll: &str,
    cores: [&str; 2],
    out_dir: &Path,
    name: &str,
) -> Result<(GatewayProc, GatewayProc)> {
    use crate::ns::{PAIR_A, PAIR_B};
    let mut procs = Vec::new();
    for (ns, cores, addrs, side) in [
        (a, cores[0], [PAIR_A, PAIR_B, "10.1.1.1", "10.1.1.2"], "a"),
        (b, cores[1], [PAIR_B, PAIR_A, "10.1.1.2", "10.1.1.1"], "b"),
    ] {
        let config = out_dir.join(format!("{name}-gateway-{side}.toml"));
        std::fs::write(&config, gateway_config(poll, cores, "", "gre", addrs))?;
        let log = out_dir.join(format!("{name}-gateway-{side}.log"));
        procs.push(GatewayProc::start(ns, bin, &config, &log)?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::ns::sh(&[
        "ip", "netns", "exec", &a.name, "ping", "-c", "1", "-W", "1", "10.1.1.2",
    ])
    .is_err()
    {
        if Instant::now() > deadline {
            bail!("no ping through the tunnel between the two gateways");
        }
    }
    let gb = procs.pop().expect("two");
    let ga = procs.pop().expect("two");
    Ok((ga, gb))
}

/// A gateway configuration with one tunnel, tun100 into tap1: `poll`,
/// `cores` (a TOML list's inside) and `extra` lines in `[gateway]`;
/// `addrs`: local, remote, inner address, inner peer.
pub(crate) fn gateway_config(
    poll: &str,
    cores: &str,
    extra: &str,
    mode: &str,
    addrs: [&str; 4],
) -> String {
    let [local, remote, address, peer] = addrs;
    format!(
        r#"[gateway]
poll = "{poll}"
cores = [{cores}]
{extra}
[[tunnel]]
name = "tun100"
mode = "{mode}"
local = "{local}"
remote = "{remote}"
ttl = 64
mtu = 1400
device = "tap1"
address = "{address}"
peer = "{peer}"
"#
    )
}
