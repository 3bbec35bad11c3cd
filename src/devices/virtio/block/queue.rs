//! The virtio-blk queue loop: drain the available ring, serve each request,
//! fill the used ring, and say whether the guest wants an interrupt.
//!
//! Pure queue logic over guest memory and a [`Disk`]: no threads, no KVM, so
//! it is tested with virtio-queue's mock driver.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, DiskError};
use super::request::{Limits, Request, RequestKind};
use super::uring::{Completion, Uring};
use super::PASS_BYTES;
use crate::devices::virtio::guest_log::GuestLog;
use crate::devices::virtio::queue_guard::{self, Chain, Disposition, Drained, QueueError};
use crate::memory::GuestMemoryMmap;
use crate::narrow;

/// The status byte the device writes last in each chain (virtio 1.x 5.2.6).
const STATUS_OK: u8 = narrow::u8_of(VIRTIO_BLK_S_OK);
const STATUS_IOERR: u8 = narrow::u8_of(VIRTIO_BLK_S_IOERR);
const STATUS_UNSUPP: u8 = narrow::u8_of(VIRTIO_BLK_S_UNSUPP);

/// What block devices' guest problems are logged as.
const LABEL: &str = "virtio-blk";

/// The bytes one pass of the Sync engine may still move ([`PASS_BYTES`]):
/// the request that reaches the bound is the pass's last, the next stays on
/// the ring and the worker looks at its control events before it goes on.
#[derive(Debug, Default)]
pub struct Pass {
    moved: u64,
    ended: bool,
}

impl Pass {
    /// Whether a request moving `bytes` is still this pass's (the first one
    /// always is).
    pub fn admit(&mut self, bytes: u64) -> bool {
        if self.moved > 0 && self.moved.saturating_add(bytes) > PASS_BYTES {
            self.ended = true;
            return false;
        }
        self.moved = self.moved.saturating_add(bytes);
        true
    }

    /// Whether the bound left requests on the ring: the caller serves again
    /// once it has looked at its other events.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// Serve every request in `queue`. Returns true when the used ring changed
/// and the driver has not asked us to hold back the interrupt, or the
/// [`QueueError`] when the ring is broken: the device then needs a reset.
///
/// The ring is drained as [`queue_guard::drain`] says.
pub fn process_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &Disk,
    limits: &Limits,
    errors: &mut GuestLog,
) -> Result<bool, QueueError> {
    process_queue_limited(mem, queue, disk, limits, errors, |_, _| true)
}

/// [`process_queue`] with a rate limiter: `admit(bytes, ops)` is asked
/// before each well-formed request is served (bytes for reads and writes,
/// one op for each); on `false` the request stays on the ring and the
/// drain stops until the caller's limiter lets it through.
pub fn process_queue_limited(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &Disk,
    limits: &Limits,
    errors: &mut GuestLog,
    mut admit: impl FnMut(u64, u64) -> bool,
) -> Result<bool, QueueError> {
    let done = queue_guard::drain_while(queue, mem, |chain| {
        serve(mem, chain, disk, limits, errors, &mut admit)
    })?;
    report_lost(&done, errors);
    Ok(finish(mem, queue, done.used > 0, errors))
}

