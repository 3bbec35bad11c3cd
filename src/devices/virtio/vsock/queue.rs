//! The vsock queues: tx (guest packets to the muxer), rx (the muxer's
//! packets into the guest's buffers) and event (the transport reset a
//! restored guest gets). Pure queue logic over guest memory and a
//! [`Muxer`]: no threads, no KVM.
//!
//! Every chain is bounded: a tx chain is read for at most a header and
//! [`MAX_PAYLOAD`] bytes, whatever its descriptors claim; an rx chain is
//! written with at most that; a chain that is broken, points outside guest
//! RAM or is too short for a header is returned empty and counted.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::muxer::{Muxer, MAX_PAYLOAD};
use super::packet::{Header, HDR_LEN};
use super::EVENT_TRANSPORT_RESET;
use crate::devices::virtio::buffers::Buffers;
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::GuestLog;

const LABEL: &str = "virtio-vsock";

/// Hand every packet the guest queued on tx to `muxer`. Returns whether
/// the used ring changed, or the error of a broken ring.
pub fn process_tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    muxer: &mut Muxer,
    scratch: &mut [u8],
    log: &mut GuestLog,
) -> Result<bool, QueueError> {
    let done = queue_guard::drain(queue, mem, |chain| {
        match read_packet(mem, chain, scratch) {
            Ok((hdr, n)) => muxer.on_guest_packet(&hdr, &scratch[..n]),
            Err(why) => {
                muxer.count_bad();
                log.warn(LABEL, format_args!("tx packet dropped: {why}"));
            }
        }
        0
    })?;
    if done.lost > 0 {
        log.warn(LABEL, format_args!("tx head index past the queue"));
    }
    Ok(done.used > 0)
}

/// The header and payload of one tx chain, the payload copied into
/// `scratch` (at least [`MAX_PAYLOAD`] bytes).
fn read_packet<M: GuestMemory>(
    mem: &M,
    chain: queue_guard::Chain<&M>,
    scratch: &mut [u8],
) -> Result<(Header, usize), String> {
    let bufs = Buffers::of(mem, chain, false, HDR_LEN + MAX_PAYLOAD).map_err(|e| e.to_string())?;
    let mut raw = [0u8; HDR_LEN];
    if bufs.read_at(mem, 0, &mut raw).map_err(|e| e.to_string())? < HDR_LEN {
        return Err(format!("{} bytes, shorter than a header", bufs.len()));
    }
    let hdr = Header::parse(&raw);
    let n = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if n > MAX_PAYLOAD {
        return Err(format!("payload of {n} bytes, more than {MAX_PAYLOAD}"));
    }
    let want = scratch
        .get_mut(..n)
        .ok_or("payload longer than the buffer")?;
    if bufs
        .read_at(mem, HDR_LEN, want)
        .map_err(|e| e.to_string())?
        < n
    {
        return Err(format!(
            "header says {n} payload bytes, the buffers hold {}",
            bufs.len() - HDR_LEN
        ));
    }
    Ok((hdr, n))
}

/// Fill the guest's rx buffers with what `muxer` has for it: at most
/// `budget` packets. `held` keeps a chain taken when the muxer turned out
/// to have nothing after all, for the next call. Returns the packets
/// delivered (used entries added) and whether the budget ran out.
pub fn process_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    muxer: &mut Muxer,
    held: &mut Option<Buffers>,
    scratch: &mut [u8],
    log: &mut GuestLog,
) -> Result<(u32, bool), QueueError> {
    let budget = u32::from(queue.size());
    let mut used = 0u32;
    while used < budget {
        if !muxer.has_rx() {
            return Ok((used, false));
        }
        let bufs = match held.take() {
            Some(b) => b,
            None => {
                let Some(chain) = queue_guard::pop(queue, mem)? else {
                    return Ok((used, false));
                };
                let head = chain.head_index();
                match Buffers::of(mem, chain, true, HDR_LEN + MAX_PAYLOAD) {
                    Ok(b) if b.len() >= HDR_LEN => b,
                    bad => {
                        let why = bad
                            .err()
                            .map_or("shorter than a header".into(), |e| e.to_string());
                        log.warn(LABEL, format_args!("rx chain {head} refused: {why}"));
                        muxer.count_bad();
                        if queue.add_used(mem, head, 0).is_ok() {
                            used += 1;
                        }
                        continue;
                    }
                }
            }
        };
        let room = (bufs.len() - HDR_LEN).min(scratch.len());
        let Some(hdr) = muxer.next_rx(&mut scratch[..room]) else {
            *held = Some(bufs);
            return Ok((used, false));
        };
        let n = usize::try_from(hdr.len).unwrap_or(0).min(room);
        let ok = bufs.write_at(mem, 0, &hdr.to_bytes()).is_ok()
            && bufs.write_at(mem, HDR_LEN, &scratch[..n]).is_ok();
        if !ok {
            // Checked inside guest RAM when taken: cannot happen.
            log.warn(
                LABEL,
                format_args!("rx chain {}: guest memory write failed", bufs.head),
            );
        }
        // HDR_LEN + n <= HDR_LEN + MAX_PAYLOAD, far below u32::MAX.
        let len = u32::try_from(HDR_LEN + n).unwrap_or(0);
        match queue.add_used(mem, bufs.head, if ok { len } else { 0 }) {
            Ok(()) => used += 1,
            Err(e) => log.warn(
                LABEL,
                format_args!("cannot return rx chain {}: {e}", bufs.head),
            ),
        }
    }
    Ok((used, true))
}

/// Post a transport reset on the event queue if one is owed (`owed` is
/// cleared once it is in a guest buffer); whether the used ring changed.
pub fn process_event<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    owed: &mut bool,
    log: &mut GuestLog,
) -> Result<bool, QueueError> {
    let mut changed = false;
    while *owed {
        let Some(chain) = queue_guard::pop(queue, mem)? else {
            return Ok(false);
        };
        let head = chain.head_index();
        let written = match Buffers::of(mem, chain, true, 4) {
            Ok(b) if b.len() == 4 => b
                .write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                .unwrap_or(0),
            _ => 0,
        };
        if written == 4 {
            *owed = false;
        } else {
            log.warn(
                LABEL,
                format_args!("event chain {head} refused: not 4 writable bytes"),
            );
        }
        // written <= 4.
        match queue.add_used(mem, head, u32::try_from(written).unwrap_or(0)) {
            Ok(()) => changed = true,
            Err(e) => log.warn(LABEL, format_args!("cannot return event chain {head}: {e}")),
        }
    }
    Ok(changed)
}
