//! A tunnel's path MTU as the underlay reported it (ICMP), shared by the
//! workers: lowered only, until it expires.

use std::sync::atomic::{AtomicU64, Ordering};

/// A path MTU learned from an ICMP error, and until when it holds (the
/// kernel's `mtu_expires`: ten minutes), in one atomic: the expiry in
/// [`crate::io::clock`] seconds above, the MTU below, and between them
/// whether it is locked (bit 16): a router reported less than the
/// kernel's `min_pmtu`, which the kernel then takes instead and locks
/// (`__ip_rt_update_pmtu`), and a locked path gets its tunnel packets
/// without DF (`iptunnel_xmit`: `ip_mtu_locked`), so that the router
/// fragments them.
#[derive(Debug, Default)]
pub struct PathMtu(AtomicU64);

/// The locked bit of [`PathMtu`]'s state.
const LOCKED: u64 = 1 << 16;

/// How long a learned path MTU holds, as the kernel's
/// `net.ipv4.route.mtu_expires`.
pub const PATH_MTU_EXPIRES: u32 = 600;

impl PathMtu {
    /// The path MTU, if one was learned and has not expired by `now`.
    #[inline]
    pub fn get(&self, now: u32) -> Option<u16> {
        self.get_locked(now).map(|(mtu, _)| mtu)
    }

    /// The path MTU and whether it is locked, if one was learned and has
    /// not expired by `now`.
    #[inline]
    pub fn get_locked(&self, now: u32) -> Option<(u16, bool)> {
        let v = self.0.load(Ordering::Relaxed);
        let (until, mtu) = ((v >> 32) as u32, v as u16);
        (mtu != 0 && until > now).then_some((mtu, v & LOCKED != 0))
    }

    /// Takes `mtu` (not locked) when it is lower than the one in force (or
    /// none is); see [`PathMtu::lower_locked`].
    pub fn lower(&self, mtu: u16, now: u32) -> bool {
        self.lower_locked(mtu, false, now)
    }

    /// Takes `mtu` when it is lower than the one in force (or none is), or
    /// when it is the same and now locked.
    /// Workers race here: each step is a compare-and-swap from the state it
    /// saw ([`PathMtu::lower_from`]), so a higher MTU never overwrites a
    /// lower one that another worker stored in between.
    pub fn lower_locked(&self, mtu: u16, locked: bool, now: u32) -> bool {
        let mut seen = self.0.load(Ordering::Relaxed);
        loop {
            match self.lower_from(seen, mtu, locked, now) {
                Ok(lowered) => return lowered,
                Err(current) => seen = current,
            }
        }
    }

    /// One step of [`PathMtu::lower`] from state `seen`: `Ok(true)` when
    /// `mtu` was taken, `Ok(false)` when the one in `seen` is no higher,
    /// `Err(current)` when the state is no longer `seen` (another worker
    /// changed it): look again.
    fn lower_from(&self, seen: u64, mtu: u16, locked: bool, now: u32) -> Result<bool, u64> {
        let (until, old) = ((seen >> 32) as u32, seen as u16);
        let old_locked = seen & LOCKED != 0;
        if old != 0 && until > now && (old < mtu || (old == mtu && (old_locked || !locked))) {
            return Ok(false);
        }
        let new = u64::from(now.saturating_add(PATH_MTU_EXPIRES)) << 32
            | u64::from(mtu)
            | if locked { LOCKED } else { 0 };
        self.0
            .compare_exchange(seen, new, Ordering::Relaxed, Ordering::Relaxed)
            .map(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_saw_an_older_path_mtu_never_raises_it() {
        // Worker A sees 1400 in force and means to lower it to 1350;
        // meanwhile worker B lowers it to 1300. A's step from what it saw
        // must fail (the state changed), and A, looking again, leaves 1300.
        // (A load, a compare and a store would have put 1350 over 1300.)
        let p = PathMtu::default();
        assert!(p.lower(1400, 0));
        let seen_by_a = p.0.load(Ordering::Relaxed);
        assert!(p.lower(1300, 0), "B");
        assert!(
            p.lower_from(seen_by_a, 1350, false, 0).is_err(),
            "A's stale step taken"
        );
        assert!(!p.lower(1350, 0), "A, looking again");
        assert_eq!(p.get(0), Some(1300));
    }

    #[test]
    fn a_path_mtu_is_only_ever_lowered_whatever_the_order() {
        let p = PathMtu::default();
        assert!(p.lower(1400, 0));
        assert!(!p.lower(1450, 0), "raised");
        assert!(p.lower(1300, 0));
        assert_eq!(p.get(0), Some(1300));
        // Expired: any value is taken again.
        assert!(p.lower(1450, PATH_MTU_EXPIRES));
        assert_eq!(p.get(PATH_MTU_EXPIRES), Some(1450));
    }
}
