//! Interop with the real kernel: for each tunnel mode and option, the
//! kernel side is configured in the guest with iproute2's own commands, as a
//! user types them, and the gateway (the real binary) runs on the host side
//! of the wire with the matching configuration; then ping both ways. One
//! boot serves every case; each case starts its own gateway and removes its
//! kernel devices after.
//!
//! `cargo xtask vm interop` runs it and prints a table; the results are
//! also written as JSON (`target/vm/interop.json`).
//! `tests/tests/vm_interop.rs` runs that command (with `GATEWAY_VM=1`) and
//! checks its exit status and its JSON.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::vm::{self, Console, GatewayProc, Guest, Stop, Topology};
use crate::wire::{self, Capture, Difference, Side};

/// How long the first packet through a fresh tunnel may take (next-hop
/// resolution on both sides, ARP through gretap), polled, never slept.
const FIRST_PING_LIMIT: Duration = Duration::from_secs(90);
/// Echo requests per direction once the first has come back.
const PINGS: u32 = 5;
/// The measured pings' TTL (hop limit): not the default 64, so that the
/// outer header shows whether it was inherited.
const PING_TTL: u32 = 33;
/// The measured pings' TOS byte: a DSCP (AF11) and ECT(0), so the outer
/// header shows what each side copies.
const PING_TOS: &str = "0x2a";
/// Bytes sent each way over TCP (`GATEWAY_VM_TCP_BYTES` to change).
const TCP_BYTES: u64 = 1 << 20;
/// How long a TCP transfer may take at emulated speed.
const TCP_LIMIT: Duration = Duration::from_secs(600);

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

/// The inner addresses: the gateway's side and the kernel's side.
#[derive(Clone, Copy)]
enum Inner {
    V4,
    V6,
}

impl Inner {
    fn gw(self) -> &'static str {
        match self {
            Inner::V4 => "10.1.1.1",
            Inner::V6 => "fd00:1::1",
        }
    }
    fn kernel(self) -> &'static str {
        match self {
            Inner::V4 => "10.1.1.2",
            Inner::V6 => "fd00:1::2",
        }
    }
}

/// One mode or option, both sides.
#[derive(Clone)]
pub struct Case {
    pub name: String,
    /// The kernel side, in the guest, as a user types it.
    pub kernel: Vec<String>,
    kernel_dev: String,
    /// The gateway's `[[tunnel]]` table.
    pub tunnel: String,
    /// Commands in the gateway's namespace once it runs (a bridge for the
    /// gretap tap), and their undoing.
    host_setup: Vec<String>,
    host_teardown: Vec<String>,
    gw_inner: &'static str,
    kernel_inner: &'static str,
    /// Bridged (gretap): the bridges whose neighbour tables must show the
    /// other side's MAC (ARP crossed).
    bridged: bool,
    v6_underlay: bool,
    /// Outer fields that differ by construction (the two sides are given
    /// mirrored options: ikey/okey, icsum/ocsum, iseq/oseq).
    pub by_construction: &'static [&'static str],
}

impl Case {
    fn differs_in(mut self, fields: &'static [&'static str]) -> Case {
        self.by_construction = fields;
        self
    }
}

fn endpoints(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        (vm::GUEST_V6, vm::GW_V6)
    } else {
        (vm::GUEST_V4, vm::GW_V4)
    }
}

/// A routed tunnel: `add` is the kernel's `ip tunnel add` line (with
/// REMOTE and LOCAL to fill in), `options` the gateway's extra lines.
fn routed(name: &str, dev: &str, add: &str, mode: &str, options: &str, inner: Inner) -> Case {
    let v6 = add.contains("ip -6") || mode.starts_with("ip6") || mode == "ipip6";
    let (guest, gw) = endpoints(v6);
    let add = add.replace("REMOTE", gw).replace("LOCAL", guest);
    let addr = match inner {
        Inner::V4 => format!(
            "ip addr add {} peer {} dev {dev}",
            inner.kernel(),
            inner.gw()
        ),
        Inner::V6 => format!(
            "ip -6 addr add {} peer {} dev {dev} nodad",
            inner.kernel(),
            inner.gw()
        ),
    };
    let kind = match inner {
        Inner::V4 => "tap",
        Inner::V6 => "tun",
    };
    Case {
        name: name.into(),
        kernel: vec![add, format!("ip link set {dev} up mtu 1400"), addr],
        kernel_dev: dev.into(),
        tunnel: format!(
            "name = \"{}\"\nmode = \"{mode}\"\nlocal = \"{gw}\"\nremote = \"{guest}\"\n{options}mtu = 1400\ndevice = \"gwt0\"\ndevice_kind = \"{kind}\"\naddress = \"{}\"\npeer = \"{}\"\n",
            dev,
            inner.gw(),
            inner.kernel()
        ),
        host_setup: vec![],
        host_teardown: vec![],
        gw_inner: inner.gw(),
        kernel_inner: inner.kernel(),
        bridged: false,
        v6_underlay: v6,
        by_construction: &[],
    }
}

