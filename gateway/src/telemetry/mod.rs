//! What the gateway tells about itself: the counters workers publish, the
//! snapshot built from them, the Prometheus endpoint and control socket,
//! and stats for people.

pub mod capture;
pub mod human;
pub mod metrics;
pub mod snapshot;
pub mod stats;
