//! virtio-net TX over fuzzed guest RAM, drained the way the worker does it
//! (notifications off, bounded passes, re-enable and look again): frames
//! that reach the host are well-formed and no pass runs away.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::net::rxtx::{
    FrameSink, NetStats, TxPath, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use microvm::devices::virtio::queue_guard;
use microvm_fuzz::{guest_memory, QueueSetup};

struct CheckingSink(u64);

impl FrameSink for CheckingSink {
    fn send_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        assert!((VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&frame.len()));
        self.0 += 1;
        if frame.len() % 7 == 0 {
            // The host refuses some frames.
            return Err(std::io::Error::other("refused"));
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let mut tx = TxPath::new("fuzz");
    let stats = NetStats::default();
    let mut sink = CheckingSink(0);
    for _ in 0..4 {
        if queue_guard::disable_notification(&mut queue, &mem).is_err() {
            return;
        }
        let Ok(batch) = tx.process(&mut queue, &mem, &mut sink, &stats) else {
            return;
        };
        assert!(batch.used <= u32::from(setup.size));
        if batch.more {
            continue;
        }
        match queue_guard::enable_notification(&mut queue, &mem) {
            Ok(true) => continue,
            Ok(false) | Err(_) => return,
        }
    }
});
