//! The run: the guest booted with two queue pairs, the two gateways, the
//! traffic, the counters, the signals.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::report::{Pings, Report, SignalCheck, TunnelResult, WorkerCount};
use crate::vm::{self, Console, GatewayProc, Guest, Machine, Stop, Topology};

/// The guest's vCPUs and NIC queue pairs: one worker per queue.
const MACHINE: Machine = Machine { cpus: 2, queues: 2 };
/// A second underlay address on each side, so that the tunnels' outer
/// flows differ in addresses too (the first are [`vm::GW_V4`] and
/// [`vm::GUEST_V4`]).
const HOST_V4_2: &str = "192.168.0.9";
const GUEST_V4_2: &str = "192.168.0.59";
/// Bytes of TCP through each tunnel.
const TCP_BYTES: u64 = 1 << 20;
/// Deadlines (generous: TCG).
const FIRST_PING_LIMIT: Duration = Duration::from_secs(120);
const START_LIMIT: Duration = Duration::from_secs(180);
const EXIT_LIMIT: Duration = Duration::from_secs(120);
const TCP_LIMIT: Duration = Duration::from_secs(600);
/// Rounds of extra flows (each one short connection attempt per tunnel)
/// before giving up on both queues receiving.
const EXTRA_ROUNDS: u32 = 16;
const PINGS: u32 = 3;

/// One tunnel, both ends.
struct Tun {
    name: &'static str,
    mode: &'static str,
    key: Option<u32>,
    host: &'static str,
    guest: &'static str,
    host_inner: &'static str,
    guest_inner: &'static str,
    /// The TCP transfer's direction.
    to_guest: bool,
}

const TUNNELS: &[Tun] = &[
    Tun {
        name: "t1",
        mode: "gre",
        key: None,
        host: vm::GW_V4,
        guest: vm::GUEST_V4,
        host_inner: "10.1.1.1",
        guest_inner: "10.1.1.2",
        to_guest: true,
    },
    Tun {
        name: "t2",
        mode: "gre",
        key: Some(2),
        host: vm::GW_V4,
        guest: vm::GUEST_V4,
        host_inner: "10.2.1.1",
        guest_inner: "10.2.1.2",
        to_guest: false,
    },
    Tun {
        name: "t3",
        mode: "ipip",
        key: None,
        host: HOST_V4_2,
        guest: GUEST_V4_2,
        host_inner: "10.3.1.1",
        guest_inner: "10.3.1.2",
        to_guest: true,
    },
    Tun {
        name: "t4",
        mode: "gre",
        key: Some(4),
        host: HOST_V4_2,
        guest: vm::GUEST_V4,
        host_inner: "10.4.1.1",
        guest_inner: "10.4.1.2",
        to_guest: false,
    },
];

/// `[gateway]` of the guest's gateway: both queues, one worker each, one
/// per vCPU, native XDP or nothing.
const GUEST_GATEWAY: &str = "[gateway]\niface = \"eth0\"\npoll = \"adaptive\"\n\
queues = [0, 1]\ncores = [0, 1]\nxdp_mode = \"native\"\n";
const HOST_GATEWAY: &str = "[gateway]\niface = \"ens0\"\npoll = \"adaptive\"\n";

fn config(head: &str, on_host: bool) -> String {
    let mut s = head.to_string();
    for t in TUNNELS {
        let (local, remote, addr, peer, dev) = if on_host {
            (
                t.host,
                t.guest,
                t.host_inner,
                t.guest_inner,
                format!("h{}", t.name),
            )
        } else {
            (
                t.guest,
                t.host,
                t.guest_inner,
                t.host_inner,
                format!("g{}", t.name),
            )
        };
        s += &format!(
            "\n[[tunnel]]\nname = \"{}\"\nmode = \"{}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\n\
             mtu = 1400\ndevice = \"{dev}\"\naddress = \"{addr}\"\npeer = \"{peer}\"\n",
            t.name, t.mode
        );
        if let Some(k) = t.key {
            s += &format!("key = {k}\n");
        }
    }
    s
}

