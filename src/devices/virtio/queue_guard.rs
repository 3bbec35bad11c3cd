//! Taking work off a guest's virtqueue without trusting the guest.
//!
//! Every device pops its chains through [`pop`] and re-arms notifications
//! through [`enable_notification`], so one piece of code decides "here is a
//! chain", "nothing to do" or "this ring is broken":
//!
//! - a queue the driver did not make ready is never touched: no chains, no
//!   notification flags written, whatever its (default, zero) addresses hold;
//! - a ring whose indices are impossible (the available index more than a
//!   queue ahead of the device) or that cannot be read is broken: the caller
//!   stops serving the device and reports `DEVICE_NEEDS_RESET` (virtio 1.2,
//!   2.1.2) until the driver resets it. Re-checking such a ring would say
//!   "more work" forever;
//! - a chain is bounded by the queue size, direct and indirect descriptors
//!   together (virtio 1.2, 2.7.5.3.1): [`Chain`] yields at most that many and
//!   then an error, so one notify costs at most queue size x queue size
//!   descriptor reads, however the guest links its tables.
//!
//! [`check`] applies the same rules to every queue when the driver sets
//! DRIVER_OK, so a ring that is broken from the start never gets a worker.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::narrow;

/// What is wrong with a queue (the ring variants) or one chain (the chain
/// variants, see [`QueueError::is_chain_error`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The driver claims more chains than the ring holds.
    #[error(
        "available index {avail} is {ahead} entries ahead of the device on a {size}-entry queue"
    )]
    AvailIndex {
        /// The driver's available index.
        avail: u16,
        /// `avail - next_avail`, wrapping.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A ready queue with its available ring at guest address 0, which
    /// virtio-queue reserves for "not set up".
    #[error("available ring at guest address 0")]
    AvailRingAtZero,
    /// The rings of a ready queue are not all inside guest memory.
    #[error("rings outside guest memory")]
    RingsOutsideMemory,
    /// Reading or writing the rings failed.
    #[error("cannot {0}")]
    RingAccess(&'static str),
    /// A chain with more descriptors than the queue has entries.
    #[error("descriptor chain longer than the queue ({0} entries)")]
    ChainTooLong(u16),
    /// A descriptor says "next" but there is none to follow: an index past
    /// the table, a nested or malformed indirect table, more than 4 GiB.
    #[error("descriptor chain breaks off (bad next index or indirect table)")]
    ChainBroken,
}

impl QueueError {
    /// True when only one chain is bad and the queue can go on.
    pub fn is_chain_error(&self) -> bool {
        matches!(self, QueueError::ChainTooLong(_) | QueueError::ChainBroken)
    }
}

/// Chains the driver made available that the device has not taken yet.
fn pending<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<u16, QueueError> {
    if queue.avail_ring() == 0 {
        return Err(QueueError::AvailRingAtZero);
    }
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| QueueError::RingAccess("read the available index"))?
        .0;
    let ahead = avail.wrapping_sub(queue.next_avail());
    if ahead > queue.size() {
        return Err(QueueError::AvailIndex {
            avail,
            ahead,
            size: queue.size(),
        });
    }
    Ok(ahead)
}

/// Whether the device can serve `queue`: not ready (it never will be
/// touched), or ready with rings inside guest memory and sane indices.
pub fn check<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<(), QueueError> {
    if !queue.ready() {
        return Ok(());
    }
    if !queue.is_valid(mem) {
        return Err(QueueError::RingsOutsideMemory);
    }
    pending(queue, mem).map(|_| ())
}

/// The next available chain, `None` when there is none (or the queue is not
/// ready), an error when the ring is broken.
pub fn pop<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Result<Option<Chain<&'a M>>, QueueError> {
    if !queue.ready() || pending(queue, mem)? == 0 {
        return Ok(None);
    }
    let limit = queue.size();
    let mut iter = queue.iter(mem).map_err(|e| match e {
        virtio_queue::Error::InvalidAvailRingIndex => {
            QueueError::RingAccess("follow the available index (it moved more than a queue ahead)")
        }
        _ => QueueError::RingAccess("read the available ring"),
    })?;
    match iter.next() {
        Some(chain) => Ok(Some(Chain::new(chain, limit))),
        // The index went back between two reads, or the entry is unreadable.
        None => Err(QueueError::RingAccess("read the available ring entry")),
    }
}

