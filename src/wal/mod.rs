//! WAL: segment naming, archiving (`push`), retrieval (`fetch`, with prefetch) and continuity.
//!
//! One repository object per WAL file: `wal/<timeline><log>/<segment>` for segments (and
//! `.backup`/`.partial` files), `wal/history/<tli>.history` for timeline history files. Each
//! object carries a one-line JSON header with the sizes and SHA-256 of its raw and stored bytes,
//! so a fetch verifies without any other metadata and a re-push can compare contents.

pub mod archive;
pub mod continuity;
pub mod prefetch;

use std::fmt;

use crate::error::{Error, Result};

pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// A WAL segment name: timeline, log and segment as in `TTTTTTTTXXXXXXXXYYYYYYYY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub tli: u32,
    /// Segment number counted from LSN 0 (log * segments_per_log + seg).
    pub segno: u64,
}

impl Segment {
    pub fn segments_per_log(seg_size: u64) -> u64 {
        0x1_0000_0000 / seg_size
    }

    pub fn parse(name: &str, seg_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        Some(Segment {
            tli,
            segno: log * Self::segments_per_log(seg_size) + seg,
        })
    }

    pub fn from_lsn(tli: u32, lsn: Lsn, seg_size: u64) -> Segment {
        Segment {
            tli,
            segno: lsn.0 / seg_size,
        }
    }

    pub fn name(&self, seg_size: u64) -> String {
        let per = Self::segments_per_log(seg_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.tli,
            self.segno / per,
            self.segno % per
        )
    }

    pub fn next(&self) -> Segment {
        Segment {
            tli: self.tli,
            segno: self.segno + 1,
        }
    }

    /// The directory part of the object key: timeline + log.
    pub fn dir(&self, seg_size: u64) -> String {
        self.name(seg_size)[..16].to_string()
    }
}

/// A log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(s: &str) -> Result<Lsn> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| Error::Usage(format!("{s:?} is not an LSN (expected X/Y in hex)")))?;
        let hi = u64::from_str_radix(hi, 16)
            .map_err(|_| Error::Usage(format!("{s:?} is not an LSN")))?;
        let lo = u64::from_str_radix(lo, 16)
            .map_err(|_| Error::Usage(format!("{s:?} is not an LSN")))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(Error::Usage(format!("{s:?} is not an LSN")));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        Lsn::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What kind of file PostgreSQL hands to archive_command / asks of restore_command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalName {
    Segment(Segment),
    /// `TTTTTTTT.history`
    History(u32),
    /// `<segment>.XXXXXXXX.backup` or `<segment>.partial`: stored beside their segment.
    Other {
        name: String,
        seg: Segment,
    },
}

impl WalName {
    pub fn parse(name: &str, seg_size: u64) -> Result<WalName> {
        if let Some(seg) = Segment::parse(name, seg_size) {
            return Ok(WalName::Segment(seg));
        }
        if let Some(t) = name.strip_suffix(".history")
            && t.len() == 8
            && let Ok(tli) = u32::from_str_radix(t, 16)
        {
            return Ok(WalName::History(tli));
        }
        if name.len() > 24
            && let Some(seg) = Segment::parse(&name[..24], seg_size)
            && (name.ends_with(".backup") || name.ends_with(".partial"))
        {
            return Ok(WalName::Other {
                name: name.to_string(),
                seg,
            });
        }
        Err(Error::Usage(format!(
            "{name:?} is not a WAL segment, history or backup file name"
        )))
    }

    /// Object key relative to the stanza.
    pub fn key(&self, seg_size: u64) -> String {
        match self {
            WalName::Segment(s) => format!("wal/{}/{}", s.dir(seg_size), s.name(seg_size)),
            WalName::History(t) => format!("wal/history/{t:08X}.history"),
            WalName::Other { name, seg } => format!("wal/{}/{name}", seg.dir(seg_size)),
        }
    }
}

/// One entry of a timeline history file: `parent_tli switch_lsn reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent_tli: u32,
    pub switch_lsn: Lsn,
}

/// Parses the content of `TTTTTTTT.history`.
pub fn parse_history(text: &str) -> Vec<HistoryEntry> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let mut parts = l.split_whitespace();
            let tli = parts.next()?.parse().ok()?;
            let lsn = Lsn::parse(parts.next()?).ok()?;
            Some(HistoryEntry {
                parent_tli: tli,
                switch_lsn: lsn,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = Segment::parse("0000000200000001000000FF", DEFAULT_SEGMENT_SIZE).unwrap();
        assert_eq!(s.tli, 2);
        assert_eq!(s.segno, 256 + 255);
        assert_eq!(
            s.next().name(DEFAULT_SEGMENT_SIZE),
            "000000020000000200000000"
        );
        assert_eq!(Lsn::parse("1/FF000028").unwrap().to_string(), "1/FF000028");
        assert_eq!(
            Segment::from_lsn(2, Lsn::parse("1/FF000028").unwrap(), DEFAULT_SEGMENT_SIZE),
            s
        );
        assert_eq!(
            WalName::parse("00000002.history", DEFAULT_SEGMENT_SIZE)
                .unwrap()
                .key(DEFAULT_SEGMENT_SIZE),
            "wal/history/00000002.history"
        );
        assert_eq!(
            WalName::parse(
                "000000010000000000000002.00000028.backup",
                DEFAULT_SEGMENT_SIZE
            )
            .unwrap()
            .key(DEFAULT_SEGMENT_SIZE),
            "wal/0000000100000000/000000010000000000000002.00000028.backup"
        );
        assert!(WalName::parse("RECOVERYXLOG", DEFAULT_SEGMENT_SIZE).is_err());
    }

    #[test]
    fn history_parses() {
        let h = parse_history(
            "1\t0/3000000\tno recovery target specified\n\n2\t0/5000A0\tbefore 2026\n",
        );
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].parent_tli, 2);
        assert_eq!(h[1].switch_lsn, Lsn(0x5000A0));
    }
}
