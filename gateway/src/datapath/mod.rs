//! The packet logic, sans-IO: functions over byte buffers that return a
//! verdict. Nothing here makes a syscall or reads a clock (the time, in
//! coarse seconds, is passed in), so all of it is unit-tested, fuzzed and
//! micro-benchmarked without root.

pub mod decap;
pub mod drop_reason;
pub mod encap;
pub mod flow;
pub mod next_hop;
pub mod offload;
pub mod ratelimit;
pub mod reasm;
pub mod tunnel;
