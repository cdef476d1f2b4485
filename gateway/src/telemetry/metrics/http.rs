//! `GET /metrics` over HTTP (`--metrics ADDR`), and `/healthz` and
//! `/readyz` (200 when all is well, 503 otherwise, with every check in the
//! body): one request per connection, parsed by httparse.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::time::Instant;

use super::clients::{ask, ask_health, read_request, serve_clients, write_by, CLIENT_TIMEOUT};
use super::{Format, Request};

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
///
/// [`on_a_thread`]: super::clients::on_a_thread
pub(super) fn serve_http_on(listener: TcpListener, requests: Sender<Request>) -> io::Result<()> {
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
            let stopping = || {
                (
                    503,
                    "Service Unavailable",
                    "gateway stopping\n".to_string(),
                    head_only,
                )
            };
            match path.as_str() {
                "/metrics" => match ask(requests, Format::Prometheus) {
                    Some(b) => (200, "OK", b, head_only),
                    None => stopping(),
                },
                "/healthz" | "/readyz" => match ask_health(requests, path == "/readyz") {
                    Some((true, b)) => (200, "OK", b, head_only),
                    Some((false, b)) => (503, "Service Unavailable", b, head_only),
                    None => stopping(),
                },
                _ => (
                    404,
                    "Not Found",
                    "try /metrics, /healthz or /readyz\n".into(),
                    head_only,
                ),
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
