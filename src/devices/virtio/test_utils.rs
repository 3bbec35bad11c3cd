//! Test helpers: how much host CPU a piece of device work costs.

use std::time::Duration;

/// CPU time (user + system) the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(
        u64::try_from(ts.tv_sec).expect("CPU time is not negative"),
        u32::try_from(ts.tv_nsec).expect("nanoseconds below one second"),
    )
}

/// CPU time the calling thread spends in `f`, and what `f` returned.
pub fn cpu_time_of<R>(f: impl FnOnce() -> R) -> (Duration, R) {
    let start = thread_cpu_time();
    let r = f();
    (thread_cpu_time().saturating_sub(start), r)
}

/// CPU time (user + system, clock-tick resolution) used so far by the
/// threads of this process named `name`; `None` when there is none.
pub fn named_thread_cpu_time(name: &str) -> Option<Duration> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        let used: u64 = fields.iter().sum();
        *total.get_or_insert(Duration::ZERO) += Duration::from_millis(used * 1000 / ticks);
    }
    total
}

/// Host CPU one queue notify may cost the device: a full queue of the
/// longest legal chains. Unit tests run unoptimised, hence the larger figure.
pub const KICK_CPU_BUDGET: Duration = if cfg!(debug_assertions) {
    Duration::from_millis(150)
} else {
    Duration::from_millis(10)
};

/// [`KICK_CPU_BUDGET`] for a kick that also moves `bytes` of data the
/// guest legitimately asked for, copied at 4 GiB/s (the copy is the
/// request's, not the device's overhead).
pub fn kick_cpu_budget_moving(bytes: u64) -> Duration {
    KICK_CPU_BUDGET + Duration::from_nanos(bytes / 4)
}

/// Write a descriptor table at `table`, each descriptor linked to the next
/// (`VRING_DESC_F_NEXT`, next = i + 1) except the last. `descs` holds
/// (address, length, flags without NEXT).
pub fn write_linked_table<M: vm_memory::GuestMemory>(
    mem: &M,
    table: vm_memory::GuestAddress,
    descs: &[(u64, u32, u16)],
) {
    use vm_memory::{Address, Bytes};
    let next = const { crate::narrow::u16_of(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT) };
    let mut raw = Vec::with_capacity(descs.len() * 16);
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let flags = if last { flags } else { flags | next };
        let next_index = if last {
            0
        } else {
            u16::try_from(i).unwrap() + 1
        };
        raw.extend_from_slice(&addr.to_le_bytes());
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next_index.to_le_bytes());
    }
    mem.write_slice(&raw, table).unwrap();
    assert!(table.checked_add(raw.len() as u64).is_some());
}

/// A full queue of one chain: `descs` linked in `vq`'s own descriptor table,
/// or, with `indirect_at`, in an indirect table there that descriptor 0
/// points to; every available entry names descriptor 0. Returns the
/// device's queue, its used ring moved to `used`.
pub fn full_queue_of_one_chain<M: vm_memory::GuestMemory>(
    vq: &virtio_queue::mock::MockSplitQueue<'_, M>,
    mem: &M,
    size: u16,
    descs: &[(u64, u32, u16)],
    indirect_at: Option<vm_memory::GuestAddress>,
    used: vm_memory::GuestAddress,
) -> virtio_queue::Queue {
    match indirect_at {
        Some(table) => {
            write_linked_table(mem, table, descs);
            let count = u32::try_from(descs.len()).unwrap();
            vq.desc_table()
                .store(0, indirect_desc(table.0, count))
                .unwrap();
        }
        None => write_linked_table(mem, vq.desc_table_addr(), descs),
    }
    fill_avail_ring(vq, size, 0);
    queue_with_used_ring_at(vq, used)
}

/// Make every entry of `vq`'s available ring name descriptor `head`, and
/// publish them all (avail index = queue size).
fn fill_avail_ring<M: vm_memory::GuestMemory>(
    vq: &virtio_queue::mock::MockSplitQueue<'_, M>,
    size: u16,
    head: u16,
) {
    for i in 0..usize::from(size) {
        vq.avail().ring().ref_at(i).unwrap().store(head);
    }
    vq.avail().idx().store(size);
}

/// An indirect descriptor: `count` descriptors at `table`.
fn indirect_desc(table: u64, count: u32) -> virtio_queue::desc::RawDescriptor {
    let flags =
        const { crate::narrow::u16_of(virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT) };
    virtio_queue::desc::split::Descriptor::new(table, count * 16, flags, 0).into()
}

/// `vq`'s queue with its used ring moved to `used`: for large queues
/// virtio-queue's mock places the used ring inside the available ring (it
/// advances by the element count, not their size).
fn queue_with_used_ring_at<M: vm_memory::GuestMemory>(
    vq: &virtio_queue::mock::MockSplitQueue<'_, M>,
    used: vm_memory::GuestAddress,
) -> virtio_queue::Queue {
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    q.try_set_used_ring_address(used).unwrap();
    q
}

/// The used index of a used ring at `used`.
pub fn used_idx<M: vm_memory::GuestMemory>(mem: &M, used: vm_memory::GuestAddress) -> u16 {
    use vm_memory::{Address, Bytes};
    mem.read_obj(used.unchecked_add(2)).unwrap()
}
