//! virtio-blk request parsing: one chain from fuzzed guest RAM through the
//! queue guard into `Request::parse`. Whatever the chain, parsing ends, and
//! an accepted request lies inside guest RAM, the disk and the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::block::request::{Limits, Request};
use microvm::devices::virtio::queue_guard;
use microvm_fuzz::{guest_memory, QueueSetup};
use vm_memory::{GuestMemory, Permissions};

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let limits = Limits {
        capacity_sectors: 64,
        seg_max: u32::from(setup.flags % 8) + 1,
        size_max: 4096,
    };
    // A handful of chains: the ring may also be broken.
    for _ in 0..4 {
        let Ok(Some(chain)) = queue_guard::pop(&mut queue, &mem) else {
            return;
        };
        let Ok(request) = Request::parse(chain, &limits) else {
            continue;
        };
        assert!(mem.check_range(request.status, 1, Permissions::Write));
        assert!(request.data.len() <= limits.seg_max as usize);
        for d in &request.data {
            assert!(d.len <= limits.size_max);
            assert!(mem.check_range(d.addr, d.len as usize, Permissions::Read));
        }
    }
});
