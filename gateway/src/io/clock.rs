//! A coarse clock for timeouts on the packet path (a learned path MTU
//! expires after ten minutes): whole seconds since the process started,
//! advanced by the control thread, read with one relaxed load. Workers
//! never read the system clock per packet.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static NOW: AtomicU32 = AtomicU32::new(0);
static START: OnceLock<Instant> = OnceLock::new();

/// Seconds since start, as of the last [`tick`].
#[inline]
pub fn now() -> u32 {
    NOW.load(Ordering::Relaxed)
}

/// Advances the clock; the control thread calls it several times a second.
pub fn tick() {
    let start = START.get_or_init(Instant::now);
    NOW.store(start.elapsed().as_secs() as u32, Ordering::Relaxed);
}
