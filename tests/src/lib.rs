//! Helpers for the integration tests: network namespaces that remove
//! themselves, the real `gateway` binary run inside one, and raw AF_PACKET
//! sockets opened inside a namespace to send hand-built frames and capture
//! what reaches a device. Packets are built with etherparse, never with the
//! gateway's own code.
//!
//! Everything here needs root; [`require_root`] says so and skips otherwise.
#![allow(unsafe_code)]

pub mod vm;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What a condition polled by [`wait_until`] returns: a `bool`, or a
/// `Result<(), String>` whose error says what was seen instead.
pub trait Condition {
    /// `Ok` when the condition holds; otherwise what was seen, if said.
    fn check(self) -> Result<(), Option<String>>;
}

impl Condition for bool {
    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl Condition for Result<(), String> {
    fn check(self) -> Result<(), Option<String>> {
        self.map_err(Some)
    }
}

/// Polls `f` every 50 ms until it holds; panics naming `what` (and what
/// `f` last saw, when it returns a `Result`) after `limit`.
pub fn wait_until<C: Condition>(what: &str, limit: Duration, mut f: impl FnMut() -> C) {
    let start = Instant::now();
    loop {
        let seen = match f().check() {
            Ok(()) => return,
            Err(seen) => seen,
        };
        if start.elapsed() >= limit {
            match seen {
                Some(seen) => {
                    panic!("timed out after {limit:?} waiting for {what}; last seen: {seen}")
                }
                None => panic!("timed out after {limit:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root (network namespaces, XDP, AF_XDP)");
    }
    root
}

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (also when the test panics).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!(
            "gwt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// `ip netns exec NS ARGS...`, output and success.
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let out = self.ip(&["-br", "link", "show", dev]);
        let s = out.split_whitespace().nth(2).expect("a MAC in ip -br link");
        parse_mac(s)
    }

    /// True when an XDP program is attached to `dev`.
    pub fn has_xdp(&self, dev: &str) -> bool {
        self.ip(&["link", "show", dev]).contains("xdp")
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it
    /// opens belong here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread")
    }

    /// Like [`NetNs::run`], without waiting for `f`.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The leaves that differ between `a` and `b`, one `path: a -> b` line
/// each, into `out`.
fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                json_diff(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), a, b, out);
            }
        }
        _ if a != b => out.push(format!("  {path}: {a} -> {b}")),
        _ => {}
    }
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

/// Two namespaces joined by a veth called `ens0` on both sides:
/// `gw` (192.168.0.8/24) and `peer` (192.168.0.58/24, plus any extra
/// addresses given).
pub struct Wire {
    pub gw: NetNs,
    pub peer: NetNs,
}

impl Wire {
    pub fn new(tag: &str, extra_peer_addrs: &[&str]) -> Wire {
        Wire::with_queues(tag, extra_peer_addrs, 1)
    }

    /// The same, with `queues` RX and TX queues on each end of the veth.
    pub fn with_queues(tag: &str, extra_peer_addrs: &[&str], queues: u32) -> Wire {
        let gw = NetNs::new(&format!("{tag}g"));
        let peer = NetNs::new(&format!("{tag}p"));
        let q = queues.to_string();
        sh(&[
            "ip",
            "link",
            "add",
            "ens0",
            "netns",
            &gw.name,
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            "ens0",
            "netns",
            &peer.name,
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
        ]);
        gw.ip(&["addr", "add", "192.168.0.8/24", "dev", "ens0"]);
        peer.ip(&["addr", "add", "192.168.0.58/24", "dev", "ens0"]);
        for a in extra_peer_addrs {
            peer.ip(&["addr", "add", a, "dev", "ens0"]);
        }
        gw.ip(&["link", "set", "ens0", "up"]);
        peer.ip(&["link", "set", "ens0", "up"]);
        Wire { gw, peer }
    }
}

