//! The modules that own a kernel interface, and with it all of the crate's
//! `unsafe`: tap/tun ioctls, the AF_XDP UMEM and rings, io_uring submission.
//! Each `unsafe` block names the invariant it relies on.
#![allow(unsafe_code)]

pub mod tap;
pub mod uring;
pub mod xsk;