/// The TCP ends: `serve ADDR PORT OUT` takes one connection and writes the
/// byte count and SHA-256 of what it read to OUT (`OUT.listening` once it
/// listens); `send ADDR PORT BYTES` sends that many pseudo-random bytes and
/// prints their count and SHA-256 once the server has closed. `probe ADDR
/// PORT N`: N connection attempts, each from a new port (a new flow).
const XFER_PY: &str = r#"import hashlib, os, random, socket, sys
if sys.argv[1] == 'serve':
    addr, port, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
elif sys.argv[1] == 'send':
    addr, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(size * 7 + port)
    c = socket.create_connection((addr, port), timeout=900)
    h = hashlib.sha256(); left = size
    while left:
        b = rng.randbytes(min(left, 1 << 16)); c.sendall(b); h.update(b); left -= len(b)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print('%d %s' % (size, h.hexdigest()))
else:
    addr, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for _ in range(n):
        try: socket.create_connection((addr, port), timeout=30).close()
        except OSError: pass
"#;

/// A child killed (by its pid) on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gateway in the guest, started by a shell that records its exit
/// status (`N.rc`) beside its pid, log and stdout in the job folder's
/// `ggw/`. Not stopped on drop: the guest's power-off ends it.
struct GuestGateway {
    n: u32,
    pid: u32,
    dir: PathBuf,
}

