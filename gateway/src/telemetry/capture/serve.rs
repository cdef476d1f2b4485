//! The gateway's side of a capture or trace client: the request read,
//! the session attached to the workers' taps, its queue drained onto the
//! socket until the client has what it asked for or goes away.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::session::{Kind, Session, Taps};
use super::stream::{encode_packet, write_message, END, ERROR, HELLO, PACKET, TRACE};
use super::{Item, Point};
use crate::datapath::drop_reason::DropReason;

/// How long the last messages (what was queued, the figures) may take
/// to write once the session ended.
const FINAL_WRITE: Duration = Duration::from_secs(2);
/// How long the thread waits on the socket when it has nothing to send,
/// or no room to send it.
const IDLE_MS: i32 = 20;
/// Bytes of messages encoded at once.
const BATCH_BYTES: usize = 256 << 10;
/// How long the workers get to let a detached session go.
const SETTLE: Duration = Duration::from_secs(1);
/// Traces one session takes at most (each is built on the data path).
const MAX_TRACES: u64 = 10_000;
/// The most bytes kept of one packet.
pub const MAX_SNAPLEN: usize = 262_144;

/// What a client asks for (one JSON line after the word `capture` or
/// `trace`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    #[serde(default)]
    pub points: Vec<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub tunnel: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub snaplen: Option<usize>,
}

/// Builds the session `ask` describes, or says in one line what is wrong.
fn session_of(trace: bool, ask: &Ask, taps: &Taps) -> Result<Session, String> {
    let kind = if trace {
        if !ask.points.is_empty() || ask.reason.is_some() {
            return Err("a trace follows whole packets: it takes no --point or --reason".into());
        }
        Kind::Trace
    } else {
        let mut points = 0u8;
        for p in &ask.points {
            let point = Point::from_name(p).ok_or_else(|| {
                format!(
                    "no point {p:?}; the points are {}",
                    Point::ALL.map(Point::name).join(", ")
                )
            })?;
            points |= point.bit();
        }
        if points == 0 {
            points = if ask.reason.is_some() {
                Point::Drop.bit()
            } else {
                Point::ALL.iter().fold(0, |m, p| m | p.bit())
            };
        }
        if ask.reason.is_some() && points & Point::Drop.bit() == 0 {
            return Err("--reason selects drops: add --point drop, or leave --point out".into());
        }
        Kind::Capture { points }
    };
    let reason = match &ask.reason {
        None => None,
        Some(r) => Some(
            DropReason::ALL
                .into_iter()
                .find(|x| x.name() == r)
                .ok_or_else(|| {
                    format!("no drop reason {r:?}; `gateway stats` lists them (e.g. key_mismatch)")
                })?,
        ),
    };
    if let Some(t) = &ask.tunnel {
        let names = taps.tunnel_names();
        if !names.iter().any(|n| n == t) {
            return Err(format!(
                "no tunnel {t:?} on this gateway; its tunnels are {}",
                names.join(", ")
            ));
        }
    }
    if ask.count == Some(0) {
        return Err("-c 0 takes nothing; give a count of 1 or more, or leave -c out".into());
    }
    let count = if trace {
        let n = ask.count.unwrap_or(10);
        if n > MAX_TRACES {
            return Err(format!(
                "-c {n}: a trace takes at most {MAX_TRACES} packets (each is followed on the data path)"
            ));
        }
        Some(n)
    } else {
        ask.count
    };
    // (0, as tcpdump's -s 0: all of it.)
    let snaplen = match ask.snaplen {
        None | Some(0) => MAX_SNAPLEN,
        Some(n) => n.min(MAX_SNAPLEN),
    };
    Session::new(
        kind,
        ask.filter.as_deref(),
        taps.workers(),
        ask.tunnel.clone(),
        reason,
        count,
        snaplen,
    )
    .map_err(|e| format!("filter: {e}"))
}

