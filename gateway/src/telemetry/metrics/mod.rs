//! What the gateway shows of itself while it runs: Prometheus text on
//! `--metrics ADDR` (`GET /metrics`), and a control socket that `gateway
//! stats` reads. Both ask the control thread for a snapshot over a channel;
//! the snapshot (see [`crate::telemetry::snapshot::snapshot`]) is the one source of every
//! figure, so the JSON, the summary and the metrics always agree.
//!
//! The Prometheus text is rendered in `prometheus`, served over HTTP in
//! `http`; the control socket and `gateway stats` are in `control_socket`;
//! what both servers do alike for their clients (a thread each, up to a
//! limit, and timeouts) is in `clients`.

use std::sync::mpsc::Sender;

mod clients;
mod control_socket;
mod http;
mod prometheus;
#[cfg(test)]
mod tests;

pub use clients::CLIENT_TIMEOUT;
pub use control_socket::{control_name, drain, query, serve_control, Audience, DrainEnd};
pub use http::serve_http;
pub use prometheus::prometheus;

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
    /// `/healthz` (`ready` false: alive?) or `/readyz` (ready for
    /// traffic?): the verdict and every check, as text.
    Health {
        ready: bool,
        reply: Sender<(bool, String)>,
    },
    /// Withdraw the shared addresses and stop once traffic has moved
    /// (`gateway drain`): each step told to `audience`, the last once the
    /// gateway has stopped.
    Drain { audience: Audience },
}
