//! Minimal CMOS real-time clock (ports 0x70/0x71): gives the guest the host's
//! wall-clock time at boot, in BCD 24-hour mode (x86 Linux defines
//! `RTC_ALWAYS_BCD` and decodes every register as BCD whatever status B says,
//! so a binary clock read 2026-12-01 22:20 as 2020-12-01 16:14). The guest kernel reads it
//! once (`rtc_cmos`/`mc146818`); without it a guest that has no kvmclock
//! (for example with `nopv`) would start in 1970. Writes to the clock are
//! accepted and ignored; the 114 bytes of NVRAM after the clock registers
//! behave like memory.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status B: 24-hour clock, BCD values (data-mode bit 0x04 clear), as a PC's RTC.
const B_24H_BCD: u8 = 0x02;
/// Status D: the battery is fine, the time is valid.
const D_VALID: u8 = 0x80;

/// Broken-down UTC time.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 = Sunday ... 7 = Saturday (CMOS convention).
    pub weekday: u32,
}

/// UTC date and time of `secs` seconds after the Unix epoch.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "each field cast is a Euclidean remainder (0..86_400) or Hinnant's \
              day (1..=31) or month (1..=12), all derived from rem_euclid: small and never negative"
)]
pub fn from_unix(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday (CMOS 5).
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

/// The last two decimal digits of `v` as packed BCD (0x00..=0x99).
fn bcd(v: i64) -> u8 {
    #[expect(clippy::cast_possible_truncation, reason = "rem_euclid(100) is 0..=99")]
    let v = v.rem_euclid(100) as u8;
    (v / 10) << 4 | (v % 10)
}

/// The CMOS RTC as a bus device at port 0x70 (index) / 0x71 (data).
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self {
            index: 0,
            nvram: [0; 128],
        }
    }
}

/// The CMOS registers a snapshot keeps: the selected index and the NVRAM
/// (the clock itself is read from the host, so a restored guest sees the
/// time of the restore).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosSnapshot {
    /// Selected register.
    pub index: u8,
    /// NVRAM bytes (128).
    pub nvram: Vec<u8>,
}

impl Cmos {
    /// A clock reading the host's time.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registers a snapshot keeps.
    pub fn snapshot(&self) -> CmosSnapshot {
        CmosSnapshot {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// A CMOS with the saved registers; the NVRAM must be 128 bytes.
    pub fn from_snapshot(s: &CmosSnapshot) -> Result<Self, String> {
        let nvram = <[u8; 128]>::try_from(s.nvram.as_slice())
            .map_err(|_| format!("CMOS state: {} NVRAM bytes, not 128", s.nvram.len()))?;
        Ok(Self {
            index: s.index & 0x7f,
            nvram,
        })
    }

    fn register(&self, reg: u8, now: &DateTime) -> u8 {
        match reg {
            REG_SECONDS => bcd(i64::from(now.second)),
            REG_MINUTES => bcd(i64::from(now.minute)),
            REG_HOURS => bcd(i64::from(now.hour)),
            REG_WEEKDAY => bcd(i64::from(now.weekday)),
            REG_DAY => bcd(i64::from(now.day)),
            REG_MONTH => bcd(i64::from(now.month)),
            REG_YEAR => bcd(now.year),
            REG_CENTURY => bcd(now.year.div_euclid(100)),
            // No update in progress, 32.768 kHz divider.
            REG_A => 0x26,
            REG_B => B_24H_BCD,
            REG_C => 0,
            REG_D => D_VALID,
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            0 => self.index,
            1 => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .and_then(|d| i64::try_from(d.as_secs()).ok())
                    .unwrap_or(0);
                self.register(self.index, &from_unix(secs))
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [b] = data else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; we have no NMI source.
            0 => self.index = b & 0x7f,
            1 if self.index > REG_D && self.index != REG_CENTURY => {
                self.nvram[usize::from(self.index)] = *b
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_to_civil() {
        assert_eq!(
            from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2026-11-27 23:28:47 UTC, a Friday.
        let t = from_unix(1_795_822_127);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 27));
        assert_eq!((t.hour, t.minute, t.second, t.weekday), (23, 28, 47, 6));
        // Leap day.
        let t = from_unix(951_782_400); // 2000-02-29 00:00:00
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    }

    #[test]
    fn clock_registers_are_bcd() {
        // 2026-12-01 22:20:47 UTC, a Tuesday (CMOS 3).
        let t = from_unix(1_796_163_647);
        let c = Cmos::new();
        let r = |reg| c.register(reg, &t);
        assert_eq!(
            [r(REG_CENTURY), r(REG_YEAR), r(REG_MONTH), r(REG_DAY)],
            [0x20, 0x26, 0x12, 0x01]
        );
        assert_eq!(
            [r(REG_HOURS), r(REG_MINUTES), r(REG_SECONDS), r(REG_WEEKDAY)],
            [0x22, 0x20, 0x47, 0x03]
        );
        assert_eq!(r(REG_B) & 0x04, 0, "data mode must be BCD");
    }

    #[test]
    fn registers_through_ports() {
        let mut c = Cmos::new();
        let mut b = [0u8];
        c.write(0, &[REG_B]);
        c.read(1, &mut b);
        assert_eq!(b[0], B_24H_BCD);
        c.write(0, &[0x80 | REG_CENTURY]); // NMI-mask bit ignored
        c.read(1, &mut b);
        assert!(b[0] >= 0x20);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x5a]); // clock writes ignored, no panic
        let mut wide = [0u8; 2];
        c.read(1, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