/// The lab: `host1` (192.168.0.8) and `host2` (192.168.0.58), each with a
/// veth `ens0` into a bridge in a third namespace, the wire, where captures
/// see every packet (the gateways' XDP programs take tunnel packets before
/// a capture on the hosts' own `ens0` could).
pub struct Lab {
    pub host1: NetNs,
    pub host2: NetNs,
    pub wire: NetNs,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let host1 = NetNs::new(&format!("{tag}1"));
        let host2 = NetNs::new(&format!("{tag}2"));
        let wire = NetNs::new(&format!("{tag}w"));
        wire.ip(&["link", "add", "br0", "type", "bridge"]);
        wire.ip(&["link", "set", "br0", "up"]);
        for (i, (host, addr)) in [(&host1, "192.168.0.8/24"), (&host2, "192.168.0.58/24")]
            .into_iter()
            .enumerate()
        {
            let port = format!("port{}", i + 1);
            sh(&[
                "ip", "link", "add", "ens0", "netns", &host.name, "type", "veth", "peer", "name",
                &port, "netns", &wire.name,
            ]);
            wire.ip(&["link", "set", &port, "master", "br0"]);
            wire.ip(&["link", "set", &port, "up"]);
            host.ip(&["addr", "add", addr, "dev", "ens0"]);
            host.ip(&["link", "set", "ens0", "up"]);
        }
        Lab { host1, host2, wire }
    }
}

/// Deterministic test data (xorshift), so the receiver can check every byte
/// without the sender's copy.
pub struct TestData(u64);

impl TestData {
    pub fn new(seed: u64) -> TestData {
        TestData(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sends `bytes` of [`TestData`] over TCP from `client` to `server_ip:port`
/// in `server`; returns the bytes received intact and the time taken. Any
/// difference panics.
pub fn tcp_transfer(
    server: &NetNs,
    server_ip: &str,
    client: &NetNs,
    bytes: usize,
) -> (usize, Duration) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let addr = format!("{server_ip}:5201");
    let bind = addr.clone();
    let listener: TcpListener = server.run(move || TcpListener::bind(&bind).expect("bind"));
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The sender fills 64 KiB blocks from the generator; so does this.
        let mut expect = TestData::new(7);
        let mut buf = vec![0u8; 1 << 16];
        let mut want = vec![0u8; 1 << 16];
        let (mut want_pos, mut want_len) = (0usize, 0usize);
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                if want_pos == want_len {
                    expect.fill(&mut want);
                    want_pos = 0;
                    want_len = want.len();
                }
                let take = (n - off).min(want_len - want_pos);
                assert!(
                    buf[off..off + take] == want[want_pos..want_pos + take],
                    "the stream is corrupted near byte {got}"
                );
                off += take;
                want_pos += take;
                got += take;
            }
        }
        got
    });
    let start = Instant::now();
    let target = addr.clone();
    let mut stream: TcpStream = client.run(move || {
        TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(5))
            .expect("connect")
    });
    let mut data = TestData::new(7);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        data.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    drop(stream);
    let got = receiver.join().expect("receiver");
    (got, start.elapsed())
}

/// One GRE tunnel (the lab's tun100 on host1) into `tap1`, adaptive poll:
/// the configuration the single-gateway tests share.
pub const ONE_GRE_TUNNEL: &str = r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "tun100"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
ttl = 64
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"
"#;

