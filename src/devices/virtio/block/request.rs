//! A virtio-blk descriptor chain parsed into a typed [`Request`].
//!
//! Parsing is pure: it reads the 16-byte header from guest memory and checks
//! the shape of the chain, the direction and placement of every buffer and the
//! sector range against the disk size. No file I/O happens here.
//!
//! Only the layout every driver uses is accepted (virtio 1.2, 5.2.6): one
//! device-readable header descriptor, the data descriptors, and a
//! device-writable status descriptor last. The status byte is the last byte of
//! that descriptor, which is where the spec puts it whatever the framing.
//! A chain longer than the queue (direct and indirect descriptors together),
//! or one that breaks off, is refused without a status: its last descriptor,
//! where the status goes, is unknown.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::{MAX_REQUEST_BYTES, SECTOR_SIZE};
use crate::devices::virtio::queue_guard::{Chain, QueueError};

/// Size of `struct virtio_blk_outhdr` (type, reserved, sector).
pub const HEADER_LEN: u32 = 16;

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read from the disk into the data buffers (`VIRTIO_BLK_T_IN`).
    In,
    /// Write the data buffers to the disk (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Make previous writes durable (`VIRTIO_BLK_T_FLUSH`).
    Flush,
    /// Return the device serial (`VIRTIO_BLK_T_GET_ID`).
    GetId,
    /// Any other type: answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

/// One data buffer in guest memory, already checked to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataDesc {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: RequestKind,
    /// First sector (512 bytes) for `In`/`Out`.
    pub sector: u64,
    /// Data buffers in order; empty for `Flush` and `Unsupported`.
    pub data: Vec<DataDesc>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes in the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// Limits a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data descriptors per request.
    pub seg_max: u32,
    /// Largest data descriptor.
    pub size_max: u32,
}

/// Why a chain is not a well-formed request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The head index was out of range or the descriptor table unreadable.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// The chain is too long or breaks off.
    #[error("bad descriptor chain")]
    Chain(#[source] QueueError),
    /// The last descriptor is device-readable (no status descriptor).
    #[error("last descriptor is not device-writable (no status descriptor)")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor has length 0")]
    StatusEmpty,
    /// The status byte is not in guest RAM.
    #[error("status descriptor {addr:#x}+{len:#x} is outside guest memory")]
    StatusOutsideMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The chain has only a status descriptor.
    #[error("chain has no request header")]
    NoHeader,
    /// The header descriptor is device-writable.
    #[error("request header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is shorter than 16 bytes.
    #[error("request header descriptor is {0} bytes, expected {HEADER_LEN}")]
    HeaderTooShort(u32),
    /// The header is not in guest RAM.
    #[error("request header at {0:#x} is outside guest memory")]
    HeaderOutsideMemory(u64),
    /// A data descriptor goes the wrong way for the request type.
    #[error("data descriptor {index} has the wrong direction for a {kind:?} request (device-writable: {writable})")]
    DataDirection {
        /// Request type.
        kind: RequestKind,
        /// Position among the data descriptors.
        index: usize,
        /// Whether the descriptor is device-writable.
        writable: bool,
    },
    /// A data buffer is not in guest RAM.
    #[error("data descriptor {addr:#x}+{len:#x} is outside guest memory")]
    DataOutsideMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// More data descriptors than `seg_max`.
    #[error("{0} data segments, more than seg_max")]
    TooManySegments(usize),
    /// A data descriptor larger than `size_max`.
    #[error("data segment of {0} bytes is larger than size_max")]
    SegmentTooLarge(u32),
    /// A read or write without data.
    #[error("{0:?} request without data")]
    NoData(RequestKind),
    /// A read or write of more than [`MAX_REQUEST_BYTES`].
    #[error("{0} data bytes in one request, more than {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    /// A read or write whose length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// A read or write past the end of the disk (or overflowing u64).
    #[error("{len} bytes at sector {sector} go beyond the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
}

/// A chain that is not a well-formed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub error: RequestError,
    /// Where to write `VIRTIO_BLK_S_IOERR`; `None` when there is no usable
    /// status byte (the chain is returned with used length 0).
    pub status: Option<GuestAddress>,
}

