//! Opening queues of tap/tun devices through `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::tunnel::DeviceKind;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
// _IOW('T', 202, int) and _IOW('T', 203, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

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
}

/// Opens one queue of the multi-queue tap or tun device `name`, creating
/// the device if it does not exist. Packets written to the returned file
/// are received by the kernel from the device; what the kernel sends to the
/// device is read from it. The device disappears when its last queue closes
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
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_NO_PI
            | IFF_MULTI_QUEUE
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
