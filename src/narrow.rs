//! Narrowing of constants, checked when the program is built.
//!
//! The virtio bindings declare their flags and status values as `u32`, and
//! the layout declares addresses as `u64`; the rings, the MMIO registers and
//! the boot structures hold them in fewer bits. Use these in a `const` item
//! or a `const { }` block: a value that does not fit then fails the build
//! rather than wrapping. Values from the guest or the host do not come here;
//! they go through `TryFrom` with an error path.

/// `v` as `u8`; panics (at build time, in a const) if it does not fit.
pub const fn u8_of(v: u32) -> u8 {
    assert!(v <= 0xff, "constant does not fit in u8");
    #[expect(clippy::cast_possible_truncation, reason = "checked just above")]
    let n = v as u8;
    n
}

/// `v` as `u16`; panics (at build time, in a const) if it does not fit.
pub const fn u16_of(v: u32) -> u16 {
    assert!(v <= 0xffff, "constant does not fit in u16");
    #[expect(clippy::cast_possible_truncation, reason = "checked just above")]
    let n = v as u16;
    n
}

/// `v` as `u32`; panics (at build time, in a const) if it does not fit.
pub const fn u32_of(v: u64) -> u32 {
    assert!(v <= 0xffff_ffff, "constant does not fit in u32");
    #[expect(clippy::cast_possible_truncation, reason = "checked just above")]
    let n = v as u32;
    n
}

/// `v` as `u32`, for lengths and sizes declared as `usize`; panics (at build
/// time, in a const) if it does not fit.
pub const fn u32_of_usize(v: usize) -> u32 {
    assert!(v <= 0xffff_ffff, "constant does not fit in u32");
    #[expect(clippy::cast_possible_truncation, reason = "checked just above")]
    let n = v as u32;
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_values_that_fit() {
        assert_eq!(u8_of(0xff), 0xff);
        assert_eq!(u16_of(0xffff), 0xffff);
        assert_eq!(u32_of(0xffff_ffff), 0xffff_ffff);
        assert_eq!(u32_of_usize(4096), 4096);
    }

    #[test]
    #[should_panic(expected = "does not fit in u16")]
    fn refuses_values_that_do_not() {
        let _ = u16_of(0x1_0000);
    }
}
