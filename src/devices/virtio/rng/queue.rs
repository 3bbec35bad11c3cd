//! The virtio-rng queue: each chain the driver makes available is a set of
//! device-writable buffers; the device fills them with random bytes (at
//! most [`MAX_BYTES_PER_CHAIN`] a chain) and returns the chain with the
//! count written. Pure queue logic over guest memory and a byte source: no
//! threads, no KVM.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemory};

use super::MAX_BYTES_PER_CHAIN;
use crate::devices::virtio::queue_guard::{self, Chain, QueueError};
use crate::devices::virtio::GuestLog;
pub use crate::host::random as host_random;

/// Fills a buffer with random bytes (the host's `getrandom` in the device).
pub type Source<'a> = &'a mut dyn FnMut(&mut [u8]) -> std::io::Result<()>;

/// What the device did so far (kept across kicks, for the log).
#[derive(Debug, Default)]
pub struct RngStats {
    /// Random bytes handed to the guest.
    pub bytes: u64,
    /// Chains returned.
    pub requests: u64,
    /// Chains refused whole or in part (a readable descriptor, a buffer
    /// outside guest memory, a chain too long or broken off) or that the
    /// source could not fill.
    pub bad: u64,
}

/// Serve every request in `queue` from `source`. Returns whether the used
/// ring changed, or the [`QueueError`] of a broken ring.
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    source: Source<'_>,
    stats: &mut RngStats,
    log: &mut GuestLog,
) -> Result<bool, QueueError> {
    process_queue_limited(queue, mem, source, stats, log, |_, _| true)
}

/// [`process_queue`] with a rate limiter: `admit(bytes, 1)` is asked for
/// each chain (the bytes it asks for, at most [`MAX_BYTES_PER_CHAIN`]); on
/// `false` the chain stays on the ring and the drain stops.
pub fn process_queue_limited<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    source: Source<'_>,
    stats: &mut RngStats,
    log: &mut GuestLog,
    mut admit: impl FnMut(u64, u64) -> bool,
) -> Result<bool, QueueError> {
    let done = queue_guard::drain_while(queue, mem, |chain| {
        if !admit(u64::from(requested(chain.clone())), 1) {
            return None;
        }
        let (len, res) = fill(mem, chain, source);
        stats.requests += 1;
        stats.bytes += u64::from(len);
        if let Err(why) = res {
            stats.bad += 1;
            log.warn("virtio-rng", format_args!("{why} ({} so far)", stats.bad));
        }
        Some(len)
    })?;
    if done.lost > 0 {
        stats.bad += u64::from(done.lost);
        log.warn("virtio-rng", format_args!("head index past the queue"));
    }
    Ok(done.used > 0)
}

/// The bytes a chain asks for, as [`fill`] counts them (its writable
/// descriptors up to the first bad one, at most [`MAX_BYTES_PER_CHAIN`]).
fn requested<M: GuestMemory>(chain: Chain<&M>) -> u32 {
    let mut n: u32 = 0;
    for desc in chain {
        match desc {
            Ok(d) if d.is_write_only() => n = n.saturating_add(d.len()),
            _ => break,
        }
        if n >= MAX_BYTES_PER_CHAIN {
            return MAX_BYTES_PER_CHAIN;
        }
    }
    n
}

