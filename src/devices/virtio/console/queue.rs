//! The virtio-console queue logic: guest output off the transmit queue into
//! a writer, host input into the receive queue's buffers.
//!
//! Pure queue logic over guest memory: no threads, no KVM, so it is tested
//! with virtio-queue's mock driver and fuzzed (`fuzz/fuzz_targets/console_*`).
//! Chains come through [`queue_guard`], so they are bounded by the queue
//! size; a chain that is bad (wrong direction, outside guest RAM, too long,
//! broken off) is returned with what could be used of it and counted, and
//! only a broken ring is an error.

use std::collections::VecDeque;
use std::io::Write;

use vm_memory::{Address, Bytes, GuestMemory};

use crate::devices::virtio::queue_guard::{self, Chain, QueueError};
use virtio_queue::{Queue, QueueT};

/// Bytes of guest output one transmit chain may carry; the rest is dropped.
/// Linux sends at most a page per buffer.
pub const TX_CHAIN_MAX: usize = 64 << 10;
/// Bytes copied from guest memory at a time.
const TX_CHUNK: usize = 4096;

/// What went wrong with chains the guest offered (the queue went on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BadChains {
    /// Chains with a descriptor of the wrong direction, outside guest RAM,
    /// too long or broken off, or (transmit) over [`TX_CHAIN_MAX`].
    pub count: u64,
    /// The last reason, for the log.
    pub last: Option<&'static str>,
}

impl BadChains {
    fn add(&mut self, why: &'static str) {
        self.count += 1;
        self.last = Some(why);
    }
}

/// Copy every transmit chain's readable buffers to `out`, in order, and
/// return each chain with used length 0. Returns whether the used ring
/// changed, or the [`QueueError`] of a broken ring.
pub fn process_tx<M: GuestMemory, W: Write + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    out: &mut W,
    bad: &mut BadChains,
) -> Result<bool, QueueError> {
    let done = queue_guard::drain(queue, mem, |chain| {
        if let Err(why) = transmit(mem, chain, out) {
            bad.add(why);
        }
        0
    })?;
    // Only for a head index past the queue: then there is nothing to return.
    if done.lost > 0 {
        bad.count += u64::from(done.lost);
        bad.last = Some("head index past the queue");
    }
    // The guest never waits for output that is still in our buffer.
    let _ = out.flush();
    Ok(done.used > 0)
}

fn transmit<M: GuestMemory, W: Write + ?Sized>(
    mem: &M,
    chain: Chain<&M>,
    out: &mut W,
) -> Result<(), &'static str> {
    let mut buf = [0u8; TX_CHUNK];
    let mut total = 0usize;
    for desc in chain {
        let desc = desc.map_err(|_| "descriptor chain too long or broken off")?;
        if desc.is_write_only() {
            return Err("device-writable descriptor on the transmit queue");
        }
        let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        let mut done = 0usize;
        while done < len {
            if total == TX_CHAIN_MAX {
                return Err("transmit chain over 64 KiB");
            }
            let n = (len - done).min(TX_CHUNK).min(TX_CHAIN_MAX - total);
            let addr = desc
                .addr()
                .checked_add(done as u64)
                .ok_or("buffer outside guest memory")?;
            mem.read_slice(&mut buf[..n], addr)
                .map_err(|_| "buffer outside guest memory")?;
            // The guest cannot do anything about a closed stdout.
            let _ = out.write_all(&buf[..n]);
            done += n;
            total += n;
        }
    }
    Ok(())
}

/// Move bytes from `input` into the receive queue's writable buffers, one
/// chain filled as far as it goes before the next is taken; chains are only
/// taken while input is waiting. Returns whether the used ring changed, or
/// the [`QueueError`] of a broken ring.
pub fn process_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    input: &mut VecDeque<u8>,
    bad: &mut BadChains,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    while !input.is_empty() {
        let Some(chain) = queue_guard::pop(queue, mem)? else {
            break;
        };
        let head = chain.head_index();
        let (len, res) = receive(mem, chain, input);
        if let Err(why) = res {
            bad.add(why);
        }
        match queue.add_used(mem, head, len) {
            Ok(()) => used_any = true,
            Err(_) => bad.add("head index past the queue"),
        }
    }
    Ok(used_any)
}

