//! A budget of events per second on the packet path (ICMP errors the
//! gateway sends, path MTU updates it takes), sans-IO: the time, in the
//! coarse seconds of [`crate::io::clock`], is passed in. One per worker, so no
//! atomics: a gateway with `n` workers allows `n` times the rate.

/// At most `per_second` events in each second.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    second: u32,
    used: u32,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            second: 0,
            used: 0,
        }
    }

    /// Takes one event from the budget of second `now`; false when it is
    /// spent.
    pub fn allow(&mut self, now: u32) -> bool {
        if now != self.second {
            self.second = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_per_second() {
        let mut r = RateLimit::new(3);
        assert_eq!((0..5).filter(|_| r.allow(7)).count(), 3);
        assert!(r.allow(8), "a new second, a new budget");
        assert_eq!((0..5).filter(|_| r.allow(8)).count(), 2);
    }
}
