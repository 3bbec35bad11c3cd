//! virtio-console's two queues over fuzzed guest RAM: the header's flags
//! byte picks the transmit queue (bit 0 clear) or the receive queue (bit 0
//! set, with `flags >> 1` times 7 bytes of host input waiting). Output
//! stays bounded per chain, input is never duplicated or invented, and a
//! broken ring is an error, never a panic.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::console::queue::{process_rx, process_tx, BadChains, TX_CHAIN_MAX};
use microvm_fuzz::{guest_memory, QueueSetup};

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let mut bad = BadChains::default();
    if setup.flags & 1 == 0 {
        let mut out = Vec::new();
        // A second pass finds nothing new unless the first broke off.
        for _ in 0..2 {
            if process_tx(&mut queue, &mem, &mut out, &mut bad).is_err() {
                return;
            }
        }
        assert!(out.len() <= usize::from(setup.size) * TX_CHAIN_MAX);
    } else {
        let total = usize::from(setup.flags >> 1) * 7;
        let mut input: VecDeque<u8> = (0..total).map(|i| i as u8).collect();
        for _ in 0..2 {
            let before = input.len();
            if process_rx(&mut queue, &mem, &mut input, &mut bad).is_err() {
                return;
            }
            assert!(input.len() <= before);
        }
        // What is left is the tail of what was typed, in order.
        let sent = total - input.len();
        assert!(input.iter().enumerate().all(|(i, &b)| b == (sent + i) as u8));
    }
});
