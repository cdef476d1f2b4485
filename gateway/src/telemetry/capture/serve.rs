//! The gateway's side of a capture or trace client: the request read,
//! the session attached to the workers' taps, its queue drained onto the
//! socket until the client has what it asked for or goes away.

use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::session::{Kind, Session, Taps};
use super::stream::{encode_packet, write_message, END, ERROR, HELLO, PACKET, TRACE};
use super::{Item, Point};
use crate::datapath::drop_reason::DropReason;

/// A client that takes nothing for this long is let go (its session
/// ends; the data path never waited for it).
const STALLED: Duration = Duration::from_secs(10);
/// How long the thread sleeps on the socket when the queue is empty.
const IDLE: Duration = Duration::from_millis(20);
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
    let snaplen = ask.snaplen.unwrap_or(MAX_SNAPLEN).clamp(1, MAX_SNAPLEN);
    Session::new(
        kind,
        ask.filter.as_deref(),
        taps.workers(),
        ask.tunnel.clone(),
        reason,
        ask.count,
        snaplen,
    )
    .map_err(|e| format!("filter: {e}"))
}

/// Serves one capture (`trace` false) or trace client whose request is
/// `body` (JSON), on this thread, until the session ends.
pub fn serve_client(conn: UnixStream, trace: bool, body: &[u8], taps: &Taps, allowed: bool) {
    let mut out = BufWriter::with_capacity(256 << 10, &conn);
    let _ = conn.set_write_timeout(Some(STALLED));
    if !allowed {
        let _ = write_message(
            &mut out,
            ERROR,
            b"only root or the gateway's own user may capture or trace its packets",
        );
        let _ = out.flush();
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
            let _ = write_message(&mut out, ERROR, e.as_bytes());
            let _ = out.flush();
            return;
        }
    };
    tracing::info!(trace, "a capture client attached");
    let hello = json!({ "workers": taps.workers() });
    let mut ok = write_message(&mut out, HELLO, hello.to_string().as_bytes())
        .and_then(|()| out.flush())
        .is_ok();
    let mut body = Vec::new();
    while ok {
        let mut moved = false;
        while let Some(item) = session.pop() {
            moved = true;
            let r = match item {
                Item::Packet(p) => {
                    encode_packet(&p, &mut body);
                    write_message(&mut out, PACKET, &body)
                }
                Item::Trace(t) => {
                    write_message(&mut out, TRACE, t.to_json().to_string().as_bytes())
                }
            };
            if r.is_err() {
                ok = false;
                break;
            }
        }
        if !ok || out.flush().is_err() {
            break;
        }
        // Every copy asked for is taken, and sent.
        if session.complete() && !moved {
            break;
        }
        // (A client that stops reading is let go by the write timeout.)
        if !moved && client_gone(&conn, IDLE) {
            break;
        }
    }
    taps.detach(&session);
    // What was queued before the workers let go is sent too (or lost with
    // the client).
    while let Some(item) = session.pop() {
        if !ok {
            continue;
        }
        let r = match item {
            Item::Packet(p) => {
                encode_packet(&p, &mut body);
                write_message(&mut out, PACKET, &body)
            }
            Item::Trace(t) => write_message(&mut out, TRACE, t.to_json().to_string().as_bytes()),
        };
        ok = r.is_ok();
    }
    let end = json!({
        "taken": session.taken.load(std::sync::atomic::Ordering::Relaxed),
        "lost": session.lost.load(std::sync::atomic::Ordering::Relaxed),
    });
    if ok {
        let _ = write_message(&mut out, END, end.to_string().as_bytes());
        let _ = out.flush();
    }
    tracing::info!(trace, figures = %end, "a capture client detached");
}

/// Waits up to `wait` for the client to say anything or hang up; true
/// when it did (a client stops its capture by closing its side).
fn client_gone(conn: &UnixStream, wait: Duration) -> bool {
    // (poll(2) reports a hang-up whatever events are asked for.)
    crate::io::wait_readable(&[conn.as_raw_fd()], wait.as_millis() as i32).unwrap_or(true)
}
