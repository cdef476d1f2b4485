//! The read side: the provided-buffer ring whose buffers the multishot
//! reads of the device queues fill, and the reads themselves.

use super::*;

/// The provided-buffer ring and the buffers it hands to reads.
/// Its mappings are private to this module: the rest of the ring sees the
/// ring's address (to register it), takes buffers out and marks the pool
/// leaked, and nothing else.
pub(super) struct ReadPool {
    /// `entries` `io_uring_buf`s, page-aligned (mmap).
    ring: NonNull<types::BufRingEntry>,
    /// `entries` buffers of [`READ_BUF`] bytes (mmap).
    bufs: NonNull<u8>,
    entries: u16,
    tail: u16,
    /// Buffers in the ring (the rest are being read out by the worker).
    in_ring: usize,
    /// Left mapped at drop: the kernel may still write into them.
    leak: bool,
}

fn map(bytes: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("null mapping"))
}

impl ReadPool {
    /// The ring's address, to register it with io_uring.
    pub(super) fn ring_addr(&self) -> u64 {
        self.ring.as_ptr() as u64
    }

    /// A completion took a buffer out of the ring.
    pub(super) fn taken(&mut self) {
        self.in_ring -= 1;
    }

    /// The kernel may still write into the buffers: never unmap them.
    pub(super) fn leak(&mut self) {
        self.leak = true;
    }

    fn ring_bytes(entries: u16) -> usize {
        usize::from(entries) * std::mem::size_of::<types::BufRingEntry>()
    }

    pub(super) fn new(entries: u16) -> io::Result<ReadPool> {
        let ring: NonNull<types::BufRingEntry> = map(Self::ring_bytes(entries))?.cast();
        let bufs = match map(usize::from(entries) * READ_BUF) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: the mapping just made, not used by anyone.
                unsafe { libc::munmap(ring.as_ptr().cast(), Self::ring_bytes(entries)) };
                return Err(e);
            }
        };
        let mut pool = ReadPool {
            ring,
            bufs,
            entries,
            tail: 0,
            in_ring: 0,
            leak: false,
        };
        for bid in 0..entries {
            pool.add(bid);
        }
        pool.publish();
        Ok(pool)
    }

    /// Puts buffer `bid` in the ring (visible after [`ReadPool::publish`]).
    pub(super) fn add(&mut self, bid: u16) {
        let i = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `i` < entries, inside the ring mapping; the kernel only
        // reads entries before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.ring.as_ptr().add(i) };
        entry.set_addr(self.bufs.as_ptr() as u64 + (usize::from(bid) * READ_BUF) as u64);
        entry.set_len(READ_BUF as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Publishes the entries added since the last call.
    pub(super) fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, inside
        // the mapping; the kernel reads it, so it is written atomically with
        // release ordering after the entries.
        let tail = unsafe { &*types::BufRingEntry::tail(self.ring.as_ptr()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: the mappings made in `new`. No read can still write into
        // them: `DeviceIo::drop` drained the ring (every read cancelled and
        // its completion reaped) before its fields drop, and set `leak`
        // instead when it could not. (That drain is what keeps them alive;
        // the order of DeviceIo's fields is not relied on.)
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), Self::ring_bytes(self.entries));
            libc::munmap(
                self.bufs.as_ptr().cast(),
                usize::from(self.entries) * READ_BUF,
            );
        }
    }
}

impl DeviceIo {
    /// The first `len` bytes of read buffer `bid`, as a read completion
    /// left them.
    #[inline]
    pub fn read_data(&self, bid: u16, len: usize) -> &[u8] {
        let bid = usize::from(bid).min(usize::from(self.pool.entries) - 1);
        // SAFETY: the buffer lies in the pool's mapping; the kernel wrote
        // it before posting the completion and does not touch it again
        // until `release_read` puts it back in the ring, which needs
        // `&mut self` and so ends this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.bufs.as_ptr().add(bid * READ_BUF),
                len.min(READ_BUF),
            )
        }
    }

    /// Gives read buffer `bid` back to the ring.
    #[inline]
    pub fn release_read(&mut self, bid: u16) {
        if bid < self.pool.entries {
            self.pool.add(bid);
            self.pool.publish();
        }
    }

    /// Arms a read on every registered file that has none and is not
    /// `gone` (nor past its end), as far as the submission queue has room.
    /// Only the files whose reads ended since the last call are looked at
    /// (`to_arm`), so a loop iteration with 10,000 devices armed costs
    /// nothing here.
    pub fn arm_reads(&mut self, gone: &[bool]) {
        while let Some(&file) = self.to_arm.last() {
            if gone.get(file as usize).copied().unwrap_or(true) {
                // Listed again when the files are replaced.
                self.to_arm.pop();
                continue;
            }
            if !self.arm_read(file) {
                return;
            }
            self.to_arm.pop();
        }
    }

    /// Arms a multishot read on registered file `file` unless one is armed.
    /// Returns false when the submission queue is full.
    #[inline]
    fn arm_read(&mut self, file: u32) -> bool {
        let f = file as usize;
        if f >= self.armed.len() || self.armed[f] {
            return true;
        }
        let sqe = if self.multishot {
            opcode::ReadMulti::new(types::Fixed(file), 0, BGID).build()
        } else {
            opcode::Read::new(types::Fixed(file), std::ptr::null_mut(), READ_BUF as u32)
                .buf_group(BGID)
                .build()
                .flags(io_uring::squeue::Flags::BUFFER_SELECT)
        }
        .user_data(READ_TAG | u64::from(file));
        // SAFETY: the read's buffers come from the pool's provided-buffer
        // ring (the pool's own mappings, not the UMEM); the kernel owns a
        // buffer from the moment it picks it until the completion names it,
        // and the pool stays mapped until every read is drained (see
        // `ReadPool::drop`).
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        self.armed[f] = true;
        self.armed_count += 1;
        self.unsubmitted += 1;
        true
    }

    /// Read buffers in the ring, waiting for packets.
    pub fn reads_ready(&self) -> usize {
        self.pool.in_ring
    }
}
