//! virtio-net frame paths: guest TX chains to a [`FrameSink`], frames from a
//! [`FrameSource`] into guest RX chains. No threads, fds or KVM here, so
//! everything is testable with `virtio-queue`'s mock rings.
//!
//! Every frame in both directions starts with a 12-byte `virtio_net_hdr_v1`,
//! which the TAP (`IFF_VNET_HDR`, vnet header size 12) consumes and produces
//! as is. The only field the device writes is `num_buffers`.
//!
//! Guest input is never trusted: a chain that points outside guest RAM, has
//! descriptors in the wrong direction, is empty, too large or longer than the
//! queue (see [`crate::devices::virtio::queue_guard`]) is handed back
//! with a used length of 0, counted, and logged at most every few seconds.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::devices::virtio::guest_log::GuestLog;
use crate::devices::virtio::queue_guard::{self, Chain, QueueError};
pub use crate::net::tap::VNET_HDR_LEN;

pub use crate::net::MAX_FRAME_LEN;
/// Largest vnet header + frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// A length within one frame buffer as the `u32` the used ring holds. Every
/// such length is at most [`MAX_BUFFER_LEN`], which fits (checked at build
/// time), so the saturation never happens.
fn used_len(n: usize) -> u32 {
    const { assert!(MAX_BUFFER_LEN <= u32::MAX as usize) };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Offset of `flags` in `virtio_net_hdr_v1`.
const HDR_FLAGS_OFFSET: usize = 0;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const HDR_NUM_BUFFERS_OFFSET: usize = 10;

/// Where TX frames go (the TAP; a `Vec` in tests).
pub trait FrameSink {
    /// Send one vnet header + frame.
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Where RX frames come from (the TAP; a queue of `Vec`s in tests).
pub trait FrameSource {
    /// Read one vnet header + frame into `buf`, returning its length, or
    /// `ErrorKind::WouldBlock` when no frame is waiting.
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Counters of one NIC, shared between its worker and the device.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, no vnet header).
    pub rx_bytes: AtomicU64,
    /// Frames dropped because they do not fit the buffers the guest posts.
    pub rx_dropped_too_big: AtomicU64,
    /// Frames from the host too short to carry a vnet header.
    pub rx_dropped_malformed: AtomicU64,
    /// RX chains returned unused because they were invalid.
    pub rx_bad_chains: AtomicU64,
    /// Times a frame had to wait for the guest to post buffers.
    pub rx_deferred: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Bytes sent by the guest (Ethernet frames, no vnet header).
    pub tx_bytes: AtomicU64,
    /// TX chains dropped because they were invalid or too large.
    pub tx_bad_chains: AtomicU64,
    /// TX frames the host refused (TAP write errors).
    pub tx_errors: AtomicU64,
}

/// A copy of [`NetStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct NetStatsSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped_too_big: u64,
    pub rx_dropped_malformed: u64,
    pub rx_bad_chains: u64,
    pub rx_deferred: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_bad_chains: u64,
    pub tx_errors: u64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl NetStats {
    /// Read all counters.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStatsSnapshot {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped_too_big: get(&self.rx_dropped_too_big),
            rx_dropped_malformed: get(&self.rx_dropped_malformed),
            rx_bad_chains: get(&self.rx_bad_chains),
            rx_deferred: get(&self.rx_deferred),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_bad_chains: get(&self.tx_bad_chains),
            tx_errors: get(&self.tx_errors),
        }
    }
}

impl fmt::Display for NetStatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx {} frames/{} bytes (dropped {} too big, {} malformed; {} bad buffers), \
             tx {} frames/{} bytes (dropped {} bad buffers, {} host errors)",
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped_too_big,
            self.rx_dropped_malformed,
            self.rx_bad_chains,
            self.tx_frames,
            self.tx_bytes,
            self.tx_bad_chains,
            self.tx_errors
        )
    }
}

/// Why a descriptor chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadChain {
    /// No descriptors (or an unreadable head).
    Empty,
    /// A device-readable descriptor on RX, or a device-writable one on TX.
    WrongDirection,
    /// A buffer outside guest RAM.
    OutOfRange,
    /// A TX frame above [`MAX_BUFFER_LEN`].
    TooLarge,
    /// Shorter than the vnet header.
    TooShort,
    /// Longer than the queue, or breaks off.
    Descriptors(QueueError),
}

impl fmt::Display for BadChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadChain::Empty => "empty descriptor chain",
            BadChain::WrongDirection => "descriptor with the wrong direction",
            BadChain::OutOfRange => "buffer outside guest memory",
            BadChain::TooLarge => "frame larger than 64 KiB",
            BadChain::TooShort => "buffer shorter than the virtio-net header",
            BadChain::Descriptors(e) => return e.fmt(f),
        })
    }
}

/// Put `entries` (head, length) on the used ring and publish them with a
/// single index update, so the driver never sees part of a multi-buffer frame
/// (Linux counts a merged frame with missing buffers as an error).
///
/// Every entry but the last is written into the ring slots past the current
/// used index (invisible to the driver); `add_used` then writes the last one
/// and stores the new index with release ordering.
///
/// Note: `add_used` counts one addition, which only matters for
/// `VIRTIO_RING_F_EVENT_IDX`, a feature this device does not offer.
pub(crate) fn publish_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = entries.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    if size == 0 {
        return Err(virtio_queue::Error::InvalidSize);
    }
    let start = queue.next_used();
    // The used index is a free-running u16 (virtio 1.x 2.7.8): it wraps.
    let mut next = start;
    for &(head, len) in rest {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = next % size;
        next = next.wrapping_add(1);
        // used ring: flags (2), idx (2), then 8-byte {id: le32, len: le32} elements.
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * u64::from(slot))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    queue.set_next_used(next);
    let res = queue.add_used(mem, last_head, last_len);
    if res.is_err() {
        queue.set_next_used(start);
    }
    res
}