/// Appends `item` to `out` as a message.
fn encode(item: Item, out: &mut Vec<u8>, body: &mut Vec<u8>) {
    // (Writing into a vector cannot fail.)
    let _ = match item {
        Item::Packet(p) => {
            encode_packet(&p, body);
            write_message(out, PACKET, body)
        }
        Item::Trace(t) => write_message(out, TRACE, t.to_json().to_string().as_bytes()),
    };
}

/// Serves one capture (`trace` false) or trace client whose request is
/// `body` (JSON), on this thread, until the session ends: the client has
/// what it asked for, closes its side (Ctrl-C), or goes away.
///
/// The socket is written only as fast as the client reads: what it has
/// not taken waits in the session's queue, which the workers fill until
/// it is full, and then lose copies (counted). A client that pauses (a
/// pager) loses copies meanwhile, not its session.
pub fn serve_client(conn: UnixStream, trace: bool, body: &[u8], taps: &Taps, allowed: bool) {
    let _ = conn.set_write_timeout(Some(FINAL_WRITE));
    let mut w = &conn;
    if !allowed {
        let _ = write_message(
            &mut w,
            ERROR,
            b"only root or the gateway's own user may capture or trace its packets",
        );
        return;
    }
    let session = serde_json::from_slice::<Ask>(body)
        .map_err(|e| format!("a request the gateway does not understand ({e})"))
        .and_then(|ask| session_of(trace, &ask, taps));
    let session = match session.and_then(|s| {
        let s = Arc::new(s);
        taps.attach(s.clone()).map(|()| s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = write_message(&mut w, ERROR, e.as_bytes());
            return;
        }
    };
    tracing::info!(trace, "a capture client attached");
    let hello = json!({ "workers": taps.workers() });
    let mut alive = write_message(&mut w, HELLO, hello.to_string().as_bytes()).is_ok()
        && conn.set_nonblocking(true).is_ok();
    let fd = conn.as_raw_fd();
    let (mut out, mut at, mut body) = (Vec::new(), 0usize, Vec::new());
    while alive {
        if at == out.len() {
            out.clear();
            at = 0;
            while out.len() < BATCH_BYTES {
                match session.pop() {
                    Some(item) => encode(item, &mut out, &mut body),
                    None => break,
                }
            }
        }
        while at < out.len() {
            match w.write(&out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        if !alive {
            break;
        }
        let idle = at == out.len() && session.drained();
        if idle && session.complete() {
            break;
        }
        // Wait for room on the socket (when there is more to send) or for
        // the next copies; either way see whether the client said stop.
        let (events, wait) = match (at < out.len(), idle) {
            (true, _) => (libc::POLLIN | libc::POLLOUT, IDLE_MS),
            (false, true) => (libc::POLLIN, IDLE_MS),
            (false, false) => (libc::POLLIN, 0),
        };
        let revents = crate::io::poll_one(fd, events, wait).unwrap_or(libc::POLLERR);
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // The client closed its side (Ctrl-C) or went away.
            break;
        }
    }
    // Detached; once every worker has seen it and the copies being made
    // are queued, what is queued goes too (if the client is still there).
    let epoch = taps.detach(&session);
    let deadline = Instant::now() + SETTLE;
    taps.wait_for_workers(epoch, deadline);
    while !session.settled() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // One message at a time, each within FINAL_WRITE: what a reader that
    // does not take it in time (paused) never gets is counted lost.
    alive = alive && conn.set_nonblocking(false).is_ok() && w.write_all(&out[at..]).is_ok();
    while let Some(item) = session.pop() {
        if alive {
            out.clear();
            encode(item, &mut out, &mut body);
            alive = w.write_all(&out).is_ok();
        }
        if !alive {
            session
                .lost
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            session
                .taken
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if alive {
        out.clear();
        let _ = write_message(&mut out, END, figures(&session).to_string().as_bytes());
        let _ = w.write_all(&out);
    }
    taps.retire(&session);
    tracing::info!(trace, figures = %figures(&session), "a capture client detached");
}

fn figures(s: &Session) -> serde_json::Value {
    json!({
        "taken": s.taken.load(std::sync::atomic::Ordering::Relaxed),
        "lost": s.lost.load(std::sync::atomic::Ordering::Relaxed),
    })
}
