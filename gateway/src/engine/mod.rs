//! The worker: the loop that takes frames from the AF_XDP socket through
//! the datapath into the devices and back, and what it needs around it:
//! the hand-over of device writes between workers and the frame ledger.

pub mod handover;
pub mod ports;
pub mod worker;
