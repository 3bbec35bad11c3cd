//! Emulated devices and the bus that routes guest accesses to them.

// Guest-facing code: every narrowing or sign-changing `as` is a finding.
// Values from the guest go through `TryFrom` with an error path, widening
// through `From`; see src/narrow.rs for constants.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod bus;
pub mod legacy;
pub mod rtc;
pub mod serial;
pub mod stdout;
pub mod virtio;
