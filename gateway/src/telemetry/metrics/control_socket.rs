//! The control socket (abstract unix, one per interface and network
//! namespace) that answers `gateway stats` and `gateway reload`, and
//! [`query`], the client side of both.

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use super::clients::{ask, read_request, serve_clients, write_by, CLIENT_TIMEOUT};
use super::{Format, Request};
use crate::telemetry::capture::Taps;
use std::sync::Arc;

/// The control socket's name: abstract, so each network namespace has its
/// own and nothing is left in the file system.
pub fn control_name(iface: &str) -> String {
    format!("gateway-{iface}")
}

/// Answers `gateway stats` on the abstract unix socket for `iface`. A
/// client writes one word (`human`, `json` or `prometheus`) and reads the
/// answer until the socket closes.
pub fn serve_control(
    iface: &str,
    requests: Sender<Request>,
    taps: Arc<Taps>,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| {
        anyhow::anyhow!("control socket @{}: {e}; is another gateway running on {iface} in this network namespace?", control_name(iface))
    })?;
    serve_control_on(listener, requests, taps)?;
    Ok(())
}

/// Answers control clients of `listener`, each with [`CLIENT_TIMEOUT`] to
/// send its word and again to take the answer, so that a client that
/// connects and says nothing (anyone in the network namespace can) or
/// never reads holds up no one for long: up to [`CLIENT_THREADS`] are
/// answered at once, and past that a client is turned away.
///
/// [`CLIENT_THREADS`]: super::clients::CLIENT_THREADS
pub(super) fn serve_control_on(
    listener: UnixListener,
    requests: Sender<Request>,
    taps: Arc<Taps>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("gw-control".into())
        .spawn(move || {
            serve_clients(
                "gw-control",
                || listener.accept().map(|(c, _)| c),
                move |c| answer_control(c, &requests, &taps),
                BUSY.as_bytes(),
            )
        })?;
    Ok(())
}

/// The longest request: a capture's, with its filter expression.
const MAX_REQUEST: usize = 8192;

/// Whether `b` is a whole request: a word, or a capture or trace request
/// (the word, a space and a JSON line).
fn request_complete(b: &[u8]) -> bool {
    let long = b.starts_with(b"capture") || b.starts_with(b"trace");
    !long || b.ends_with(b"\n")
}

fn answer_control(mut conn: UnixStream, requests: &Sender<Request>, taps: &Taps) {
    let mut word = vec![0u8; MAX_REQUEST];
    // The word is what the first read brings (or nothing, when the client
    // closes its side at once: the human summary); a capture or trace
    // request runs to its newline.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let Some(n) = read_request(&mut conn, &mut word, deadline, request_complete) else {
        return;
    };
    let word = &word[..n];
    for (w, trace) in [(&b"capture "[..], false), (&b"trace "[..], true)] {
        if let Some(ask) = word.strip_prefix(w) {
            // Packets are the users' traffic: only root or the gateway's
            // own user may see them.
            let allowed = may_reload(&conn);
            // Runs while the client reads: the session is its own.
            let _ = conn.set_read_timeout(None);
            crate::telemetry::capture::serve_client(conn, trace, ask, taps, allowed);
            return;
        }
    }
    if std::str::from_utf8(word).unwrap_or("").trim() == "drain" {
        answer_drain(conn, requests);
        return;
    }
    let format = match std::str::from_utf8(word).unwrap_or("").trim() {
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

/// `gateway drain`: the request goes to the control thread with the
/// connection.
fn answer_drain(mut conn: UnixStream, requests: &Sender<Request>) {
    if !may_reload(&conn) {
        let _ = write_by(
            &mut conn,
            b"error: drain refused: only root or the gateway's own user may ask for one\n",
            Instant::now() + CLIENT_TIMEOUT,
        );
        return;
    }
    // The control thread keeps the connection and says each step on it,
    // the last after the gateway has stopped, just before it exits.
    let _ = requests.send(Request::Drain {
        audience: Audience(Some(conn)),
    });
}

/// Whoever asked for a drain: told each step as it happens.
pub struct Audience(Option<UnixStream>);

impl Audience {
    /// Says `line`, waiting at most a second for a client that does not
    /// read; one that is gone or stalls is told nothing more.
    pub fn say(&mut self, line: &str) {
        if let Some(c) = &mut self.0 {
            if write_by(c, line.as_bytes(), Instant::now() + Duration::from_secs(1)).is_err() {
                self.0 = None;
            }
        }
    }
}

/// How a drain ended, as the gateway said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Traffic moved, and the gateway stopped.
    Drained,
    /// The gateway stopped at `drain_timeout`, traffic still arriving.
    TimedOut,
    /// The connection closed before the gateway said it had stopped.
    Unfinished,
}

/// `gateway drain`: asks the gateway running on `iface` to drain, and
/// writes what it says to `out` as it says it, until it has stopped.
pub fn drain(iface: &str, out: &mut dyn Write) -> anyhow::Result<DrainEnd> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!("no gateway answers for {iface} in this network namespace ({e}); is it running (gateway --iface {iface})?")
    })?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    s.write_all(b"drain")?;
    s.shutdown(std::net::Shutdown::Write)?;
    // As long as the drain takes: the gateway closes when it has stopped
    // (or the kernel does, when it dies).
    let mut said = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        said.push_str(&text);
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    if said.is_empty() {
        anyhow::bail!(
            "the gateway on {iface} closed the connection unanswered; it may be stopping"
        );
    }
    if let Some(e) = said.strip_prefix("error: ") {
        anyhow::bail!("{}", e.trim_end());
    }
    if let Some((_, e)) = said.split_once("\nerror: ") {
        anyhow::bail!("{}", e.trim_end());
    }
    Ok(if !said.contains("\nstopped") {
        DrainEnd::Unfinished
    } else if said.contains("drain timed out") {
        DrainEnd::TimedOut
    } else {
        DrainEnd::Drained
    })
}

/// What a control client is told when [`CLIENT_THREADS`] others are being
/// answered.
///
/// [`CLIENT_THREADS`]: super::clients::CLIENT_THREADS
pub(super) const BUSY: &str =
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
