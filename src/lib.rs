//! microvm: a lightweight KVM virtual machine monitor.
//!
//! The binary (`src/main.rs`) parses the command line and runs a [`vmm::Vmm`];
//! everything else lives in this library so that tests can drive it directly.

// The agent's client parses what a guest sends: the same cast rules as the
// guest-facing devices.
#[deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]
pub mod agent;
pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod helper;
pub mod host;
pub mod image;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod narrow;
pub mod net;
pub mod pause;
pub mod rate_limit;
pub mod rpc;
pub mod seccomp;
// The snapshot parser reads a file that may come from anywhere: the same cast
// rules as the guest-facing devices (set here, on the module, so the parser's
// own file keeps only the format).
#[deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]
pub mod snapshot;
pub mod vcpu;
pub mod vmm;

/// An error and its causes on one line: "outer: cause: root cause".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