/// [`process_queue_limited`] through the io_uring engine: first the
/// requests the kernel finished go on the used ring, then the new ones are
/// parsed and admitted as there, and those the engine runs are handed to
/// the kernel instead of served on the spot. A full engine leaves chains on
/// the available ring: the next completion brings the worker back.
pub(super) fn process_queue_async(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    uring: &mut Uring,
    limits: &Limits,
    errors: &mut GuestLog,
    mut admit: impl FnMut(u64, u64) -> bool,
) -> Result<bool, QueueError> {
    let mut done = complete(mem, queue, uring.reap(), errors);
    let disk = uring.disk().clone();
    uring.new_pass();
    let drained = queue_guard::drain_taking(queue, mem, |chain| {
        let head = chain.head_index();
        let request = match parse(mem, chain, limits, errors) {
            Ok(r) => r,
            Err(len) => return Disposition::Used(len),
        };
        let bytes = admitted_bytes(&request);
        if !uring.has_room_for(bytes) || !admit(bytes, 1) {
            return Disposition::Hold;
        }
        if !uring.runs(&request) {
            return Disposition::Used(execute(mem, &request, &disk, errors));
        }
        match uring.push(mem, head, &request) {
            Ok(()) => Disposition::Taken,
            Err(e) => {
                errors.report(LABEL, &format!("{:?} request", request.kind), &e);
                Disposition::Used(status_len(mem, request.status, STATUS_IOERR, 0, errors))
            }
        }
    })?;
    done.absorb(drained);
    if let Err(e) = uring.submit() {
        // The entries stay queued and go with the next submit.
        errors.report(LABEL, "cannot submit to the io_uring", &e);
    }
    // What the kernel finished inside the submit (reads the page cache
    // holds complete there): answered now, not after another wake-up.
    done.absorb(complete(mem, queue, uring.reap(), errors));
    report_lost(&done, errors);
    Ok(finish(mem, queue, done.used > 0, errors))
}

/// One kick through a fresh io_uring engine on `disk`, waiting for all it
/// put in flight: what the fuzz target drives (a worker keeps its engine).
pub fn process_queue_async_once(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &std::sync::Arc<Disk>,
    limits: &Limits,
    errors: &mut GuestLog,
) -> std::io::Result<Result<bool, QueueError>> {
    let mut uring = Uring::new(disk.clone())?;
    let r = process_queue_async(mem, queue, &mut uring, limits, errors, |_, _| true);
    let rest = uring.wait_idle();
    let irq = complete_and_finish(mem, queue, rest, errors);
    Ok(r.map(|i| i || irq))
}

/// Put `completions` on the used ring, each with its status byte.
pub(super) fn complete(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    completions: Vec<Completion>,
    errors: &mut GuestLog,
) -> Drained {
    let mut done = Drained::default();
    for c in completions {
        let len = match c.result {
            Ok(n) => status_len(mem, c.status, STATUS_OK, n, errors),
            Err(e) => {
                errors.report(LABEL, "request", &e);
                status_len(mem, c.status, STATUS_IOERR, 0, errors)
            }
        };
        done.count(queue.add_used(mem, c.head, len));
    }
    done
}

/// [`complete`], then whether the driver wants an interrupt for them.
pub(super) fn complete_and_finish(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    completions: Vec<Completion>,
    errors: &mut GuestLog,
) -> bool {
    let done = complete(mem, queue, completions, errors);
    report_lost(&done, errors);
    finish(mem, queue, done.used > 0, errors)
}

fn report_lost(done: &Drained, errors: &mut GuestLog) {
    if let Some(e) = &done.lost_because {
        errors.report(
            LABEL,
            &format!("{} chains not returned to the used ring", done.lost),
            e,
        );
    }
}

fn finish(mem: &GuestMemoryMmap, queue: &mut Queue, used_any: bool, errors: &mut GuestLog) -> bool {
    if !used_any {
        return false;
    }
    queue_guard::wants_interrupt(queue, mem).unwrap_or_else(|e| {
        errors.report(LABEL, "cannot read the used event index", &e);
        true
    })
}

/// Serve one chain; returns the used length (bytes written to guest memory,
/// status byte included; 0 when the chain was dropped), or `None` when
/// `admit` holds it back.
fn serve(
    mem: &GuestMemoryMmap,
    chain: Chain<&GuestMemoryMmap>,
    disk: &Disk,
    limits: &Limits,
    errors: &mut GuestLog,
    admit: &mut impl FnMut(u64, u64) -> bool,
) -> Option<u32> {
    let request = match parse(mem, chain, limits, errors) {
        Ok(r) => r,
        Err(len) => return Some(len),
    };
    if !admit(admitted_bytes(&request), 1) {
        return None;
    }
    Some(execute(mem, &request, disk, errors))
}