/// Fill one chain; the bytes written and why the chain was cut short.
fn receive<M: GuestMemory>(
    mem: &M,
    chain: Chain<&M>,
    input: &mut VecDeque<u8>,
) -> (u32, Result<(), &'static str>) {
    let mut written: u32 = 0;
    for desc in chain {
        if input.is_empty() {
            break;
        }
        let desc = match desc {
            Ok(d) => d,
            Err(_) => return (written, Err("descriptor chain too long or broken off")),
        };
        if !desc.is_write_only() {
            return (
                written,
                Err("device-readable descriptor on the receive queue"),
            );
        }
        let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        let n = len.min(input.len());
        let (a, b) = input.as_slices();
        let first = n.min(a.len());
        let ok = mem.write_slice(&a[..first], desc.addr()).is_ok()
            && (first == n
                || desc
                    .addr()
                    .checked_add(first as u64)
                    .is_some_and(|at| mem.write_slice(&b[..n - first], at).is_ok()));
        if !ok {
            return (written, Err("buffer outside guest memory"));
        }
        input.drain(..n);
        // n <= the descriptor's u32 length; the chain is bounded by the
        // queue size, so the sum of at most 256 such lengths saturates at worst.
        written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }
    (written, Ok(()))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{memory, Driver, BUF_BASE, MEM_SIZE};
    use crate::devices::virtio::test_utils::{full_queue_of_one_chain, used_idx};

    fn tx(
        q: &mut Queue,
        mem: &crate::devices::virtio::net::rxtx::tests::Mem,
    ) -> (Vec<u8>, bool, BadChains) {
        let mut out = Vec::new();
        let mut bad = BadChains::default();
        let used = process_tx(q, mem, &mut out, &mut bad).unwrap();
        (out, used, bad)
    }

    #[test]
    fn tx_writes_chains_in_order_and_returns_them_empty() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        mem.write_slice(b"hello, ", GuestAddress(BUF_BASE)).unwrap();
        mem.write_slice(b"world", GuestAddress(BUF_BASE + 0x100))
            .unwrap();
        mem.write_slice(b"!\n", GuestAddress(BUF_BASE + 0x200))
            .unwrap();
        let h1 = drv.add_chain(&[(BUF_BASE, 7, false), (BUF_BASE + 0x100, 5, false)]);
        let h2 = drv.add_chain(&[(BUF_BASE + 0x200, 2, false)]);
        let (out, used, bad) = tx(&mut q, &mem);
        assert_eq!(out, b"hello, world!\n");
        assert!(used);
        assert_eq!(bad.count, 0);
        assert_eq!(drv.take_used(), vec![(h1, 0), (h2, 0)]);
        // Nothing new: nothing used.
        assert!(!tx(&mut q, &mem).1);
    }

    #[test]
    fn tx_hostile_chains_are_bounded_counted_and_returned() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 32);
        let mut q = drv.queue();
        let outside = MEM_SIZE as u64 + 0x1000;
        let heads = [
            drv.add_chain(&[(outside, 100, false)]),
            drv.add_chain(&[(BUF_BASE, 100, true)]),
            // Straddles the end of RAM, and wraps the address space.
            drv.add_chain(&[(MEM_SIZE as u64 - 8, 100, false)]),
            drv.add_chain(&[(u64::MAX - 10, 100, false)]),
            // 4 GiB in one descriptor, and two of 40 KiB: cut at 64 KiB.
            drv.add_chain(&[(BUF_BASE, u32::MAX, false)]),
            drv.add_chain(&[(BUF_BASE, 40 << 10, false), (BUF_BASE, 40 << 10, false)]),
            // An indirect table that is not one.
            drv.add_indirect_head(BUF_BASE, 7),
        ];
        drv.add_bogus_head(300);
        mem.write_slice(b"ok", GuestAddress(BUF_BASE + 0x10_0000))
            .unwrap();
        let good = drv.add_chain(&[(BUF_BASE + 0x10_0000, 2, false)]);
        let (out, used, bad) = tx(&mut q, &mem);
        assert!(used);
        assert!(
            out.ends_with(b"ok"),
            "the good chain after them still goes out"
        );
        assert!(out.len() <= 2 * TX_CHAIN_MAX + 8 + 2, "{} bytes", out.len());
        assert!(bad.count >= heads.len() as u64, "{bad:?}");
        let used: Vec<u16> = drv.take_used().into_iter().map(|(h, _)| h).collect();
        for h in heads.iter().chain([&good]) {
            assert!(used.contains(h), "chain {h} returned");
        }
    }

    #[test]
    fn tx_full_queue_of_looping_and_maximal_chains_ends() {
        let mem = memory();
        let size = 256u16;
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), size);
        // Every entry names a chain of 256 descriptors of 4 KiB: the walk
        // stops at the queue size, and each chain at 64 KiB of output.
        let descs: Vec<(u64, u32, u16)> = (0..usize::from(size))
            .map(|i| (BUF_BASE + (i as u64 % 16) * 4096, 4096, 0))
            .collect();
        let used_at = GuestAddress(0x8_0000);
        let mut q = full_queue_of_one_chain(&vq, &mem, size, &descs, None, used_at);
        let (out, used, bad) = tx(&mut q, &mem);
        assert!(used);
        assert_eq!(out.len(), usize::from(size) * TX_CHAIN_MAX);
        assert_eq!(bad.count, u64::from(size));
        assert_eq!(used_idx(&mem, used_at), size);
    }

    #[test]
    fn broken_rings_are_errors_not_panics() {
        let mem = memory();
        let drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        drv.vq.avail().idx().store(40);
        let mut bad = BadChains::default();
        assert!(matches!(
            process_tx(&mut q, &mem, &mut Vec::new(), &mut bad),
            Err(QueueError::AvailIndex { .. })
        ));
        let mut input: VecDeque<u8> = b"x".iter().copied().collect();
        assert!(matches!(
            process_rx(&mut q, &mem, &mut input, &mut bad),
            Err(QueueError::AvailIndex { .. })
        ));
    }

    #[test]
    fn rx_fills_buffers_in_order_and_only_with_input() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let mut bad = BadChains::default();
        let h1 = drv.add_chain(&[(BUF_BASE, 4, true)]);
        let h2 = drv.add_chain(&[(BUF_BASE + 0x100, 3, true), (BUF_BASE + 0x200, 16, true)]);
        let h3 = drv.add_chain(&[(BUF_BASE + 0x300, 16, true)]);
        let mut input = VecDeque::new();
        // No input: no buffer is taken.
        assert!(!process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
        assert!(drv.take_used().is_empty());
        // Split across the deque's two halves too.
        input.extend(b"xxhello world\n");
        input.drain(..2);
        assert!(process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
        assert!(input.is_empty());
        assert_eq!(drv.take_used(), vec![(h1, 4), (h2, 8)]);
        let mut got = [0u8; 12];
        mem.read_slice(&mut got[..4], GuestAddress(BUF_BASE))
            .unwrap();
        mem.read_slice(&mut got[4..7], GuestAddress(BUF_BASE + 0x100))
            .unwrap();
        mem.read_slice(&mut got[7..12], GuestAddress(BUF_BASE + 0x200))
            .unwrap();
        assert_eq!(&got, b"hello world\n");
        assert_eq!(bad.count, 0);
        // The third buffer waits for more input.
        input.extend(b"ls\n");
        assert!(process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
        assert_eq!(drv.take_used(), vec![(h3, 3)]);
    }

    #[test]
    fn rx_hostile_chains_are_returned_and_input_kept() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 32);
        let mut q = drv.queue();
        let outside = MEM_SIZE as u64 + 0x1000;
        let heads = [
            drv.add_chain(&[(BUF_BASE, 100, false)]),
            drv.add_chain(&[(outside, 100, true)]),
            drv.add_chain(&[(u64::MAX - 2, 100, true)]),
            drv.add_indirect_head(BUF_BASE, 7),
        ];
        drv.add_bogus_head(300);
        let good = drv.add_chain(&[(BUF_BASE + 0x1000, 64, true)]);
        let mut input: VecDeque<u8> = b"date\n".iter().copied().collect();
        let mut bad = BadChains::default();
        assert!(process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
        assert!(input.is_empty());
        let used = drv.take_used();
        assert_eq!(used.last(), Some(&(good, 5)), "{used:?}");
        for h in heads {
            assert!(used.contains(&(h, 0)), "chain {h} returned empty: {used:?}");
        }
        assert!(bad.count >= 4, "{bad:?}");
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        assert_eq!(&got, b"date\n");
    }

    #[test]
    fn rx_a_long_input_spans_a_full_queue_and_waits() {
        let mem = memory();
        let size = 8u16;
        let mut drv = Driver::new(&mem, 0, size);
        let mut q = drv.queue();
        for i in 0..u64::from(size) {
            drv.add_chain(&[(BUF_BASE + i * 0x100, 4, true)]);
        }
        let mut input: VecDeque<u8> = (0..100u8).collect();
        let mut bad = BadChains::default();
        assert!(process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
        assert_eq!(input.len(), 100 - 4 * usize::from(size));
        assert_eq!(drv.take_used().len(), usize::from(size));
        // No buffers left: nothing happens until the guest posts more.
        assert!(!process_rx(&mut q, &mem, &mut input, &mut bad).unwrap());
    }
}
