//! The modules that own a kernel interface, and with it all of the crate's
//! `unsafe`: tap/tun ioctls, the AF_XDP UMEM and rings, io_uring submission.
//! Each `unsafe` block names the invariant it relies on.
#![allow(unsafe_code)]

pub mod clock;
pub mod netlink;
pub mod tap;
pub mod uring;
pub mod xdp;
pub mod xsk;

/// Waits up to `timeout_ms` for `events` (`POLLIN`, `POLLOUT`) on `fd`;
/// returns what happened (`revents`, hang-ups and errors included; 0 on
/// a timeout or a signal).
pub fn poll_one(fd: std::os::fd::RawFd, events: i16, timeout_ms: i32) -> std::io::Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `p` is one live pollfd, the length given.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(p.revents)
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub fn wait_readable(fds: &[std::os::fd::RawFd], timeout_ms: i32) -> std::io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Whether the peer of a connected unix socket is root or runs as the
/// same user as this process (SO_PEERCRED).
pub fn peer_is_root_or_self(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live
    // ucred of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == 0 || cred.uid == me)
}

/// A non-blocking eventfd: one thread writes it to wake another that waits
/// in [`wait_readable`].
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    pub fn new() -> std::io::Result<EventFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(EventFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    /// Makes the fd readable (a failure can only be a full counter, which
    /// is readable already).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears it.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64.
        let _ = unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Raises this process's soft limit on open files (RLIMIT_NOFILE) to
/// `needed`, or to the hard limit when that is lower, when `needed` is
/// above the soft one (systemd and shells start processes at 1024, with a
/// far higher hard limit). Returns the limit in force afterwards.
pub fn raise_open_files(needed: u64) -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit the call fills.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r.rlim_cur >= needed || r.rlim_cur >= r.rlim_max {
        return Ok(r.rlim_cur);
    }
    // As far as needed, within the hard limit (which may be a million).
    let raised = libc::rlimit {
        rlim_cur: needed.min(r.rlim_max),
        rlim_max: r.rlim_max,
    };
    // SAFETY: `raised` is a live rlimit the call reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raised.rlim_cur)
}
