//! Ethernet frames over a byte stream, each preceded by its length as a
//! 4-byte big-endian number: the protocol of `passt --fd` (qemu's
//! `-netdev stream` speaks the same).
//!
//! The peer is not trusted. A length above the limit is skipped as it
//! arrives (never buffered), a frame shorter than an Ethernet header is
//! dropped, and a stream that ends inside a prefix or a frame is reported as
//! closed. Both directions use one fixed buffer each: nothing grows with what
//! the peer sends.

// Guest-facing code: every narrowing or sign-changing `as` is a finding.
// Values from the guest go through `TryFrom` with an error path, widening
// through `From`; see src/narrow.rs for constants.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

use std::io::{self, IoSlice, Read, Write};

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Shortest frame passed on: an Ethernet header (two MACs and the type).
pub const MIN_FRAME_LEN: usize = 14;

/// Errors of the framing layer (anything else is the stream's own `io::Error`).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The peer closed the stream (`truncated` when inside a frame or prefix).
    #[error("the peer closed the stream{}", if *truncated { " in the middle of a frame" } else { "" })]
    Closed {
        /// Bytes of an unfinished prefix or frame were lost.
        truncated: bool,
    },
    /// A frame we were asked to send is too short or too long.
    #[error("cannot send a {len}-byte frame (limits {MIN_FRAME_LEN}..={max})")]
    BadLength {
        /// Length asked for.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// An earlier frame is still being written and the stream is not writable.
    #[error("the peer is not reading: frame not sent")]
    Busy,
}

impl From<FramingError> for io::Error {
    fn from(e: FramingError) -> Self {
        let kind = match e {
            FramingError::Closed { .. } => io::ErrorKind::UnexpectedEof,
            FramingError::BadLength { .. } => io::ErrorKind::InvalidInput,
            FramingError::Busy => io::ErrorKind::WouldBlock,
        };
        io::Error::new(kind, e)
    }
}

/// Counters of frames the reader refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Frames longer than the limit, skipped.
    pub oversize: u64,
    /// Frames shorter than an Ethernet header, dropped.
    pub runt: u64,
}

/// Splits a stream into frames.
#[derive(Debug)]
pub struct FrameReader {
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of an oversize frame still to throw away.
    skip: usize,
    max_frame: usize,
    closed: bool,
    stats: ReaderStats,
}