/// The request in `chain`, or the used length of a chain that is not one
/// (its status byte, if any, says IOERR).
fn parse(
    mem: &GuestMemoryMmap,
    chain: Chain<&GuestMemoryMmap>,
    limits: &Limits,
    errors: &mut GuestLog,
) -> Result<Request, u32> {
    Request::parse(chain, limits).map_err(|rejected| {
        errors.report(LABEL, "bad request", &rejected.error);
        match rejected.status {
            Some(status) => status_len(mem, status, STATUS_IOERR, 0, errors),
            None => 0,
        }
    })
}

/// What a rate limiter charges for `request` (besides one op).
fn admitted_bytes(request: &Request) -> u64 {
    match request.kind {
        RequestKind::In | RequestKind::Out => request.data_len(),
        _ => 0,
    }
}

/// Serve `request` on the spot; returns its used length.
fn execute(mem: &GuestMemoryMmap, request: &Request, disk: &Disk, errors: &mut GuestLog) -> u32 {
    let (status, written) = match disk.execute(mem, request) {
        Ok(n) => (STATUS_OK, n),
        Err(e @ DiskError::Unsupported(_)) => {
            errors.report(LABEL, "request", &e);
            (STATUS_UNSUPP, 0)
        }
        Err(e) => {
            errors.report(LABEL, &format!("{:?} request", request.kind), &e);
            (STATUS_IOERR, 0)
        }
    };
    status_len(mem, request.status, status, written, errors)
}

/// Write `status` at `addr`: the used length is then `written` plus the
/// status byte, or 0 when the byte cannot be written.
fn status_len(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    status: u8,
    written: u32,
    errors: &mut GuestLog,
) -> u32 {
    match write_status(mem, addr, status, errors) {
        Ok(()) => written.saturating_add(1),
        Err(()) => 0,
    }
}