/// gretap/ip6gretap: both sides bridge their tunnel device, with an address
/// on the bridge; ARP crosses the tunnel.
fn bridged(name: &str, dev: &str, kind: &str, mode: &str) -> Case {
    let v6 = mode.starts_with("ip6");
    let (guest, gw) = endpoints(v6);
    Case {
        name: name.into(),
        kernel: vec![
            format!("ip link add {dev} type {kind} remote {gw} local {guest}"),
            format!("ip link set {dev} up mtu 1400"),
            "ip link add br9 type bridge".into(),
            format!("ip link set {dev} master br9"),
            "ip link set br9 up".into(),
            "ip addr add 10.9.9.2/24 dev br9".into(),
        ],
        kernel_dev: dev.into(),
        tunnel: format!(
            "name = \"{dev}\"\nmode = \"{mode}\"\nlocal = \"{gw}\"\nremote = \"{guest}\"\nmtu = 1400\ndevice = \"gwt0\"\n"
        ),
        host_setup: vec![
            "ip link add br9 type bridge".into(),
            "ip link set gwt0 master br9".into(),
            "ip link set br9 up".into(),
            "ip addr add 10.9.9.1/24 dev br9".into(),
        ],
        host_teardown: vec!["ip link del br9".into()],
        gw_inner: "10.9.9.1",
        kernel_inner: "10.9.9.2",
        bridged: true,
        v6_underlay: v6,
        by_construction: &[],
    }
}

/// Every case, in order: the seed lab's two first, then the other modes,
/// then GRE's options and the outer header's.
pub fn cases() -> Vec<Case> {
    use Inner::*;
    let gre = "ip tunnel add tun100 mode gre remote REMOTE local LOCAL";
    vec![
        routed(
            "gre",
            "tun100",
            &format!("{gre} ttl 64"),
            "gre",
            "ttl = 64\n",
            V4,
        ),
        routed(
            "ipip",
            "tun200",
            "ip tunnel add tun200 mode ipip remote REMOTE local LOCAL",
            "ipip",
            "",
            V4,
        ),
        bridged("gretap", "gtap0", "gretap", "gretap"),
        routed(
            "sit",
            "sit1",
            "ip tunnel add sit1 mode sit remote REMOTE local LOCAL",
            "sit",
            "",
            V6,
        ),
        routed(
            "ip6gre",
            "g6",
            "ip -6 tunnel add g6 mode ip6gre remote REMOTE local LOCAL",
            "ip6gre",
            "",
            V4,
        ),
        bridged("ip6gretap", "g6tap", "ip6gretap", "ip6gretap"),
        routed(
            "ip6ip6",
            "t66",
            "ip -6 tunnel add t66 mode ip6ip6 remote REMOTE local LOCAL",
            "ip6ip6",
            "",
            V6,
        ),
        routed(
            "ipip6",
            "t46",
            "ip -6 tunnel add t46 mode ipip6 remote REMOTE local LOCAL",
            "ipip6",
            "",
            V4,
        ),
        routed(
            "gre key",
            "tun100",
            &format!("{gre} key 42"),
            "gre",
            "key = 42\n",
            V4,
        ),
        routed(
            "gre csum",
            "tun100",
            &format!("{gre} csum"),
            "gre",
            "csum = true\n",
            V4,
        ),
        routed(
            "gre seq",
            "tun100",
            &format!("{gre} seq"),
            "gre",
            "seq = true\n",
            V4,
        ),
        routed(
            "gre key csum seq",
            "tun100",
            &format!("{gre} key 7 csum seq"),
            "gre",
            "key = 7\ncsum = true\nseq = true\n",
            V4,
        ),
        routed(
            "gre ikey/okey",
            "tun100",
            &format!("{gre} ikey 1001 okey 1002"),
            "gre",
            "ikey = 1002\nokey = 1001\n",
            V4,
        )
        .differs_in(&["gre.key"]),
        routed(
            "gre icsum (kernel)",
            "tun100",
            &format!("{gre} icsum"),
            "gre",
            "ocsum = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.checksum.status"]),
        routed(
            "gre ocsum (kernel)",
            "tun100",
            &format!("{gre} ocsum"),
            "gre",
            "icsum = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.checksum.status"]),
        routed(
            "gre iseq (kernel)",
            "tun100",
            &format!("{gre} iseq"),
            "gre",
            "oseq = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.sequence_number"]),
        routed(
            "gre oseq (kernel)",
            "tun100",
            &format!("{gre} oseq"),
            "gre",
            "iseq = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.sequence_number"]),
        routed(
            "gre ttl inherit",
            "tun100",
            &format!("{gre} ttl inherit"),
            "gre",
            "ttl = \"inherit\"\n",
            V4,
        ),
        routed(
            "gre tos inherit",
            "tun100",
            &format!("{gre} tos inherit"),
            "gre",
            "tos = \"inherit\"\n",
            V4,
        ),
        routed(
            "ipip nopmtudisc",
            "tun200",
            "ip tunnel add tun200 mode ipip remote REMOTE local LOCAL nopmtudisc",
            "ipip",
            "pmtudisc = false\n",
            V4,
        ),
        routed(
            "ip6ip6 encaplimit none",
            "t66",
            "ip -6 tunnel add t66 mode ip6ip6 remote REMOTE local LOCAL encaplimit none",
            "ip6ip6",
            "encaplimit = \"none\"\n",
            V6,
        ),
    ]
}