/// Ask the driver not to notify; nothing happens on a queue that is not ready.
pub fn disable_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), QueueError> {
    if !queue.ready() {
        return Ok(());
    }
    queue
        .disable_notification(mem)
        .map_err(|_| QueueError::RingAccess("write the used ring flags"))
}

/// Ask the driver to notify again; true when chains arrived in the meantime
/// (pop again). A queue that is not ready has none.
pub fn enable_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, QueueError> {
    if !queue.ready() {
        return Ok(false);
    }
    queue
        .enable_notification(mem)
        .map_err(|_| QueueError::RingAccess("write the used ring flags"))?;
    Ok(pending(queue, mem)? > 0)
}

/// What one [`drain`] did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Chains returned to the used ring.
    pub used: u32,
    /// Chains that could not be returned (a head index past the queue; the
    /// used ring itself was checked at activation), and the last reason.
    pub lost: u32,
    /// Why the last lost chain could not be returned.
    pub lost_because: Option<virtio_queue::Error>,
    /// [`drain_while`] stopped at a chain its `serve` put back.
    pub stopped: bool,
}

/// Serve every chain the driver makes available: `serve` does the work of
/// one chain and returns its used length (bytes written into its buffers),
/// and the chain goes back on the used ring. Notifications are off while
/// draining and on again afterwards, then the ring is checked once more, so a
/// chain made available between the last pop and the re-enable is never
/// missed. The work is bounded by the guest: at most a queue of chains per
/// pass, and a pass repeats only for chains added meanwhile. The error is
/// that of a broken ring: the device then needs a reset.
pub fn drain<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
    mut serve: impl FnMut(Chain<&'a M>) -> u32,
) -> Result<Drained, QueueError> {
    drain_while(queue, mem, |chain| Some(serve(chain)))
}

/// [`drain`], but `serve` may answer `None`: the chain is put back on the
/// available ring, untouched, and the drain stops with notifications still
/// off (a rate limiter's timer, not the guest, brings the device back).
pub fn drain_while<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
    mut serve: impl FnMut(Chain<&'a M>) -> Option<u32>,
) -> Result<Drained, QueueError> {
    drain_taking(queue, mem, |chain| match serve(chain) {
        Some(len) => Disposition::Used(len),
        None => Disposition::Hold,
    })
}

/// What the `serve` of [`drain_taking`] did with one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done: it goes on the used ring with this length.
    Used(u32),
    /// Not now: it goes back on the available ring, untouched, and the
    /// drain stops (as [`drain_while`]'s `None`).
    Hold,
    /// Taken away, in flight: the caller puts it on the used ring itself
    /// when its work completes (by its head index).
    Taken,
}

/// [`drain_while`] for a device that completes chains later: `serve` may
/// also keep a chain ([`Disposition::Taken`]).
pub fn drain_taking<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
    mut serve: impl FnMut(Chain<&'a M>) -> Disposition,
) -> Result<Drained, QueueError> {
    let mut done = Drained::default();
    loop {
        disable_notification(queue, mem)?;
        while let Some(chain) = pop(queue, mem)? {
            let head = chain.head_index();
            let len = match serve(chain) {
                Disposition::Used(len) => len,
                Disposition::Taken => continue,
                Disposition::Hold => {
                    queue.go_to_previous_position();
                    done.stopped = true;
                    return Ok(done);
                }
            };
            done.count(queue.add_used(mem, head, len));
        }
        // More may have arrived while notifications were off.
        if !enable_notification(queue, mem)? {
            return Ok(done);
        }
    }
}

impl Drained {
    /// Add what `other` did to this.
    pub fn absorb(&mut self, other: Drained) {
        self.used = self.used.saturating_add(other.used);
        self.lost = self.lost.saturating_add(other.lost);
        self.lost_because = other.lost_because.or(self.lost_because.take());
        self.stopped |= other.stopped;
    }

