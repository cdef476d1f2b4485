//! The lab: the guest and the gateway's side, booted once, and one case run
//! on it (the kernel's devices, the gateway, pings both ways, ARP, TCP both
//! ways, the capture), then undone.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::cases::{endpoints, Case};
use super::report::{CaseResult, Pings, Transfer};
use super::wire::{self, Capture};
use super::{FIRST_PING_LIMIT, PINGS, PING_TOS, PING_TTL, TCP_BYTES, TCP_LIMIT};
use crate::vm::{self, Console, GatewayProc, Guest, Stop, Topology};

/// The TCP ends: `serve ADDR PORT OUT` takes one connection and writes the
/// byte count and SHA-256 of what it read to OUT (`OUT.listening` once it
/// listens); `send ADDR PORT BYTES` sends that many pseudo-random bytes and
/// prints their count and SHA-256 once the server has closed.
const XFER_PY: &str = r#"import hashlib, os, random, socket, sys
def family(a): return socket.AF_INET6 if ':' in a else socket.AF_INET
if sys.argv[1] == 'serve':
    addr, port, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(1); s.settimeout(900)
    open(out + '.listening', 'w').close()
    c, _ = s.accept(); c.settimeout(900)
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b: break
        h.update(b); n += len(b)
    c.close()
    with open(out + '.tmp', 'w') as f: f.write('%d %s\n' % (n, h.hexdigest()))
    os.rename(out + '.tmp', out)
else:
    addr, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(size * 7 + port)
    c = socket.create_connection((addr, port), timeout=900)
    h = hashlib.sha256(); left = size
    while left:
        b = rng.randbytes(min(left, 1 << 16)); c.sendall(b); h.update(b); left -= len(b)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print('%d %s' % (size, h.hexdigest()))
"#;

/// The guest and the gateway's side, booted once for every case.
pub struct Lab {
    pub guest: Guest,
    pub topo: Topology,
    pub gateway_bin: PathBuf,
    pub dir: PathBuf,
    pub stop: Stop,
    /// Last: the run's folder goes after QEMU (which shares part of it).
    _dir: vm::RemoveDir,
}

