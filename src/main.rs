pub mod devices;
pub mod layout;
pub mod memory;

fn main() {}
