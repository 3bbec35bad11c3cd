//! Raw mode for an interactive terminal on stdin, restored on every exit path.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// If stdin is a terminal, switch it to raw mode (keeping Ctrl-C as SIGINT, so
/// it stops the VM) and remember how to restore it.
pub fn enter_raw_mode() {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return;
    }
    let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills `t` on success, and we only use it then.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, t.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: initialised by the successful tcgetattr above.
    let orig = unsafe { t.assume_init() };
    let mut raw = orig;
    // SAFETY: cfmakeraw edits the struct we own.
    unsafe { libc::cfmakeraw(&mut raw) };
    raw.c_lflag |= libc::ISIG;
    // Keep output post-processing so host-side messages still start at column 0.
    raw.c_oflag |= libc::OPOST;
    // SAFETY: a valid termios for a descriptor that is a terminal.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } == 0 {
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(orig);
    }
}

/// Put the terminal back the way it was, if we changed it.
pub fn restore() {
    if let Some(orig) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: restoring settings previously read from the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &orig) };
    }
}