fn write_status(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    status: u8,
    errors: &mut GuestLog,
) -> Result<(), ()> {
    mem.write_obj(status, addr).map_err(|e| {
        errors.report(LABEL, "cannot write the status byte", &e);
    })
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    use std::sync::Arc;

    use super::super::test_utils::TempImage;
    use super::super::{ID_BYTES, QUEUE_SIZE, SEG_MAX};
    use super::*;
    use crate::config::IoEngine;
    use crate::devices::virtio::test_utils::{
        cpu_time_of, full_queue_of_one_chain, kick_cpu_budget_moving, used_idx, KICK_CPU_BUDGET,
    };

    const W: u16 = narrow::u16_of(VRING_DESC_F_WRITE);
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const MEM_SIZE: usize = 0x4_0000;
    const QSIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    /// A driver with a 16-entry queue at guest address 0.
    struct Driver<'a> {
        m: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        queue: Queue,
        next_desc: u16,
    }

    impl<'a> Driver<'a> {
        fn new(m: &'a GuestMemoryMmap) -> Self {
            let vq = MockSplitQueue::new(m, QSIZE);
            let queue = vq.create_queue().unwrap();
            Self {
                m,
                vq,
                queue,
                next_desc: 0,
            }
        }

        /// Put one chain in the available ring (descriptors linked in order).
        fn submit(&mut self, descs: &[RawDescriptor]) {
            let next = const { narrow::u16_of(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT) };
            let first = self.next_desc;
            let linked: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let d = Descriptor::from(*d);
                    let idx = first + u16::try_from(i).unwrap();
                    if i + 1 < descs.len() {
                        RawDescriptor::from(Descriptor::new(
                            d.addr().0,
                            d.len(),
                            d.flags() | next,
                            idx + 1,
                        ))
                    } else {
                        RawDescriptor::from(Descriptor::new(
                            d.addr().0,
                            d.len(),
                            d.flags() & !next,
                            0,
                        ))
                    }
                })
                .collect();
            self.vq.add_desc_chains(&linked, first).unwrap();
            self.next_desc += u16::try_from(descs.len()).unwrap();
        }

        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        }

        fn used_idx(&self) -> u16 {
            self.vq.used().idx().load()
        }

        fn status(&self, at: u64) -> u8 {
            self.m.read_obj(GuestAddress(at)).unwrap()
        }
    }

    fn image(sectors: usize) -> (TempImage, Vec<u8>) {
        let contents: Vec<u8> = (0..sectors * 512)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        (TempImage::new(&contents), contents)
    }

    fn run(d: &mut Driver<'_>, disk: &Disk) -> (bool, GuestLog) {
        let mut errors = GuestLog::default();
        let irq = process_queue(d.m, &mut d.queue, disk, &disk.limits(), &mut errors)
            .expect("the ring is sound");
        (irq, errors)
    }

    /// 0: read sectors 2..4 into two buffers; 1: write sector 10 (0x5a);
    /// 2: flush; 3: get-id; status bytes at STATUS + i.
    fn submit_read_write_flush_get_id(m: &GuestMemoryMmap, d: &mut Driver<'_>) {
        header(m, HDR, VIRTIO_BLK_T_IN, 2);
        d.submit(&[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 512, W),
            desc(STATUS, 1, W),
        ]);
        header(m, HDR + 0x100, VIRTIO_BLK_T_OUT, 10);
        m.write_slice(&[0x5a; 512], GuestAddress(DATA + 0x2000))
            .unwrap();
        d.submit(&[
            desc(HDR + 0x100, 16, 0),
            desc(DATA + 0x2000, 512, 0),
            desc(STATUS + 1, 1, W),
        ]);
        header(m, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
        d.submit(&[desc(HDR + 0x200, 16, 0), desc(STATUS + 2, 1, W)]);
        header(m, HDR + 0x300, VIRTIO_BLK_T_GET_ID, 0);
        d.submit(&[
            desc(HDR + 0x300, 16, 0),
            desc(DATA + 0x3000, 20, W),
            desc(STATUS + 3, 1, W),
        ]);
    }

    #[test]
    fn read_write_flush_get_id() {
        let m = mem();
        let (img, contents) = image(16);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        submit_read_write_flush_get_id(&m, &mut d);
        m.write_slice(&[0xff; 4], GuestAddress(STATUS)).unwrap();

        let (irq, errors) = run(&mut d, &disk);
        assert!(irq);
        assert_eq!(errors.count(), 0);
        assert_eq!(d.used_idx(), 4);
        // Used lengths: data written into guest memory plus the status byte.
        assert_eq!(d.used(0), (0, 1025));
        assert_eq!(d.used(1), (4, 1));
        assert_eq!(d.used(2), (7, 1));
        assert_eq!(d.used(3), (9, 21));
        for i in 0..4 {
            assert_eq!(d.status(STATUS + i), STATUS_OK);
        }

        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, contents[1024..1536]);
        m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(got, contents[1536..2048]);
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk[10 * 512..11 * 512].iter().all(|&b| b == 0x5a));
        assert_eq!(on_disk[..10 * 512], contents[..10 * 512]);
        let mut id = [0u8; ID_BYTES];
        m.read_slice(&mut id, GuestAddress(DATA + 0x3000)).unwrap();
        assert_eq!(&id, disk.id());

        // Nothing new: no interrupt, nothing used.
        let (irq, _) = run(&mut d, &disk);
        assert!(!irq);
        assert_eq!(d.used_idx(), 4);
    }

    #[test]
    fn errors_complete_with_a_status() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        let ioerr = STATUS_IOERR;
        m.write_slice(&[0xff; 8], GuestAddress(STATUS)).unwrap();

        // 0: out of range (the disk has 4 sectors).
        header(&m, HDR, VIRTIO_BLK_T_IN, 4);
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        // 1: header too short.
        d.submit(&[desc(HDR, 8, 0), desc(DATA, 512, W), desc(STATUS + 1, 1, W)]);
        // 2: data outside guest memory.
        header(&m, HDR + 0x100, VIRTIO_BLK_T_IN, 0);
        d.submit(&[
            desc(HDR + 0x100, 16, 0),
            desc(MEM_SIZE as u64 - 256, 512, W),
            desc(STATUS + 2, 1, W),
        ]);
        // 3: data direction mismatch (a write whose data is device-writable).
        header(&m, HDR + 0x200, VIRTIO_BLK_T_OUT, 0);
        d.submit(&[
            desc(HDR + 0x200, 16, 0),
            desc(DATA, 512, W),
            desc(STATUS + 3, 1, W),
        ]);
        // 4: unsupported type.
        header(&m, HDR + 0x300, 11, 0);
        d.submit(&[desc(HDR + 0x300, 16, 0), desc(STATUS + 4, 1, W)]);

        let (irq, errors) = run(&mut d, &disk);
        assert!(irq);
        assert_eq!(errors.count(), 5);
        assert_eq!(d.used_idx(), 5);
        for i in 0..5u16 {
            assert_eq!(d.used(i).1, 1, "request {i}");
        }
        for i in 0..4 {
            assert_eq!(d.status(STATUS + i), ioerr, "request {i}");
        }
        assert_eq!(d.status(STATUS + 4), STATUS_UNSUPP);
    }

    #[test]
    fn write_on_read_only_drive() {
        let m = mem();
        let (img, contents) = image(4);
        let disk = Disk::open(img.path(), true).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        m.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]);
        let (irq, errors) = run(&mut d, &disk);
        assert!(irq);
        assert_eq!(errors.count(), 1);
        assert_eq!(d.used(0), (0, 1));
        assert_eq!(d.status(STATUS), STATUS_IOERR);
        assert_eq!(std::fs::read(img.path()).unwrap(), contents);
    }

    #[test]
    fn chains_without_a_usable_status_are_returned_empty() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        // 0: no status descriptor.
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 512, W)]);
        // 1: status descriptor device-readable.
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)]);
        // 2: status byte outside guest memory.
        d.submit(&[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(0x1000_0000, 1, W),
        ]);
        // 3: a good one after them still gets served.
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]);

        let (irq, errors) = run(&mut d, &disk);
        assert!(irq);
        assert_eq!(errors.count(), 3);
        assert_eq!(d.used_idx(), 4);
        // Request 0's chain is "header + one writable buffer": the buffer is
        // taken as the status descriptor and the request has no data.
        assert_eq!(d.used(0).1, 1);
        assert_eq!(d.used(1).1, 0);
        assert_eq!(d.used(2).1, 0);
        assert_eq!(d.used(3).1, 513);
    }

    #[test]
    fn header_only_chain_is_dropped() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        d.submit(&[desc(HDR, 16, 0)]);
        let (irq, errors) = run(&mut d, &disk);
        assert!(irq);
        assert_eq!(errors.count(), 1);
        assert_eq!(d.used(0), (0, 0));
    }

    #[test]
    fn a_limiter_holds_requests_on_the_ring_in_order() {
        let m = mem();
        let (img, _) = image(16);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)]);
        header(&m, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        d.submit(&[desc(HDR + 0x100, 16, 0), desc(STATUS + 1, 1, W)]);
        let mut errors = GuestLog::default();
        let mut asked = Vec::new();
        // The first is refused: nothing is served, the ring is as it was.
        let irq = process_queue_limited(
            &m,
            &mut d.queue,
            &disk,
            &disk.limits(),
            &mut errors,
            |b, o| {
                asked.push((b, o));
                false
            },
        )
        .unwrap();
        assert!(!irq);
        assert_eq!(d.used_idx(), 0);
        // One at a time: the read, then the flush.
        let mut budget = 1;
        for served in [1, 2] {
            let irq = process_queue_limited(
                &m,
                &mut d.queue,
                &disk,
                &disk.limits(),
                &mut errors,
                |b, o| {
                    asked.push((b, o));
                    std::mem::take(&mut budget) > 0
                },
            )
            .unwrap();
            assert!(irq);
            assert_eq!(d.used_idx(), served);
            budget = 1;
        }
        assert_eq!(d.used(0), (0, 1025));
        assert_eq!(asked, vec![(1024, 1), (1024, 1), (0, 1), (0, 1)]);
        assert_eq!(errors.count(), 0);
    }

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        d.submit(&[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
        m.write_obj(
            narrow::u16_of(VRING_AVAIL_F_NO_INTERRUPT),
            d.vq.avail_addr(),
        )
        .unwrap();
        let (irq, _) = run(&mut d, &disk);
        assert!(!irq);
        assert_eq!(d.used_idx(), 1);
    }

    #[test]
    fn bogus_avail_index_is_a_broken_ring() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        // The driver claims more chains than the queue can hold.
        m.write_obj(QSIZE + 5, d.vq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut errors = GuestLog::default();
        let r = process_queue(d.m, &mut d.queue, &disk, &disk.limits(), &mut errors);
        assert_eq!(
            r,
            Err(QueueError::AvailIndex {
                avail: QSIZE + 5,
                ahead: QSIZE + 5,
                size: QSIZE
            })
        );
        assert_eq!(d.used_idx(), 0);
    }

    /// Where the CPU tests put the used ring of their full-size queue.
    const USED_RING: GuestAddress = GuestAddress(0x8000);

    /// One kick of a full-size queue whose every entry is the chain `descs`
    /// (through an indirect table at `indirect_at`, if given; every header
    /// a request of type `kind` at sector 0): the CPU it took, its result,
    /// the errors it counted and the guest memory.
    fn kick_full_queue(
        kind: u32,
        descs: &[(u64, u32, u16)],
        indirect_at: Option<GuestAddress>,
        engine: IoEngine,
    ) -> (
        std::time::Duration,
        Result<bool, QueueError>,
        GuestLog,
        GuestMemoryMmap,
    ) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        header(&m, HDR, kind, 0);
        let (img, _) = image(256);
        let disk = Arc::new(Disk::open(img.path(), false).unwrap());
        let vq = MockSplitQueue::create(&m, GuestAddress(0), QUEUE_SIZE);
        let mut queue = full_queue_of_one_chain(&vq, &m, QUEUE_SIZE, descs, indirect_at, USED_RING);
        let mut errors = GuestLog::default();
        let limits = disk.limits();
        let (cpu, r) = match engine {
            IoEngine::Sync => {
                cpu_time_of(|| process_queue(&m, &mut queue, &disk, &limits, &mut errors))
            }
            IoEngine::Async => cpu_time_of(|| {
                process_queue_async_once(&m, &mut queue, &disk, &limits, &mut errors).unwrap()
            }),
        };
        // Every chain is handed back.
        assert_eq!(used_idx(&m, USED_RING), QUEUE_SIZE);
        (cpu, r, errors, m)
    }

    /// Finding 2 of the hostile-guest review: every avail entry names one
    /// descriptor pointing at a 65,535-entry indirect table.
    #[test]
    fn one_kick_does_not_walk_a_huge_indirect_table() {
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend((2..u16::MAX).map(|_| (DATA, 0, W)));
        descs.push((STATUS, 1, W));
        for engine in [IoEngine::Sync, IoEngine::Async] {
            let (cpu, r, errors, _) = kick_full_queue(
                VIRTIO_BLK_T_IN,
                &descs,
                Some(GuestAddress(0x10_0000)),
                engine,
            );
            eprintln!(
                "virtio-blk ({engine:?}): one kick, {QUEUE_SIZE} pointers to a 65,535-entry table: {cpu:?} CPU"
            );
            assert_eq!(r, Ok(true));
            assert!(cpu < KICK_CPU_BUDGET, "one kick took {cpu:?} of CPU");
            assert_eq!(errors.count(), u64::from(QUEUE_SIZE));
        }
    }

    /// The CPU-per-kick check: a full queue of the longest chains the spec
    /// allows (queue-size descriptors: header, one sector, 253 empty data
    /// descriptors, status), every avail entry naming the same chain.
    #[test]
    fn cpu_per_kick_for_a_full_queue_of_maximal_chains() {
        let mut descs = vec![(HDR, 16, 0), (DATA, 512, W)];
        descs.extend((3..QUEUE_SIZE).map(|_| (DATA, 0, W)));
        descs.push((STATUS, 1, W));
        assert_eq!(descs.len(), usize::from(QUEUE_SIZE));
        // The header is left all zero: VIRTIO_BLK_T_IN of sector 0.
        for engine in [IoEngine::Sync, IoEngine::Async] {
            let (cpu, r, errors, m) = kick_full_queue(VIRTIO_BLK_T_IN, &descs, None, engine);
            eprintln!(
                "virtio-blk ({engine:?}): one kick, {QUEUE_SIZE} chains of {QUEUE_SIZE} descriptors: {cpu:?} CPU"
            );
            assert_eq!(r, Ok(true));
            assert_eq!(errors.count(), 0);
            assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), STATUS_OK);
            assert!(cpu < KICK_CPU_BUDGET, "one kick took {cpu:?} of CPU");
        }
    }

    /// Issue 25's second hostile-guest finding: a full queue of chains of
    /// 254 (seg_max) 512-byte segments, reads and writes. One
    /// `preadv`/`pwritev` per request, not one call per segment: 256 calls
    /// a kick instead of 65,024.
    #[test]
    fn cpu_per_kick_for_a_full_queue_of_small_segments() {
        for (kind, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, 0)] {
            let mut descs = vec![(HDR, 16, 0)];
            descs.extend((0..SEG_MAX).map(|i| (0x20_0000 + u64::from(i) * 512, 512, flags)));
            descs.push((STATUS, 1, W));
            for engine in [IoEngine::Sync, IoEngine::Async] {
                let (cpu, r, errors, m) = kick_full_queue(kind, &descs, None, engine);
                eprintln!(
                    "virtio-blk ({engine:?}): one kick, {QUEUE_SIZE} {} of {SEG_MAX} x 512 bytes: {cpu:?} CPU",
                    if kind == VIRTIO_BLK_T_IN { "reads" } else { "writes" }
                );
                assert_eq!(r, Ok(true));
                assert_eq!(errors.count(), 0);
                assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), STATUS_OK);
                // 256 x 127 KiB = 32.5 MiB of data in the kick.
                let budget =
                    kick_cpu_budget_moving(u64::from(QUEUE_SIZE) * u64::from(SEG_MAX) * 512);
                assert!(
                    cpu < budget,
                    "one kick took {cpu:?} of CPU (budget {budget:?})"
                );
            }
        }
    }

    /// The io_uring engine answers what the Sync engine does: the same
    /// used lengths and status bytes (in completion order), the same data
    /// in guest memory and on disk, the same counters.
    #[test]
    fn async_engine_serves_as_sync_does() {
        let mut results = Vec::new();
        for engine in [IoEngine::Sync, IoEngine::Async] {
            let m = mem();
            let (img, contents) = image(16);
            let disk = Arc::new(Disk::open(img.path(), false).unwrap());
            let mut d = Driver::new(&m);
            // The four of read_write_flush_get_id, then a read past the end.
            submit_read_write_flush_get_id(&m, &mut d);
            header(&m, HDR + 0x400, VIRTIO_BLK_T_IN, 16);
            d.submit(&[
                desc(HDR + 0x400, 16, 0),
                desc(DATA, 512, W),
                desc(STATUS + 4, 1, W),
            ]);
            m.write_slice(&[0xff; 5], GuestAddress(STATUS)).unwrap();
            let mut errors = GuestLog::default();
            let limits = disk.limits();
            let irq = match engine {
                IoEngine::Sync => {
                    process_queue(&m, &mut d.queue, &disk, &limits, &mut errors).unwrap()
                }
                IoEngine::Async => {
                    let mut u = Uring::new(disk.clone()).unwrap();
                    let irq = process_queue_async(
                        &m,
                        &mut d.queue,
                        &mut u,
                        &limits,
                        &mut errors,
                        |_, _| true,
                    )
                    .unwrap();
                    let rest = u.wait_idle();
                    assert_eq!(u.in_flight(), 0);
                    complete_and_finish(&m, &mut d.queue, rest, &mut errors) || irq
                }
            };
            assert!(irq);
            assert_eq!(d.used_idx(), 5, "{engine:?}");
            let mut used: Vec<(u32, u32)> = (0..5).map(|i| d.used(i)).collect();
            used.sort_unstable();
            let statuses: Vec<u8> = (0..5).map(|i| d.status(STATUS + i)).collect();
            let mut got = vec![0u8; 1024];
            m.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
            m.read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
                .unwrap();
            assert_eq!(got, contents[1024..2048], "{engine:?}");
            let on_disk = std::fs::read(img.path()).unwrap();
            assert!(on_disk[10 * 512..11 * 512].iter().all(|&b| b == 0x5a));
            results.push((used, statuses, errors.count(), disk.stats().metrics()));
        }
        assert_eq!(results[0], results[1]);
        assert_eq!(
            results[0].1,
            vec![STATUS_OK, STATUS_OK, STATUS_OK, STATUS_OK, STATUS_IOERR]
        );
    }

    /// A rate limiter holds requests back under the io_uring engine too,
    /// in order, and nothing is in flight for a held request.
    #[test]
    fn async_engine_holds_what_the_limiter_refuses() {
        let m = mem();
        let (img, _) = image(16);
        let disk = Arc::new(Disk::open(img.path(), false).unwrap());
        let mut u = Uring::new(disk.clone()).unwrap();
        let mut d = Driver::new(&m);
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        d.submit(&[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)]);
        let mut errors = GuestLog::default();
        let limits = disk.limits();
        let irq = process_queue_async(&m, &mut d.queue, &mut u, &limits, &mut errors, |_, _| false)
            .unwrap();
        assert!(!irq);
        assert_eq!(u.in_flight(), 0);
        assert_eq!(d.used_idx(), 0);
        process_queue_async(&m, &mut d.queue, &mut u, &limits, &mut errors, |_, _| true).unwrap();
        let rest = u.wait_idle();
        complete_and_finish(&m, &mut d.queue, rest, &mut errors);
        assert_eq!(d.used(0), (0, 1025));
        assert_eq!(errors.count(), 0);
    }

    #[test]
    fn out_of_range_head_index_is_dropped() {
        let m = mem();
        let (img, _) = image(4);
        let disk = Disk::open(img.path(), false).unwrap();
        let mut d = Driver::new(&m);
        // Avail ring entry 0 names descriptor 200 in a 16-entry table.
        m.write_obj(200u16, d.vq.avail_addr().unchecked_add(4))
            .unwrap();
        m.write_obj(1u16, d.vq.avail_addr().unchecked_add(2))
            .unwrap();
        let (_, errors) = run(&mut d, &disk);
        assert_eq!(
            errors.count(),
            2,
            "empty chain, then add_used refuses the index"
        );
        assert_eq!(d.used_idx(), 0);
    }
}
