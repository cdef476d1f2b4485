//! What the gateway shows of itself while it runs: Prometheus text on
//! `--metrics ADDR` (`GET /metrics`), and a control socket that `gateway
//! stats` reads. Both ask the control thread for a snapshot over a channel;
//! the snapshot (see [`crate::telemetry::snapshot::snapshot`]) is the one source of every
//! figure, so the JSON, the summary and the metrics always agree.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a request wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    Human,
    Json,
}

/// A request answered by the control thread.
pub enum Request {
    /// The counters, rendered.
    Stats {
        format: Format,
        reply: Sender<String>,
    },
    /// Read the configuration file again and apply it; the answer is one
    /// line, starting with `error:` when nothing changed.
    Reload { reply: Sender<String> },
}

/// Renders a snapshot in Prometheus' text exposition format.
pub fn prometheus(s: &Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let tunnels = s["tunnels"].as_array().cloned().unwrap_or_default();
    let workers = s["workers"].as_array().cloned().unwrap_or_default();
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut resolved = Vec::new();
    for t in &tunnels {
        let name = t["name"].as_str().unwrap_or("?");
        for dir in ["rx", "tx"] {
            let l = format!("tunnel=\"{name}\",direction=\"{dir}\"");
            packets.push((l.clone(), n(&t[format!("{dir}_packets")])));
            bytes.push((l, n(&t[format!("{dir}_bytes")])));
        }
        resolved.push((
            format!("tunnel=\"{name}\""),
            u64::from(t["next_hop"].is_string()),
        ));
    }
    family(
        "gateway_tunnel_packets_total",
        "counter",
        "Packets per tunnel: rx delivered into its device, tx sent on the wire.",
        packets,
    );
    family(
        "gateway_tunnel_bytes_total",
        "counter",
        "Bytes per tunnel: rx written into its device, tx sent on the wire.",
        bytes,
    );
    family(
        "gateway_tunnel_next_hop_resolved",
        "gauge",
        "1 when the outer next hop's MAC is known.",
        resolved,
    );
    let drops = s["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("reason=\"{k}\""), n(v)))
                .collect()
        })
        .unwrap_or_default();
    family(
        "gateway_drops_total",
        "counter",
        "Packets dropped, by reason.",
        drops,
    );
    let xdp = s["xdp"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("counter=\"{k}\""), n(v)))
                .collect()
        })
        .unwrap_or_default();
    family(
        "gateway_xdp_packets_total",
        "counter",
        "The XDP program's counters: seen, redirected, and why others went to the kernel.",
        xdp,
    );
    let g = &s["gateway"];
    if g.is_object() {
        let b = |v: &Value| u64::from(v.as_bool().unwrap_or(false));
        family(
            "gateway_underlay_up",
            "gauge",
            "1 while the underlay interface is up.",
            vec![(String::new(), b(&g["underlay_up"]))],
        );
        family(
            "gateway_xdp_attached",
            "gauge",
            "1 while the gateway's XDP program is the one attached to the underlay.",
            vec![(String::new(), b(&g["xdp_attached"]))],
        );
        let events = g["events"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("event=\"{k}\""), n(v)))
                    .collect()
            })
            .unwrap_or_default();
        family(
            "gateway_events_total",
            "counter",
            "Reloads (and refused ones), devices re-created after deletion, underlay down events, XDP program lost.",
            events,
        );
    }

    let per_worker = |path: &[&str]| -> Vec<(String, u64)> {
        workers
            .iter()
            .map(|w| {
                let mut v = w;
                for p in path {
                    v = &v[*p];
                }
                (format!("queue=\"{}\"", w["queue"]), n(v))
            })
            .collect()
    };
    for (name, path, help) in [
        (
            "gateway_worker_rx_frames_total",
            &["rx_frames"][..],
            "Frames taken from the AF_XDP RX ring.",
        ),
        (
            "gateway_worker_delivered_total",
            &["delivered"][..],
            "Packets written into tunnel devices.",
        ),
        (
            "gateway_worker_keepalives_total",
            &["keepalives"][..],
            "GRE keepalives answered (sent back on the underlay).",
        ),
        (
            "gateway_worker_coalesced_total",
            &["coalesced"][..],
            "Delivered TCP segments written in another segment's write (coalesced into one GSO packet).",
        ),
        (
            "gateway_worker_tx_gso_packets_total",
            &["tx_gso_packets"][..],
            "Large (TSO/USO) packets read from the devices and cut into tunnel-MTU segments.",
        ),
        (
            "gateway_worker_coalesced_writes_total",
            &["coalesced_writes"][..],
            "Device writes carrying coalesced TCP segments.",
        ),
        (
            "gateway_worker_spread_out_total",
            &["spread_out"][..],
            "Packets handed to another worker to write into the device (spread_writes).",
        ),
        (
            "gateway_worker_spread_in_total",
            &["spread_in"][..],
            "Packets written into a device for another worker (spread_writes).",
        ),
        (
            "gateway_worker_spread_bounced_total",
            &["spread_bounced"][..],
            "Packets handed to another worker that came back unwritten during a reload and were written by this one.",
        ),
        (
            "gateway_worker_path_mtu_updates_total",
            &["path_mtu_updates"][..],
            "ICMP fragmentation-needed messages about tunnel packets taken (path MTU lowered).",
        ),
        (
            "gateway_worker_fragments_merged_total",
            &["fragments_merged"][..],
            "Outer fragments merged into a reassembled datagram.",
        ),
        (
            "gateway_worker_batches_total",
            &["batches"][..],
            "RX batches (rx_frames / batches is the mean batch size).",
        ),
        (
            "gateway_worker_tx_read_total",
            &["tx_read"][..],
            "Packets read from tunnel devices.",
        ),
        (
            "gateway_worker_tx_sent_total",
            &["tx_sent"][..],
            "Packets handed to the AF_XDP TX ring.",
        ),
        (
            "gateway_worker_tx_replies_total",
            &["tx_replies"][..],
            "ARP and neighbour answers written back into devices.",
        ),
        (
            "gateway_worker_busy_nanoseconds_total",
            &["polls", "busy_ns"][..],
            "Time spent in loop iterations that moved packets.",
        ),
        (
            "gateway_worker_idle_nanoseconds_total",
            &["polls", "idle_ns"][..],
            "Time spent waiting for packets (spinning or asleep).",
        ),
        (
            "gateway_xsk_rx_dropped_total",
            &["xsk", "rx_dropped"][..],
            "The kernel's AF_XDP socket: packets dropped.",
        ),
        (
            "gateway_xsk_rx_ring_full_total",
            &["xsk", "rx_ring_full"][..],
            "The kernel's AF_XDP socket: RX ring full.",
        ),
        (
            "gateway_xsk_fill_ring_empty_total",
            &["xsk", "fill_ring_empty"][..],
            "The kernel's AF_XDP socket: fill ring empty (shortfall).",
        ),
        (
            "gateway_xsk_rx_invalid_descs_total",
            &["xsk", "rx_invalid_descs"][..],
            "The kernel's AF_XDP socket: invalid RX descriptors.",
        ),
    ] {
        family(name, "counter", help, per_worker(path));
    }
    family(
        "gateway_worker_fragments_pending",
        "gauge",
        "Outer fragments held for reassembly now.",
        per_worker(&["fragments_pending"]),
    );
    let mut frames = Vec::new();
    for w in &workers {
        for place in [
            "total",
            "free",
            "in_kernel",
            "in_flight",
            "in_tx",
            "at_peers",
        ] {
            frames.push((
                format!("queue=\"{}\",place=\"{place}\"", w["queue"]),
                n(&w["frames"][place]),
            ));
        }
    }
    family(
        "gateway_worker_frames",
        "gauge",
        "Where each worker's UMEM frames are (ring occupancy).",
        frames,
    );
    out
}

