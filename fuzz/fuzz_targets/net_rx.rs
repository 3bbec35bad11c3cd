//! virtio-net RX: frames of fuzzed lengths into fuzzed guest RX buffers,
//! with and without mergeable buffers. No frame is written outside the
//! chains the guest posted, and a frame waiting for buffers stays pending.
//!
//! Input: the queue header, one byte of frame count, three bytes per frame
//! (length, and the header flags byte), then the guest RAM image.

#![no_main]

use std::collections::VecDeque;
use std::io;

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::net::rxtx::{
    FrameSource, NetStats, RxPath, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use microvm_fuzz::{guest_memory, QueueSetup};

struct Frames(VecDeque<Vec<u8>>);

impl FrameSource for Frames {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .0
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((setup, rest)) = QueueSetup::parse(data) else {
        return;
    };
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % 16);
    let Some((specs, image)) = rest.split_at_checked(3 * count) else {
        return;
    };
    let frames = specs
        .chunks_exact(3)
        .map(|s| {
            // Lengths from 0 to a little past the largest frame.
            let len = usize::from(u16::from_le_bytes([s[0], s[1]])) * 2 % (MAX_BUFFER_LEN + 64);
            let mut frame = vec![0u8; len];
            if let Some(flags) = frame.first_mut() {
                *flags = s[2];
            }
            frame
        })
        .collect();
    let mut source = Frames(frames);
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let mrg_rxbuf = setup.flags & 1 != 0;
    let guest_csum = setup.flags & 2 != 0;
    let budget = u32::from(setup.flags >> 4) + 1;
    let mut rx = RxPath::new("fuzz", mrg_rxbuf, guest_csum);
    let stats = NetStats::default();
    // The worker calls again after each batch, and after an RX kick.
    for _ in 0..4 {
        let Ok(batch) = rx.process(&mut queue, &mem, &mut source, &stats, budget) else {
            return;
        };
        assert!(batch.frames <= budget);
    }
    let s = stats.snapshot();
    assert!(s.rx_bytes <= s.rx_frames * (MAX_BUFFER_LEN - VNET_HDR_LEN) as u64);
});
