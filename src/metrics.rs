//! Firecracker-style metrics: one JSON line per flush to the file or FIFO
//! named by `--metrics-path`, `PUT /metrics` or the config file's
//! `metrics`, `utc_timestamp_ms` first, then counter groups under
//! Firecracker's top-level keys (`vcpu`, `block`, `net`, `vsock`,
//! `entropy`, ...; a device's own group is `block_<id>`, `net_<id>`). Each
//! counter is what happened since the last flush. The VMM flushes every
//! [`FLUSH_INTERVAL`], on the API's FlushMetrics and when it stops.
//!
//! The file is opened non-blocking and written from the main thread: a
//! FIFO nobody drains loses lines, it never stalls the VM.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// How often the VMM writes a line on its own.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Counter groups: (group, [(counter, total so far)]).
pub type Sample = Vec<(String, Vec<(&'static str, u64)>)>;

struct Sink {
    file: File,
    /// The totals of the last line, by group and counter.
    last: HashMap<(String, &'static str), u64>,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Why metrics cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Set already (Firecracker allows it once, too).
    #[error("metrics are already configured")]
    Again,
    /// The file cannot be opened.
    #[error("metrics file '{path}'")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Write metrics to `path` (a file, created if missing, or a FIFO).
pub fn configure(path: &Path) -> Result<(), MetricsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if sink.is_some() {
        return Err(MetricsError::Again);
    }
    // Read and write: opening a FIFO for writing alone fails while no
    // reader has it open, and blocks without O_NONBLOCK.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| MetricsError::Open {
            path: path.display().to_string(),
            source,
        })?;
    *sink = Some(Sink {
        file,
        last: HashMap::new(),
    });
    Ok(())
}

/// Whether a metrics file is set.
pub fn configured() -> bool {
    SINK.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// The line for `sample` at `utc_ms`, counters as deltas from `last`
/// (updated). A total that went down (a counter that restarted) counts
/// from zero.
fn line(utc_ms: u64, sample: &Sample, last: &mut HashMap<(String, &'static str), u64>) -> String {
    let mut out = format!("{{\"utc_timestamp_ms\":{utc_ms}");
    for (group, counters) in sample {
        let mut m = serde_json::Map::new();
        for &(name, total) in counters {
            let before = last.insert((group.clone(), name), total).unwrap_or(0);
            let delta = if total >= before {
                total - before
            } else {
                total
            };
            m.insert(name.into(), delta.into());
        }
        out.push(',');
        out.push_str(&serde_json::Value::String(group.clone()).to_string());
        out.push(':');
        out.push_str(&serde_json::Value::Object(m).to_string());
    }
    out.push_str("}\n");
    out
}

/// Write one line for `sample`, if a metrics file is set. A full FIFO
/// drops the line (logged), it does not block.
pub fn flush(sample: &Sample) {
    let mut guard = SINK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sink) = guard.as_mut() else {
        return;
    };
    let utc_ms = crate::host::unix_now_ns() / 1_000_000;
    let text = line(utc_ms, sample, &mut sink.last);
    if let Err(e) = sink.file.write_all(text.as_bytes()) {
        log::warn!("metrics: line dropped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_start_with_the_time_and_count_deltas() {
        let mut last = HashMap::new();
        let s1: Sample = vec![
            (
                "vcpu".into(),
                vec![("exit_io_in", 10), ("exit_mmio_write", 3)],
            ),
            ("block_rootfs".into(), vec![("read_bytes", 4096)]),
        ];
        let l = line(1234, &s1, &mut last);
        assert!(
            l.starts_with("{\"utc_timestamp_ms\":1234,\"vcpu\":{"),
            "{l}"
        );
        assert!(l.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["vcpu"]["exit_io_in"], 10);
        assert_eq!(v["block_rootfs"]["read_bytes"], 4096);
        let s2: Sample = vec![
            (
                "vcpu".into(),
                vec![("exit_io_in", 15), ("exit_mmio_write", 3)],
            ),
            ("block_rootfs".into(), vec![("read_bytes", 100)]),
        ];
        let v: serde_json::Value = serde_json::from_str(&line(2000, &s2, &mut last)).unwrap();
        assert_eq!(v["vcpu"]["exit_io_in"], 5);
        assert_eq!(v["vcpu"]["exit_mmio_write"], 0);
        // A restarted counter counts from zero.
        assert_eq!(v["block_rootfs"]["read_bytes"], 100);
    }
}
