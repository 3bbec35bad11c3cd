//! The local terminal in raw mode for `microvm exec --tty`: every key,
//! Ctrl-C included, goes to the guest's pty, whose line discipline does
//! what a terminal would. Restored when the guard drops.

/// Raw mode on stdin while it lives.
pub struct RawMode(libc::termios);

impl RawMode {
    /// Raw mode, if stdin is a terminal.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `t` on success, and we only use it then.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, t.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: initialised by the successful tcgetattr above.
        let orig = unsafe { t.assume_init() };
        let mut raw = orig;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: a valid termios for a descriptor that is a terminal.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: settings read from the same descriptor in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}
