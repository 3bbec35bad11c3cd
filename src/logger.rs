//! The process's one logger: RUST_LOG (default: warnings) or a level, one
//! module alone if asked, to stderr or a file or FIFO a log collector
//! reads (opened without blocking, so a reader that falls behind loses
//! lines instead of stalling the VMM). Set from the command line at start
//! and again by the API's `PUT /logger` (Firecracker's) before boot: the
//! `log` crate takes one logger for good, so it is a switch over the
//! current `env_logger` one.

use std::path::PathBuf;
use std::sync::RwLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// And warnings.
    Warning,
    /// And information.
    Info,
    /// And debugging.
    Debug,
    /// Everything.
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warning" | "warn" => Self::Warning,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => {
                return Err(format!(
                    "unknown level '{s}': expected Error, Warning, Info, Debug, Trace or Off"
                ))
            }
        })
    }
}

impl LogLevel {
    /// The `log` crate's filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warning => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Where and what to log (`--log-path`, `--level`, `--module`,
/// `--show-log-origin`; the same fields of `PUT /logger`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// A file or FIFO instead of stderr.
    pub path: Option<PathBuf>,
    /// The level, in place of RUST_LOG.
    pub level: Option<LogLevel>,
    /// Only this module's lines.
    pub module: Option<String>,
    /// Show each line's module.
    pub origin: bool,
}

/// The logger in use; `None` before [`init`].
static CURRENT: RwLock<Option<env_logger::Logger>> = RwLock::new(None);

/// Forwards every record to [`CURRENT`].
struct Switch;

impl log::Log for Switch {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        let l = CURRENT.read().unwrap_or_else(|e| e.into_inner());
        l.as_ref().is_some_and(|l| l.enabled(m))
    }

    fn log(&self, r: &log::Record<'_>) {
        let l = CURRENT.read().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = l.as_ref() {
            l.log(r);
        }
    }

    fn flush(&self) {
        let l = CURRENT.read().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = l.as_ref() {
            l.flush();
        }
    }
}

fn build(s: &LogSettings) -> std::io::Result<env_logger::Logger> {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    b.format_target(s.origin);
    if let Some(level) = s.level {
        b.filter_level(level.filter());
    }
    if let Some(module) = &s.module {
        let level = s.level.unwrap_or(LogLevel::Warning).filter();
        b.filter_level(log::LevelFilter::Off)
            .filter_module(module, level);
    }
    if let Some(path) = &s.path {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        b.target(env_logger::Target::Pipe(Box::new(file)))
            .write_style(env_logger::WriteStyle::Never);
    }
    Ok(b.build())
}

/// Log as `s` says from now on (the first call installs the logger). On
/// an error (the file cannot be opened) the logger in use stays.
pub fn configure(s: &LogSettings) -> std::io::Result<()> {
    let logger = build(s)?;
    let max = logger.filter();
    let first = {
        let mut cur = CURRENT.write().unwrap_or_else(|e| e.into_inner());
        let first = cur.is_none();
        *cur = Some(logger);
        first
    };
    if first {
        // Fails only if another logger was installed: then that one logs.
        let _ = log::set_logger(&Switch);
    }
    log::set_max_level(max);
    Ok(())
}