/// How long a client of `/metrics` or of the control socket has to send
/// its request, and then to take the answer: a client that stalls is let
/// go after this, unanswered or with part of the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Clients answered at once, each on a thread of its own. Past this many a
/// new client is turned away at once (its connection closed; `gateway
/// stats` then says the gateway is busy): a crowd of stalled clients costs
/// at most this many threads, each for [`CLIENT_TIMEOUT`] twice and the
/// gateway's answer, and never holds the accepting thread.
const CLIENT_THREADS: usize = 32;

/// Serves `GET /metrics` on `addr` until the process ends.
pub fn serve_http(addr: &str, requests: Sender<Request>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "--metrics {addr}: cannot listen ({e}); give a free ADDR:PORT such as 127.0.0.1:9464"
        )
    })?;
    serve_http_on(listener, requests)?;
    Ok(())
}

/// The longest HTTP request head read.
const HTTP_HEAD_MAX: usize = 8192;

/// Answers HTTP clients of `listener`: one request per connection
/// (`Connection: close`), each with [`CLIENT_TIMEOUT`] to send its request
/// head and again to take the answer, on threads of their own as
/// [`on_a_thread`] allows. The request is parsed by httparse. (tiny_http,
/// which served it before, accepts connections itself and sets no timeout
/// on them, nor lets one be set: a client that sent nothing held one of
/// its threads for ever, and one that did not read its answer held up
/// every answer after it.)
fn serve_http_on(listener: TcpListener, requests: Sender<Request>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("gw-metrics".into())
        .spawn(move || {
            serve_clients(
                "gw-metrics",
                || listener.accept().map(|(c, _)| c),
                move |c| answer_http(c, &requests),
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 13\r\nConnection: close\r\n\r\ngateway busy\n",
            )
        })?;
    Ok(())
}