    /// Count the result of one `add_used`.
    pub fn count(&mut self, added: Result<(), virtio_queue::Error>) {
        match added {
            Ok(()) => self.used = self.used.saturating_add(1),
            Err(e) => {
                self.lost = self.lost.saturating_add(1);
                self.lost_because = Some(e);
            }
        }
    }
}

/// Whether the driver wants an interrupt for the used entries just added:
/// with `VIRTIO_RING_F_EVENT_IDX` as its used event index says; without it,
/// unless it set `VRING_AVAIL_F_NO_INTERRUPT` (a hint we honour). An error
/// (the ring cannot be read) means "interrupt", which is never wrong.
pub fn wants_interrupt<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    // Without EVENT_IDX, virtio-queue always says yes.
    let needed = queue.needs_notification(mem)?;
    if !needed || queue.event_idx_enabled() {
        return Ok(needed);
    }
    let flags = mem
        .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & const { narrow::u16_of(VRING_AVAIL_F_NO_INTERRUPT) } == 0)
}

/// A descriptor chain that yields at most `limit` descriptors (the queue
/// size), then [`QueueError::ChainTooLong`]; a chain that breaks off yields
/// [`QueueError::ChainBroken`]. After an error it yields nothing.
#[derive(Clone, Debug)]
pub struct Chain<M> {
    inner: DescriptorChain<M>,
    limit: u16,
    taken: u16,
    /// The last descriptor yielded has `VRING_DESC_F_NEXT`.
    more: bool,
    done: bool,
}

impl<M> Chain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    /// Bound `inner` to `limit` descriptors.
    pub fn new(inner: DescriptorChain<M>, limit: u16) -> Self {
        Self {
            inner,
            limit,
            taken: 0,
            more: true,
            done: false,
        }
    }

    /// Index of the chain's head descriptor (what goes on the used ring).
    pub fn head_index(&self) -> u16 {
        self.inner.head_index()
    }

    /// The guest memory the chain's buffers are in.
    pub fn memory(&self) -> &M::Target {
        self.inner.memory()
    }
}

