//! Attaching virtio-mmio devices: windows, IRQs, irqfd/ioeventfd, kernel command line.