/// Echo replies seen out of requests sent, from ping's summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pings {
    pub sent: u32,
    pub received: u32,
}

impl Pings {
    fn parse(out: &str) -> Option<Pings> {
        let line = out.lines().find(|l| l.contains("packets transmitted"))?;
        let mut words = line.split_whitespace();
        let sent = words.next()?.parse().ok()?;
        let received = line
            .split(", ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(Pings { sent, received })
    }

    pub fn all(&self) -> bool {
        self.sent > 0 && self.received == self.sent
    }

    fn show(p: Option<Pings>) -> String {
        p.map(|p| format!("{}/{}", p.received, p.sent))
            .unwrap_or_else(|| "-".into())
    }
}

/// What one case came to.
#[derive(Clone, Debug, Default)]
pub struct CaseResult {
    pub name: String,
    pub kernel_commands: Vec<String>,
    pub gateway_to_kernel: Option<Pings>,
    pub kernel_to_gateway: Option<Pings>,
    /// Bridged cases: whether each side's neighbour table shows the other
    /// bridge's MAC.
    pub arp: Option<bool>,
    /// The kernel's own view of its device (`ip -d link show`).
    pub kernel_device: String,
    /// The gateway's counters after the pings (its JSON).
    pub gateway_stats: Option<String>,
    /// The tunnel's packets received and sent, by the gateway's count.
    pub tunnel_packets: Option<(u64, u64)>,
    /// TCP from the gateway's side to the kernel's, then back.
    pub tcp: Vec<Transfer>,
    /// The outer headers each side sent (from the capture), and where
    /// they differ.
    pub wire: Option<(Side, Side)>,
    pub differences: Vec<Difference>,
    /// The fields of `differences` that differ by construction.
    pub by_construction: Vec<String>,
    pub error: Option<String>,
}

impl CaseResult {
    /// The differences in the outer headers not made by the case itself.
    pub fn unexpected_differences(&self) -> Vec<&Difference> {
        self.differences
            .iter()
            .filter(|d| !self.by_construction.contains(&d.field))
            .collect()
    }

    /// Both TCP transfers arrived whole (same byte count and SHA-256).
    pub fn tcp_pass(&self) -> bool {
        self.error.is_none() && self.tcp.len() == 2 && self.tcp.iter().all(Transfer::intact)
    }

    /// The case passed: pings both ways, and TCP intact both ways when it
    /// ran (`GATEWAY_VM_TCP_BYTES=0` runs none).
    pub fn passes(&self) -> bool {
        self.pings_pass() && (self.tcp.is_empty() || self.tcp_pass())
    }