/// What an HTTP request head asks for, once httparse has all of it.
enum Head {
    /// More bytes are needed.
    Partial,
    /// Method and path.
    Complete(String, String),
    Invalid,
}

fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Head::Complete(
            req.method.unwrap_or("").to_string(),
            req.path.unwrap_or("").to_string(),
        ),
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Invalid,
    }
}

fn answer_http(mut conn: TcpStream, requests: &Sender<Request>) {
    let mut head = vec![0u8; HTTP_HEAD_MAX];
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let done = |b: &[u8]| !matches!(parse_head(b), Head::Partial);
    let Some(n) = read_request(&mut conn, &mut head, deadline, done) else {
        return;
    };
    if n == 0 {
        return;
    }
    let (status, reason, body, head_only) = match parse_head(&head[..n]) {
        Head::Complete(method, path) if method == "GET" || method == "HEAD" => {
            let head_only = method == "HEAD";
            if path == "/metrics" {
                match ask(requests, Format::Prometheus) {
                    Some(b) => (200, "OK", b, head_only),
                    None => (
                        503,
                        "Service Unavailable",
                        "gateway stopping\n".into(),
                        head_only,
                    ),
                }
            } else {
                (404, "Not Found", "try /metrics\n".into(), head_only)
            }
        }
        Head::Partial if n == HTTP_HEAD_MAX => (
            431,
            "Request Header Fields Too Large",
            "request head too long\n".into(),
            false,
        ),
        _ => (
            400,
            "Bad Request",
            "bad request; try GET /metrics\n".into(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    if write_by(&mut conn, out.as_bytes(), Instant::now() + CLIENT_TIMEOUT).is_ok() {
        let _ = conn.shutdown(Shutdown::Write);
    }
}

/// Runs `work` on a thread of its own while fewer than [`CLIENT_THREADS`]
/// are busy; else drops it, which closes the client's connection unanswered.
fn on_a_thread(name: &str, busy: &Arc<AtomicUsize>, work: impl FnOnce() + Send + 'static) {
    /// One busy client thread, counted while it lives.
    struct Busy(Arc<AtomicUsize>);
    impl Drop for Busy {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    if busy.fetch_add(1, Ordering::AcqRel) >= CLIENT_THREADS {
        busy.fetch_sub(1, Ordering::AcqRel);
        drop(work);
        return;
    }
    let guard = Busy(busy.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-c"))
        .spawn(move || {
            let _guard = guard;
            work()
        });
    if let Err(e) = spawned {
        // The client is let go (and the thread uncounted) with the closure
        // that held it.
        tracing::warn!("{name}: cannot start a thread for a client ({e})");
    }
}

/// A client connection: a stream with read and write timeouts.
trait Client: Read + Write + Send + 'static {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn nonblocking(&self, on: bool) -> io::Result<()>;
}

/// The same three calls on both kinds of stream.
macro_rules! client {
    ($($t:ty),*) => {$(
        impl Client for $t {
            fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(t)
            }
            fn write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(t)
            }
            fn nonblocking(&self, on: bool) -> io::Result<()> {
                self.set_nonblocking(on)
            }
        }
    )*};
}
client!(TcpStream, UnixStream);

/// Answers each client `accept` returns with `answer`, on a thread of its
/// own where [`on_a_thread`] allows. Never returns.
fn serve_clients<C: Client>(
    name: &str,
    mut accept: impl FnMut() -> io::Result<C>,
    answer: impl Fn(C) + Clone + Send + 'static,
    busy_notice: &[u8],
) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match accept() {
            Ok(c) => c,
            Err(_) => {
                // Out of file descriptors, or a client gone before it was
                // accepted: try again, without spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if busy.load(Ordering::Acquire) >= CLIENT_THREADS {
            turn_away(conn, busy_notice);
            continue;
        }
        let answer = answer.clone();
        on_a_thread(name, &busy, move || answer(conn));
    }
}

/// Tells a client the server is busy, without waiting on it: what it has
/// sent is read and dropped (closing with unread bytes would reset the
/// connection before the notice arrives), the notice written if the socket
/// takes it at once, and the connection closed.
fn turn_away<C: Client>(mut conn: C, notice: &[u8]) {
    if conn.nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 512];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    let _ = conn.write(notice);
}

