//! `gateway capture` and `gateway trace`: copies of the packets the fast
//! path handles, taken at five points, and the path of single packets
//! stage by stage, while the gateway runs.
//!
//! A client asks over the control socket ([`serve`]); the request becomes
//! a [`Session`] attached to the [`Taps`] every worker holds. A worker
//! looks at the taps once per loop iteration (one relaxed load); with no
//! session attached, that is all a capture costs. With one, the worker
//! runs the session's libpcap filter ([`filter`]) over the packet at each
//! point the session wants, copies what matches into the session's
//! bounded queue, and moves on: a full queue (a reader slower than the
//! traffic) loses the copy, counted, never the packet. The thread serving
//! the client drains the queue onto the socket ([`stream`]); the client
//! writes pcapng or prints traces ([`client`]).
//!
//! The points:
//! - `wire-in`: a frame the XDP program steered to the gateway, as
//!   received (Ethernet);
//! - `device-out`: a decapsulated packet written into its tunnel's device
//!   (before coalescing), or an answer into the device (ARP, ICMP);
//! - `device-in`: a packet read from a tunnel's device (a GSO packet
//!   whole);
//! - `wire-out`: an encapsulated frame put on the TX ring (keepalives
//!   too);
//! - `drop`: a packet dropped, with its reason: a received frame as it
//!   came, or a packet read from a device.

mod client;
mod filter;
mod serve;
mod session;
mod stream;
mod tap;
mod trace;

pub use client::{capture, trace, CaptureArgs, TraceArgs};
pub use serve::serve_client;
pub use session::{Kind, Session, Taps};
pub use tap::Tap;
pub use trace::TraceBuf;

/// Where in the data path a copy is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Point {
    WireIn = 0,
    DeviceOut = 1,
    DeviceIn = 2,
    WireOut = 3,
    Drop = 4,
}

impl Point {
    pub const ALL: [Point; 5] = [
        Point::WireIn,
        Point::DeviceOut,
        Point::DeviceIn,
        Point::WireOut,
        Point::Drop,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Point::WireIn => "wire-in",
            Point::DeviceOut => "device-out",
            Point::DeviceIn => "device-in",
            Point::WireOut => "wire-out",
            Point::Drop => "drop",
        }
    }

    pub fn from_name(s: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == s)
    }

    pub fn from_u8(v: u8) -> Option<Point> {
        Point::ALL.get(usize::from(v)).copied()
    }

    /// This point's bit in a set of points.
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// What the point shows, for the capture file's interface description.
    pub const fn description(self) -> &'static str {
        match self {
            Point::WireIn => "frames the XDP program steered to the gateway, as received",
            Point::DeviceOut => "decapsulated packets written into the tunnel devices",
            Point::DeviceIn => "packets read from the tunnel devices",
            Point::WireOut => "encapsulated frames put on the TX ring",
            Point::Drop => "packets dropped, with the reason",
        }
    }

    /// The direction in the pcapng packet flags: 1 received (by the
    /// gateway, from the wire or a device), 2 sent, 0 for drops.
    pub const fn direction(self) -> u32 {
        match self {
            Point::WireIn | Point::DeviceIn => 1,
            Point::DeviceOut | Point::WireOut => 2,
            Point::Drop => 0,
        }
    }
}

/// What a copied packet starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Link {
    /// An Ethernet header (the wire, tap devices).
    Ethernet = 0,
    /// An IP header (tun devices).
    Raw = 1,
}

impl Link {
    pub fn of(kind: crate::datapath::tunnel::DeviceKind) -> Link {
        match kind {
            crate::datapath::tunnel::DeviceKind::Tap => Link::Ethernet,
            crate::datapath::tunnel::DeviceKind::Tun => Link::Raw,
        }
    }
}

/// A packet copied at a point.
#[derive(Debug)]
pub struct Record {
    pub point: Point,
    pub link: Link,
    /// The NIC queue (worker) that handled it.
    pub queue: u16,
    pub tunnel: Option<std::sync::Arc<str>>,
    pub reason: Option<crate::datapath::drop_reason::DropReason>,
    /// Since the Unix epoch.
    pub time: std::time::Duration,
    /// The packet's length; `data` may be shorter (the snap length).
    pub len: u32,
    pub data: Vec<u8>,
}

/// What a session's queue holds.
#[derive(Debug)]
pub enum Item {
    Packet(Record),
    Trace(trace::Trace),
}
