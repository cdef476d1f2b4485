//! Any bytes as a run of received outer fragments (each prefixed by its
//! length): reassembly must hold, complete or drop each, never panic, and
//! never hold more than its bounds or lose count of what it holds.
#![no_main]

use std::cell::RefCell;

use gateway::reasm::{Outcome, Reassembler, MAX_DATAGRAMS};
use libfuzzer_sys::fuzz_target;

thread_local! {
    // Allocated once, as in a worker; cleared for each input.
    static R: RefCell<Reassembler> = RefCell::new(Reassembler::new());
}

fuzz_target!(|data: &[u8]| {
    R.with(|r| run(&mut r.borrow_mut(), data));
});

fn run(r: &mut Reassembler, data: &[u8]) {
    r.clear();
    let mut held: u64 = 0;
    let mut out = vec![0u8; 4096];
    let mut rest = data;
    let mut now = 0u32;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n) * 8;
        let (frame, tail) = tail.split_at(n.min(tail.len()));
        rest = tail;
        match r.add(frame, now) {
            Outcome::Held => held += 1,
            Outcome::Dropped { also, .. } => held -= u64::from(also),
            Outcome::Complete { merged } => {
                held -= u64::from(merged);
                if let Some(len) = r.take(&mut out) {
                    assert!(len <= out.len());
                }
            }
        }
        assert_eq!(r.pending(), held);
        assert!(r.pending() <= (MAX_DATAGRAMS * 64) as u64);
        now += 1;
        held -= u64::from(r.expire(now));
    }
}
