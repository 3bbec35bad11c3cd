//! The virtio-mmio transport under fuzzed register sequences (any offset,
//! size, value and order), in front of a device that, once activated,
//! drains every queue it was given through the queue guard. The transport
//! never panics, never activates a queue the guard refuses, and the
//! activated device can always follow its rings.
//!
//! Input: two bytes of operation count, then six bytes per operation
//! (kind and size, register, four value bytes), then the guest RAM image.

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::bus::BusDevice;
use microvm::devices::virtio::mmio::MmioTransport;
use microvm::devices::virtio::{
    queue_guard, ActivateError, Interrupt, VirtioCommon, VirtioDevice,
};
use microvm::memory::GuestMemoryMmap;
use microvm_fuzz::guest_memory;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

struct Device {
    common: VirtioCommon,
}

impl VirtioDevice for Device {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn set_acked_features(&mut self, features: u64) {
        let offered = self.common.avail_features();
        assert_eq!(features & !offered, 0, "unoffered features acked");
        self.common.ack_features(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.wrapping_add(i as u64) as u8;
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), self.common.queue_sizes().len());
        assert_eq!(queue_evts.len(), self.common.queue_sizes().len());
        for mut q in queues {
            // The transport checked it: the guard agrees.
            assert_eq!(queue_guard::check(&q, &mem), Ok(()));
            assert!(q.size() <= q.max_size());
            // Two queues' worth of chains at most: the rest is a broken ring.
            for _ in 0..2 * usize::from(q.size()) {
                match queue_guard::pop(&mut q, &mem) {
                    Ok(Some(chain)) => {
                        let head = chain.head_index();
                        let n = chain.take_while(Result::is_ok).count();
                        assert!(n <= usize::from(q.size()));
                        let _ = q.add_used(&mem, head, 0);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        interrupt.needs_reset();
                        break;
                    }
                }
            }
            let _ = queue_guard::enable_notification(&mut q, &mem);
        }
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((count, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let count = usize::from(u16::from_le_bytes(*count) % 512);
    let Some((ops, image)) = rest.split_at_checked(6 * count) else {
        return;
    };
    let mem = guest_memory(image);
    let device = Device {
        common: VirtioCommon::new(2, "fuzz".into(), VIRTIO_F_VERSION_1 | 1 << 3, &[16, 256]),
    };
    let Ok(mut t) = MmioTransport::new(mem, Box::new(device)) else {
        return;
    };
    for op in ops.chunks_exact(6) {
        let len = [4, 4, 4, 1, 2, 8, 0, 3][usize::from(op[0] >> 5)];
        let offset = match op[0] & 0x3 {
            3 => 0x100 + u64::from(op[1]),
            // Now and then a register access off its alignment.
            _ if op[0] & 0xc == 0xc => u64::from(op[1]),
            _ => u64::from(op[1] & 0xfc),
        };
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&op[2..6]);
        if op[0] & 0x10 != 0 {
            t.read(offset, &mut buf[..len]);
        } else {
            t.write(offset, &buf[..len]);
        }
        let status = {
            let mut s = [0u8; 4];
            t.read(0x70, &mut s);
            u32::from_le_bytes(s)
        };
        // Activated means DRIVER_OK.
        if t.is_activated() {
            assert_ne!(status & 4, 0);
        }
    }
});
