//! The outer destination MAC of each tunnel, and the underlay's own: one
//! atomic slot per tunnel that the control thread's resolver (see
//! [`crate::control::neighbour`]) writes and the workers read per packet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const VALID: u64 = 1 << 63;

/// Next-hop MACs, one slot per tunnel.
pub struct NextHops {
    slots: Vec<AtomicU64>,
    /// The underlay interface's own MAC: the outer source.
    local: AtomicU64,
    wanted: AtomicBool,
}

fn pack(m: [u8; 6]) -> u64 {
    VALID | u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

fn unpack(v: u64) -> Option<[u8; 6]> {
    if v & VALID == 0 {
        return None;
    }
    let b = v.to_be_bytes();
    Some([b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl NextHops {
    pub fn new(tunnels: usize) -> NextHops {
        NextHops {
            slots: (0..tunnels).map(|_| AtomicU64::new(0)).collect(),
            local: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
        }
    }

    /// The underlay interface's MAC, once known.
    #[inline]
    pub fn local(&self) -> Option<[u8; 6]> {
        unpack(self.local.load(Ordering::Relaxed))
    }

    pub fn set_local(&self, mac: [u8; 6]) {
        self.local.store(pack(mac), Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self, tunnel: usize) -> Option<[u8; 6]> {
        // Relaxed: the MAC is one self-contained value; a worker seeing the
        // old one for a moment sends a packet or two to the old MAC, as the
        // kernel would while its own entry changes.
        unpack(self.slots[tunnel].load(Ordering::Relaxed))
    }

    pub fn set(&self, tunnel: usize, mac: Option<[u8; 6]>) {
        self.slots[tunnel].store(mac.map_or(0, pack), Ordering::Relaxed);
    }

    /// A worker had a packet for a tunnel without a next hop.
    #[inline]
    pub fn request(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    /// Whether a worker asked since the last call (for the resolver).
    pub fn take_request(&self) -> bool {
        self.wanted.swap(false, Ordering::Relaxed)
    }
}

/// A MAC address as people write it.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip() {
        let h = NextHops::new(2);
        assert_eq!(h.get(0), None);
        h.set(1, Some([0, 1, 2, 3, 4, 0xff]));
        assert_eq!(h.get(1), Some([0, 1, 2, 3, 4, 0xff]));
        h.set(1, Some([0; 6]));
        assert_eq!(h.get(1), Some([0; 6]));
        h.set(1, None);
        assert_eq!(h.get(1), None);
    }
}
