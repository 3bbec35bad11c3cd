//! Building and running a VM.

pub mod device_manager;
