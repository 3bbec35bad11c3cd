//! virtio-rng's request queue over fuzzed guest RAM: every chain is
//! returned with at most `MAX_BYTES_PER_CHAIN` written, the bytes counted
//! are the bytes the source gave, and a broken ring is an error, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::rng::{process_queue, RngStats, MAX_BYTES_PER_CHAIN};
use microvm::devices::virtio::GuestLog;
use microvm_fuzz::{guest_memory, QueueSetup};

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let (mut stats, mut log) = (RngStats::default(), GuestLog::default());
    let mut given = 0u64;
    // A deterministic source; flags bit 0 makes it fail now and then.
    let fail = setup.flags & 1 == 1;
    let mut source = |b: &mut [u8]| {
        if fail && given % 3 == 2 {
            given += 1;
            return Err(std::io::Error::other("no entropy"));
        }
        given += 1;
        b.fill(0xa5);
        Ok(())
    };
    for _ in 0..2 {
        if process_queue(&mut queue, &mem, &mut source, &mut stats, &mut log).is_err() {
            return;
        }
    }
    assert!(stats.bytes <= stats.requests * u64::from(MAX_BYTES_PER_CHAIN));
    // Two passes take at most a queue of chains each.
    assert!(stats.requests <= 2 * u64::from(setup.size));
});
