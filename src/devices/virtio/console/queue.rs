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
    let mut used_any = false;
    loop {
        queue_guard::disable_notification(queue, mem)?;
        while let Some(chain) = queue_guard::pop(queue, mem)? {
            let head = chain.head_index();
            if let Err(why) = transmit(mem, chain, out) {
                bad.add(why);
            }
            // Fails only for a head index past the queue: then there is
            // nothing to return.
            match queue.add_used(mem, head, 0) {
                Ok(()) => used_any = true,
                Err(_) => bad.add("head index past the queue"),
            }
        }
        // More may have arrived while notifications were off.
        if !queue_guard::enable_notification(queue, mem)? {
            break;
        }
    }
    // The guest never waits for output that is still in our buffer.
    let _ = out.flush();
    Ok(used_any)
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