/// Path of the gateway binary: `GATEWAY_BIN`, or the workspace's debug or
/// release build.
pub fn gateway_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GATEWAY_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["debug", "release"] {
        let p = root.join("target").join(profile).join("gateway");
        if p.exists() {
            return p;
        }
    }
    panic!("no gateway binary: run `cargo build -p gateway` first, or set GATEWAY_BIN");
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    child: Option<Child>,
    lines: Receiver<String>,
    pub stderr_path: PathBuf,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    use std::path::PathBuf;
    /// A file removed on drop.
    pub struct TempPath(pub PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Gateway {
    /// Starts `gateway --iface ens0 --config <config>` in `ns` and waits
    /// until it reports that it is running (or panics with its log).
    pub fn start(ns: &NetNs, config: &str) -> Gateway {
        Self::start_with(ns, config, &[])
    }

    /// Like [`Gateway::start`], with extra command-line arguments.
    pub fn start_with(ns: &NetNs, config: &str, extra: &[&str]) -> Gateway {
        Self::start_wrapped(ns, config, &[], extra)
    }

    /// Like [`Gateway::start_with`], run through `prefix` (e.g. `setpriv`
    /// with a reduced set of capabilities).
    pub fn start_wrapped(ns: &NetNs, config: &str, prefix: &[&str], extra: &[&str]) -> Gateway {
        Self::start_inner(ns, config, prefix, extra, Duration::from_secs(20))
    }

    /// Like [`Gateway::start`], waiting up to `patience` for it to run (a
    /// configuration of thousands of tunnels).
    pub fn start_patient(ns: &NetNs, config: &str, patience: Duration) -> Gateway {
        Self::start_inner(ns, config, &[], &[], patience)
    }

    fn start_inner(
        ns: &NetNs,
        config: &str,
        prefix: &[&str],
        extra: &[&str],
        patience: Duration,
    ) -> Gateway {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let cfg_path = std::env::temp_dir().join(format!("gwt-{}-{n}.toml", std::process::id()));
        std::fs::write(&cfg_path, config).expect("write config");
        let stderr_path = std::env::temp_dir().join(format!("gwt-{}-{n}.log", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).expect("log file");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(prefix)
            .arg(gateway_bin())
            .args(["--iface", "ens0", "--config"])
            .arg(&cfg_path)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn gateway");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let gw = Gateway {
            child: Some(child),
            lines: rx,
            stderr_path,
            _config: tempfile_path::TempPath(cfg_path),
        };
        let deadline = Instant::now() + patience;
        loop {
            let log = gw.log();
            if log.contains("gateway running") {
                break;
            }
            if Instant::now() > deadline || log.contains("error:") {
                panic!("gateway did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Replaces the configuration file the gateway was started with.
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self._config.0, config).expect("write config");
    }

    /// Runs `gateway reload --iface ens0` in `ns`: its success and what it
    /// printed (stdout and stderr).
    pub fn reload(&self, ns: &NetNs) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(gateway_bin())
            .args(["reload", "--iface", "ens0"])
            .env("NO_COLOR", "1")
            .output()
            .expect("run gateway reload");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Waits for the process to exit by itself (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Asks for the counters (SIGUSR1) and returns the JSON it prints.
    pub fn stats(&self) -> Value {
        while self.lines.try_recv().is_ok() {}
        self.signal(libc::SIGUSR1);
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no stats from the gateway; log:\n{}", self.log()));
        serde_json::from_str(&line).expect("stats JSON")
    }

    /// Waits for the traffic counters to stop changing (traffic drained),
    /// then returns the stats. Poll and time counters keep moving while the
    /// worker idles, so they are left out of the comparison. Panics, with
    /// what changed between the last two snapshots, when the counters are
    /// still moving after 30 s.
    pub fn settled_stats(&self) -> Value {
        const LIMIT: Duration = Duration::from_secs(30);
        fn traffic(s: &Value) -> Value {
            let workers: Vec<Value> = s["workers"]
                .as_array()
                .map(|ws| {
                    ws.iter()
                        .map(|w| {
                            serde_json::json!({
                                "rx_frames": w["rx_frames"],
                                "delivered": w["delivered"],
                                "tx_read": w["tx_read"],
                                "tx_sent": w["tx_sent"],
                                "tx_replies": w["tx_replies"],
                                "drops": w["drops"],
                                "frames": w["frames"],
                                "xsk": w["xsk"],
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({"workers": workers, "xdp": s["xdp"]})
        }
        let start = Instant::now();
        let mut last = self.stats();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.stats();
            let (before, after) = (traffic(&last), traffic(&now));
            if before == after {
                return now;
            }
            if start.elapsed() >= LIMIT {
                let mut changed = Vec::new();
                json_diff("", &before, &after, &mut changed);
                panic!(
                    "the traffic counters did not settle in {LIMIT:?}; between the last two \
                     snapshots (100 ms apart) these changed:\n{}\nlast stats: {now}",
                    changed.join("\n")
                );
            }
            last = now;
        }
    }

    /// For what became of frames just sent: waits until the XDP program
    /// has seen a frame since `before` (stats taken before sending) and the
    /// workers have taken every frame it steered to them (or their sockets
    /// counted it dropped), then returns [`Gateway::settled_stats`].
    pub fn settled_stats_after(&self, before: &Value) -> Value {
        let at = |s: &Value, path: &[&str]| {
            let mut v = s;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        };
        let seen_before = at(before, &["xdp", "seen"]);
        wait_until(
            "the frames sent to reach the gateway",
            Duration::from_secs(30),
            || {
                let s = self.stats();
                let seen = at(&s, &["xdp", "seen"]);
                let steered = at(&s, &["xdp", "redirected"]);
                let taken: u64 = s["workers"]
                    .as_array()
                    .map(|ws| {
                        ws.iter()
                            .map(|w| {
                                at(w, &["rx_frames"])
                                    + at(w, &["xsk", "rx_dropped"])
                                    + at(w, &["xsk", "rx_ring_full"])
                            })
                            .sum()
                    })
                    .unwrap_or(0);
                if seen > seen_before && taken >= steered {
                    Ok(())
                } else {
                    Err(format!(
                        "the XDP program saw {seen} frames ({seen_before} before), steered \
                         {steered}, the workers took {taken}: {s}"
                    ))
                }
            },
        );
        self.settled_stats()
    }

    /// Sends `sig` and waits for the process to exit; returns its exit
    /// status and the last stats line it printed.
    pub fn stop_with(mut self, sig: i32) -> (std::process::ExitStatus, Option<Value>) {
        self.signal(sig);
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("wait");
        let mut last = None;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                last = Some(v);
            }
        }
        (status, last)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP GET from inside `ns`: the status code and the body.
pub fn http_status(ns: &NetNs, addr: &'static str, path: &'static str) -> Option<(u16, String)> {
    ns.run(move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    })
}

/// A raw AF_PACKET socket bound to one device of a namespace.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSocket {
    /// Opens the socket inside `ns`, bound to `dev`, receiving every
    /// protocol. `rcvbuf` bytes of receive buffer.
    pub fn open(ns: &NetNs, dev: &str, rcvbuf: usize) -> RawSocket {
        let dev = dev.to_string();
        let (fd, ifindex) = ns.run(move || {
            let name = CString::new(dev.clone()).unwrap();
            // SAFETY: plain libc calls with valid arguments; the fd is
            // owned right away.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                assert!(ifindex > 0, "no device {dev}");
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = ifindex;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                let size = rcvbuf as libc::c_int;
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &size as *const _ as *const libc::c_void,
                    4,
                );
                (fd, ifindex)
            }
        });
        RawSocket { fd, ifindex }
    }

    /// Sends one frame out of the device.
    pub fn send(&self, frame: &[u8]) {
        if let Err(e) = self.try_send(frame) {
            panic!("sendto: {e}");
        }
    }

    /// From now on every frame sent starts with a `struct virtio_net_hdr`
    /// (`PACKET_VNET_HDR`): the kernel takes offload requests from it, a
    /// checksum left to be completed among them, as from a VM's NIC.
    pub fn use_vnet_hdr(&self) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one live c_int on this socket.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends `frames` with one sendmmsg(2); returns how many the kernel
    /// took (0 when it refused the first, for want of buffer space, say).
    pub fn send_batch(&self, frames: &[Vec<u8>]) -> usize {
        // SAFETY: every msghdr points at a live sockaddr_ll and a live
        // iovec over a frame that outlives the call.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex;
            sll.sll_halen = 6;
            let mut iovs: Vec<libc::iovec> = frames
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .map(|iov| {
                    let mut m: libc::mmsghdr = std::mem::zeroed();
                    m.msg_hdr.msg_name = &mut sll as *mut _ as *mut libc::c_void;
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let n = libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0);
            n.max(0) as usize
        }
    }

    /// Sends one frame out of the device; an error (no carrier, say) is
    /// returned, not a panic.
    pub fn try_send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll zeroed then filled; the buffer is valid.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex;
            sll.sll_halen = 6;
            let rc = libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc == frame.len() as isize {
                Ok(())
            } else if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Err(std::io::Error::other(format!(
                    "sent {rc} of {} bytes",
                    frame.len()
                )))
            }
        }
    }

    /// Receives frames arriving on the device (not ones it sends) until
    /// `quiet` passes with nothing new, or `max` have arrived.
    pub fn receive(&self, max: usize, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let tv = libc::timeval {
            tv_sec: quiet.as_secs() as libc::time_t,
            tv_usec: quiet.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a valid timeval.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        while out.len() < max {
            // SAFETY: recvfrom into a live buffer with a sockaddr_ll.
            let (n, pkttype) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll.sll_pkttype)
            };
            if n < 0 {
                break;
            }
            if pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            out.push(buf[..n as usize].to_vec());
        }
        out
    }

    /// Like [`RawSocket::receive`], with each frame's VLAN ID as the kernel
    /// reports it (`PACKET_AUXDATA`: the kernel takes a received frame's
    /// tag off before any capture sees it).
    pub fn receive_tagged(&self, max: usize, quiet: Duration) -> Vec<(Option<u16>, Vec<u8>)> {
        let fd = self.fd.as_raw_fd();
        let on: libc::c_int = 1;
        let tv = libc::timeval {
            tv_sec: quiet.as_secs() as libc::time_t,
            tv_usec: quiet.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a live int and a live timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&on as *const libc::c_int).cast(),
                4,
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut control = [0u64; 16];
        while out.len() < max {
            // SAFETY: recvmsg into live buffers that outlive the call; the
            // control messages are read within the length the kernel set.
            let (n, pkttype, vlan) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
                msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                let n = libc::recvmsg(fd, &mut msg, 0);
                let mut vlan = None;
                if n >= 0 {
                    let mut c = libc::CMSG_FIRSTHDR(&msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_PACKET
                            && (*c).cmsg_type == libc::PACKET_AUXDATA
                        {
                            let aux: libc::tpacket_auxdata =
                                std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                            if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                                vlan = Some(aux.tp_vlan_tci & 0x0fff);
                            }
                        }
                        c = libc::CMSG_NXTHDR(&msg, c);
                    }
                }
                (n, sll.sll_pkttype, vlan)
            };
            if n < 0 {
                break;
            }
            if pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            out.push((vlan, buf[..n as usize].to_vec()));
        }
        out
    }
}