/// Result of one [`TxPath::process`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxBatch {
    /// Chains returned to the guest.
    pub used: u32,
    /// Stopped at the batch limit with chains left.
    pub more: bool,
    /// Stopped at a frame the rate limiter holds back (left on the ring).
    pub throttled: bool,
}

/// Guest-to-host path.
#[derive(Debug)]
pub struct TxPath {
    label: String,
    buf: Box<[u8]>,
    log: GuestLog,
}

impl TxPath {
    /// A TX path; `label` prefixes its log messages.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            buf: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            log: GuestLog::default(),
        }
    }

    /// Gather one chain into `self.buf`; its length or why it is refused.
    fn gather<M: GuestMemory>(&mut self, mem: &M, chain: Chain<&M>) -> Result<usize, BadChain> {
        let mut len = 0usize;
        let mut descriptors = 0usize;
        for desc in chain {
            let desc = desc.map_err(BadChain::Descriptors)?;
            descriptors += 1;
            if desc.is_write_only() {
                return Err(BadChain::WrongDirection);
            }
            let dlen = desc.len() as usize;
            if dlen == 0 {
                continue;
            }
            if dlen > MAX_BUFFER_LEN - len {
                return Err(BadChain::TooLarge);
            }
            mem.read_slice(&mut self.buf[len..len + dlen], desc.addr())
                .map_err(|_| BadChain::OutOfRange)?;
            len += dlen;
        }
        if descriptors == 0 {
            return Err(BadChain::Empty);
        }
        if len < VNET_HDR_LEN {
            return Err(BadChain::TooShort);
        }
        Ok(len)
    }

    /// Send every frame the guest queued (up to one queue's worth) to `sink`;
    /// an error when the ring is broken.
    pub fn process<M: GuestMemory, S: FrameSink + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        sink: &mut S,
        stats: &NetStats,
    ) -> Result<TxBatch, QueueError> {
        self.process_limited(queue, mem, sink, stats, |_| true)
    }

    /// [`TxPath::process`] with a rate limiter: `admit(bytes)` is asked for
    /// each well-formed frame (its bytes past the vnet header; one op); on
    /// `false` the chain stays on the ring and the batch ends throttled.
    pub fn process_limited<M: GuestMemory, S: FrameSink + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        sink: &mut S,
        stats: &NetStats,
        mut admit: impl FnMut(u64) -> bool,
    ) -> Result<TxBatch, QueueError> {
        let mut batch = TxBatch::default();
        let limit = u32::from(queue.size()).max(1);
        let mut handled = 0u32;
        while let Some(chain) = queue_guard::pop(queue, mem)? {
            let head = chain.head_index();
            let gathered = self.gather(mem, chain);
            if let Ok(len) = gathered {
                if !admit((len - VNET_HDR_LEN) as u64) {
                    queue.go_to_previous_position();
                    batch.throttled = true;
                    break;
                }
            }
            match gathered {
                Ok(len) => match sink.send_frame(&self.buf[..len]) {
                    Ok(()) => {
                        bump(&stats.tx_frames, 1);
                        bump(&stats.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        bump(&stats.tx_errors, 1);
                        self.log.warn(
                            &self.label,
                            format_args!("host refused a {len}-byte TX frame: {e}"),
                        );
                    }
                },
                Err(why) => {
                    bump(&stats.tx_bad_chains, 1);
                    self.log
                        .warn(&self.label, format_args!("dropped TX chain {head}: {why}"));
                }
            }
            // TX buffers are only read: the used length is 0 either way.
            match queue.add_used(mem, head, 0) {
                Ok(()) => batch.used += 1,
                Err(e) => self.log.warn(
                    &self.label,
                    format_args!("cannot return TX chain {head}: {e}"),
                ),
            }
            handled += 1;
            if handled >= limit {
                batch.more = true;
                break;
            }
        }
        Ok(batch)
    }
}

/// A guest RX chain, validated and taken off the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RxBuffer {
    head: u16,
    /// Device-writable guest ranges, in order.
    segments: Vec<(GuestAddress, usize)>,
    /// Sum of the segment lengths (at most [`MAX_BUFFER_LEN`]).
    capacity: usize,
}

fn parse_rx_chain<M: GuestMemory>(mem: &M, chain: Chain<&M>) -> Result<RxBuffer, BadChain> {
    let head = chain.head_index();
    let mut segments = Vec::new();
    let mut capacity = 0usize;
    let mut descriptors = 0usize;
    for desc in chain {
        let desc = desc.map_err(BadChain::Descriptors)?;
        descriptors += 1;
        if !desc.is_write_only() {
            return Err(BadChain::WrongDirection);
        }
        let dlen = desc.len() as usize;
        if dlen == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), dlen, Permissions::Write) {
            return Err(BadChain::OutOfRange);
        }
        let take = dlen.min(MAX_BUFFER_LEN - capacity);
        segments.push((desc.addr(), take));
        capacity += take;
        if capacity == MAX_BUFFER_LEN {
            // Nothing larger will ever be written; the rest is never touched.
            break;
        }
    }
    if descriptors == 0 {
        return Err(BadChain::Empty);
    }
    if capacity < VNET_HDR_LEN {
        return Err(BadChain::TooShort);
    }
    Ok(RxBuffer {
        head,
        segments,
        capacity,
    })
}

/// Why [`RxPath::process`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The source has no more frames.
    SourceEmpty,
    /// A frame is pending until the guest posts more buffers.
    NeedBuffers,
    /// The batch limit was reached; call again.
    Budget,
    /// A frame is pending until the rate limiter lets it through.
    Throttled,
}

/// Result of one [`RxPath::process`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxBatch {
    /// Used-ring entries added (frames' buffers and refused chains).
    pub used: u32,
    /// Frames delivered.
    pub frames: u32,
    /// Why it stopped.
    pub stop: RxStop,
}

