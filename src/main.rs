pub mod config;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod net;
pub mod vmm;

fn main() {}