    pub fn pings_pass(&self) -> bool {
        self.error.is_none()
            && self.gateway_to_kernel.is_some_and(|p| p.all())
            && self.kernel_to_gateway.is_some_and(|p| p.all())
            && self.arp != Some(false)
            // Both directions' echo requests and replies went through
            // the gateway's tunnel, not around it.
            && self
                .tunnel_packets
                .is_some_and(|(rx, tx)| rx >= 2 * PINGS as u64 && tx >= 2 * PINGS as u64)
    }
}

/// One TCP transfer: what was sent and what arrived.
#[derive(Clone, Debug, Default)]
pub struct Transfer {
    pub direction: String,
    pub sent: String,
    pub received: String,
}

impl Transfer {
    pub fn intact(&self) -> bool {
        !self.sent.is_empty() && self.sent == self.received
    }
}

/// The whole run.
pub struct Report {
    pub kernel: String,
    pub accel: String,
    pub results: Vec<CaseResult>,
}

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
        let many = format!("ping -c {PINGS} -i 0.2 -W 5 -Q {PING_TOS} -t {PING_TTL} {dst}");
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
        for p in [out.clone(), out.with_extension("listening")] {
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
            let sent = self.host_ok(&format!(
                "python3 {} send {} 5001 {}",
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
        let (rc, sent) = self.guest.exec_status(
            &format!(
                "python3 /mnt/xfer.py send {} 5002 {}",
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

/// Boots the lab and runs `only` (names; all when empty).
pub fn run(cache: &Path, gateway_bin: &Path, only: &[String], stop: &Stop) -> Result<Report> {
    let all = cases();
    let chosen: Vec<Case> = all
        .iter()
        .filter(|c| only.is_empty() || only.contains(&c.name))
        .cloned()
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        bail!("no case named {only:?}; the cases: {names:?}");
    }
    let prefix = format!("gwvm{}", std::process::id());
    let mut lab = Lab::up(cache, gateway_bin, &prefix, Console::Log, stop)?;
    let mut results = Vec::new();
    for case in &chosen {
        results.push(lab.run_case(case)?);
    }
    Ok(Report {
        kernel: lab.guest.release.clone(),
        accel: match lab.guest.accel {
            vm::Accel::Kvm => "kvm".into(),
            vm::Accel::Tcg => "tcg".into(),
        },
        results,
    })
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

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_pings(p: Option<Pings>) -> String {
    match p {
        Some(p) => format!("{{\"sent\": {}, \"received\": {}}}", p.sent, p.received),
        None => "null".into(),
    }
}

impl Report {
    pub fn to_json(&self) -> String {
        let mut o = format!(
            "{{\n  \"kernel\": {},\n  \"accel\": {},\n  \"modes\": [\n",
            json_str(&self.kernel),
            json_str(&self.accel)
        );
        let side = |s: &Side| -> String {
            let f: Vec<String> = s
                .fields
                .iter()
                .map(|(k, v)| format!("{}: {}", json_str(k), json_str(v)))
                .collect();
            format!("{{\"packets\": {}, {}}}", s.packets, f.join(", "))
        };
        for (i, r) in self.results.iter().enumerate() {
            let cmds: Vec<String> = r.kernel_commands.iter().map(|c| json_str(c)).collect();
            let tcp: Vec<String> = r
                .tcp
                .iter()
                .map(|t| {
                    format!(
                        "{{\"direction\": {}, \"sent\": {}, \"received\": {}, \"intact\": {}}}",
                        json_str(&t.direction),
                        json_str(&t.sent),
                        json_str(&t.received),
                        t.intact()
                    )
                })
                .collect();
            let diffs: Vec<String> = r
                .differences
                .iter()
                .map(|d| {
                    format!(
                        "{{\"field\": {}, \"gateway\": {}, \"kernel\": {}}}",
                        json_str(&d.field),
                        json_str(&d.gateway),
                        json_str(&d.kernel)
                    )
                })
                .collect();
            let wire = r
                .wire
                .as_ref()
                .map(|(g, k)| format!("{{\"gateway\": {}, \"kernel\": {}}}", side(g), side(k)))
                .unwrap_or_else(|| "null".into());
            let _ = write!(
                o,
                "    {{\"mode\": {}, \"pings_pass\": {}, \"tcp_pass\": {}, \"gateway_to_kernel\": {}, \"kernel_to_gateway\": {}, \"arp\": {}, \"tunnel_packets\": {}, \"error\": {},\n     \"kernel_commands\": [{}],\n     \"tcp\": [{}],\n     \"wire\": {},\n     \"differences\": [{}],\n     \"differences_by_construction\": [{}],\n     \"kernel_device\": {},\n     \"gateway_stats\": {}}}{}\n",
                json_str(&r.name),
                r.pings_pass(),
                r.tcp_pass(),
                json_pings(r.gateway_to_kernel),
                json_pings(r.kernel_to_gateway),
                r.arp.map(|a| a.to_string()).unwrap_or_else(|| "null".into()),
                r.tunnel_packets
                    .map(|(rx, tx)| format!("{{\"rx\": {rx}, \"tx\": {tx}}}"))
                    .unwrap_or_else(|| "null".into()),
                r.error.as_deref().map(json_str).unwrap_or_else(|| "null".into()),
                cmds.join(", "),
                tcp.join(", "),
                wire,
                diffs.join(", "),
                r.by_construction
                    .iter()
                    .map(|f| json_str(f))
                    .collect::<Vec<_>>()
                    .join(", "),
                json_str(&r.kernel_device),
                // The gateway's own JSON line, as it printed it.
                r.gateway_stats.as_deref().unwrap_or("null"),
                if i + 1 < self.results.len() { "," } else { "" }
            );
        }
        o.push_str("  ]\n}\n");
        o
    }

    pub fn table(&self) -> String {
        let mut o = format!(
            "kernel {} under {}\n{:<24} {:>10} {:>10} {:>4} {:>11} {:>5} {:>5}  pings\n",
            self.kernel,
            self.accel,
            "mode",
            "gw->kernel",
            "kernel->gw",
            "ARP",
            "gw rx/tx",
            "TCP",
            "diffs"
        );
        for r in &self.results {
            let _ = writeln!(
                o,
                "{:<24} {:>10} {:>10} {:>4} {:>11} {:>5} {:>5}  {}",
                r.name,
                Pings::show(r.gateway_to_kernel),
                Pings::show(r.kernel_to_gateway),
                match r.arp {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "",
                },
                r.tunnel_packets
                    .map(|(rx, tx)| format!("{rx}/{tx}"))
                    .unwrap_or_else(|| "-".into()),
                if r.tcp.is_empty() {
                    "-"
                } else if r.tcp_pass() {
                    "ok"
                } else {
                    "BAD"
                },
                if r.wire.is_some() {
                    r.unexpected_differences().len().to_string()
                } else {
                    "-".into()
                },
                if r.pings_pass() { "pass" } else { "FAIL" }
            );
        }
        let with_diffs: Vec<&CaseResult> = self
            .results
            .iter()
            .filter(|r| !r.differences.is_empty())
            .collect();
        if !with_diffs.is_empty() {
            o.push_str("\nouter headers, where the gateway's differ from the kernel's (tshark; \"diffs\" above counts those not made by the case):\n");
        }
        for r in with_diffs {
            for d in &r.differences {
                let _ = writeln!(
                    o,
                    "  {:<22} {:<22} gateway {:<28} kernel {}{}",
                    r.name,
                    d.field,
                    d.gateway,
                    d.kernel,
                    if r.by_construction.contains(&d.field) {
                        "  (by construction)"
                    } else {
                        ""
                    }
                );
            }
        }
        for r in &self.results {
            for t in r.tcp.iter().filter(|t| !t.intact()) {
                let _ = writeln!(
                    o,
                    "\n{}: TCP {}: sent {}, received {}",
                    r.name, t.direction, t.sent, t.received
                );
            }
        }
        for r in self.results.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                o,
                "\n{}: {}",
                r.name,
                r.error.as_deref().unwrap_or_default()
            );
        }
        o
    }
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

    #[test]
    fn ping_summaries_are_read() {
        let p = Pings::parse(
            "--- 10.1.1.2 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 804ms\n",
        )
        .unwrap();
        assert_eq!((p.sent, p.received), (5, 4));
        let p = Pings::parse("1 packets transmitted, 0 received, +1 errors, 100% packet loss\n")
            .unwrap();
        assert!(!p.all());
    }

    #[test]
    fn the_seed_lab_comes_first_in_the_kernels_words() {
        let c = cases();
        assert_eq!(c[0].name, "gre");
        assert_eq!(
            c[0].kernel[0],
            "ip tunnel add tun100 mode gre remote 192.168.0.8 local 192.168.0.58 ttl 64"
        );
        assert_eq!(c[1].name, "ipip");
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        for m in ["gretap", "sit", "ip6gre", "ip6gretap", "ip6ip6", "ipip6"] {
            assert!(names.contains(&m), "{m} missing");
        }
    }
}