enum Deliver {
    Done,
    NoBuffers,
    TooBig,
    Failed,
    Broken(QueueError),
}

/// Host-to-guest path. Holds at most one frame while the guest has no room.
#[derive(Debug)]
pub struct RxPath {
    label: String,
    frame: Box<[u8]>,
    /// Length of the frame in `frame` still to deliver.
    pending: Option<usize>,
    /// The pending frame was charged to the rate limiter already.
    pending_paid: bool,
    /// Chains taken off the ring for the pending frame, or left over after a
    /// frame too big for them was dropped; used before popping new ones.
    reserved: VecDeque<RxBuffer>,
    mrg_rxbuf: bool,
    guest_csum: bool,
    log: GuestLog,
}

impl RxPath {
    /// An RX path for a driver that negotiated `VIRTIO_NET_F_MRG_RXBUF`
    /// (`mrg_rxbuf`: frames may span several chains) and
    /// `VIRTIO_NET_F_GUEST_CSUM` (`guest_csum`: header flags pass through).
    pub fn new(label: impl Into<String>, mrg_rxbuf: bool, guest_csum: bool) -> Self {
        Self {
            label: label.into(),
            frame: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            pending: None,
            pending_paid: false,
            reserved: VecDeque::new(),
            mrg_rxbuf,
            guest_csum,
            log: GuestLog::default(),
        }
    }

