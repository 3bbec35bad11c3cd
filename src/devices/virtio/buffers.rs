//! The buffers of one descriptor chain in one direction, checked once
//! against guest memory, then read or written as one byte range. For
//! devices whose messages span descriptors in any split the driver likes
//! (vsock's header and payload).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::queue_guard::{Chain, QueueError};

/// Why a chain's buffers were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadBuffers {
    /// No descriptors.
    #[error("empty descriptor chain")]
    Empty,
    /// A descriptor of the other direction.
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// A buffer outside guest RAM.
    #[error("buffer outside guest memory")]
    OutOfRange,
    /// Longer than the queue, or breaks off.
    #[error(transparent)]
    Descriptors(QueueError),
}

/// The buffers of one chain: all device-readable or all device-writable.
#[derive(Clone, Debug)]
pub struct Buffers {
    /// The chain's head index, for the used ring.
    pub head: u16,
    segments: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl Buffers {
    /// The buffers of `chain`, which must all be `writable` (or all
    /// readable), at most `max` bytes of them counted: descriptors past
    /// that are never touched. Every counted byte is inside guest memory.
    pub fn of<M: GuestMemory>(
        mem: &M,
        chain: Chain<&M>,
        writable: bool,
        max: usize,
    ) -> Result<Self, BadBuffers> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut len = 0usize;
        let mut descriptors = 0usize;
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for desc in chain {
            let desc = desc.map_err(BadBuffers::Descriptors)?;
            descriptors += 1;
            if desc.is_write_only() != writable {
                return Err(BadBuffers::WrongDirection);
            }
            let take = usize::try_from(desc.len())
                .unwrap_or(usize::MAX)
                .min(max - len);
            if take == 0 {
                if len == max {
                    break;
                }
                continue;
            }
            if !mem.check_range(desc.addr(), take, access) {
                return Err(BadBuffers::OutOfRange);
            }
            segments.push((desc.addr(), take));
            len += take;
        }
        if descriptors == 0 {
            return Err(BadBuffers::Empty);
        }
        Ok(Self {
            head,
            segments,
            len,
        })
    }

    /// Bytes the buffers hold (at most the `max` they were taken with).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether they hold nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The (address, length) pieces covering `offset..offset + n` of the
    /// range, clipped to its end.
    fn pieces(
        &self,
        mut offset: usize,
        mut n: usize,
    ) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        self.segments.iter().filter_map(move |&(addr, len)| {
            if n == 0 {
                return None;
            }
            if offset >= len {
                offset -= len;
                return None;
            }
            let take = (len - offset).min(n);
            // offset < len <= the segment, checked inside guest memory.
            let at = addr.unchecked_add(u64::try_from(offset).unwrap_or(0));
            offset = 0;
            n -= take;
            Some((at, take))
        })
    }

    /// Copy bytes from `offset` of the range into `out`; the count copied
    /// (short at the range's end).
    pub fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        out: &mut [u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        for (addr, take) in self.pieces(offset, out.len()) {
            mem.read_slice(&mut out[done..done + take], addr)?;
            done += take;
        }
        Ok(done)
    }

    /// Copy `data` to `offset` of the range; the count copied (short at
    /// the range's end).
    pub fn write_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        for (addr, take) in self.pieces(offset, data.len()) {
            mem.write_slice(&data[done..done + take], addr)?;
            done += take;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{memory, Driver, BUF_BASE, MEM_SIZE};
    use crate::devices::virtio::queue_guard;

    #[test]
    fn reads_and_writes_across_descriptors_and_refuses_bad_chains() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0, 16);
        let mut q = d.queue();
        d.add_chain(&[
            (BUF_BASE, 10, true),
            (BUF_BASE + 0x100, 0, true),
            (BUF_BASE + 0x1000, 20, true),
        ]);
        let chain = queue_guard::pop(&mut q, &mem).unwrap().unwrap();
        let b = Buffers::of(&mem, chain, true, 1 << 20).unwrap();
        assert_eq!(b.len(), 30);
        let data: Vec<u8> = (0..30).collect();
        assert_eq!(b.write_at(&mem, 0, &data).unwrap(), 30);
        let mut back = [0u8; 12];
        assert_eq!(b.read_at(&mem, 5, &mut back).unwrap(), 12);
        assert_eq!(back.to_vec(), (5..17).collect::<Vec<u8>>());
        let mut tail = [0u8; 8];
        assert_eq!(
            b.read_at(&mem, 26, &mut tail).unwrap(),
            4,
            "short at the end"
        );
        // Bounded by max: the second buffer is cut.
        d.add_chain(&[(BUF_BASE, 10, true), (BUF_BASE + 0x1000, 20, true)]);
        let chain = queue_guard::pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(Buffers::of(&mem, chain, true, 15).unwrap().len(), 15);
        // Wrong direction, outside memory.
        d.add_chain(&[(BUF_BASE, 10, false)]);
        let chain = queue_guard::pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(
            Buffers::of(&mem, chain, true, 64).unwrap_err(),
            BadBuffers::WrongDirection
        );
        d.add_chain(&[(MEM_SIZE as u64 - 4, 64, false)]);
        let chain = queue_guard::pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(
            Buffers::of(&mem, chain, false, 64).unwrap_err(),
            BadBuffers::OutOfRange
        );
    }
}