/// Fill one chain; the bytes written and why the chain was cut short.
fn fill<M: GuestMemory>(
    mem: &M,
    chain: Chain<&M>,
    source: Source<'_>,
) -> (u32, Result<(), &'static str>) {
    let mut buf = [0u8; MAX_BYTES_PER_CHAIN as usize];
    let mut written: u32 = 0;
    for desc in chain {
        let left = MAX_BYTES_PER_CHAIN - written;
        if left == 0 {
            break;
        }
        let desc = match desc {
            Ok(d) => d,
            Err(_) => return (written, Err("descriptor chain too long or broken off")),
        };
        if !desc.is_write_only() {
            return (
                written,
                Err("device-readable descriptor on the request queue"),
            );
        }
        let n = desc.len().min(left);
        // n <= MAX_BYTES_PER_CHAIN, the buffer's length.
        let part = &mut buf[..usize::try_from(n).unwrap_or(0)];
        if source(part).is_err() {
            return (written, Err("the host's random source failed"));
        }
        if mem.write_slice(part, desc.addr()).is_err() {
            return (written, Err("buffer outside guest memory"));
        }
        written += n;
    }
    (written, Ok(()))
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{memory, Driver, BUF_BASE, MEM_SIZE};
    use crate::devices::virtio::test_utils::{
        cpu_time_of, full_queue_of_one_chain, used_idx, KICK_CPU_BUDGET,
    };

    fn counting() -> impl FnMut(&mut [u8]) -> std::io::Result<()> {
        let mut next = 0u8;
        move |b: &mut [u8]| {
            for x in b {
                *x = next;
                next = next.wrapping_add(1);
            }
            Ok(())
        }
    }

    #[test]
    fn fills_writable_buffers_and_returns_the_count() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0, 16);
        let mut q = d.queue();
        let head = d.add_chain(&[(BUF_BASE, 100, true), (BUF_BASE + 0x1000, 28, true)]);
        let (mut stats, mut log) = (RngStats::default(), GuestLog::default());
        let mut src = counting();
        assert!(process_queue(&mut q, &mem, &mut src, &mut stats, &mut log).unwrap());
        assert_eq!(d.take_used(), vec![(head, 128)]);
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(BUF_BASE)).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| usize::from(b) == i));
        let mut tail = [0u8; 28];
        mem.read_slice(&mut tail, GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        assert_eq!(tail[0], 100);
        assert_eq!((stats.bytes, stats.requests, stats.bad), (128, 1, 0));
        // Nothing more: the used ring does not change.
        assert!(!process_queue(&mut q, &mem, &mut src, &mut stats, &mut log).unwrap());
    }

    #[test]
    fn hostile_chains_are_bounded_refused_and_returned() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0, 16);
        let mut q = d.queue();
        // A readable descriptor: refused, returned empty.
        let a = d.add_chain(&[(BUF_BASE, 64, false)]);
        // A buffer past guest RAM: refused, returned empty.
        let b = d.add_chain(&[(MEM_SIZE as u64 - 16, 64, true)]);
        // 1 MiB of buffers: only MAX_BYTES_PER_CHAIN of them filled.
        let c = d.add_chain(&[(BUF_BASE, 1 << 20, true)]);
        let (mut stats, mut log) = (RngStats::default(), GuestLog::default());
        let mut src = counting();
        assert!(process_queue(&mut q, &mem, &mut src, &mut stats, &mut log).unwrap());
        assert_eq!(
            d.take_used(),
            vec![(a, 0), (b, 0), (c, MAX_BYTES_PER_CHAIN)]
        );
        assert_eq!(stats.bad, 2);
        // A source that fails gives the chain nothing, and the queue goes on.
        let e = d.add_chain(&[(BUF_BASE, 64, true)]);
        let mut broken = |_: &mut [u8]| Err(std::io::Error::other("no entropy"));
        assert!(process_queue(&mut q, &mem, &mut broken, &mut stats, &mut log).unwrap());
        assert_eq!(d.take_used(), vec![(e, 0)]);
        assert_eq!(q.next_used(), 4);
    }

    #[test]
    fn a_full_queue_of_maximal_chains_is_one_bounded_kick() {
        let mem = memory();
        let size = 256u16;
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), size);
        // Every entry names a chain of 256 writable 1 MiB buffers.
        let w = crate::narrow::u16_of(virtio_bindings::virtio_ring::VRING_DESC_F_WRITE);
        let descs: Vec<(u64, u32, u16)> = (0..u64::from(size))
            .map(|i| (BUF_BASE + (i % 8) * (1 << 20), 1 << 20, w))
            .collect();
        let used_at = GuestAddress(0x8_0000);
        let mut q = full_queue_of_one_chain(&vq, &mem, size, &descs, None, used_at);
        let (mut stats, mut log) = (RngStats::default(), GuestLog::default());
        let mut src = host_random;
        let (cpu, used) =
            cpu_time_of(|| process_queue(&mut q, &mem, &mut src, &mut stats, &mut log).unwrap());
        assert!(used);
        assert_eq!(used_idx(&mem, used_at), size);
        assert_eq!(
            stats.bytes,
            u64::from(size) * u64::from(MAX_BYTES_PER_CHAIN)
        );
        assert!(cpu < KICK_CPU_BUDGET, "one kick took {cpu:?} of CPU");
    }

    #[test]
    fn host_random_fills_the_buffer() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        host_random(&mut a).unwrap();
        host_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