    /// Whether a frame waits for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Move frames from `source` into the guest's RX buffers until the source
    /// is empty, the guest runs out of buffers, or `budget` frames were
    /// handled; an error when the ring is broken.
    pub fn process<M: GuestMemory, S: FrameSource + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        source: &mut S,
        stats: &NetStats,
        budget: u32,
    ) -> Result<RxBatch, QueueError> {
        self.process_limited(queue, mem, source, stats, budget, |_| true)
    }

    /// [`RxPath::process`] with a rate limiter: `admit(bytes)` is asked
    /// for each frame (its bytes past the vnet header; one op); on `false`
    /// the frame stays pending and the batch ends [`RxStop::Throttled`].
    pub fn process_limited<M: GuestMemory, S: FrameSource + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        source: &mut S,
        stats: &NetStats,
        budget: u32,
        mut admit: impl FnMut(u64) -> bool,
    ) -> Result<RxBatch, QueueError> {
        let mut batch = RxBatch {
            used: 0,
            frames: 0,
            stop: RxStop::Budget,
        };
        let mut handled = 0u32;
        while handled < budget {
            let paid = std::mem::take(&mut self.pending_paid);
            let len = match self.pending.take() {
                Some(len) => len,
                None => match source.recv_frame(&mut self.frame) {
                    Ok(len) => len.min(MAX_BUFFER_LEN),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        batch.stop = RxStop::SourceEmpty;
                        return Ok(batch);
                    }
                    Err(e) => {
                        self.log
                            .warn(&self.label, format_args!("cannot read from host: {e}"));
                        batch.stop = RxStop::SourceEmpty;
                        return Ok(batch);
                    }
                },
            };
            handled += 1;
            if len < VNET_HDR_LEN {
                bump(&stats.rx_dropped_malformed, 1);
                continue;
            }
            if !paid && !admit((len - VNET_HDR_LEN) as u64) {
                self.pending = Some(len);
                batch.stop = RxStop::Throttled;
                return Ok(batch);
            }
            match self.deliver(queue, mem, len, stats, &mut batch.used) {
                Deliver::Done => {
                    batch.frames += 1;
                    bump(&stats.rx_frames, 1);
                    bump(&stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Deliver::NoBuffers => {
                    self.pending = Some(len);
                    self.pending_paid = true;
                    bump(&stats.rx_deferred, 1);
                    batch.stop = RxStop::NeedBuffers;
                    return Ok(batch);
                }
                Deliver::TooBig => {
                    bump(&stats.rx_dropped_too_big, 1);
                    self.log.warn(
                        &self.label,
                        format_args!(
                            "dropped a {len}-byte RX frame: larger than the buffers the guest posts"
                        ),
                    );
                }
                Deliver::Failed => {}
                Deliver::Broken(e) => return Err(e),
            }
        }
        Ok(batch)
    }

    /// Return an invalid chain to the guest with nothing written.
    fn refuse<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        why: BadChain,
        stats: &NetStats,
        used: &mut u32,
    ) {
        bump(&stats.rx_bad_chains, 1);
        self.log
            .warn(&self.label, format_args!("dropped RX chain {head}: {why}"));
        match queue.add_used(mem, head, 0) {
            Ok(()) => *used += 1,
            Err(e) => self.log.warn(
                &self.label,
                format_args!("cannot return RX chain {head}: {e}"),
            ),
        }
    }

    fn deliver<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
        stats: &NetStats,
        used: &mut u32,
    ) -> Deliver {
        // A frame can span at most every chain of the ring.
        let max_chains = if self.mrg_rxbuf {
            usize::from(queue.size()).max(1)
        } else {
            1
        };
        loop {
            let have: usize = self.reserved.iter().map(|b| b.capacity).sum();
            if have >= len || (!self.mrg_rxbuf && !self.reserved.is_empty()) {
                break;
            }
            if self.reserved.len() >= max_chains {
                return Deliver::TooBig;
            }
            let chain = match queue_guard::pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return Deliver::NoBuffers,
                Err(e) => return Deliver::Broken(e),
            };
            let head = chain.head_index();
            match parse_rx_chain(mem, chain) {
                Ok(buf) => self.reserved.push_back(buf),
                Err(why) => self.refuse(queue, mem, head, why, stats, used),
            }
        }
        // How many chains the frame takes (the loop above made room for it,
        // except without MRG_RXBUF, where only the first chain counts).
        let mut count = 0usize;
        let mut room = 0usize;
        for buf in self.reserved.iter().take(max_chains) {
            if room >= len {
                break;
            }
            room += buf.capacity;
            count += 1;
        }
        // num_buffers is a le16: at most max_chains, itself a queue size.
        let Ok(num_buffers) = u16::try_from(count) else {
            return Deliver::TooBig;
        };
        if room < len {
            // Keep the chains for a smaller frame.
            return Deliver::TooBig;
        }
        let frame = &mut self.frame[..len];
        frame[HDR_NUM_BUFFERS_OFFSET..HDR_NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        if !self.guest_csum {
            // The driver cannot take NEEDS_CSUM / DATA_VALID (virtio 1.x 5.1.6.4).
            frame[HDR_FLAGS_OFFSET] = 0;
        }

        let mut entries = Vec::with_capacity(count);
        let mut offset = 0usize;
        let mut failed = None;
        for buf in self.reserved.drain(..count) {
            let mut written = 0usize;
            for &(addr, seg_len) in &buf.segments {
                if offset >= len || failed.is_some() {
                    break;
                }
                let n = seg_len.min(len - offset);
                if let Err(e) = mem.write_slice(&frame[offset..offset + n], addr) {
                    failed = Some(e);
                    break;
                }
                offset += n;
                written += n;
            }
            entries.push((buf.head, used_len(written)));
        }
        if let Some(e) = &failed {
            // Cannot happen for RAM checked in parse_rx_chain; be safe anyway.
            for entry in &mut entries {
                entry.1 = 0;
            }
            bump(&stats.rx_bad_chains, entries.len() as u64);
            self.log.warn(
                &self.label,
                format_args!("dropped an RX frame: guest memory write failed: {e}"),
            );
        }
        match publish_used(queue, mem, &entries) {
            // One entry per drained chain: `count` of them.
            Ok(()) => *used += u32::from(num_buffers),
            Err(e) => {
                self.log.warn(
                    &self.label,
                    format_args!("cannot return RX chains to the guest: {e}"),
                );
                return Deliver::Failed;
            }
        }
        if failed.is_some() {
            Deliver::Failed
        } else {
            Deliver::Done
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        cpu_time_of, full_queue_of_one_chain, used_idx, KICK_CPU_BUDGET,
    };
    use std::collections::VecDeque;
    use std::time::Duration;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    pub(crate) type Mem = crate::memory::GuestMemoryMmap;

    pub(crate) const MEM_SIZE: usize = 16 << 20;
    const F_WRITE: u16 = crate::narrow::u16_of(VRING_DESC_F_WRITE);
    const F_NEXT: u16 = crate::narrow::u16_of(VRING_DESC_F_NEXT);
    const F_INDIRECT: u16 = crate::narrow::u16_of(VRING_DESC_F_INDIRECT);
    const HDR_LEN32: u32 = crate::narrow::u32_of_usize(VNET_HDR_LEN);

    /// A test buffer's length as a descriptor or used-ring length.
    fn len32(n: usize) -> u32 {
        u32::try_from(n).unwrap()
    }
    /// Where test buffers start (queues live below).
    pub(crate) const BUF_BASE: u64 = 0x10_0000;

    pub(crate) fn memory() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A driver-side view of one queue.
    pub(crate) struct Driver<'a> {
        pub(crate) vq: MockSplitQueue<'a, Mem>,
        mem: &'a Mem,
        size: usize,
        next_desc: u16,
        used_seen: u16,
    }

    impl<'a> Driver<'a> {
        pub(crate) fn new(mem: &'a Mem, start: u64, size: u16) -> Self {
            Self {
                vq: MockSplitQueue::create(mem, GuestAddress(start), size),
                mem,
                size: usize::from(size),
                next_desc: 0,
                used_seen: 0,
            }
        }

        pub(crate) fn queue(&self) -> Queue {
            self.vq.create_queue().unwrap()
        }

        /// Post one chain of (addr, len, device_writable); returns its head.
        pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let first = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, writable))| {
                    let mut flags = if writable { F_WRITE } else { 0 };
                    let next = first + u16::try_from(i).unwrap() + 1;
                    if i + 1 < descs.len() {
                        flags |= F_NEXT;
                    }
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
                })
                .collect();
            self.vq.add_desc_chains(&raw, first).unwrap();
            self.next_desc += u16::try_from(descs.len()).unwrap();
            first
        }

        /// Post one descriptor pointing to an indirect table at `table`
        /// holding `descs` (addr, len, device_writable); returns its head.
        pub(crate) fn add_indirect(&mut self, table: u64, descs: &[(u64, u32, bool)]) -> u16 {
            for (i, &(addr, len, writable)) in descs.iter().enumerate() {
                let mut flags = if writable { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                let d = RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    u16::try_from(i).unwrap() + 1,
                ));
                self.mem
                    .write_obj(d, GuestAddress(table + 16 * i as u64))
                    .unwrap();
            }
            self.add_indirect_head(table, 16 * len32(descs.len()))
        }

        /// Post one indirect descriptor `table`/`len` without writing a table.
        pub(crate) fn add_indirect_head(&mut self, table: u64, len: u32) -> u16 {
            let head = self.next_desc;
            let d = SplitDescriptor::new(table, len, F_INDIRECT, 0);
            self.vq
                .add_desc_chains(&[RawDescriptor::from(d)], head)
                .unwrap();
            self.next_desc += 1;
            head
        }

        /// Post a head index that is no descriptor at all.
        pub(crate) fn add_bogus_head(&mut self, head: u16) {
            let avail = self.vq.avail_addr();
            let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
            self.vq
                .avail()
                .ring()
                .ref_at(usize::from(idx) % self.size)
                .unwrap()
                .store(head);
            self.mem
                .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                .unwrap();
        }

        /// Used entries since the last call: (head, len).
        pub(crate) fn take_used(&mut self) -> Vec<(u16, u32)> {
            let idx = self.vq.used().idx().load();
            let mut out = Vec::new();
            while self.used_seen != idx {
                let e = self
                    .vq
                    .used()
                    .ring()
                    .ref_at(usize::from(self.used_seen) % self.size)
                    .unwrap()
                    .load();
                out.push((u16::try_from(e.id()).unwrap(), e.len()));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    fn hdr_and(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v.extend_from_slice(payload);
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                u8::try_from(i % 256)
                    .unwrap()
                    .wrapping_mul(31)
                    .wrapping_add(seed)
            })
            .collect()
    }

    struct VecSink(Vec<Vec<u8>>);
    impl FrameSink for VecSink {
        fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.push(frame.to_vec());
            Ok(())
        }
    }

    pub(crate) struct VecSource(pub(crate) VecDeque<Vec<u8>>);
    impl FrameSource for VecSource {
        fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let f = self
                .0
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(n)
        }
    }

    fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn header_len_matches_virtio_bindings() {
        assert_eq!(
            VNET_HDR_LEN,
            std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>()
        );
    }

    #[test]
    fn tx_single_descriptor() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let frame = hdr_and(&pattern(60, 1));
        mem.write_slice(&frame, GuestAddress(BUF_BASE)).unwrap();
        let head = drv.add_chain(&[(BUF_BASE, len32(frame.len()), false)]);

        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        let batch = TxPath::new("t")
            .process(&mut q, &mem, &mut sink, &stats)
            .unwrap();
        assert_eq!(
            batch,
            TxBatch {
                used: 1,
                more: false,
                throttled: false,
            }
        );
        assert_eq!(sink.0, vec![frame]);
        assert_eq!(drv.take_used(), vec![(head, 0)]);
        let s = stats.snapshot();
        assert_eq!((s.tx_frames, s.tx_bytes), (1, 60));
    }

    #[test]
    fn tx_multi_descriptor_frames() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        // Header alone in the first descriptor, payload split over two more (Linux's layout).
        let payload = pattern(3000, 7);
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(BUF_BASE))
            .unwrap();
        mem.write_slice(&payload[..1000], GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        mem.write_slice(&payload[1000..], GuestAddress(BUF_BASE + 0x3000))
            .unwrap();
        let h1 = drv.add_chain(&[
            (BUF_BASE, HDR_LEN32, false),
            (BUF_BASE + 0x1000, 1000, false),
            (BUF_BASE + 0x3000, 2000, false),
        ]);
        // A second frame in the same batch, header and data together.
        let second = hdr_and(&pattern(100, 9));
        mem.write_slice(&second, GuestAddress(BUF_BASE + 0x8000))
            .unwrap();
        let h2 = drv.add_chain(&[(BUF_BASE + 0x8000, len32(second.len()), false)]);

        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        TxPath::new("t")
            .process(&mut q, &mem, &mut sink, &stats)
            .unwrap();
        assert_eq!(sink.0, vec![hdr_and(&payload), second]);
        assert_eq!(drv.take_used(), vec![(h1, 0), (h2, 0)]);
        assert_eq!(stats.snapshot().tx_bytes, 3100);
    }

    #[test]
    fn tx_hostile_chains_are_dropped_and_returned() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let outside = MEM_SIZE as u64 + 0x1000;
        let heads = [
            drv.add_chain(&[(outside, 100, false)]),
            drv.add_chain(&[(BUF_BASE, 100, true)]),
            drv.add_chain(&[(BUF_BASE, u32::MAX, false)]),
            drv.add_chain(&[(BUF_BASE, 4, false)]),
            // Two descriptors of 40 KiB each: over 64 KiB.
            drv.add_chain(&[(BUF_BASE, 40 << 10, false), (BUF_BASE, 40 << 10, false)]),
            // Straddles the end of RAM.
            drv.add_chain(&[(MEM_SIZE as u64 - 8, 100, false)]),
            drv.add_chain(&[(u64::MAX - 10, 100, false)]),
        ];
        // A good frame after all that still goes out.
        let good = hdr_and(&pattern(64, 3));
        mem.write_slice(&good, GuestAddress(BUF_BASE + 0x10000))
            .unwrap();
        let good_head = drv.add_chain(&[(BUF_BASE + 0x10000, len32(good.len()), false)]);

        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        TxPath::new("t")
            .process(&mut q, &mem, &mut sink, &stats)
            .unwrap();
        assert_eq!(sink.0, vec![good]);
        let used = drv.take_used();
        let mut expect: Vec<(u16, u32)> = heads.iter().map(|h| (*h, 0)).collect();
        expect.push((good_head, 0));
        assert_eq!(used, expect);
        let s = stats.snapshot();
        assert_eq!((s.tx_frames, s.tx_bad_chains), (1, heads.len() as u64));
    }

    #[test]
    fn tx_bogus_head_does_not_panic() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        drv.add_bogus_head(200);
        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        TxPath::new("t")
            .process(&mut q, &mem, &mut sink, &stats)
            .unwrap();
        assert!(sink.0.is_empty());
        assert_eq!(stats.snapshot().tx_bad_chains, 1);
    }

    #[test]
    fn tx_and_rx_through_indirect_tables() {
        let mem = memory();
        let mut tx = Driver::new(&mem, 0, 16);
        let mut txq = tx.queue();
        let payload = pattern(2000, 4);
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(BUF_BASE))
            .unwrap();
        mem.write_slice(&payload, GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        let head = tx.add_indirect(
            BUF_BASE + 0x8000,
            &[
                (BUF_BASE, HDR_LEN32, false),
                (BUF_BASE + 0x1000, 2000, false),
            ],
        );
        // Indirect tables outside RAM or of odd length yield empty chains.
        let bad = [
            tx.add_indirect_head(MEM_SIZE as u64 + 0x1000, 32),
            tx.add_indirect_head(BUF_BASE, 17),
            tx.add_indirect_head(BUF_BASE, 0),
        ];
        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        TxPath::new("t")
            .process(&mut txq, &mem, &mut sink, &stats)
            .unwrap();
        assert_eq!(sink.0, vec![hdr_and(&payload)]);
        assert_eq!(
            tx.take_used(),
            vec![(head, 0), (bad[0], 0), (bad[1], 0), (bad[2], 0)]
        );
        assert_eq!(stats.snapshot().tx_bad_chains, 3);

        let mut rx = Driver::new(&mem, 0x4000, 16);
        let mut rxq = rx.queue();
        let head = rx.add_indirect(
            BUF_BASE + 0x9000,
            &[
                (BUF_BASE + 0x10000, HDR_LEN32, true),
                (BUF_BASE + 0x11000, 4096, true),
            ],
        );
        let mut src = VecSource(VecDeque::from([hdr_and(&payload)]));
        RxPath::new("t", false, true)
            .process(&mut rxq, &mem, &mut src, &stats, 8)
            .unwrap();
        assert_eq!(rx.take_used(), vec![(head, 2012)]);
        assert_eq!(read(&mem, BUF_BASE + 0x11000, 2000), payload);
    }

    /// Where the CPU tests put the used ring of their full-size queue.
    const USED_RING: GuestAddress = GuestAddress(0x8000);

    /// A sink that drops every frame: the CPU tests measure the queue work only.
    struct NullSink(u64);
    impl FrameSink for NullSink {
        fn send_frame(&mut self, _: &[u8]) -> io::Result<()> {
            self.0 += 1;
            Ok(())
        }
    }

    /// One TX kick of a full 256-entry queue whose every entry is descriptor
    /// 0, pointing at an indirect table of `descs`: the CPU it took, the
    /// counters and the frames sent.
    fn tx_kick_full_queue(descs: &[(u64, u32, u16)]) -> (Duration, NetStatsSnapshot, u64) {
        let mem = memory();
        let drv = Driver::new(&mem, 0, 256);
        let table = GuestAddress(BUF_BASE + 0x10_0000);
        let mut q = full_queue_of_one_chain(&drv.vq, &mem, 256, descs, Some(table), USED_RING);
        let stats = NetStats::default();
        let mut sink = NullSink(0);
        let mut tx = TxPath::new("t");
        let (cpu, _) = cpu_time_of(|| tx.process(&mut q, &mem, &mut sink, &stats).unwrap());
        assert_eq!(used_idx(&mem, USED_RING), 256);
        (cpu, stats.snapshot(), sink.0)
    }

    /// Finding 2 of the hostile-guest review, on TX: every avail entry names
    /// one descriptor pointing at a 65,535-entry indirect table.
    #[test]
    fn tx_kick_does_not_walk_a_huge_indirect_table() {
        let mut descs = vec![(BUF_BASE, HDR_LEN32, 0)];
        descs.extend((1..u16::MAX).map(|_| (BUF_BASE, 0, 0)));
        let (cpu, stats, sent) = tx_kick_full_queue(&descs);
        eprintln!("virtio-net TX: one kick, 256 pointers to a 65,535-entry table: {cpu:?} CPU");
        assert!(cpu < KICK_CPU_BUDGET, "one kick took {cpu:?} of CPU");
        assert_eq!((stats.tx_bad_chains, sent), (256, 0));
    }

    /// The CPU-per-kick check on TX: a full queue of the longest legal
    /// chains (one indirect table of queue-size descriptors each).
    #[test]
    fn tx_cpu_per_kick_for_a_full_queue_of_maximal_chains() {
        let mut descs = vec![(BUF_BASE, HDR_LEN32, 0)];
        descs.extend((1..256).map(|i| (BUF_BASE + 0x1000 + 64 * i, 60, 0)));
        let (cpu, stats, sent) = tx_kick_full_queue(&descs);
        eprintln!("virtio-net TX: one kick, 256 chains of 256 descriptors: {cpu:?} CPU");
        assert_eq!((stats.tx_bad_chains, sent), (0, 256));
        assert!(cpu < KICK_CPU_BUDGET, "one kick took {cpu:?} of CPU");
    }

    #[test]
    fn tx_sink_errors_are_counted() {
        struct Failing;
        impl FrameSink for Failing {
            fn send_frame(&mut self, _: &[u8]) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let head = drv.add_chain(&[(BUF_BASE, 80, false)]);
        let stats = NetStats::default();
        TxPath::new("t")
            .process(&mut q, &mem, &mut Failing, &stats)
            .unwrap();
        assert_eq!(drv.take_used(), vec![(head, 0)]);
        assert_eq!(stats.snapshot().tx_errors, 1);
    }

    #[test]
    fn rx_into_one_buffer() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let head = drv.add_chain(&[(BUF_BASE, 2048, true)]);
        let frame = hdr_and(&pattern(1000, 5));
        let mut src = VecSource(VecDeque::from([frame.clone()]));

        let stats = NetStats::default();
        let mut rx = RxPath::new("t", false, true);
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 64).unwrap();
        assert_eq!(
            batch,
            RxBatch {
                used: 1,
                frames: 1,
                stop: RxStop::SourceEmpty
            }
        );
        assert_eq!(drv.take_used(), vec![(head, len32(frame.len()))]);
        let got = read(&mem, BUF_BASE, frame.len());
        assert_eq!(&got[VNET_HDR_LEN..], &frame[VNET_HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        let s = stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_bytes), (1, 1000));
    }

    #[test]
    fn rx_scatters_over_descriptors_of_one_chain() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        // Linux "big packets" layout without MRG_RXBUF: header, then pages.
        let head = drv.add_chain(&[
            (BUF_BASE, HDR_LEN32, true),
            (BUF_BASE + 0x1000, 4096, true),
            (BUF_BASE + 0x3000, 4096, true),
        ]);
        let payload = pattern(6000, 2);
        let mut src = VecSource(VecDeque::from([hdr_and(&payload)]));
        let stats = NetStats::default();
        RxPath::new("t", false, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(drv.take_used(), vec![(head, 6012)]);
        let mut got = read(&mem, BUF_BASE + 0x1000, 4096);
        got.extend(read(&mem, BUF_BASE + 0x3000, 6000 - 4096));
        assert_eq!(got, payload);
    }

    #[test]
    fn rx_mergeable_buffers_span_chains() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let heads: Vec<u16> = (0..4)
            .map(|i| drv.add_chain(&[(BUF_BASE + i * 0x1000, 1500, true)]))
            .collect();
        let payload = pattern(4000, 11);
        let mut hdr = vec![0u8; VNET_HDR_LEN];
        hdr[HDR_FLAGS_OFFSET] = 2; // DATA_VALID passes through with GUEST_CSUM
        hdr.extend_from_slice(&payload);
        let small = hdr_and(&pattern(50, 4));
        let mut src = VecSource(VecDeque::from([hdr, small.clone()]));

        let stats = NetStats::default();
        let mut rx = RxPath::new("t", true, true);
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 64).unwrap();
        assert_eq!(batch.frames, 2);
        assert_eq!(batch.stop, RxStop::SourceEmpty);
        // 4012 bytes over three 1500-byte buffers, then the small frame in the fourth.
        assert_eq!(
            drv.take_used(),
            vec![
                (heads[0], 1500),
                (heads[1], 1500),
                (heads[2], 1012),
                (heads[3], len32(small.len()))
            ]
        );
        let first = read(&mem, BUF_BASE, 1500);
        assert_eq!(first[HDR_FLAGS_OFFSET], 2);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
        let mut got = first[VNET_HDR_LEN..].to_vec();
        got.extend(read(&mem, BUF_BASE + 0x1000, 1500));
        got.extend(read(&mem, BUF_BASE + 0x2000, 1012));
        assert_eq!(got, payload);
        let fourth = read(&mem, BUF_BASE + 0x3000, small.len());
        assert_eq!(u16::from_le_bytes([fourth[10], fourth[11]]), 1);
    }

    #[test]
    fn rx_flags_cleared_without_guest_csum() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        drv.add_chain(&[(BUF_BASE, 2048, true)]);
        let mut frame = hdr_and(&pattern(100, 1));
        frame[HDR_FLAGS_OFFSET] = 2;
        let mut src = VecSource(VecDeque::from([frame]));
        RxPath::new("t", false, false)
            .process(&mut q, &mem, &mut src, &NetStats::default(), 8)
            .unwrap();
        assert_eq!(read(&mem, BUF_BASE, 1)[0], 0);
    }

    #[test]
    fn a_throttled_frame_waits_and_is_charged_once() {
        // TX: the chain stays on the ring until the limiter admits it.
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let frame = hdr_and(&pattern(60, 1));
        mem.write_slice(&frame, GuestAddress(BUF_BASE)).unwrap();
        let head = drv.add_chain(&[(BUF_BASE, len32(frame.len()), false)]);
        let stats = NetStats::default();
        let mut sink = VecSink(Vec::new());
        let mut tx = TxPath::new("t");
        let mut charged = Vec::new();
        let batch = tx
            .process_limited(&mut q, &mem, &mut sink, &stats, |b| {
                charged.push(b);
                false
            })
            .unwrap();
        assert!(batch.throttled && batch.used == 0 && sink.0.is_empty());
        let batch = tx
            .process_limited(&mut q, &mem, &mut sink, &stats, |b| {
                charged.push(b);
                true
            })
            .unwrap();
        assert_eq!((batch.used, batch.throttled), (1, false));
        assert_eq!(sink.0, vec![frame]);
        assert_eq!(drv.take_used(), vec![(head, 0)]);
        assert_eq!(charged, vec![60, 60]);

        // RX: held back, then out of buffers: charged once, delivered once.
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let frame = hdr_and(&pattern(100, 2));
        let mut src = VecSource(VecDeque::from([frame.clone()]));
        let mut rx = RxPath::new("t", false, true);
        let mut charges = 0;
        let b = rx
            .process_limited(&mut q, &mem, &mut src, &stats, 8, |_| {
                charges += 1;
                false
            })
            .unwrap();
        assert_eq!(b.stop, RxStop::Throttled);
        assert!(rx.has_pending() && src.0.is_empty());
        let b = rx
            .process_limited(&mut q, &mem, &mut src, &stats, 8, |_| {
                charges += 1;
                true
            })
            .unwrap();
        assert_eq!(b.stop, RxStop::NeedBuffers, "no buffers posted yet");
        let head = drv.add_chain(&[(BUF_BASE, 2048, true)]);
        let b = rx
            .process_limited(&mut q, &mem, &mut src, &stats, 8, |_| {
                charges += 1;
                true
            })
            .unwrap();
        assert_eq!((b.frames, b.stop), (1, RxStop::SourceEmpty));
        assert_eq!(drv.take_used(), vec![(head, len32(frame.len()))]);
        assert_eq!(charges, 2, "refused once, paid once");
    }

    #[test]
    fn rx_without_buffers_keeps_the_frame_pending() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let frame = hdr_and(&pattern(500, 8));
        let next = hdr_and(&pattern(70, 9));
        let mut src = VecSource(VecDeque::from([frame.clone(), next.clone()]));
        let stats = NetStats::default();
        let mut rx = RxPath::new("t", true, true);

        let batch = rx.process(&mut q, &mem, &mut src, &stats, 64).unwrap();
        assert_eq!(batch.stop, RxStop::NeedBuffers);
        assert_eq!(batch.used, 0);
        assert!(rx.has_pending());
        // The source was not read past the pending frame.
        assert_eq!(src.0.len(), 1);

        // Not enough room yet for 512 bytes: one 300-byte buffer is reserved, not used.
        let h1 = drv.add_chain(&[(BUF_BASE, 300, true)]);
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 64).unwrap();
        assert_eq!(batch.stop, RxStop::NeedBuffers);
        assert!(drv.take_used().is_empty());

        let h2 = drv.add_chain(&[(BUF_BASE + 0x1000, 300, true)]);
        let h3 = drv.add_chain(&[(BUF_BASE + 0x2000, 300, true)]);
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 64).unwrap();
        assert_eq!(batch.stop, RxStop::SourceEmpty);
        assert_eq!(batch.frames, 2);
        assert_eq!(
            drv.take_used(),
            vec![(h1, 300), (h2, 212), (h3, len32(next.len()))]
        );
        assert!(!rx.has_pending());
        let s = stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_deferred), (2, 2));
    }

    #[test]
    fn rx_frame_too_big_is_dropped_and_buffer_kept() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let head = drv.add_chain(&[(BUF_BASE, 200, true)]);
        let big = hdr_and(&pattern(500, 1));
        let small = hdr_and(&pattern(100, 2));
        let mut src = VecSource(VecDeque::from([big, small.clone()]));
        let stats = NetStats::default();
        let batch = RxPath::new("t", false, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(batch.frames, 1);
        assert_eq!(drv.take_used(), vec![(head, len32(small.len()))]);
        assert_eq!(read(&mem, BUF_BASE + 12, 100), small[12..].to_vec());
        let s = stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_dropped_too_big), (1, 1));
    }

    #[test]
    fn rx_mergeable_frame_larger_than_the_whole_ring_is_dropped() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 4);
        let mut q = drv.queue();
        let heads: Vec<u16> = (0..4)
            .map(|i| drv.add_chain(&[(BUF_BASE + i * 0x1000, 100, true)]))
            .collect();
        let big = hdr_and(&pattern(1000, 1));
        let small = hdr_and(&pattern(20, 2));
        let mut src = VecSource(VecDeque::from([big, small.clone()]));
        let stats = NetStats::default();
        let batch = RxPath::new("t", true, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(batch.frames, 1);
        assert_eq!(drv.take_used(), vec![(heads[0], len32(small.len()))]);
        assert_eq!(stats.snapshot().rx_dropped_too_big, 1);
    }

    #[test]
    fn rx_hostile_chains_are_returned_empty() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        let outside = MEM_SIZE as u64 + 0x1000;
        let bad = [
            drv.add_chain(&[(outside, 2048, true)]),
            drv.add_chain(&[(BUF_BASE, 2048, false)]),
            drv.add_chain(&[(BUF_BASE, u32::MAX, true)]),
            drv.add_chain(&[(BUF_BASE, 4, true)]),
            drv.add_chain(&[(BUF_BASE, 100, true), (BUF_BASE + 0x1000, 100, false)]),
            drv.add_chain(&[(u64::MAX - 100, 2048, true)]),
        ];
        let good = drv.add_chain(&[(BUF_BASE + 0x4000, 2048, true)]);
        let frame = hdr_and(&pattern(90, 6));
        let mut src = VecSource(VecDeque::from([frame.clone()]));
        let stats = NetStats::default();
        let batch = RxPath::new("t", true, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(batch.frames, 1);
        assert_eq!(batch.used, len32(bad.len()) + 1);
        let mut expect: Vec<(u16, u32)> = bad.iter().map(|h| (*h, 0)).collect();
        expect.push((good, len32(frame.len())));
        assert_eq!(drv.take_used(), expect);
        let s = stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_bad_chains), (1, bad.len() as u64));
    }

    #[test]
    fn rx_bogus_head_and_short_frames_do_not_panic() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        drv.add_bogus_head(300);
        let head = drv.add_chain(&[(BUF_BASE, 2048, true)]);
        let frame = hdr_and(&pattern(40, 1));
        let mut src = VecSource(VecDeque::from([vec![1, 2, 3], Vec::new(), frame.clone()]));
        let stats = NetStats::default();
        let batch = RxPath::new("t", false, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(batch.frames, 1);
        // The bogus head cannot go on the used ring (out of range); the good one does.
        assert_eq!(drv.take_used(), vec![(head, len32(frame.len()))]);
        let s = stats.snapshot();
        assert_eq!((s.rx_dropped_malformed, s.rx_bad_chains), (2, 1));
    }

    #[test]
    fn rx_budget_limits_a_batch() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 16);
        let mut q = drv.queue();
        for i in 0..8 {
            drv.add_chain(&[(BUF_BASE + i * 0x1000, 2048, true)]);
        }
        let mut src = VecSource((0..5).map(|i| hdr_and(&pattern(64, i))).collect());
        let stats = NetStats::default();
        let mut rx = RxPath::new("t", true, true);
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 3).unwrap();
        assert_eq!((batch.frames, batch.stop), (3, RxStop::Budget));
        let batch = rx.process(&mut q, &mem, &mut src, &stats, 3).unwrap();
        assert_eq!((batch.frames, batch.stop), (2, RxStop::SourceEmpty));
    }

    #[test]
    fn rx_64k_gso_frame_with_mergeable_buffers() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 0, 256);
        let mut q = drv.queue();
        for i in 0..64 {
            drv.add_chain(&[(BUF_BASE + i * 0x1000, 4096, true)]);
        }
        let payload = pattern(MAX_FRAME_LEN, 3);
        let mut src = VecSource(VecDeque::from([hdr_and(&payload)]));
        let stats = NetStats::default();
        let batch = RxPath::new("t", true, true)
            .process(&mut q, &mem, &mut src, &stats, 64)
            .unwrap();
        assert_eq!(batch.frames, 1);
        let used = drv.take_used();
        assert_eq!(used.len(), MAX_BUFFER_LEN.div_ceil(4096));
        let total: u32 = used.iter().map(|u| u.1).sum();
        assert_eq!(total as usize, MAX_BUFFER_LEN);
        let first = read(&mem, BUF_BASE, VNET_HDR_LEN);
        assert_eq!(
            usize::from(u16::from_le_bytes([first[10], first[11]])),
            used.len()
        );
    }
}