impl Request {
    /// Parse `chain` and check it against `limits`.
    pub fn parse<M>(chain: Chain<M>, limits: &Limits) -> Result<Self, Rejected>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let mem = chain.memory();
        let drop = |error| Rejected {
            error,
            status: None,
        };
        let descs: Vec<Descriptor> = chain
            .clone()
            .collect::<Result<_, _>>()
            .map_err(|e| drop(RequestError::Chain(e)))?;

        let last = descs.last().ok_or(drop(RequestError::EmptyChain))?;
        if !last.is_write_only() {
            return Err(drop(RequestError::StatusNotWritable));
        }
        if last.len() == 0 {
            return Err(drop(RequestError::StatusEmpty));
        }
        let status = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .filter(|&a| mem.check_range(a, 1, Permissions::Write))
            .ok_or(drop(RequestError::StatusOutsideMemory {
                addr: last.addr().raw_value(),
                len: last.len(),
            }))?;
        let fail = |error| Rejected {
            error,
            status: Some(status),
        };

        let (header, rest) = match descs.split_first() {
            Some((h, rest)) if !rest.is_empty() => (h, &rest[..rest.len() - 1]),
            _ => return Err(fail(RequestError::NoHeader)),
        };
        if header.is_write_only() {
            return Err(fail(RequestError::HeaderWritable));
        }
        if header.len() < HEADER_LEN {
            return Err(fail(RequestError::HeaderTooShort(header.len())));
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| fail(RequestError::HeaderOutsideMemory(header.addr().raw_value())))?;
        // struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
        let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[8..]);
        let sector = u64::from_le_bytes(sector_bytes);

        let kind = match request_type {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => RequestKind::Unsupported(other),
        };
        let mut request = Request {
            kind,
            sector,
            data: Vec::new(),
            status,
        };
        // Flush carries no data (a driver that sends some anyway loses
        // nothing), and unsupported requests are answered without looking.
        let device_writes = match kind {
            RequestKind::In | RequestKind::GetId => true,
            RequestKind::Out => false,
            RequestKind::Flush | RequestKind::Unsupported(_) => return Ok(request),
        };

        if rest.len() > limits.seg_max as usize {
            return Err(fail(RequestError::TooManySegments(rest.len())));
        }
        for (index, d) in rest.iter().enumerate() {
            if d.is_write_only() != device_writes {
                return Err(fail(RequestError::DataDirection {
                    kind,
                    index,
                    writable: d.is_write_only(),
                }));
            }
            if d.len() > limits.size_max {
                return Err(fail(RequestError::SegmentTooLarge(d.len())));
            }
            let access = if device_writes {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(fail(RequestError::DataOutsideMemory {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                }));
            }
            request.data.push(DataDesc {
                addr: d.addr(),
                len: d.len(),
            });
        }

        if matches!(kind, RequestKind::In | RequestKind::Out) {
            let len = request.data_len();
            if len == 0 {
                return Err(fail(RequestError::NoData(kind)));
            }
            if len > MAX_REQUEST_BYTES {
                return Err(fail(RequestError::TooLarge(len)));
            }
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::UnalignedLength(len)));
            }
            let capacity = limits.capacity_sectors;
            let in_range = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len))
                .zip(capacity.checked_mul(SECTOR_SIZE))
                .is_some_and(|(end, size)| end <= size);
            if !in_range {
                return Err(fail(RequestError::OutOfRange {
                    sector,
                    len,
                    capacity,
                }));
            }
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::memory::GuestMemoryMmap;

    const W: u16 = crate::narrow::u16_of(VRING_DESC_F_WRITE);
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const LIMITS: Limits = Limits {
        capacity_sectors: 8,
        seg_max: 4,
        size_max: 4096,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, t: u32, sector: u64) {
        m.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
    }

    fn parse(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        Request::parse(Chain::new(chain, 16), &LIMITS)
    }

    fn err(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (RequestError, Option<GuestAddress>) {
        let r = parse(m, descs).unwrap_err();
        (r.error, r.status)
    }

    #[test]
    fn well_formed_requests() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 3);
        let r = parse(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 512, 1024, W),
                desc(STATUS, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::In);
        assert_eq!(r.sector, 3);
        assert_eq!(r.data_len(), 1536);
        assert_eq!(r.data.len(), 2);
        assert_eq!(r.status, GuestAddress(STATUS));

        header(&m, VIRTIO_BLK_T_OUT, 7);
        let r = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Out);

        // The status byte is the last byte of the last descriptor.
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[desc(HDR, 16, 0), desc(STATUS, 4, W)]).unwrap();
        assert_eq!(r.kind, RequestKind::Flush);
        assert_eq!(r.status, GuestAddress(STATUS + 3));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::GetId);

        header(&m, 11, 0);
        let r = parse(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Unsupported(11));
    }

    #[test]
    fn chains_without_usable_status_are_dropped() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // No status descriptor at all: the header is last.
        assert_eq!(
            err(&m, &[desc(HDR, 16, 0)]),
            (RequestError::StatusNotWritable, None)
        );
        // Status descriptor device-readable.
        assert_eq!(
            err(
                &m,
                &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)]
            ),
            (RequestError::StatusNotWritable, None)
        );
        assert_eq!(
            err(&m, &[desc(HDR, 16, 0), desc(STATUS, 0, W)]),
            (RequestError::StatusEmpty, None)
        );
        // Status byte outside guest RAM, or wrapping around the address space.
        assert!(matches!(
            err(&m, &[desc(HDR, 16, 0), desc(0x10_0000, 1, W)]),
            (RequestError::StatusOutsideMemory { .. }, None)
        ));
        assert!(matches!(
            err(&m, &[desc(HDR, 16, 0), desc(u64::MAX, 2, W)]),
            (RequestError::StatusOutsideMemory { .. }, None)
        ));
    }

    #[test]
    fn bad_headers_get_ioerr() {
        let m = mem();
        let st = Some(GuestAddress(STATUS));
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(err(&m, &[desc(STATUS, 1, W)]), (RequestError::NoHeader, st));
        assert_eq!(
            err(
                &m,
                &[desc(HDR, 8, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]
            ),
            (RequestError::HeaderTooShort(8), st)
        );
        assert_eq!(
            err(
                &m,
                &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)]
            ),
            (RequestError::HeaderWritable, st)
        );
        assert_eq!(
            err(
                &m,
                &[
                    desc(0x3_fff8, 16, 0),
                    desc(DATA, 512, W),
                    desc(STATUS, 1, W)
                ]
            ),
            (RequestError::HeaderOutsideMemory(0x3_fff8), st)
        );
    }

    #[test]
    fn data_checks() {
        let m = mem();
        let st = Some(GuestAddress(STATUS));
        header(&m, VIRTIO_BLK_T_IN, 0);
        // A read into a device-readable buffer.
        assert!(matches!(
            err(&m, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]),
            (RequestError::DataDirection { index: 0, writable: false, .. }, s) if s == st
        ));
        // Data outside guest memory, partly or wholly.
        assert!(matches!(
            err(&m, &[desc(HDR, 16, 0), desc(0x3_ff00, 512, W), desc(STATUS, 1, W)]),
            (RequestError::DataOutsideMemory { .. }, s) if s == st
        ));
        assert!(matches!(
            err(&m, &[desc(HDR, 16, 0), desc(u64::MAX - 100, 512, W), desc(STATUS, 1, W)]),
            (RequestError::DataOutsideMemory { .. }, s) if s == st
        ));
        assert_eq!(
            err(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]),
            (RequestError::NoData(RequestKind::In), st)
        );
        assert_eq!(
            err(
                &m,
                &[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)]
            ),
            (RequestError::UnalignedLength(100), st)
        );
        assert_eq!(
            err(
                &m,
                &[desc(HDR, 16, 0), desc(DATA, 8192, W), desc(STATUS, 1, W)]
            ),
            (RequestError::SegmentTooLarge(8192), st)
        );
        let mut many = vec![desc(HDR, 16, 0)];
        many.extend((0..5).map(|i| desc(DATA + i * 512, 512, W)));
        many.push(desc(STATUS, 1, W));
        assert_eq!(err(&m, &many), (RequestError::TooManySegments(5), st));

        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert!(matches!(
            err(
                &m,
                &[
                    desc(HDR, 16, 0),
                    desc(DATA, 512, 0),
                    desc(DATA, 512, W),
                    desc(STATUS, 1, W)
                ]
            ),
            (
                RequestError::DataDirection {
                    index: 1,
                    writable: true,
                    ..
                },
                _
            )
        ));
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert!(matches!(
            err(
                &m,
                &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)]
            ),
            (RequestError::DataDirection { .. }, _)
        ));
    }

    #[test]
    fn sector_range() {
        let m = mem();
        let ok = |sector: u64, len: u32| {
            header(&m, VIRTIO_BLK_T_IN, sector);
            parse(
                &m,
                &[desc(HDR, 16, 0), desc(DATA, len, W), desc(STATUS, 1, W)],
            )
        };
        // The disk has 8 sectors.
        assert!(ok(0, 4096).is_ok());
        assert!(ok(7, 512).is_ok());
        for (sector, len) in [(8, 512), (7, 1024), (u64::MAX, 512), (u64::MAX / 512, 1024)] {
            assert!(
                matches!(
                    ok(sector, len).unwrap_err().error,
                    RequestError::OutOfRange { .. }
                ),
                "sector {sector} len {len}"
            );
        }
    }

    /// A driver that did not accept seg_max and size_max is still bound by
    /// MAX_REQUEST_BYTES: two overlapping 8 MiB + 512 buffers are refused
    /// with IOERR, two of exactly half the bound are a request.
    #[test]
    fn a_request_moves_at_most_max_request_bytes() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x90_0000)]).unwrap();
        let unbound = Limits {
            capacity_sectors: u64::MAX / SECTOR_SIZE,
            seg_max: u32::MAX,
            size_max: u32::MAX,
        };
        let half = u32::try_from(MAX_REQUEST_BYTES / 2).unwrap();
        assert_eq!(u64::from(half) * 2, MAX_REQUEST_BYTES);
        let q = MockSplitQueue::new(&m, 16);
        for (len, ok) in [(half, true), (half + 512, false)] {
            header(&m, VIRTIO_BLK_T_IN, 0);
            let descs = [
                desc(HDR, 16, 0),
                desc(0x10_0000, len, W),
                desc(0x10_0000, len, W),
                desc(STATUS, 1, W),
            ];
            let chain = q.build_desc_chain(&descs).unwrap();
            let r = Request::parse(Chain::new(chain, 16), &unbound);
            if ok {
                assert_eq!(r.unwrap().data_len(), MAX_REQUEST_BYTES);
            } else {
                let r = r.unwrap_err();
                assert_eq!(r.error, RequestError::TooLarge(2 * u64::from(len)));
                assert_eq!(r.status, Some(GuestAddress(STATUS)));
            }
        }
    }

    #[test]
    fn looping_chain_is_refused_without_status() {
        // A descriptor whose `next` points at itself: the chain is cut at the
        // queue size and refused; no descriptor of it is taken as the status.
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let q = MockSplitQueue::new(&m, 4);
        let flags =
            const { crate::narrow::u16_of(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT) };
        q.desc_table()
            .store(0, RawDescriptor::from(Descriptor::new(HDR, 16, flags, 1)))
            .unwrap();
        q.desc_table()
            .store(
                1,
                RawDescriptor::from(Descriptor::new(STATUS, 1, flags | W, 1)),
            )
            .unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        m.write_obj(0u16, q.avail_addr().unchecked_add(4)).unwrap();
        m.write_obj(1u16, q.avail_addr().unchecked_add(2)).unwrap();
        let chain = crate::devices::virtio::queue_guard::pop(&mut queue, &m)
            .unwrap()
            .unwrap();
        let r = Request::parse(chain, &LIMITS).unwrap_err();
        assert_eq!(r.error, RequestError::Chain(QueueError::ChainTooLong(4)));
        assert_eq!(r.status, None);
    }
}