impl GuestGateway {
    fn file(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.n))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.file("log")).unwrap_or_default()
    }

    fn exit_status(&self) -> Option<i32> {
        fs::read_to_string(self.file("rc"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Everything the run holds; dropped in this order: the host's gateway,
/// the guest (powered off), the namespaces, the run's folder.
struct Lab {
    host_gw: Option<GatewayProc>,
    guest: Guest,
    topo: Topology,
    dir: PathBuf,
    bin: PathBuf,
    /// The same binary as the guest runs it: in the job folder (the
    /// guest's /mnt), since the checkout may be where the guest has its
    /// own file system (/tmp, /run).
    guest_bin: String,
    stop: Stop,
    starts: u32,
    _dir: vm::RemoveDir,
}

impl Lab {
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

    /// Starts the gateway in the guest and waits until it says it runs.
    fn start_guest_gateway(&mut self) -> Result<GuestGateway> {
        self.starts += 1;
        let dir = self.guest.job.join("ggw");
        fs::create_dir_all(&dir)?;
        fs::write(
            self.guest.job.join("ggw.toml"),
            config(GUEST_GATEWAY, false),
        )?;
        let n = self.starts;
        let bin = self.guest_bin.clone();
        self.guest.exec(&format!(
            "( NO_COLOR=1 {bin} --config /mnt/ggw.toml > /mnt/ggw/{n}.json 2> /mnt/ggw/{n}.log < /dev/null &\n  \
             echo $! > /mnt/ggw/{n}.pid; wait $!; echo $? > /mnt/ggw/{n}.tmp; mv /mnt/ggw/{n}.tmp /mnt/ggw/{n}.rc ) \
             > /dev/null 2>&1 < /dev/null &\n"
        ))?;
        let mut gw = GuestGateway { n, pid: 0, dir };
        let stop = self.stop.clone();
        let pid_file = gw.file("pid");
        gw.pid = vm::wait_for("the guest gateway's pid", START_LIMIT, &stop, || {
            self.guest.alive()?;
            Ok(fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok()))
        })?;
        vm::wait_for("the guest gateway to start", START_LIMIT, &stop, || {
            self.guest.alive()?;
            let log = gw.log();
            if log.contains("gateway running") {
                return Ok(Some(()));
            }
            if let Some(rc) = gw.exit_status() {
                bail!("the gateway in the guest exited ({rc}):\n{log}");
            }
            Ok(None)
        })?;
        vm::say(&format!(
            "gateway {n} running in the guest (pid {})",
            gw.pid
        ));
        Ok(gw)
    }

    /// `ip -j -d link show eth0` in the guest, parsed.
    fn eth0(&mut self) -> Result<(Value, String)> {
        let out = self.guest.exec("ip -j -d link show eth0")?;
        let v: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("ip -j -d link show eth0 said:\n{out}"))?;
        Ok((v[0].clone(), out.trim().to_string()))
    }

    /// eth0's XDP program: (mode name, program id), or None.
    fn xdp_on_eth0(&mut self) -> Result<Option<(String, Option<u64>)>> {
        let (link, _) = self.eth0()?;
        let xdp = &link["xdp"];
        if xdp.is_null() {
            return Ok(None);
        }
        // iproute2: 1 driver, 2 generic (skb), 3 offload, 4 several.
        let mode = match xdp["mode"].as_u64() {
            Some(1) => "driver".to_string(),
            Some(2) => "generic".to_string(),
            Some(3) => "offload".to_string(),
            Some(4) => "multi".to_string(),
            other => format!("{other:?}"),
        };
        let id = xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64());
        Ok(Some((mode, id)))
    }

    fn ping(&mut self, from_guest: bool, dst: &str) -> Result<Pings> {
        let once = format!("ping -c 1 -W 3 {dst}");
        // -w: every reply waited for until the deadline (-W alone gives up
        // on the last one after twice the slowest RTT so far).
        let many = format!("ping -c {PINGS} -i 0.3 -w 60 {dst}");
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

    /// TCP from the host's side to a server in the guest: (sent, received).
    fn tcp_to_guest(&mut self, t: &Tun, port: u16) -> Result<(String, String)> {
        let name = format!("tcp-{}", t.name);
        let out = self.guest.job.join("out").join(&name);
        let listening = out.with_extension("listening");
        let server_log = out.with_extension("log");
        self.guest.exec(&format!(
            "python3 /mnt/xfer.py serve {} {port} /mnt/out/{name} > /mnt/out/{name}.log 2>&1 < /dev/null &"
            , t.guest_inner
        ))?;
        let stop = self.stop.clone();
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
            "python3 {} send {} {port} {TCP_BYTES}",
            self.guest.job.join("xfer.py").display(),
            t.guest_inner
        ))?;
        let received = vm::wait_for("the guest's TCP server's digest", TCP_LIMIT, &stop, || {
            self.guest.alive()?;
            Ok(fs::read_to_string(&out).ok())
        })?;
        Ok((sent.trim().to_string(), received.trim().to_string()))
    }

    /// TCP from the guest to a server on the host's side: (sent, received).
    fn tcp_to_host(&mut self, t: &Tun, port: u16) -> Result<(String, String)> {
        let out = self.dir.join(format!("tcp-{}", t.name));
        let listening = out.with_extension("listening");
        let log = out.with_extension("log");
        let mut server = KillOnDrop(
            Command::new("ip")
                .args(["netns", "exec", &self.topo.gw, "python3"])
                .arg(self.guest.job.join("xfer.py"))
                .args(["serve", t.host_inner, &port.to_string()])
                .arg(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log)?)
                .spawn()
                .context("starting python3")?,
        );
        let stop = self.stop.clone();
        vm::wait_for(
            "the TCP server on the host's side to listen",
            vm::COMMAND_LIMIT,
            &stop,
            || {
                if let Some(s) = server.0.try_wait()? {
                    bail!(
                        "the TCP server exited ({s}): {}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Ok(listening.exists().then_some(()))
            },
        )?;
        let (rc, sent) = self.guest.exec_status(
            &format!(
                "python3 /mnt/xfer.py send {} {port} {TCP_BYTES}",
                t.host_inner
            ),
            TCP_LIMIT,
        )?;
        if rc != 0 {
            bail!("the guest's TCP sender failed ({rc}): {}", sent.trim());
        }
        let received = vm::wait_for("the TCP server's digest", TCP_LIMIT, &stop, || {
            Ok(fs::read_to_string(&out).ok())
        })?;
        Ok((sent.trim().to_string(), received.trim().to_string()))
    }

    /// The guest gateway's workers and whether it says its XDP program is
    /// attached, from `gateway stats --format json`.
    fn workers(&mut self) -> Result<(Vec<WorkerCount>, Option<bool>)> {
        let out = self.guest.exec(&format!(
            "{} stats --iface eth0 --format json",
            self.guest_bin
        ))?;
        let v: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("gateway stats said:\n{out}"))?;
        let workers = v["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| WorkerCount {
                queue: w["queue"].as_u64().unwrap_or(u64::MAX),
                core: w["core"].clone(),
                rx_frames: w["rx_frames"].as_u64().unwrap_or(0),
                delivered: w["delivered"].as_u64().unwrap_or(0),
            })
            .collect();
        Ok((workers, v["gateway"]["xdp_attached"].as_bool()))
    }

    /// Signals the guest's gateway, waits for it to exit, and looks at eth0.
    fn signal(&mut self, gw: &GuestGateway, sig: &str) -> Result<SignalCheck> {
        let before = self.xdp_on_eth0()?;
        let mut c = SignalCheck {
            signal: format!("SIG{sig}"),
            xdp_prog_id_before: before.as_ref().and_then(|b| b.1),
            ..Default::default()
        };
        if before.is_none() {
            bail!("no XDP program on eth0 while gateway {} runs", gw.n);
        }
        self.guest.exec(&format!("kill -{sig} {}", gw.pid))?;
        let stop = self.stop.clone();
        c.exit_status = Some(vm::wait_for(
            &format!("the guest gateway to exit on SIG{sig}"),
            EXIT_LIMIT,
            &stop,
            || {
                self.guest.alive()?;
                Ok(gw.exit_status())
            },
        )?);
        // The kernel lets go of the program when the last reference goes
        // (the link's file, closed at exit): waited for as a condition.
        let gone = vm::wait_for("no XDP program on eth0", EXIT_LIMIT, &stop, || {
            Ok(self.xdp_on_eth0()?.is_none().then_some(()))
        });
        c.no_xdp_after = gone.is_ok();
        c.ip_link_after = self.eth0()?.1;
        // Its devices: deleted at a clean exit, gone with their last file
        // when killed (not persistent).
        let devs: Vec<String> = TUNNELS.iter().map(|t| format!("g{}", t.name)).collect();
        let list = format!(
            "for d in {}; do ip link show $d > /dev/null 2>&1 && echo $d; done; true",
            devs.join(" ")
        );
        let mut left = Vec::new();
        let gone = vm::wait_for("the gateway's devices to go", EXIT_LIMIT, &stop, || {
            left = self
                .guest
                .exec(&list)?
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Ok(left.is_empty().then_some(()))
        });
        if gone.is_err() {
            c.devices_left = left;
        }
        let (rc, out) = self.guest.exec_status(
            "command -v bpftool > /dev/null || exit 3\nbpftool -j net show dev eth0",
            vm::COMMAND_LIMIT,
        )?;
        if rc == 0 {
            let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
            c.bpftool_no_xdp_after = Some(v[0]["xdp"].as_array().is_some_and(|a| a.is_empty()));
        }
        if let Some(id) = c.xdp_prog_id_before {
            let (rc, _) = self.guest.exec_status(
                &format!("command -v bpftool > /dev/null || exit 3\nbpftool prog show id {id}"),
                vm::COMMAND_LIMIT,
            )?;
            c.prog_gone = match rc {
                0 => Some(false),
                3 => None,
                _ => Some(true),
            };
        }
        vm::say(&format!(
            "SIG{sig}: exit status {:?}, XDP program left on eth0: {}",
            c.exit_status,
            if c.no_xdp_after { "none" } else { "yes" }
        ));
        Ok(c)
    }
}

