//! microvm: a lightweight KVM virtual machine monitor.
//!
//! The binary (`src/main.rs`) parses the command line and runs a [`vmm::Vmm`];
//! everything else lives in this library so that tests can drive it directly.

pub mod boot;
pub mod config;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod net;
pub mod vcpu;
pub mod vmm;
