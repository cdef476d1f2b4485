//! The write side: a packet (`WriteFixed` from the UMEM), a gathered run
//! of packets (`Writev` over their frames), or another worker's frames;
//! each write holds its frames until its completion.

use super::*;

impl DeviceIo {
    /// Queues a write of `frame`'s bytes `offset..offset + len` to
    /// registered file `file`. Nothing reaches the kernel until
    /// [`DeviceIo::submit`]. When the submission queue is full the frame
    /// comes back as `Err`.
    #[inline]
    pub fn push(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        tag: u16,
    ) -> Result<(), Frame> {
        let start = frame.addr() + offset;
        let idx = Xsk::frame_index(&frame);
        if frame.umem() != self.region.id
            || len == 0
            || offset + len > frame.len()
            || start + len > self.region.len
            || idx >= self.in_flight.len()
            || self.in_flight[idx].is_some()
        {
            // Not a write this writer can make safely; the caller counts it.
            return Err(frame);
        }
        let ptr = self.region.base.as_ptr().wrapping_add(start);
        let sqe = opcode::WriteFixed::new(types::Fixed(file), ptr, len as u32, 0)
            .offset(0)
            .build()
            .user_data(idx as u64);
        // SAFETY: `ptr..ptr + len` lies inside fixed buffer 0 (checked
        // above) and belongs to `frame`, which `queue` hands to this writer
        // until the completion for `idx` arrives, so nothing else touches
        // the bytes; the UMEM handle held by `self` keeps them mapped.
        unsafe { self.queue(&sqe, idx, file, frame, tag, len as u32) }
    }

    /// An empty vector for the pieces of a coalesced write.
    pub fn pieces(&mut self) -> Vec<Piece> {
        self.spare_pieces.pop().unwrap_or_default()
    }

    /// Takes back a vector of pieces (emptied) for reuse.
    pub fn recycle(&mut self, mut v: Vec<Piece>) {
        if v.capacity() > 0 {
            v.clear();
            self.spare_pieces.push(v);
        }
    }

    /// Lets this ring write frames of worker `peer`'s UMEM.
    pub fn add_peer(&mut self, peer: usize, region: Region, umem: Umem) {
        if self.peers.len() <= peer {
            self.peers.resize_with(peer + 1, || None);
        }
        self.peers[peer] = Some((region, umem));
    }