impl FrameReader {
    /// A reader passing frames of up to `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        // Room for one whole frame and its prefix, and as much again so one
        // read(2) usually brings several frames.
        let cap = 2 * (PREFIX_LEN + max_frame);
        Self {
            buf: vec![0u8; cap].into_boxed_slice(),
            start: 0,
            end: 0,
            skip: 0,
            max_frame,
            closed: false,
            stats: ReaderStats::default(),
        }
    }

    /// Frames refused so far.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// The next frame from what is buffered, if a whole one is there.
    fn take_buffered(&mut self, out: &mut [u8]) -> Option<usize> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.end - self.start);
                self.start += n;
                self.skip -= n;
                if self.skip > 0 {
                    return None;
                }
            }
            let avail = &self.buf[self.start..self.end];
            let prefix = avail.get(..PREFIX_LEN)?;
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > self.max_frame || len > out.len() {
                self.stats.oversize += 1;
                self.start += PREFIX_LEN;
                self.skip = len;
                continue;
            }
            if avail.len() - PREFIX_LEN < len {
                return None;
            }
            let frame_start = self.start + PREFIX_LEN;
            self.start = frame_start + len;
            if len < MIN_FRAME_LEN {
                self.stats.runt += 1;
                continue;
            }
            out[..len].copy_from_slice(&self.buf[frame_start..frame_start + len]);
            return Some(len);
        }
    }

    /// Copy the next frame into `out` and return its length. Reads from `src`
    /// only when no whole frame is buffered, and then until it would block,
    /// so `WouldBlock` means the stream is drained (edge-triggered epoll is
    /// safe). Frames longer than `out` count as oversize.
    pub fn read_frame<R: Read>(&mut self, src: &mut R, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(len) = self.take_buffered(out) {
                return Ok(len);
            }
            if self.closed {
                return Err(FramingError::Closed { truncated: false }.into());
            }
            // Keep the unfinished frame at the front so there is room behind it.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.closed = true;
                    let truncated = self.end > self.start || self.skip > 0;
                    self.start = 0;
                    self.end = 0;
                    self.skip = 0;
                    return Err(FramingError::Closed { truncated }.into());
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes frames to a stream, finishing a frame that went out partly before
/// starting the next, so the stream never loses its framing.
#[derive(Debug)]
pub struct FrameWriter {
    /// The unsent tail of the last frame (prefix included).
    pending: Vec<u8>,
    max_frame: usize,
}

impl FrameWriter {
    /// A writer for frames of up to `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            pending: Vec::with_capacity(PREFIX_LEN + max_frame),
            max_frame,
        }
    }

    /// Bytes of a partly written frame still to go.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Write what is left of a partly written frame; `Ok(true)` when done.
    pub fn flush_pending<W: Write>(&mut self, dst: &mut W) -> io::Result<bool> {
        while !self.pending.is_empty() {
            match dst.write(&self.pending) {
                Ok(0) => return Err(FramingError::Closed { truncated: true }.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Send one frame. If the stream takes only part of it, the rest is kept
    /// and goes out first on the next call or [`flush_pending`](Self::flush_pending):
    /// the frame counts as sent. If an earlier frame is still unfinished and
    /// the stream takes nothing, this one is refused with [`FramingError::Busy`].
    pub fn write_frame<W: Write>(&mut self, dst: &mut W, frame: &[u8]) -> io::Result<()> {
        if frame.len() < MIN_FRAME_LEN || frame.len() > self.max_frame {
            return Err(FramingError::BadLength {
                len: frame.len(),
                max: self.max_frame,
            }
            .into());
        }
        if !self.flush_pending(dst)? {
            return Err(FramingError::Busy.into());
        }
        let len = u32::try_from(frame.len()).map_err(|_| FramingError::BadLength {
            len: frame.len(),
            max: self.max_frame,
        })?;
        let prefix = len.to_be_bytes();
        let total = PREFIX_LEN + frame.len();
        let written = loop {
            match dst.write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)]) {
                Ok(0) => return Err(FramingError::Closed { truncated: false }.into()),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if written < total {
            self.pending.clear();
            if written < PREFIX_LEN {
                self.pending.extend_from_slice(&prefix[written..]);
                self.pending.extend_from_slice(frame);
            } else {
                self.pending
                    .extend_from_slice(&frame[written - PREFIX_LEN..]);
            }
            // Best effort now; the rest goes out before the next frame.
            self.flush_pending(dst)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 256).unwrap().wrapping_add(seed))
            .collect()
    }

    fn prefixed(f: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(f.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(f);
        v
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn would_block(r: io::Result<usize>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn whole_frames_in_one_read() {
        let (mut peer, mut ours) = pair();
        let (f1, f2) = (frame(60, 1), frame(1514, 2));
        let mut bytes = prefixed(&f1);
        bytes.extend(prefixed(&f2));
        peer.write_all(&bytes).unwrap();
        let mut r = FrameReader::new(2048);
        let mut out = vec![0u8; 2048];
        assert_eq!(r.read_frame(&mut ours, &mut out).unwrap(), 60);
        assert_eq!(&out[..60], &f1[..]);
        assert_eq!(r.read_frame(&mut ours, &mut out).unwrap(), 1514);
        assert_eq!(&out[..1514], &f2[..]);
        assert!(would_block(r.read_frame(&mut ours, &mut out)));
    }

    #[test]
    fn frames_split_across_reads_and_partial_prefixes() {
        let (mut peer, mut ours) = pair();
        let f = frame(300, 7);
        let bytes = prefixed(&f);
        let mut r = FrameReader::new(2048);
        let mut out = vec![0u8; 2048];
        // Two bytes of the prefix, then the rest of it, then the frame in pieces.
        for chunk in [&bytes[..2], &bytes[2..4], &bytes[4..100], &bytes[100..299]] {
            peer.write_all(chunk).unwrap();
            assert!(would_block(r.read_frame(&mut ours, &mut out)));
        }
        peer.write_all(&bytes[299..]).unwrap();
        assert_eq!(r.read_frame(&mut ours, &mut out).unwrap(), 300);
        assert_eq!(&out[..300], &f[..]);
    }

    #[test]
    fn many_frames_through_a_small_buffer() {
        // More bytes than the reader's buffer holds, frames straddling refills.
        let (mut peer, mut ours) = pair();
        let frames: Vec<Vec<u8>> = (0..50)
            .map(|i| frame(40 + i * 7, u8::try_from(i).unwrap()))
            .collect();
        let mut r = FrameReader::new(400);
        let mut out = vec![0u8; 400];
        let mut got = Vec::new();
        for f in &frames {
            peer.write_all(&prefixed(f)).unwrap();
        }
        loop {
            match r.read_frame(&mut ours, &mut out) {
                Ok(n) => got.push(out[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn oversize_frames_are_skipped_without_losing_the_stream() {
        let (mut peer, mut ours) = pair();
        let mut r = FrameReader::new(1000);
        let mut out = vec![0u8; 1000];
        let big = frame(5000, 3);
        let small = frame(64, 4);
        let mut bytes = prefixed(&big);
        bytes.extend(prefixed(&small));
        // The big frame arrives in pieces; none of it is buffered.
        for chunk in bytes.chunks(700) {
            peer.write_all(chunk).unwrap();
            match r.read_frame(&mut ours, &mut out) {
                Ok(n) => assert_eq!(&out[..n], &small[..]),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        assert_eq!(r.stats().oversize, 1);
        // A length near u32::MAX is skipped too, then the next frame is found.
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend(frame(10, 0));
        peer.write_all(&bytes).unwrap();
        assert!(would_block(r.read_frame(&mut ours, &mut out)));
        assert_eq!(r.stats().oversize, 2);
    }

    #[test]
    fn frame_larger_than_the_callers_buffer_counts_as_oversize() {
        let (mut peer, mut ours) = pair();
        let mut r = FrameReader::new(2000);
        let mut out = vec![0u8; 100];
        peer.write_all(&prefixed(&frame(500, 1))).unwrap();
        peer.write_all(&prefixed(&frame(50, 2))).unwrap();
        assert_eq!(r.read_frame(&mut ours, &mut out).unwrap(), 50);
        assert_eq!(r.stats().oversize, 1);
    }

    #[test]
    fn runts_and_empty_frames_are_dropped() {
        let (mut peer, mut ours) = pair();
        let mut r = FrameReader::new(2000);
        let mut out = vec![0u8; 2000];
        peer.write_all(&prefixed(&[])).unwrap();
        peer.write_all(&prefixed(&frame(13, 0))).unwrap();
        peer.write_all(&prefixed(&frame(14, 0))).unwrap();
        assert_eq!(r.read_frame(&mut ours, &mut out).unwrap(), 14);
        assert_eq!(r.stats().runt, 2);
    }

    #[test]
    fn close_mid_frame_and_mid_prefix_is_reported() {
        for cut in [2usize, 4, 50] {
            let (mut peer, mut ours) = pair();
            let mut r = FrameReader::new(2000);
            let mut out = vec![0u8; 2000];
            let bytes = prefixed(&frame(100, 0));
            peer.write_all(&bytes[..cut]).unwrap();
            drop(peer);
            let err = r.read_frame(&mut ours, &mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}");
            assert!(err.to_string().contains("middle of a frame"), "{err}");
            // Stays closed, does not panic.
            let err = r.read_frame(&mut ours, &mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
        let (peer, mut ours) = pair();
        drop(peer);
        let err = FrameReader::new(100)
            .read_frame(&mut ours, &mut [0u8; 100])
            .unwrap_err();
        assert!(!err.to_string().contains("middle"), "{err}");
    }

    #[test]
    fn writer_prefixes_and_checks_lengths() {
        let (mut peer, mut ours) = pair();
        let mut w = FrameWriter::new(1518);
        let f = frame(100, 9);
        w.write_frame(&mut ours, &f).unwrap();
        let mut got = vec![0u8; 104];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, prefixed(&f));
        for bad in [0usize, 13, 1519] {
            let e = w.write_frame(&mut ours, &frame(bad, 0)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn writer_finishes_a_partial_frame_before_the_next() {
        let (mut peer, mut ours) = pair();
        let max = 60_000;
        let mut w = FrameWriter::new(max);
        // Fill the socket until a frame goes out only partly.
        let mut sent = Vec::new();
        let mut busy = false;
        for i in 0..1000u32 {
            let f = frame(max, u8::try_from(i).unwrap());
            match w.write_frame(&mut ours, &f) {
                Ok(()) => sent.push(f),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    busy = true;
                    break;
                }
            }
        }
        assert!(busy, "socket never filled up");
        assert!(w.pending() > 0 || !sent.is_empty());
        // The peer drains; every accepted frame arrives whole and in order.
        let mut r = FrameReader::new(max);
        let mut out = vec![0u8; max];
        let mut got = Vec::new();
        peer.set_nonblocking(true).unwrap();
        while got.len() < sent.len() {
            match r.read_frame(&mut peer, &mut out) {
                Ok(n) => got.push(out[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    w.flush_pending(&mut ours).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), sent.len());
        assert!(got == sent);
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn writer_to_a_closed_peer_fails_cleanly() {
        let (peer, mut ours) = pair();
        drop(peer);
        let mut w = FrameWriter::new(1518);
        let e = w.write_frame(&mut ours, &frame(60, 0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
