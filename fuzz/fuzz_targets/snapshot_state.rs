//! Snapshot state files: whatever the bytes, parsing ends with a snapshot
//! or an error (never a panic), and an accepted snapshot is consistent with
//! its own configuration (vCPU count, memory layout, the device list).

#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = Snapshot::parse(data) else {
        return;
    };
    assert_eq!(s.vcpus.len(), usize::from(s.config.cpus));
    assert_eq!(s.memory_bytes(), s.config.memory_mib << 20);
    assert!(s
        .virtio
        .iter()
        .map(|d| &d.device)
        .eq(s.config.virtio_devices().iter()));
});