    /// Queues a write, to registered file `file`, of bytes `offset..offset
    /// + len` of `frame` and then every piece, where the frames belong to
    /// worker `peer` (added with [`DeviceIo::add_peer`]); its completion
    /// carries `peer`. When it cannot (an unknown worker, a piece out of
    /// place, the queue full) every frame comes back in the `Err`.
    #[allow(clippy::result_large_err, clippy::too_many_arguments)]
    pub fn push_foreign(
        &mut self,
        peer: usize,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        rest: Vec<Piece>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (Frame, Vec<Piece>)> {
        let Some(Some((region, _))) = self.peers.get(peer) else {
            return Err((frame, rest));
        };
        let region = *region;
        // Of that worker's UMEM, and inside it.
        let in_place = |f: &Frame, off: usize, len: usize| {
            f.umem() == region.id
                && len > 0
                && off + len <= f.len()
                && f.addr() + off + len <= region.len
        };
        if !in_place(&frame, offset, len)
            || rest.iter().any(|p| !in_place(&p.frame, p.offset, p.len))
        {
            return Err((frame, rest));
        }
        let slot = match self.foreign_free.pop() {
            Some(s) => s,
            None => {
                self.foreign.push(None);
                self.foreign.len() - 1
            }
        };
        let base = region.base.as_ptr();
        let mut iov = Vec::new();
        let mut expected = len;
        let sqe = if rest.is_empty() {
            let ptr = base.wrapping_add(frame.addr() + offset);
            opcode::Write::new(types::Fixed(file), ptr, len as u32)
                .offset(0)
                .build()
        } else {
            iov = self.spare_iov.pop().unwrap_or_default();
            iov.clear();
            iov.push(libc::iovec {
                iov_base: base.wrapping_add(frame.addr() + offset).cast(),
                iov_len: len,
            });
            for p in &rest {
                iov.push(libc::iovec {
                    iov_base: base.wrapping_add(p.frame.addr() + p.offset).cast(),
                    iov_len: p.len,
                });
                expected += p.len;
            }
            opcode::Writev::new(types::Fixed(file), iov.as_ptr(), iov.len() as u32)
                .offset(0)
                .build()
        }
        .user_data(FOREIGN_TAG | slot as u64);
        // SAFETY: every byte written lies inside worker `peer`'s UMEM
        // (checked above) within frames handed to this ring with the entry,
        // which its owner does not touch until they come back with the
        // completion; `self.peers` holds a handle that keeps that UMEM
        // mapped, and the iovec array lives in the entry.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.foreign_free.push(slot);
            if iov.capacity() > 0 {
                self.spare_iov.push(iov);
            }
            return Err((frame, rest));
        }
        if let Some(w) = self.writes_on.get_mut(file as usize) {
            *w += 1;
        }
        self.foreign[slot] = Some((
            peer,
            InFlight {
                op: Op::Write,
                file,
                frame,
                tag,
                expected: expected as u32,
                packets,
                rest,
                iov,
            },
        ));
        self.count += 1;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Queues one write of `frame`'s bytes `offset..offset + len` followed
    /// by every piece, carrying `packets` packets, to registered file
    /// `file`. When it cannot (a piece out of place, the queue full) every
    /// frame comes back in the `Err`.
    #[allow(clippy::result_large_err, clippy::too_many_arguments)]
    pub fn push_gather(
        &mut self,
        file: u32,
        frame: Frame,
        offset: usize,
        len: usize,
        rest: Vec<Piece>,
        tag: u16,
        packets: u16,
    ) -> Result<(), (Frame, Vec<Piece>)> {
        let idx = Xsk::frame_index(&frame);
        // Of this worker's UMEM, and inside it.
        let in_place = |f: &Frame, off: usize, len: usize| {
            f.umem() == self.region.id
                && len > 0
                && off + len <= f.len()
                && f.addr() + off + len <= self.region.len
        };
        if !in_place(&frame, offset, len)
            || rest.iter().any(|p| !in_place(&p.frame, p.offset, p.len))
            || idx >= self.in_flight.len()
            || self.in_flight[idx].is_some()
        {
            return Err((frame, rest));
        }
        let base = self.region.base.as_ptr();
        let mut iov = self.spare_iov.pop().unwrap_or_default();
        iov.clear();
        iov.push(libc::iovec {
            iov_base: base.wrapping_add(frame.addr() + offset).cast(),
            iov_len: len,
        });
        let mut expected = len;
        for p in &rest {
            iov.push(libc::iovec {
                iov_base: base.wrapping_add(p.frame.addr() + p.offset).cast(),
                iov_len: p.len,
            });
            expected += p.len;
        }
        let frames = 1 + rest.len();
        let sqe = opcode::Writev::new(types::Fixed(file), iov.as_ptr(), iov.len() as u32)
            .offset(0)
            .build()
            .user_data(idx as u64);
        // SAFETY: every iovec lies inside the UMEM (checked above) within a
        // frame handed to this writer with the entry, and the iovec array
        // itself is kept in the entry; both live until the completion.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.spare_iov.push(iov);
            return Err((frame, rest));
        }
        if let Some(w) = self.writes_on.get_mut(file as usize) {
            *w += 1;
        }
        self.in_flight[idx] = Some(InFlight {
            op: Op::Write,
            file,
            frame,
            tag,
            expected: expected as u32,
            packets,
            rest,
            iov,
        });
        self.count += 1;
        self.write_frames += frames;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Pushes `sqe` and takes ownership of `frame` (index `idx`) until its
    /// completion arrives.
    ///
    /// # Safety
    /// The memory `sqe` points at must lie in the registered UMEM and
    /// belong to `frame`.
    unsafe fn queue(
        &mut self,
        sqe: &io_uring::squeue::Entry,
        idx: usize,
        file: u32,
        frame: Frame,
        tag: u16,
        expected: u32,
    ) -> Result<(), Frame> {
        // SAFETY: the caller guarantees the entry's buffer; it stays valid
        // because the frame is held in `in_flight` until its completion.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            return Err(frame);
        }
        if let Some(w) = self.writes_on.get_mut(file as usize) {
            *w += 1;
        }
        self.in_flight[idx] = Some(InFlight {
            op: Op::Write,
            file,
            frame,
            tag,
            expected,
            packets: 1,
            rest: Vec::new(),
            iov: Vec::new(),
        });
        self.count += 1;
        self.write_frames += 1;
        self.unsubmitted += 1;
        Ok(())
    }
}
