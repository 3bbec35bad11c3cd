//! virtio-vsock's queues over fuzzed guest RAM: the tx queue's packets go
//! to a real muxer (Unix sockets under /tmp), the rx queue is filled with
//! what the muxer owes the guest, the event queue gets a transport reset.
//! Every chain is returned, at most a queue of them per pass, the muxer
//! never holds more connections than its bound, and a broken ring is an
//! error, never a panic.
//!
//! Flags: bit 0 clear: tx; set: rx, with `flags >> 2` packets owed to the
//! guest first; bit 1 (rx only): the event queue instead.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::vsock::muxer::{Listener, Muxer, MAX_CONNECTIONS, MAX_PAYLOAD};
use microvm::devices::virtio::vsock::packet::{op, Header, HOST_CID, TYPE_STREAM};
use microvm::devices::virtio::vsock::queue::{process_event, process_rx, process_tx};
use microvm::devices::virtio::GuestLog;
use microvm_fuzz::{guest_memory, QueueSetup};

const CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((setup, image)) = QueueSetup::parse(data) else {
        return;
    };
    let mem = guest_memory(image);
    let mut queue = setup.queue();
    let dir = std::env::temp_dir().join(format!("microvm-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the fuzz socket");
    let path = dir.join("v.sock");
    let listener = Listener::bind(&path).expect("bind the fuzz socket");
    let mut mux = Muxer::new(CID, path, listener.try_clone().expect("clone")).expect("muxer");
    let mut log = GuestLog::default();
    let mut scratch = vec![0u8; MAX_PAYLOAD];
    let size = u32::from(setup.size);
    if setup.flags & 1 == 0 {
        for _ in 0..2 {
            if process_tx(&mut queue, &mem, &mut mux, &mut scratch, &mut log).is_err() {
                return;
            }
        }
        assert!(mux.connections() <= MAX_CONNECTIONS);
        assert!(mux.stats().tx_packets <= 2 * u64::from(size));
    } else if setup.flags & 2 == 0 {
        for port in 0..u32::from(setup.flags >> 2) {
            let h = Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: port,
                dst_port: 9,
                len: 1,
                kind: TYPE_STREAM,
                op: op::RW,
                ..Header::default()
            };
            mux.on_guest_packet(&h, b"x");
        }
        let mut held = None;
        for _ in 0..2 {
            match process_rx(&mut queue, &mem, &mut mux, &mut held, &mut scratch, &mut log) {
                Ok((used, _)) => assert!(used <= size),
                Err(_) => return,
            }
        }
    } else {
        let mut owed = true;
        let _ = process_event(&mut queue, &mem, &mut owed, &mut log);
    }
    drop(mux);
    drop(listener);
});
