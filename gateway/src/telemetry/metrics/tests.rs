//! Unit tests of the Prometheus text and of both servers: a stalled or
//! silent client holds up no one, and past the limit one is turned away.

use super::clients::{turn_away, CLIENT_THREADS};
use super::control_socket::{serve_control_on, BUSY};
use super::http::serve_http_on;
use super::*;
use serde_json::json;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::mpsc::{channel, Sender};
use std::time::Duration;

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
#[test]
fn prometheus_text_has_the_anycast_state_and_the_drain() {
    let snap = json!({
        "tunnels": [], "drops": {}, "xdp": {}, "workers": [],
        "gateway": {"underlay_up": true, "xdp_attached": true, "events": {},
            "anycast": {"device": "gw-anycast", "addresses": ["192.0.2.1", "2001:db8::1"], "announced": true},
            "draining": null},
    });
    let text = prometheus(&snap);
    assert!(
        text.contains("gateway_anycast_announced{address=\"192.0.2.1\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("gateway_anycast_announced{address=\"2001:db8::1\"} 1"),
        "{text}"
    );
    assert!(text.contains("gateway_draining 0"), "{text}");
    let mut snap = snap;
    snap["gateway"]["anycast"]["announced"] = json!(false);
    snap["gateway"]["draining"] = json!({"since_ms": 10});
    let text = prometheus(&snap);
    assert!(
        text.contains("gateway_anycast_announced{address=\"192.0.2.1\"} 0"),
        "{text}"
    );
    assert!(text.contains("gateway_draining 1"), "{text}");
    // Without [anycast], no family for it.
    snap["gateway"]["anycast"] = json!(null);
    assert!(!prometheus(&snap).contains("gateway_anycast_announced"));
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
                Request::Health { ready, reply } => {
                    let _ = reply.send((!ready, format!("ready: {ready}\n")));
                }
                Request::Drain { mut audience } => audience.say("draining\n"),
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
    serve_control_on(
        UnixListener::bind_addr(&addr).unwrap(),
        gateway,
        std::sync::Arc::new(crate::telemetry::capture::Taps::new(1)),
    )
    .unwrap();
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
    serve_control_on(
        UnixListener::bind_addr(&addr).unwrap(),
        gateway,
        std::sync::Arc::new(crate::telemetry::capture::Taps::new(1)),
    )
    .unwrap();
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
        out.starts_with("HTTP/1.1 404 ")
            && out.ends_with("\r\n\r\ntry /metrics, /healthz or /readyz\n"),
        "{out}"
    );
    // The fake says alive, not ready: 200 and 503, with its text.
    let out = get("GET /healthz HTTP/1.0\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nready: false\n"),
        "{out}"
    );
    let out = get("GET /readyz HTTP/1.0\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && out.ends_with("\r\n\r\nready: true\n"),
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
