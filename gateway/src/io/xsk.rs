//! One AF_XDP socket with its own UMEM (xsk-rs underneath), and the frame
//! ownership discipline around it.
//!
//! A UMEM frame has exactly one owner at a time: the fill ring, the RX ring,
//! the worker (as a [`Frame`] value), an in-flight io_uring write (held by
//! [`super::uring::DeviceWriter`]), the TX ring or the completion ring.
//! [`Frame`] is deliberately neither `Copy` nor `Clone`: handing it on moves
//! it, so a frame cannot be in two places. Each frame also carries the
//! identity of its UMEM ([`UmemId`]), checked wherever frames change hands
//! (fill and TX rings, data access, io_uring writes): a frame of one
//! worker's UMEM can never reach another socket's rings, nor be read as
//! another UMEM's memory.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Size of one UMEM frame; the kernel requires a power of two.
pub const FRAME_SIZE: u32 = 4096;

/// Which UMEM a frame belongs to: every socket's UMEM gets its own number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemId(u32);

static NEXT_UMEM: AtomicU32 = AtomicU32::new(1);

/// A UMEM frame owned by the worker, and the UMEM it is of. Created only
/// by the [`Xsk`] of that UMEM.
#[derive(Debug)]
pub struct Frame {
    desc: FrameDesc,
    umem: UmemId,
}

impl Frame {
    /// Offset of the packet data from the start of the UMEM.
    pub fn addr(&self) -> usize {
        self.desc.addr()
    }

    /// Bytes of packet data in the frame.
    pub fn len(&self) -> usize {
        self.desc.lengths().data()
    }

    /// The UMEM this frame is of.
    pub fn umem(&self) -> UmemId {
        self.umem
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("{iface} queue {queue}: cannot create the UMEM ({reason}); raise the locked-memory limit (ulimit -l) or lower frames_per_queue")]
    Umem {
        iface: String,
        queue: u32,
        reason: String,
    },
    #[error("{iface} queue {queue}: cannot bind an AF_XDP socket ({reason}); check that the queue exists (ethtool -l {iface}), that no other AF_XDP program holds it, and that the kernel has CONFIG_XDP_SOCKETS")]
    Socket {
        iface: String,
        queue: u32,
        reason: String,
    },
    #[error("invalid ring size {0}: use a power of two")]
    RingSize(u32),
    #[error("this kernel offers no AF_XDP sockets ({reason}); the gateway needs a kernel built with CONFIG_XDP_SOCKETS=y (Linux 5.4 or later)")]
    NoAfXdp { reason: String },
}

/// The kernel refused the socket family itself (built without
/// CONFIG_XDP_SOCKETS, or a seccomp policy forbids it).
fn no_af_xdp(reason: &str) -> bool {
    reason.contains(&std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT).to_string())
}

/// The memory the UMEM occupies, for registering it with io_uring, and
/// which UMEM it is (to check a frame against before touching its memory).
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub base: NonNull<u8>,
    pub len: usize,
    pub id: UmemId,
}

// SAFETY: `Region` only describes memory; access to the frames in it is
// governed by `Frame` ownership, not by who holds a `Region`.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: a shared `Region` gives access to nothing.
unsafe impl Sync for Region {}

/// Kernel-side counters of one AF_XDP socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct XskStats {
    /// Dropped by the kernel (for instance no room in the RX ring).
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_invalid_descs: u64,
    pub fill_ring_empty: u64,
}

/// An AF_XDP socket bound to one NIC queue, with its rings and UMEM.
pub struct Xsk {
    umem: Umem,
    fill: FillQueue,
    comp: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    region: Region,
    frames: u32,
    scratch: Vec<FrameDesc>,
}

/// A frame of another UMEM reached this socket: a bug in the gateway (never
/// caused by a packet). Stopping the worker is the only safe answer: the
/// frame would otherwise give the kernel, or this worker, memory that
/// another worker owns.
#[cold]
#[inline(never)]
fn foreign_frame(frame: &Frame, ours: UmemId, place: &str) -> ! {
    panic!(
        "a frame of UMEM {} was handed to UMEM {}'s {place}: frames never cross workers",
        frame.umem.0, ours.0
    )
}