/// Builders for the packets the tests send, with etherparse.
pub mod pkt {
    use etherparse::{IpNumber, PacketBuilder};

    /// An ICMP echo request, as a bare IPv4 packet.
    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4], seq: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).icmpv4_echo_request(0x4242, seq);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    /// A UDP datagram, as a bare IPv4 packet.
    pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    /// A UDP datagram, as a bare IPv6 packet.
    pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(src, dst, 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    /// Ethernet + outer IPv4 (protocol `proto`) around `payload`.
    pub fn outer(
        dst_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut hdr =
            etherparse::Ipv4Header::new(payload.len() as u16, 64, IpNumber(proto), src, dst)
                .unwrap();
        hdr.header_checksum = hdr.calc_header_checksum();
        let eth = etherparse::Ethernet2Header {
            source: [0x02, 0, 0, 0, 0, 0x58],
            destination: dst_mac,
            ether_type: etherparse::EtherType::IPV4,
        };
        let mut out = Vec::new();
        eth.write(&mut out).unwrap();
        hdr.write(&mut out).unwrap();
        out.extend_from_slice(payload);
        out
    }

    /// A GRE header (RFC 2784/2890) in front of `inner`: `flags` is the
    /// flags-and-version word; key and sequence are written when their bit
    /// is set; a checksum is computed when C is set.
    pub fn gre(flags: u16, protocol: u16, key: u32, seq: u32, inner: &[u8]) -> Vec<u8> {
        let mut g = Vec::new();
        g.extend_from_slice(&flags.to_be_bytes());
        g.extend_from_slice(&protocol.to_be_bytes());
        let csum_at = g.len();
        if flags & 0x8000 != 0 {
            g.extend_from_slice(&[0, 0, 0, 0]);
        }
        if flags & 0x2000 != 0 {
            g.extend_from_slice(&key.to_be_bytes());
        }
        if flags & 0x1000 != 0 {
            g.extend_from_slice(&seq.to_be_bytes());
        }
        g.extend_from_slice(inner);
        if flags & 0x8000 != 0 {
            let c = internet_checksum(&g);
            g[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        g
    }

    /// RFC 1071, written here independently of the gateway's own.
    pub fn internet_checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// The conformance suite's far end: scapy (tests/conformance/peer.py), an
/// independent packet library, running in a namespace; it builds and sends
/// packets from Python expressions and dissects captured frames.
pub struct Scapy {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Scapy {
    pub fn start(ns: &NetNs, gw_mac: &str) -> Scapy {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/peer.py");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "/usr/bin/python3",
                script,
                gw_mac,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the scapy peer (python3-scapy, installed by cargo xtask setup)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Scapy {
            child,
            stdin,
            stdout,
        }
    }

    pub fn ask(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("scapy peer answered {line:?} to {cmd}"));
        assert!(v.get("error").is_none(), "scapy: {v} for {cmd}");
        v
    }

    pub fn send(&mut self, expr: &str) {
        self.ask(json!({"op": "send", "pkt": expr}));
    }

    pub fn decode(&mut self, frame: &[u8]) -> Value {
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        self.ask(json!({"op": "decode", "hex": hex}))
    }
}

impl Drop for Scapy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reading the gateway's stats JSON, and the accounting every test checks.
pub mod stats {
    use serde_json::Value;

    pub fn u64_at(v: &Value, path: &[&str]) -> u64 {
        let mut cur = v;
        for p in path {
            cur = &cur[*p];
        }
        cur.as_u64()
            .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
    }

    pub fn tunnel_rx(stats: &Value, name: &str) -> u64 {
        stats["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["rx_packets"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no tunnel {name}"))
    }

    pub fn drops(stats: &Value, reason: &str) -> u64 {
        u64_at(stats, &["drops", reason])
    }

    /// Drops of received packets (the `tx_` reasons belong to the way out).
    pub fn total_drops(stats: &Value) -> u64 {
        stats["drops"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with("tx_"))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum()
    }

    pub fn total_tx_drops(stats: &Value) -> u64 {
        stats["drops"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("tx_"))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum()
    }

    pub fn worker_sum(stats: &Value, field: &str) -> u64 {
        stats["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w[field].as_u64().unwrap())
            .sum()
    }

    /// received = delivered + counted drops, and every UMEM frame is home.
    pub fn assert_accounting(stats: &Value) {
        let rx = worker_sum(stats, "rx_frames");
        let delivered = worker_sum(stats, "delivered")
            + worker_sum(stats, "keepalives")
            + worker_sum(stats, "keepalive_replies")
            + worker_sum(stats, "path_mtu_updates")
            + worker_sum(stats, "fragments_merged")
            + worker_sum(stats, "fragments_pending");
        assert_eq!(rx, delivered + total_drops(stats), "accounting: {stats}");
        let read = worker_sum(stats, "tx_read");
        let out = worker_sum(stats, "tx_sent") + worker_sum(stats, "tx_replies");
        assert_eq!(
            read,
            out + total_tx_drops(stats),
            "outbound accounting: {stats}"
        );
        for w in stats["workers"].as_array().unwrap() {
            let f = &w["frames"];
            // Once traffic stops, no write is left in flight (reads hold
            // no frames).
            assert_eq!(
                u64_at(f, &["in_flight"]),
                0,
                "writes still in flight after traffic: {w}"
            );
            assert_eq!(u64_at(f, &["in_tx"]), 0, "frames stuck in TX: {w}");
            assert_eq!(
                f["at_peers"].as_u64().unwrap_or(0),
                0,
                "frames still with another worker after traffic: {w}"
            );
            assert_eq!(
                u64_at(f, &["free"]) + u64_at(f, &["in_kernel"]) + u64_at(f, &["in_flight"]),
                u64_at(f, &["total"]),
                "a UMEM frame is missing: {w}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_says_what_it_saw_last() {
        let mut n = 0;
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until("n to reach 1000", Duration::from_millis(200), || {
                n += 1;
                if n >= 1000 {
                    Ok(())
                } else {
                    Err(format!("n is {n}"))
                }
            })
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("waiting for n to reach 1000; last seen: n is "),
            "{msg}"
        );
        wait_until("true", Duration::ZERO, || true);
    }

    #[test]
    fn json_diff_names_each_changed_leaf() {
        let a =
            json!({"workers": [{"rx_frames": 1, "xsk": {"rx_dropped": 0}}], "xdp": {"seen": 4}});
        let b =
            json!({"workers": [{"rx_frames": 3, "xsk": {"rx_dropped": 0}}], "xdp": {"seen": 5}});
        let mut out = Vec::new();
        json_diff("", &a, &b, &mut out);
        assert_eq!(
            out,
            ["  workers[0].rx_frames: 1 -> 3", "  xdp.seen: 4 -> 5"]
        );
    }
}