/// Reads a request into `buf` until `complete` says it is, `buf` is full,
/// or the client closes its side; waits no longer than `deadline` in all.
/// Returns the bytes read, or `None` when the client sent nothing complete
/// in time (or failed): it is then let go unanswered.
fn read_request<C: Client>(
    conn: &mut C,
    buf: &mut [u8],
    deadline: Instant,
    complete: impl Fn(&[u8]) -> bool,
) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() && !(n > 0 && complete(&buf[..n])) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        conn.read_timeout(Some(left)).ok()?;
        match conn.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(n)
}

/// Writes all of `bytes` by `deadline`, or fails: a client that does not
/// take its answer in time does not hold up the thread that answers it.
fn write_by<C: Client>(conn: &mut C, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.write_timeout(Some(left))?;
        match conn.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => bytes = &bytes[k..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ask(requests: &Sender<Request>, format: Format) -> Option<String> {
    let (tx, rx) = channel();
    requests.send(Request::Stats { format, reply: tx }).ok()?;
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

/// The control socket's name: abstract, so each network namespace has its
/// own and nothing is left in the file system.
pub fn control_name(iface: &str) -> String {
    format!("gateway-{iface}")
}

/// Answers `gateway stats` on the abstract unix socket for `iface`. A
/// client writes one word (`human`, `json` or `prometheus`) and reads the
/// answer until the socket closes.
pub fn serve_control(iface: &str, requests: Sender<Request>) -> anyhow::Result<()> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| {
        anyhow::anyhow!("control socket @{}: {e}; is another gateway running on {iface} in this network namespace?", control_name(iface))
    })?;
    serve_control_on(listener, requests)?;
    Ok(())
}

/// Answers control clients of `listener`, each with [`CLIENT_TIMEOUT`] to
/// send its word and again to take the answer, so that a client that
/// connects and says nothing (anyone in the network namespace can) or
/// never reads holds up no one for long: up to [`CLIENT_THREADS`] are
/// answered at once, and past that a client is turned away.
fn serve_control_on(listener: UnixListener, requests: Sender<Request>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("gw-control".into())
        .spawn(move || {
            serve_clients(
                "gw-control",
                || listener.accept().map(|(c, _)| c),
                move |c| answer_control(c, &requests),
                BUSY.as_bytes(),
            )
        })?;
    Ok(())
}

fn answer_control(mut conn: UnixStream, requests: &Sender<Request>) {
    let mut word = [0u8; 16];
    // The word is what the first read brings (or nothing, when the client
    // closes its side at once: the human summary).
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let Some(n) = read_request(&mut conn, &mut word, deadline, |_| true) else {
        return;
    };
    let format = match std::str::from_utf8(&word[..n]).unwrap_or("").trim() {
        "reload" => None,
        "json" => Some(Format::Json),
        "prometheus" => Some(Format::Prometheus),
        _ => Some(Format::Human),
    };
    let body = match format {
        Some(f) => ask(requests, f),
        None if !may_reload(&conn) => Some(
            "error: reload refused: only root or the gateway's own user may ask for one\n".into(),
        ),
        None => {
            let (tx, rx) = channel();
            requests.send(Request::Reload { reply: tx }).ok();
            rx.recv_timeout(std::time::Duration::from_secs(30)).ok()
        }
    };
    // No answer in time (the gateway stopping, or a reload that did not
    // finish): said so, rather than nothing.
    let body = body.unwrap_or_else(|| {
        "error: the gateway gave no answer in time (it may be stopping, or a reload may still be running)\n".into()
    });
    let _ = write_by(&mut conn, body.as_bytes(), Instant::now() + CLIENT_TIMEOUT);
}

/// What a control client is told when [`CLIENT_THREADS`] others are being
/// answered.
const BUSY: &str =
    "error: the gateway is busy with other clients of its control socket; try again\n";

/// Whether the peer of `conn` may make the gateway reload: root, or the
/// user the gateway runs as. (Anyone in the network namespace can reach
/// the abstract socket; reading counters is harmless, a reload is not.)
fn may_reload(conn: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    crate::io::peer_is_root_or_self(conn.as_fd())
}

/// `gateway stats` and `gateway reload`: asks the gateway running on
/// `iface` in this network namespace (`format` is `human`, `json`,
/// `prometheus` or `reload`).
pub fn query(iface: &str, format: &str) -> anyhow::Result<String> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!("no gateway answers for {iface} in this network namespace ({e}); is it running (gateway --iface {iface})?")
    })?;
    // The gateway answers within a few seconds (a reload within 30).
    let patience = if format == "reload" { 40 } else { 10 };
    s.set_read_timeout(Some(Duration::from_secs(patience)))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let gone = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    };
    // A gateway that turns the client away may close before the request is
    // written: what it said, if anything, is read all the same.
    if let Err(e) = s
        .write_all(format.as_bytes())
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
    {
        if !gone(&e) {
            return Err(e.into());
        }
    }
    let mut out = String::new();
    match s.read_to_string(&mut out) {
        Ok(_) => {}
        Err(e) if gone(&e) => anyhow::bail!(
            "the gateway on {iface} closed the connection unanswered ({e}); it may be busy or stopping, try again"
        ),
        Err(e) => anyhow::bail!(
            "the gateway on {iface} did not answer within {patience} s ({e}); it may be stopping or overloaded"
        ),
    }
    if out.is_empty() {
        anyhow::bail!(
            "the gateway on {iface} closed the connection unanswered; it may be stopping"
        );
    }
    // A refusal (busy, not allowed, no answer in time) is an error line.
    if format != "reload" {
        if let Some(e) = out.strip_prefix("error: ") {
            anyhow::bail!("{}", e.trim_end());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    #[test]
    fn prometheus_text_has_every_family_with_labels() {
        let snap = json!({
            "tunnels": [{"name": "tun100", "rx_packets": 5, "rx_bytes": 490, "tx_packets": 4, "tx_bytes": 500, "next_hop": "02:00:00:00:00:01"}],
            "drops": {"key_mismatch": 3},
            "xdp": {"seen": 10, "redirected": 8},
            "workers": [{"queue": 0, "rx_frames": 8, "delivered": 5, "batches": 2, "tx_read": 4, "tx_sent": 4, "tx_replies": 0,
                "polls": {"busy_ns": 100, "idle_ns": 900},
                "xsk": {"rx_dropped": 0, "rx_ring_full": 0, "fill_ring_empty": 0, "rx_invalid_descs": 0},
                "frames": {"total": 4096, "free": 1, "in_kernel": 2048, "in_flight": 64, "in_tx": 0}}],
        });
        let text = prometheus(&snap);
        assert!(text.contains("gateway_tunnel_packets_total{tunnel=\"tun100\",direction=\"rx\"} 5"));
        assert!(text.contains("gateway_tunnel_next_hop_resolved{tunnel=\"tun100\"} 1"));
        assert!(text.contains("gateway_drops_total{reason=\"key_mismatch\"} 3"));
        assert!(text.contains("gateway_xdp_packets_total{counter=\"redirected\"} 8"));
        assert!(text.contains("gateway_worker_frames{queue=\"0\",place=\"in_kernel\"} 2048"));
        assert!(text.contains("# TYPE gateway_worker_busy_nanoseconds_total counter"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("gateway_"), "{line}");
        }
    }
    /// How long a test waits for what should take a few seconds at most.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// A stand-in for the control thread: the first stats request gets an
    /// answer far larger than a socket buffer holds, the rest the format's
    /// name. The receiver hears when the large one was handed out.
    fn fake_gateway() -> (Sender<Request>, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = channel();
        let (large_tx, large_rx) = channel();
        std::thread::spawn(move || {
            let mut first = true;
            for r in rx {
                match r {
                    Request::Stats { format, reply } => {
                        let body = if std::mem::take(&mut first) {
                            let _ = large_tx.send(());
                            "x".repeat(32 << 20)
                        } else {
                            format!("{format:?}\n")
                        };
                        let _ = reply.send(body);
                    }
                    Request::Reload { reply } => {
                        let _ = reply.send("reloaded\n".into());
                    }
                }
            }
        });
        (tx, large_rx)
    }

    /// Stalls `listener`'s server with many clients:
    /// silent ones first, then one that asks (`ask`) for the large answer
    /// and never reads it, then one that sends half a request (`half`).
    /// Returns them, with the index of the one that asked.
    fn stall<C>(connect: impl Fn() -> C, ask: &[u8], half: &[u8]) -> (Vec<C>, usize)
    where
        C: Write,
    {
        // Half the threads (the others for the asker, the half-sender and
        // the clients that must be answered meanwhile, one after another:
        // a thread may still be counted for a moment after its answer).
        let mut clients: Vec<C> = (0..CLIENT_THREADS / 2).map(|_| connect()).collect();
        let mut asker = connect();
        asker.write_all(ask).unwrap();
        clients.push(asker);
        let mut halfway = connect();
        halfway.write_all(half).unwrap();
        clients.push(halfway);
        (clients, CLIENT_THREADS / 2)
    }

    /// Reads until the server closes; every stalled client is let go.
    fn let_go<C: Read>(c: &mut C) -> Vec<u8> {
        let mut got = Vec::new();
        c.read_to_end(&mut got)
            .expect("the server lets a stalled client go");
        got
    }

    #[test]
    fn a_stalled_control_client_holds_up_no_one() {
        let name = format!("gateway-test-{}-control", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let (gateway, large) = fake_gateway();
        serve_control_on(UnixListener::bind_addr(&addr).unwrap(), gateway).unwrap();
        let connect = || {
            let c = UnixStream::connect_addr(&addr).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            c
        };
        let (mut stalled, asker) = stall(connect, b"prometheus", b"");
        large
            .recv_timeout(PATIENCE)
            .expect("the stalled client's request reached the gateway");

        let mut c = connect();
        c.write_all(b"json").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out)
            .expect("answered while others stall");
        assert_eq!(out, "Json\n");

        for (i, s) in stalled.iter_mut().enumerate() {
            let got = let_go(s);
            if i != asker {
                assert!(
                    got.is_empty(),
                    "client {i} said nothing and got {} bytes",
                    got.len()
                );
            }
        }
    }

    #[test]
    fn past_the_thread_limit_a_control_client_is_turned_away_not_kept_waiting() {
        let name = format!("gateway-test-{}-busy", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let (gateway, _large) = fake_gateway();
        serve_control_on(UnixListener::bind_addr(&addr).unwrap(), gateway).unwrap();
        let connect = || {
            let c = UnixStream::connect_addr(&addr).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            c
        };
        // Every thread held by a client that says nothing (each for
        // CLIENT_TIMEOUT).
        let _silent: Vec<UnixStream> = (0..CLIENT_THREADS).map(|_| connect()).collect();
        let mut c = connect();
        let _ = c.write_all(b"json");
        let _ = c.shutdown(Shutdown::Write);
        let mut out = String::new();
        let read = c.read_to_string(&mut out);
        // The notice, or (when the gateway closed before the word came) a
        // reset; never the answer, which would mean it waited for a thread.
        let reset = matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset);
        assert!(
            out == BUSY || reset,
            "not turned away at once: {out:?} {read:?}"
        );
    }

    #[test]
    fn gateway_stats_says_the_gateway_is_busy_when_turned_away() {
        // A control socket that turns every client away, as the real one
        // does past CLIENT_THREADS, under the name `query` looks for.
        let iface = format!("busy{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(control_name(&iface).as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                turn_away(conn, BUSY.as_bytes());
            }
        });
        let e = query(&iface, "json").unwrap_err().to_string();
        assert!(
            e.contains("busy"),
            "gateway stats did not say the gateway is busy: {e}"
        );
    }

    #[test]
    fn a_stalled_metrics_client_holds_up_no_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (gateway, large) = fake_gateway();
        serve_http_on(listener, gateway).unwrap();
        let connect = || {
            let c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            c
        };
        let (mut stalled, asker) = stall(
            connect,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n",
        );
        large
            .recv_timeout(PATIENCE)
            .expect("the stalled client's request reached the gateway");

        let get = |request: &str| {
            let mut c = connect();
            c.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out)
                .expect("answered while others stall");
            out
        };
        let out = get("GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\r\nContent-Length: 11\r\nConnection: close\r\n\r\nPrometheus\n"),
            "{out}"
        );
        let out = get("GET / HTTP/1.0\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 404 ") && out.ends_with("\r\n\r\ntry /metrics\n"),
            "{out}"
        );
        let out = get("HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 200 ") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
        let out = get("BREW /metrics HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

        for (i, s) in stalled.iter_mut().enumerate() {
            let got = let_go(s);
            if i != asker {
                assert!(
                    got.is_empty(),
                    "client {i} sent no whole request and got {} bytes",
                    got.len()
                );
            }
        }
    }
}