impl Xsk {
    /// Creates the UMEM (`frames` frames) and binds a socket to `queue` of
    /// `iface`. Returns the socket and every frame, all owned by the caller.
    /// The XDP program is not touched: the caller puts [`Xsk::fd`] into its
    /// XSKMAP.
    pub fn new(
        iface: &str,
        queue: u32,
        frames: u32,
        ring_size: u32,
        bind: XskBind,
    ) -> Result<(Xsk, Vec<Frame>), XskError> {
        let qs = QueueSize::new(ring_size).map_err(|_| XskError::RingSize(ring_size))?;
        let umem_err = |reason: String| XskError::Umem {
            iface: iface.into(),
            queue,
            reason,
        };
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| umem_err(e.to_string()))?)
            .fill_queue_size(qs)
            .comp_queue_size(qs)
            .build()
            .map_err(|e| umem_err(e.to_string()))?;
        let count = NonZeroU32::new(frames).ok_or_else(|| umem_err("no frames".into()))?;
        let (umem, descs) = Umem::new(umem_config, count, false).map_err(|e| {
            let reason = error_chain(&e);
            if no_af_xdp(&reason) {
                XskError::NoAfXdp { reason }
            } else {
                umem_err(reason)
            }
        })?;

        let mut bind_flags = BindFlags::XDP_USE_NEED_WAKEUP;
        match bind {
            XskBind::Auto => {}
            XskBind::Copy => bind_flags |= BindFlags::XDP_COPY,
            XskBind::ZeroCopy => bind_flags |= BindFlags::XDP_ZEROCOPY,
        }
        let socket_config = SocketConfig::builder()
            .rx_queue_size(qs)
            .tx_queue_size(qs)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind_flags)
            .build();
        let name = std::ffi::CString::new(iface).map_err(|e| XskError::Socket {
            iface: iface.into(),
            queue,
            reason: e.to_string(),
        })?;
        // SAFETY: the UMEM is not shared with another socket, so the
        // shared-UMEM precondition of `Socket::new` does not apply; libxdp's
        // own program load is inhibited.
        let (tx, rx, rings) =
            unsafe { Socket::new(socket_config, &umem, &Interface::new(name), queue) }.map_err(
                |e| {
                    let reason = error_chain(&e);
                    if no_af_xdp(&reason) {
                        XskError::NoAfXdp { reason }
                    } else {
                        XskError::Socket {
                            iface: iface.into(),
                            queue,
                            reason,
                        }
                    }
                },
            )?;
        let (fill, comp) = rings.ok_or_else(|| XskError::Socket {
            iface: iface.into(),
            queue,
            reason: "no fill/completion rings returned".into(),
        })?;

        // The UMEM is one mapping; a frame's `addr` is its offset from the
        // start. Recover the start from the first frame.
        // SAFETY: `descs[0]` is a frame of this UMEM and no ring holds it yet.
        let first = unsafe { umem.data(&descs[0]) }.contents().as_ptr();
        let base = first.wrapping_sub(descs[0].addr()) as *mut u8;
        let id = UmemId(NEXT_UMEM.fetch_add(1, Ordering::Relaxed));
        let region = Region {
            base: NonNull::new(base).ok_or_else(|| umem_err("null mapping".into()))?,
            len: frames as usize * FRAME_SIZE as usize,
            id,
        };
        let owned = descs
            .into_iter()
            .map(|desc| Frame { desc, umem: id })
            .collect();
        Ok((
            Xsk {
                umem,
                fill,
                comp,
                tx,
                rx,
                region,
                frames,
                scratch: vec![FrameDesc::default(); 256],
            },
            owned,
        ))
    }

    /// The socket's file descriptor, for the XSKMAP.
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    pub fn umem(&self) -> &Umem {
        &self.umem
    }

    pub fn region(&self) -> Region {
        self.region
    }

    /// Frames in the UMEM.
    pub fn frame_count(&self) -> u32 {
        self.frames
    }

    /// Moves up to `max` received frames from the RX ring into `out`.
    /// Returns how many.
    #[inline]
    pub fn receive(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let max = max.min(self.scratch.len());
        // SAFETY: the RX ring only hands out frames of this socket's UMEM,
        // which the scratch descriptors then describe.
        let n = unsafe { self.rx.consume(&mut self.scratch[..max]) };
        let umem = self.region.id;
        out.extend(self.scratch[..n].iter().map(|d| Frame { desc: *d, umem }));
        n
    }

    /// Panics unless `frame` is of this socket's UMEM (see [`foreign_frame`]).
    #[inline]
    fn check(&self, frame: &Frame, place: &str) {
        if frame.umem != self.region.id {
            foreign_frame(frame, self.region.id, place);
        }
    }

    /// Copies the descriptors of `frames` into the scratch space, checking
    /// that each is of this UMEM.
    #[inline]
    fn descs(&mut self, frames: &[Frame], place: &str) -> usize {
        let n = frames.len().min(self.scratch.len());
        for (d, f) in self.scratch.iter_mut().zip(&frames[..n]) {
            if f.umem != self.region.id {
                foreign_frame(f, self.region.id, place);
            }
            *d = f.desc;
        }
        n
    }

    /// Hands frames from the end of `frames` to the fill ring, as many as it
    /// has room for but leaving `keep` in `frames`. Returns how many moved.
    #[inline]
    pub fn fill(&mut self, frames: &mut Vec<Frame>, keep: usize) -> usize {
        if frames.len() <= keep {
            return 0;
        }
        let mut moved = 0;
        // In chunks of the scratch space's size.
        while frames.len() > keep {
            let room = self.fill.nb_free((frames.len() - keep) as u32) as usize;
            let n = room.min(frames.len() - keep);
            if n == 0 {
                break;
            }
            let start = frames.len() - n.min(self.scratch.len());
            let n = self.descs(&frames[start..], "fill ring");
            // SAFETY: the frames belong to this UMEM (checked by `descs`) and
            // are owned by the caller (in no ring); after this call the fill
            // ring owns them, and they are removed from `frames` below so
            // they cannot be used again.
            let produced = unsafe { self.fill.produce(&self.scratch[..n]) };
            // The ring took the first `produced` of those (xsk_ring_prod__
            // reserve takes all or none, but nothing here relies on it).
            frames.drain(start..start + produced);
            moved += produced;
            if produced < n {
                break;
            }
        }
        moved
    }

    /// Kicks the kernel when it has asked to be told about new fill-ring
    /// entries (the need-wakeup protocol).
    #[inline]
    pub fn wake_fill_if_needed(&mut self) -> io::Result<()> {
        if self.fill.needs_wakeup() {
            self.fill.wakeup(self.rx.fd_mut(), 0)?;
        }
        Ok(())
    }

    /// Lets this socket's busy polling run the NIC queue's NAPI context
    /// (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL` of 20 µs, `SO_BUSY_POLL_BUDGET`
    /// packets per poll); the worker then drives it with
    /// [`Xsk::busy_poll`] when its RX ring is empty. Drivers without NAPI
    /// busy polling ignore it.
    pub fn set_busy_poll(&self, budget: u16) -> io::Result<()> {
        for (opt, val) in [
            (libc::SO_PREFER_BUSY_POLL, 1),
            (libc::SO_BUSY_POLL, 20),
            (libc::SO_BUSY_POLL_BUDGET, libc::c_int::from(budget)),
        ] {
            // SAFETY: setsockopt reads one c_int from `val`, which lives
            // across the call; the fd is this socket's.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&val as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// One busy poll of the NIC queue by the kernel (a non-blocking
    /// `recvfrom` on the socket).
    #[inline]
    pub fn busy_poll(&self) {
        // SAFETY: recvfrom with no buffer and MSG_DONTWAIT on this socket's
        // fd; AF_XDP copies nothing, it only polls.
        unsafe {
            libc::recvfrom(
                self.fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    /// The packet bytes of a frame, to read and rewrite in place.
    #[inline]
    pub fn data_mut<'a>(&'a self, frame: &'a mut Frame) -> &'a mut [u8] {
        self.check(frame, "data");
        // SAFETY: `frame` is of this UMEM (checked) and owned by the caller,
        // so neither the kernel nor anyone else accesses it meanwhile; the
        // returned slice borrows the frame, so it cannot be handed on while
        // the slice lives.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        let slice = data.contents_mut();
        let (ptr, len) = (slice.as_mut_ptr(), slice.len());
        // SAFETY: same memory as `slice`, with the lifetime of the borrow of
        // `frame` and `self` rather than of the temporary `DataMut`.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// The whole packet-data area of a frame (to its end), with the frame's
    /// length set to all of it; set the real length with [`Xsk::set_len`].
    #[inline]
    pub fn buffer_mut<'a>(&'a self, frame: &'a mut Frame) -> &'a mut [u8] {
        self.check(frame, "data");
        // SAFETY: as in `data_mut`: a frame of this UMEM, owned by the caller.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        let mut cursor = data.cursor();
        let cap = cursor.buf_len();
        cursor.set_pos(cap);
        let slice = data.contents_mut();
        let (ptr, len) = (slice.as_mut_ptr(), slice.len());
        // SAFETY: same memory as `slice`, borrowed for as long as `frame`.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Sets the number of packet bytes in a frame (capped at its capacity).
    #[inline]
    pub fn set_len(&self, frame: &mut Frame, len: usize) {
        self.check(frame, "data");
        // SAFETY: as in `data_mut`: a frame of this UMEM, owned by the caller.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        data.cursor().set_pos(len);
    }

    /// Hands frames from the front of `frames` to the TX ring, as many as it
    /// has room for, and kicks the kernel when it asks for it (copy mode
    /// always does). Returns how many moved; the rest stay in `frames`.
    #[inline]
    pub fn transmit(&mut self, frames: &mut Vec<Frame>, outstanding: u64) -> io::Result<usize> {
        let mut produced = 0;
        // In chunks of the scratch space's size.
        while !frames.is_empty() {
            let room = self.tx.nb_free(frames.len() as u32) as usize;
            let n = room.min(frames.len());
            if n == 0 {
                break;
            }
            let n = self.descs(&frames[..n], "TX ring");
            // SAFETY: the frames belong to this UMEM (checked by `descs`)
            // and are owned by the caller; the TX ring owns them from here
            // until the completion ring returns them, and they leave
            // `frames` below.
            let p = unsafe { self.tx.produce(&self.scratch[..n]) };
            frames.drain(..p);
            produced += p;
            if p < n {
                break;
            }
        }
        // Kick whenever the ring holds frames not yet sent, new or not: in
        // copy mode each kick sends only a budget of them (32), so frames
        // left over from a burst would otherwise wait for the next packet
        // to go out, which may never come.
        if (produced > 0 || outstanding > 0) && self.tx.needs_wakeup() {
            self.tx.wakeup()?;
        }
        Ok(produced)
    }

    /// Takes frames the kernel has finished sending back from the
    /// completion ring.
    #[inline]
    pub fn complete(&mut self, out: &mut Vec<Frame>) -> usize {
        let max = self.scratch.len();
        // SAFETY: the completion ring only returns frames of this UMEM.
        let n = unsafe { self.comp.consume(&mut self.scratch[..max]) };
        let umem = self.region.id;
        out.extend(self.scratch[..n].iter().map(|d| Frame { desc: *d, umem }));
        n
    }

    pub fn stats(&self) -> io::Result<XskStats> {
        let s = self.rx.fd().xdp_statistics()?;
        Ok(XskStats {
            rx_dropped: s.rx_dropped(),
            rx_ring_full: s.rx_ring_full(),
            rx_invalid_descs: s.rx_invalid_descs(),
            fill_ring_empty: s.rx_fill_ring_empty_descs(),
        })
    }

    /// Index of the frame a [`Frame`] lives in, `0..frame_count()`.
    #[inline]
    pub fn frame_index(frame: &Frame) -> usize {
        frame.addr() / FRAME_SIZE as usize
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How AF_XDP sockets are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskBind {
    /// Let the kernel pick (zero-copy where the driver has it).
    Auto,
    Copy,
    ZeroCopy,
}

impl std::fmt::Display for XskBind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XskBind::Auto => "auto",
            XskBind::Copy => "copy",
            XskBind::ZeroCopy => "zerocopy",
        })
    }
}