impl<M> Iterator for Chain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    type Item = Result<Descriptor, QueueError>;

    fn next(&mut self) -> Option<Self::Item> {
        // A descriptor without NEXT ends the chain: virtio-queue would not
        // read further either.
        if self.done || !self.more {
            return None;
        }
        if self.taken == self.limit {
            self.done = true;
            return Some(Err(QueueError::ChainTooLong(self.limit)));
        }
        match self.inner.next() {
            Some(desc) => {
                self.taken += 1;
                self.more = desc.has_next();
                Some(Ok(desc))
            }
            None => {
                self.done = true;
                // Nothing at all is an empty chain, for the device to judge.
                (self.taken > 0).then_some(Err(QueueError::ChainBroken))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::test_utils::write_linked_table;

    type Mem = crate::memory::GuestMemoryMmap;
    const NEXT: u16 = narrow::u16_of(VRING_DESC_F_NEXT);

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        Descriptor::new(addr, len, flags, next).into()
    }

    /// Publish `head` as the only available chain.
    fn offer(m: &Mem, vq: &MockSplitQueue<'_, Mem>, head: u16) {
        vq.avail().ring().ref_at(0).unwrap().store(head);
        vq.avail().idx().store(1);
        assert_eq!(
            m.read_obj::<u16>(vq.avail_addr().unchecked_add(2)).unwrap(),
            1
        );
    }

    fn walk(chain: Chain<&Mem>) -> (usize, Option<QueueError>) {
        let mut n = 0;
        for d in chain {
            match d {
                Ok(_) => n += 1,
                Err(e) => return (n, Some(e)),
            }
        }
        (n, None)
    }

    #[test]
    fn chains_up_to_the_queue_size_pass() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 8);
        let descs: Vec<(u64, u32, u16)> = (0..8).map(|i| (0x8000 + i * 16, 16, 0)).collect();
        write_linked_table(&m, vq.desc_table_addr(), &descs);
        offer(&m, &vq, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = pop(&mut q, &m).unwrap().unwrap();
        assert_eq!(chain.head_index(), 0);
        assert_eq!(walk(chain), (8, None));
        assert!(pop(&mut q, &m).unwrap().is_none());
        assert!(!enable_notification(&mut q, &m).unwrap());
    }

    #[test]
    fn loops_and_long_indirect_tables_are_cut_at_the_queue_size() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 8);
        // Descriptor 0 loops on itself.
        vq.desc_table().store(0, raw(0x8000, 1, NEXT, 0)).unwrap();
        // Descriptor 1: two direct descriptors, then a 7-entry indirect table.
        vq.desc_table().store(1, raw(0x8000, 1, NEXT, 2)).unwrap();
        vq.desc_table().store(2, raw(0x8000, 1, NEXT, 3)).unwrap();
        let indirect = const { narrow::u16_of(VRING_DESC_F_INDIRECT) };
        vq.desc_table()
            .store(3, raw(0x9000, 7 * 16, indirect, 0))
            .unwrap();
        let descs: Vec<(u64, u32, u16)> = (0..7).map(|_| (0x8000, 1, 0)).collect();
        write_linked_table(&m, GuestAddress(0x9000), &descs);
        for (i, head) in [0u16, 1].into_iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(head);
        }
        vq.avail().idx().store(2);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = pop(&mut q, &m).unwrap().unwrap();
        assert_eq!(walk(chain), (8, Some(QueueError::ChainTooLong(8))));
        let chain = pop(&mut q, &m).unwrap().unwrap();
        assert_eq!(walk(chain), (8, Some(QueueError::ChainTooLong(8))));
    }

    #[test]
    fn chains_that_break_off_are_errors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 8);
        // "Next" is descriptor 200 of an 8-entry table.
        vq.desc_table().store(0, raw(0x8000, 1, NEXT, 200)).unwrap();
        offer(&m, &vq, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = pop(&mut q, &m).unwrap().unwrap();
        assert_eq!(walk(chain), (1, Some(QueueError::ChainBroken)));
        // A head past the table is an empty chain, not an error of the guard.
        let vq = MockSplitQueue::new(&m, 8);
        offer(&m, &vq, 300);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = pop(&mut q, &m).unwrap().unwrap();
        assert_eq!(walk(chain), (0, None));
    }

    #[test]
    fn impossible_avail_index_is_a_broken_ring() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.avail().idx().store(21);
        let mut q: Queue = vq.create_queue().unwrap();
        let broken = QueueError::AvailIndex {
            avail: 21,
            ahead: 21,
            size: 16,
        };
        assert_eq!(check(&q, &m), Err(broken));
        assert_eq!(pop(&mut q, &m).unwrap_err(), broken);
        assert_eq!(enable_notification(&mut q, &m), Err(broken));
        assert!(!broken.is_chain_error());
        // A full ring is not.
        vq.avail().idx().store(16);
        assert_eq!(check(&q, &m), Ok(()));
    }

    #[test]
    fn avail_ring_at_zero_is_a_broken_ring() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let mut q: Queue = vq.create_queue().unwrap();
        q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        m.write_obj(3u16, GuestAddress(2)).unwrap();
        assert_eq!(check(&q, &m), Err(QueueError::AvailRingAtZero));
        assert_eq!(pop(&mut q, &m).unwrap_err(), QueueError::AvailRingAtZero);
        assert_eq!(
            enable_notification(&mut q, &m),
            Err(QueueError::AvailRingAtZero)
        );
    }

    #[test]
    fn unready_queue_is_never_touched() {
        let m = mem();
        m.write_slice(&[0xaa; 16], GuestAddress(0)).unwrap();
        m.write_obj(3u16, GuestAddress(2)).unwrap();
        let mut q = <Queue as QueueT>::new(16).unwrap();
        assert_eq!(check(&q, &m), Ok(()));
        assert!(pop(&mut q, &m).unwrap().is_none());
        disable_notification(&mut q, &m).unwrap();
        assert!(!enable_notification(&mut q, &m).unwrap());
        let mut low = [0u8; 16];
        m.read_slice(&mut low, GuestAddress(0)).unwrap();
        let mut want = [0xaa; 16];
        want[2..4].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(low, want);
    }

    #[test]
    fn rings_outside_memory_fail_the_check() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        q.try_set_used_ring_address(GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(check(&q, &m), Err(QueueError::RingsOutsideMemory));
    }
}