impl Lab {
    /// Packages, kernel, accelerator, namespaces, boot: everything up to a
    /// guest that takes commands. `cache` is `target/vm`.
    pub fn up(
        cache: &Path,
        gateway_bin: &Path,
        prefix: &str,
        console: Console,
        stop: &Stop,
    ) -> Result<Lab> {
        if !gateway_bin.exists() {
            bail!(
                "no gateway binary at {}: run `cargo build -p gateway` first",
                gateway_bin.display()
            );
        }
        vm::ensure_packages()?;
        let kernel = vm::prepare(cache)?;
        let dir = cache.join(format!("run-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let remove = vm::RemoveDir(dir.clone());
        let accel = vm::choose_accel(&kernel, &dir, stop)?;
        let topo = Topology::new(prefix)?;
        let guest = Guest::boot(&kernel, accel, &topo, dir.join("job"), console, stop)?;
        Ok(Lab {
            guest,
            topo,
            gateway_bin: gateway_bin.to_path_buf(),
            dir,
            stop: stop.clone(),
            _dir: remove,
        })
    }

    /// `sh -c SCRIPT` in the gateway's namespace: success and output.
    pub fn host_shell(&self, script: &str) -> (bool, String) {
        self.host(script)
    }

    fn host(&self, script: &str) -> (bool, String) {
        Topology::exec(&self.topo.gw, &["sh", "-c", script])
    }

    fn host_ok(&self, script: &str) -> Result<String> {
        let (ok, out) = self.host(script);
        if !ok {
            bail!(
                "in the gateway's namespace, `{script}` failed:\n{}",
                out.trim()
            );
        }
        Ok(out)
    }

    fn gateway_config(tunnel: &str) -> String {
        format!("[gateway]\niface = \"ens0\"\npoll = \"adaptive\"\n\n[[tunnel]]\n{tunnel}")
    }

    /// Pings `dst` from the gateway's side (`guest` false) or the kernel's:
    /// first until one answers, then [`PINGS`] counted.
    fn ping(&mut self, from_guest: bool, dst: &str) -> Result<Pings> {
        let once = format!("ping -c 1 -W 2 {dst}");
        // -w: wait for every reply until the deadline (with -W alone ping
        // gives up on the last one after twice the slowest RTT so far, and
        // a loaded TCG guest would lose it).
        let many = format!("ping -c {PINGS} -i 0.2 -w 60 -Q {PING_TOS} -t {PING_TTL} {dst}");
        let stop = self.stop.clone();
        let mut last = String::new();
        let first = vm::wait_for(
            &format!("a first echo reply from {dst}"),
            FIRST_PING_LIMIT,
            &stop,
            || {
                let (ok, out) = if from_guest {
                    let (rc, out) = self.guest.exec_status(&once, vm::COMMAND_LIMIT)?;
                    (rc == 0, out)
                } else {
                    self.host(&once)
                };
                last = out;
                Ok(ok.then_some(()))
            },
        );
        if let Err(e) = first {
            bail!("{e}; the last ping said:\n{}", last.trim());
        }
        let out = if from_guest {
            self.guest.exec_status(&many, vm::COMMAND_LIMIT)?.1
        } else {
            self.host(&many).1
        };
        Pings::parse(&out).with_context(|| format!("no summary from ping:\n{out}"))
    }

    /// The MAC of `dev` in the guest or the gateway's namespace.
    fn mac(&mut self, in_guest: bool, dev: &str) -> Result<String> {
        let cmd = format!("cat /sys/class/net/{dev}/address");
        let out = if in_guest {
            self.guest.exec(&cmd)?
        } else {
            self.host_ok(&cmd)?
        };
        Ok(out.trim().to_string())
    }

    fn tcp_bytes() -> u64 {
        std::env::var("GATEWAY_VM_TCP_BYTES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(TCP_BYTES)
    }

    /// TCP from the gateway's side to a server in the guest.
    fn tcp_to_kernel(&mut self, case: &Case) -> Result<Transfer> {
        fs::write(self.guest.job.join("xfer.py"), XFER_PY)?;
        let out = self.guest.job.join("out/tcp-in");
        // (The log too: the last case's must not be read as this one's.)
        for p in [
            out.clone(),
            out.with_extension("listening"),
            out.with_extension("log"),
        ] {
            let _ = fs::remove_file(p);
        }
        let pid = self.guest.exec(&format!(
            "python3 /mnt/xfer.py serve {} 5001 /mnt/out/tcp-in > /mnt/out/tcp-in.log 2>&1 &\necho $!",
            case.kernel_inner
        ))?;
        let stop = self.stop.clone();
        let listening = out.with_extension("listening");
        let server_log = out.with_extension("log");
        let result = (|| -> Result<Transfer> {
            vm::wait_for(
                "the guest's TCP server to listen",
                vm::COMMAND_LIMIT,
                &stop,
                || {
                    self.guest.alive()?;
                    let log = fs::read_to_string(&server_log).unwrap_or_default();
                    if log.contains("Traceback") {
                        bail!("the guest's TCP server failed:\n{log}");
                    }
                    Ok(listening.exists().then_some(()))
                },
            )?;
            // `timeout`: a sender stuck on a dead path ends within the
            // transfer's limit instead of holding the lab.
            let sent = self.host_ok(&format!(
                "timeout {} python3 {} send {} 5001 {}",
                TCP_LIMIT.as_secs(),
                self.guest.job.join("xfer.py").display(),
                case.kernel_inner,
                Self::tcp_bytes()
            ))?;
            let received =
                vm::wait_for("the guest's TCP server's digest", TCP_LIMIT, &stop, || {
                    self.guest.alive()?;
                    Ok(fs::read_to_string(&out).ok())
                })?;
            Ok(Transfer {
                direction: "gateway -> kernel".into(),
                sent: sent.trim().to_string(),
                received: received.trim().to_string(),
            })
        })();
        if result.is_err() {
            let _ = self
                .guest
                .exec_status(&format!("kill {}", pid.trim()), vm::COMMAND_LIMIT);
        }
        result
    }

    /// TCP from the guest to a server on the gateway's side.
    fn tcp_to_gateway(&mut self, case: &Case) -> Result<Transfer> {
        fs::write(self.guest.job.join("xfer.py"), XFER_PY)?;
        let out = self.dir.join("tcp-out");
        let listening = out.with_extension("listening");
        for p in [&out, &listening] {
            let _ = fs::remove_file(p);
        }
        let mut server = KillOnDrop(
            std::process::Command::new("ip")
                .args(["netns", "exec", &self.topo.gw, "python3"])
                .arg(self.guest.job.join("xfer.py"))
                .args(["serve", case.gw_inner, "5002"])
                .arg(&out)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(fs::File::create(self.dir.join("tcp-out.log"))?)
                .spawn()
                .context("starting python3")?,
        );
        let stop = self.stop.clone();
        vm::wait_for(
            "the TCP server on the gateway's side to listen",
            vm::COMMAND_LIMIT,
            &stop,
            || {
                if let Some(s) = server.0.try_wait()? {
                    bail!(
                        "the TCP server exited ({s}): {}",
                        fs::read_to_string(self.dir.join("tcp-out.log")).unwrap_or_default()
                    );
                }
                Ok(listening.exists().then_some(()))
            },
        )?;
        // `timeout`, shorter than the wait for it: the guest runs its
        // commands one at a time, and a sender left running would hold up
        // every later one (the next case's among them).
        let (rc, sent) = self.guest.exec_status(
            &format!(
                "timeout {} python3 /mnt/xfer.py send {} 5002 {}",
                TCP_LIMIT.as_secs() - 30,
                case.gw_inner,
                Self::tcp_bytes()
            ),
            TCP_LIMIT,
        )?;
        if rc != 0 {
            bail!("the guest's TCP sender failed ({rc}): {}", sent.trim());
        }
        let received = vm::wait_for("the TCP server's digest", TCP_LIMIT, &stop, || {
            Ok(fs::read_to_string(&out).ok())
        })?;
        Ok(Transfer {
            direction: "kernel -> gateway".into(),
            sent: sent.trim().to_string(),
            received: received.trim().to_string(),
        })
    }

    fn run_case_steps(&mut self, case: &Case, r: &mut CaseResult) -> Result<()> {
        let script = format!("set -e\n{}\n", case.kernel.join("\n"));
        self.guest.exec(&script)?;
        r.kernel_device = self
            .guest
            .exec(&format!("ip -d link show {}", case.kernel_dev))?
            .trim()
            .to_string();
        let gw_dir = self.dir.join("gateway");
        let mut gw = GatewayProc::start(
            &self.gateway_bin,
            &self.topo.gw,
            &Self::gateway_config(&case.tunnel),
            &gw_dir,
            &self.stop,
        )?;
        for c in &case.host_setup {
            self.host_ok(c)?;
        }
        let pcap = self.dir.join("wire.pcap");
        let capture = Capture::start(&self.topo.wire, &pcap, &self.stop)?;
        let steps = (|| -> Result<()> {
            r.gateway_to_kernel = Some(self.ping(false, case.kernel_inner)?);
            r.kernel_to_gateway = Some(self.ping(true, case.gw_inner)?);
            if case.bridged {
                let guest_mac = self.mac(true, "br9")?;
                let gw_mac = self.mac(false, "br9")?;
                let seen_here = self.host_ok(&format!("ip neigh show {}", case.kernel_inner))?;
                let seen_there = self
                    .guest
                    .exec(&format!("ip neigh show {}", case.gw_inner))?;
                r.arp = Some(seen_here.contains(&guest_mac) && seen_there.contains(&gw_mac));
            }
            if std::env::var("GATEWAY_VM_TCP_BYTES").as_deref() != Ok("0") {
                r.tcp.push(self.tcp_to_kernel(case)?);
                r.tcp.push(self.tcp_to_gateway(case)?);
            }
            let stats = gw.stats(&self.stop)?;
            r.tunnel_packets = tunnel_packets(&stats);
            r.gateway_stats = Some(stats);
            let pcap = capture.finish()?;
            // Kept for a look with wireshark: target/vm/pcaps/CASE.pcap.
            if let Some(cache) = self.dir.parent() {
                let keep = cache.join("pcaps");
                fs::create_dir_all(&keep)?;
                let name: String = case
                    .name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                fs::copy(&pcap, keep.join(format!("{name}.pcap")))?;
            }
            let (guest, gw_end) = endpoints(case.v6_underlay);
            let gw_side = wire::side(&pcap, gw_end, guest)?;
            let kernel_side = wire::side(&pcap, guest, gw_end)?;
            r.differences = wire::compare(&gw_side, &kernel_side);
            r.wire = Some((gw_side, kernel_side));
            Ok(())
        })();
        let log = fs::read_to_string(&gw.log).unwrap_or_default();
        let stopped = gw.stop();
        steps.and(stopped).map_err(|e| {
            let tail: Vec<&str> = log.lines().rev().take(8).collect::<Vec<_>>();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            e.context(format!("gateway log (last lines):\n{}", tail.join("\n")))
        })
    }

    /// Runs one case and undoes it, whatever happened; a failure is
    /// recorded in the result. Fails only when the lab itself is gone.
    pub fn run_case(&mut self, case: &Case) -> Result<CaseResult> {
        vm::say(&format!("case {}", case.name));
        let mut r = CaseResult {
            name: case.name.clone(),
            kernel_commands: case.kernel.clone(),
            by_construction: case.by_construction.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        if let Err(e) = self.run_case_steps(case, &mut r) {
            r.error = Some(format!("{e:#}"));
        }
        for c in &case.host_teardown {
            let _ = self.host(c);
        }
        // Every device the case made in the guest (the tunnel, the bridge).
        self.guest.exec(&format!(
            "ip link del {} 2>/dev/null; ip link del br9 2>/dev/null; true",
            case.kernel_dev
        ))?;
        self.stop.check()?;
        self.guest.alive()?;
        Ok(r)
    }
}

/// A child killed (by its pid) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first tunnel's `rx_packets` and `tx_packets` in the gateway's stats
/// JSON (one tunnel per case).
fn tunnel_packets(stats: &str) -> Option<(u64, u64)> {
    let tunnels = &stats[stats.find("\"tunnels\":")?..];
    let field = |name: &str| -> Option<u64> {
        let key = format!("\"{name}\":");
        let at = tunnels.find(&key)? + key.len();
        tunnels[at..].split([',', '}']).next()?.trim().parse().ok()
    };
    Some((field("rx_packets")?, field("tx_packets")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_counters_are_read() {
        let s = r#"{"drops":{"x":1},"tunnels":[{"name":"tun100","rx_bytes":1176,"rx_packets":12,"tx_bytes":1464,"tx_packets":13}],"workers":[]}"#;
        assert_eq!(tunnel_packets(s), Some((12, 13)));
        assert_eq!(tunnel_packets("{}"), None);
    }
}