/// Boots the lab and runs the scenario; the report says what passed (and
/// the error, if the run stopped early).
pub fn run(cache: &Path, gateway_bin: &Path, stop: &Stop) -> Result<Report> {
    let start = Instant::now();
    let mut r = Report {
        vcpus: MACHINE.cpus,
        queues: MACHINE.queues,
        gateway_bin: gateway_bin.display().to_string(),
        ..Default::default()
    };
    let prefix = format!("gwvm{}", std::process::id());
    match up(cache, gateway_bin, &prefix, stop, &mut r) {
        Ok(mut lab) => {
            if let Err(e) = steps(&mut lab, &mut r) {
                r.error = Some(format!("{e:#}"));
            }
            // The host's gateway first, then the guest, the namespaces.
            drop(lab.host_gw.take());
            drop(lab);
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

fn up(cache: &Path, gateway_bin: &Path, prefix: &str, stop: &Stop, r: &mut Report) -> Result<Lab> {
    if !gateway_bin.exists() {
        bail!(
            "no gateway binary at {}: run `cargo build -p gateway` first",
            gateway_bin.display()
        );
    }
    vm::ensure_packages()?;
    let kernel = vm::prepare(cache)?;
    r.kernel = kernel.release.clone();
    let dir = cache.join(format!("run-{prefix}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let remove = vm::RemoveDir(dir.clone());
    let accel = vm::choose_accel(&kernel, &dir, stop)?;
    r.accel = match accel {
        vm::Accel::Kvm => "kvm".into(),
        vm::Accel::Tcg => "tcg".into(),
    };
    let topo = Topology::with_queues(prefix, MACHINE.queues)?;
    let guest = Guest::boot_machine(
        &kernel,
        accel,
        MACHINE,
        &topo,
        dir.join("job"),
        Console::Log,
        stop,
    )?;
    // The binary where the guest sees it: a hard link (or a copy) in the
    // job folder, its /mnt.
    let linked = guest.job.join("gateway");
    if fs::hard_link(gateway_bin, &linked).is_err() {
        fs::copy(gateway_bin, &linked).context("copying the gateway binary into the job folder")?;
    }
    Ok(Lab {
        host_gw: None,
        guest,
        topo,
        dir,
        bin: gateway_bin.to_path_buf(),
        guest_bin: "/mnt/gateway".into(),
        stop: stop.clone(),
        starts: 0,
        _dir: remove,
    })
}

fn steps(lab: &mut Lab, r: &mut Report) -> Result<()> {
    // The guest: what it runs on, and the gateway binary through 9p.
    r.kernel = lab.guest.exec("uname -r")?.trim().to_string();
    let bin = lab.guest_bin.clone();
    lab.guest.exec(&format!(
        "test -x {bin} || {{ echo 'no {bin} in the guest (the job folder over 9p)'; exit 1; }}"
    ))?;
    let info = lab.guest.exec("ethtool -i eth0")?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    r.driver = field("driver:");
    r.driver_version = field("version:");
    let channels = lab.guest.exec("ethtool -l eth0")?;
    r.combined_channels = channels
        .split("Current hardware settings:")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.trim().strip_prefix("Combined:")))
        .and_then(|v| v.trim().parse().ok());
    if r.combined_channels != Some(MACHINE.queues) {
        bail!(
            "eth0 has {:?} combined channels, not {}:\n{channels}",
            r.combined_channels,
            MACHINE.queues
        );
    }
    lab.guest.exec(&format!(
        "set -e\nmodprobe -d /tmp/km tun\nip addr add {GUEST_V4_2}/24 dev eth0"
    ))?;
    lab.host_ok(&format!("ip addr add {HOST_V4_2}/24 dev ens0"))?;
    fs::write(lab.guest.job.join("xfer.py"), XFER_PY)?;

    // The two gateways.
    let gw = lab.start_guest_gateway()?;
    let (mode, _) = lab
        .xdp_on_eth0()?
        .context("the guest's gateway runs but eth0 has no XDP program")?;
    r.xdp_mode = mode;
    let host_cfg = config(HOST_GATEWAY, true);
    lab.host_gw = Some(GatewayProc::start(
        &lab.bin,
        &lab.topo.gw,
        &host_cfg,
        &lab.dir.join("host-gateway"),
        &lab.stop,
    )?);

    // Ping both ways and TCP through each tunnel.
    for (i, t) in TUNNELS.iter().enumerate() {
        vm::say(&format!(
            "tunnel {} ({} {} -> {}{})",
            t.name,
            t.mode,
            t.host,
            t.guest,
            t.key.map(|k| format!(" key {k}")).unwrap_or_default()
        ));
        let mut tr = TunnelResult {
            name: t.name.into(),
            mode: t.mode.into(),
            outer: format!(
                "{} -> {}{}",
                t.host,
                t.guest,
                t.key.map(|k| format!(" key {k}")).unwrap_or_default()
            ),
            tcp_direction: if t.to_guest {
                "host -> guest"
            } else {
                "guest -> host"
            }
            .into(),
            tcp_bytes: TCP_BYTES,
            ..Default::default()
        };
        let res = (|| -> Result<()> {
            tr.host_to_guest = Some(lab.ping(false, t.guest_inner)?);
            tr.guest_to_host = Some(lab.ping(true, t.host_inner)?);
            let port = 5001 + i as u16;
            let (sent, received) = if t.to_guest {
                lab.tcp_to_guest(t, port)?
            } else {
                lab.tcp_to_host(t, port)?
            };
            tr.tcp_sent = Some(sent);
            tr.tcp_received = Some(received);
            Ok(())
        })();
        r.tunnels.push(tr);
        res.with_context(|| format!("tunnel {}", t.name))?;
    }

    // Both workers must have received: the NIC's hash decides; when the
    // tunnels' own flows all went to one queue, more flows (short TCP
    // connection attempts, each from a new port) until both have.
    (r.workers, r.xdp_attached) = lab.workers()?;
    let xfer = lab.guest.job.join("xfer.py").display().to_string();
    while !r.both_workers_received() && r.extra_flows < EXTRA_ROUNDS * TUNNELS.len() as u32 {
        lab.stop.check()?;
        for t in TUNNELS {
            lab.host(&format!("python3 {xfer} probe {} 9 1", t.guest_inner));
            r.extra_flows += 1;
        }
        (r.workers, r.xdp_attached) = lab.workers()?;
    }
    vm::say(&format!(
        "workers: {}",
        r.workers
            .iter()
            .map(|w| format!("queue {} rx {}", w.queue, w.rx_frames))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // SIGTERM, SIGKILL: no XDP program left behind either time.
    let term = lab.signal(&gw, "TERM");
    // Its log, start to stop (what it said about the kernel's features).
    r.gateway_log = gw.log().lines().map(|l| l.trim().to_string()).collect();
    r.signals.push(term?);
    let gw = lab.start_guest_gateway()?;
    let kill = lab.signal(&gw, "KILL");
    r.signals.push(kill?);

    // A third start still carries the first tunnel.
    let gw = lab.start_guest_gateway()?;
    let t = &TUNNELS[0];
    let a = lab.ping(false, t.guest_inner).ok();
    let b = lab.ping(true, t.host_inner).ok();
    r.restart_pings = Some((a, b));
    lab.guest.exec(&format!("kill -TERM {}", gw.pid))?;
    let stop = lab.stop.clone();
    vm::wait_for("the third guest gateway to exit", EXIT_LIMIT, &stop, || {
        lab.guest.alive()?;
        Ok(gw.exit_status())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_configs_mirror_each_other() {
        let host = config(HOST_GATEWAY, true);
        let guest = config(GUEST_GATEWAY, false);
        assert_eq!(host.matches("[[tunnel]]").count(), TUNNELS.len());
        assert!(host.contains("local = \"192.168.0.9\"\nremote = \"192.168.0.59\""));
        assert!(guest.contains("local = \"192.168.0.59\"\nremote = \"192.168.0.9\""));
        assert!(guest.contains("iface = \"eth0\""));
        assert_eq!(guest.matches("key = 4").count(), 1);
    }
}
