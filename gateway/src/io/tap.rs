//! Opening queues of tap/tun devices through `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::datapath::tunnel::DeviceKind;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
// _IOW('T', 202, int), _IOW('T', 203, int) and _IOW('T', 208, unsigned int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// The kernel may hand over packets with a partial checksum
/// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), completed by the gateway.
pub const TUN_F_CSUM: u32 = 0x01;
/// ... and TCP segmentation left to the gateway (TSO over IPv4, IPv6).
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// ... and UDP segmentation (USO, Linux 6.2 and later).
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a device queue could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun ({0}); load the tun module (modprobe tun), and run as root or give the gateway's user access to it (gateway/dist/60-gateway-tun.rules)")]
    Open(io::Error),
    #[error("device {name}: exists with other settings ({io}); it must be a {kind} created with multi_queue: `ip link del {name}`, or `ip tuntap add {name} mode {kind} multi_queue`")]
    Mismatch {
        name: String,
        kind: &'static str,
        io: io::Error,
    },
    #[error("device {name}: TUNSETIFF failed ({io}); run as root or with CAP_NET_ADMIN")]
    SetIff { name: String, io: io::Error },
    #[error("device {name}: TUNSETPERSIST failed ({io})")]
    Persist { name: String, io: io::Error },
    #[error("device {name}: TUNSETOFFLOAD failed ({io})")]
    Offload { name: String, io: io::Error },
}

/// Opens one queue of the multi-queue tap or tun device `name`, creating
/// the device if it does not exist. Packets written to the returned file
/// are received by the kernel from the device; what the kernel sends to the
/// device is read from it. Every packet either way is preceded by a
/// virtio-net header ([`crate::datapath::offload::VNET_HDR_LEN`] bytes, `IFF_VNET_HDR`),
/// which lets a write carry a GSO packet. The device disappears when its last queue closes
/// unless it was made persistent.
pub fn open_queue(name: &str, kind: DeviceKind) -> Result<OwnedFd, TapError> {
    // A device whose previous owner just exited can answer EBUSY while the
    // kernel releases that owner's io_uring-registered queues; give it a
    // moment.
    let mut tries = 0;
    loop {
        match open_queue_once(name, kind) {
            Err(TapError::Mismatch { io, .. })
                if io.raw_os_error() == Some(libc::EBUSY) && tries < 30 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn open_queue_once(name: &str, kind: DeviceKind) -> Result<OwnedFd, TapError> {
    open_with(name, kind, IFF_VNET_HDR | IFF_MULTI_QUEUE)
}

/// Opens the single-queue tun device `name` (creating it), no packet
/// header: a device that carries nothing, only addresses. A second opener
/// gets EBUSY.
pub fn open_single_tun(name: &str) -> Result<OwnedFd, TapError> {
    open_with(name, DeviceKind::Tun, 0)
}

fn open_with(name: &str, kind: DeviceKind, extra: libc::c_short) -> Result<OwnedFd, TapError> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_NO_PI
            | extra
            | match kind {
                DeviceKind::Tap => IFF_TAP,
                DeviceKind::Tun => IFF_TUN,
            },
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    // Config validation keeps names to 15 bytes; refuse anything longer
    // rather than truncate it.
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(TapError::SetIff {
            name: name.into(),
            io: io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        });
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`; `req` is a
    // live, correctly laid out `IfReq` of at least that size, and the fd is
    // an open /dev/net/tun file.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EBUSY) => TapError::Mismatch {
                name: name.into(),
                kind: match kind {
                    DeviceKind::Tap => "tap",
                    DeviceKind::Tun => "tun",
                },
                io: e,
            },
            _ => TapError::SetIff {
                name: name.into(),
                io: e,
            },
        });
    }
    Ok(file.into())
}

/// Tells the kernel which offloads the reader of the device handles
/// (`TUN_F_*`): with none, it hands over only whole, checksummed packets.
pub fn set_offload(fd: &OwnedFd, name: &str, flags: u32) -> Result<(), TapError> {
    let uso = flags & (TUN_F_USO4 | TUN_F_USO6);
    match set_offload_once(fd, name, flags) {
        // A kernel before 6.2 knows no USO: the rest alone, then.
        Err(_) if uso != 0 => {
            USO.store(false, std::sync::atomic::Ordering::Relaxed);
            set_offload_once(fd, name, flags & !uso)
        }
        other => other,
    }
}

/// False once a device refused USO: this kernel cannot take UDP GSO
/// packets, so received UDP is not coalesced either.
static USO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the kernel takes UDP segmentation offload (`GSO_UDP_L4`).
pub fn uso_supported() -> bool {
    USO.load(std::sync::atomic::Ordering::Relaxed)
}

fn set_offload_once(fd: &OwnedFd, name: &str, flags: u32) -> Result<(), TapError> {
    // SAFETY: TUNSETOFFLOAD takes an unsigned integer by value; the fd is a
    // tun/tap queue attached by `open_queue`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(TapError::Offload {
            name: name.into(),
            io: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Makes the device outlive its queues (or not).
pub fn set_persistent(fd: &OwnedFd, name: &str, persistent: bool) -> Result<(), TapError> {
    // SAFETY: TUNSETPERSIST takes an integer argument by value; the fd is a
    // tun/tap queue attached by `open_queue`.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETPERSIST,
            libc::c_ulong::from(persistent),
        )
    };
    if rc < 0 {
        return Err(TapError::Persist {
            name: name.into(),
            io: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What the devices may hand over: partial checksums, TCP segmentation
/// (IPv4, IPv6, with ECN) and UDP segmentation (IPv4, IPv6).
pub const DEVICE_OFFLOADS: u32 =
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6;
