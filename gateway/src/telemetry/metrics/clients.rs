//! What the HTTP endpoint and the control socket do alike for a client: a
//! thread of its own, up to a limit past which it is turned away, and a
//! deadline to send its request and another to take the answer.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Format, Request};

/// How long a client of `/metrics` or of the control socket has to send
/// its request, and then to take the answer: a client that stalls is let
/// go after this, unanswered or with part of the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Clients answered at once, each on a thread of its own. Past this many a
/// new client is turned away at once (its connection closed; `gateway
/// stats` then says the gateway is busy): a crowd of stalled clients costs
/// at most this many threads, each for [`CLIENT_TIMEOUT`] twice and the
/// gateway's answer, and never holds the accepting thread.
pub(super) const CLIENT_THREADS: usize = 32;

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
pub(super) trait Client: Read + Write + Send + 'static {
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
pub(super) fn serve_clients<C: Client>(
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
pub(super) fn turn_away<C: Client>(mut conn: C, notice: &[u8]) {
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
pub(super) fn read_request<C: Client>(
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
pub(super) fn write_by<C: Client>(
    conn: &mut C,
    mut bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
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

/// Asks the control thread for `/healthz` (`ready` false) or `/readyz`.
pub(super) fn ask_health(requests: &Sender<Request>, ready: bool) -> Option<(bool, String)> {
    let (tx, rx) = channel();
    requests.send(Request::Health { ready, reply: tx }).ok()?;
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

pub(super) fn ask(requests: &Sender<Request>, format: Format) -> Option<String> {
    let (tx, rx) = channel();
    requests.send(Request::Stats { format, reply: tx }).ok()?;
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}
