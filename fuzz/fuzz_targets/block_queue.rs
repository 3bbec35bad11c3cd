//! The virtio-blk queue loop over fuzzed guest RAM and a small disk: every
//! kick ends, and a broken ring is reported, never spun on; through the
//! Sync engine, a rate limiter, or (flag 4) the io_uring engine.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use microvm::devices::virtio::block::{
    process_queue, process_queue_async_once, process_queue_limited, Disk,
};
use microvm::devices::virtio::GuestLog;
use microvm_fuzz::{guest_memory, QueueSetup};

/// A 16-sector disk in RAM-backed storage, shared by every input.
fn disk() -> &'static Arc<Disk> {
    static DISK: OnceLock<Arc<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() {
            dir
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("microvm-fuzz-block-{}.img", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 16 * 512]).expect("creating the fuzz disk");
        let disk = Disk::open(&path, false).expect("opening the fuzz disk");
        // The open file is all the target needs.
        let _ = std::fs::remove_file(&path);
        Arc::new(disk)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let disk = disk();
    let mut limits = disk.limits();
    if setup.flags & 1 != 0 {
        // A driver that did not accept seg_max / size_max.
        limits.seg_max = u32::MAX;
        limits.size_max = u32::MAX;
    }
    let mut errors = GuestLog::default();
    // Three kicks: each must see the state the last left. With flag 2,
    // a rate limiter that admits one request in three: held-back chains go
    // back on the ring and are served by a later kick.
    let mut n = 0u32;
    for _ in 0..3 {
        let r = if setup.flags & 4 != 0 {
            // The io_uring engine: the same answers, completed later.
            process_queue_async_once(&mem, &mut queue, disk, &limits, &mut errors)
                .expect("an io_uring on the fuzzing host")
        } else if setup.flags & 2 != 0 {
            process_queue_limited(&mem, &mut queue, disk, &limits, &mut errors, |_, _| {
                n += 1;
                n % 3 == 0
            })
        } else {
            process_queue(&mem, &mut queue, disk, &limits, &mut errors)
        };
        if r.is_err() {
            return;
        }
    }
});
