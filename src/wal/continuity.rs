//! WAL continuity: which segments the archive holds, how timelines branch, and whether the
//! chain from a backup's start segment to the newest archived segment has a gap.
//!
//! Recovery with `recovery_target_timeline = 'latest'` follows the newest timeline whose
//! history descends from the backup's timeline. For each timeline on that path PostgreSQL
//! reads the segments from the one holding its switch-in point (named with the new timeline)
//! up to the one before the switch-out point; that is the chain checked here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::archive::{self, FetchError};
use super::{HistoryEntry, Lsn, Segment, WalName, parse_history};
use crate::error::{Error, Result};
use crate::repo::Repo;

/// What the archive holds.
#[derive(Debug, Default)]
pub struct Archive {
    pub seg_size: u64,
    /// Segment numbers present, per timeline.
    pub segments: BTreeMap<u32, BTreeSet<u64>>,
    /// Parsed history files, per timeline.
    pub histories: BTreeMap<u32, Vec<HistoryEntry>>,
}

impl Archive {
    /// Lists `wal/` and reads (verified) every history file.
    pub async fn load(repo: &Repo, seg_size: u64) -> Result<Archive> {
        let prefix = repo.key("wal/");
        let objs = repo.storage().list(&prefix).await?;
        let mut a = Archive {
            seg_size,
            ..Default::default()
        };
        let mut history_tlis = Vec::new();
        for o in objs {
            let name = o.key.rsplit('/').next().unwrap_or("");
            match WalName::parse(name, seg_size) {
                Ok(WalName::Segment(s)) => {
                    a.segments.entry(s.tli).or_default().insert(s.segno);
                }
                Ok(WalName::History(t)) => history_tlis.push(t),
                _ => {}
            }
        }
        for t in history_tlis {
            match archive::read_verified(repo, &WalName::History(t), seg_size).await {
                Ok(bytes) => {
                    a.histories
                        .insert(t, parse_history(&String::from_utf8_lossy(&bytes)));
                }
                Err(FetchError::NotFound) => {}
                Err(FetchError::Failed(e)) => return Err(e),
            }
        }
        Ok(a)
    }

    /// Timelines that descend from (or are) `tli`, newest last.
    fn descendants(&self, tli: u32) -> Vec<u32> {
        let mut out = vec![tli];
        for (&t, h) in &self.histories {
            if t != tli && h.iter().any(|e| e.parent_tli == tli) {
                out.push(t);
            }
        }
        out.sort();
        out
    }

    /// The timeline `latest` recovery would end on, starting from `tli`.
    pub fn latest_timeline(&self, tli: u32) -> u32 {
        *self.descendants(tli).last().unwrap_or(&tli)
    }

    /// The path of (timeline, first segno, last segno or None for "open end") from `start` to
    /// `target_tli`.
    fn path(&self, start: Segment, target_tli: u32) -> Result<Vec<(u32, u64, Option<u64>)>> {
        if target_tli == start.tli {
            return Ok(vec![(start.tli, start.segno, None)]);
        }
        let hist = self.histories.get(&target_tli).ok_or_else(|| {
            Error::NotFound(format!(
                "history file of timeline {target_tli} is not in the archive"
            ))
        })?;
        // Entries are in order: each says "parent_tli ran until switch_lsn".
        let pos = hist
            .iter()
            .position(|e| e.parent_tli == start.tli)
            .ok_or_else(|| {
                Error::Failed(format!(
                    "timeline {target_tli} does not descend from timeline {}",
                    start.tli
                ))
            })?;
        let mut out = Vec::new();
        let mut begin = start.segno;
        for (i, e) in hist.iter().enumerate().skip(pos) {
            let switch_seg = e.switch_lsn.0 / self.seg_size;
            if switch_seg < begin {
                return Err(Error::Failed(format!(
                    "timeline {} branched off at {} before the backup's start segment",
                    hist.get(i + 1).map(|n| n.parent_tli).unwrap_or(target_tli),
                    e.switch_lsn
                )));
            }
            // The segment holding the switch point is read from the new timeline.
            out.push((e.parent_tli, begin, switch_seg.checked_sub(1)));
            begin = switch_seg;
        }
        out.push((target_tli, begin, None));
        Ok(out)
    }

    /// Checks the chain from `start` (to `must_reach` at least, if given) along the path to the
    /// latest descendant timeline.
    pub fn chain(&self, start: Segment, must_reach: Option<Segment>) -> Result<Chain> {
        let target = self.latest_timeline(start.tli);
        let path = self.path(start, target)?;
        let mut gaps = Vec::new();
        let mut last: Option<Segment> = None;
        let mut timelines = Vec::new();
        for (tli, first, end) in path {
            timelines.push(tli);
            let have = self.segments.get(&tli).cloned().unwrap_or_default();
            let end = match end {
                Some(e) => e,
                // Open end: the newest segment archived on this timeline.
                None => match have.range(first..).next_back() {
                    Some(&e) => e,
                    None => continue,
                },
            };
            if end < first {
                continue;
            }
            for segno in first..=end {
                if have.contains(&segno) {
                    if gaps.is_empty() {
                        last = Some(Segment { tli, segno });
                    }
                } else {
                    gaps.push(Segment { tli, segno }.name(self.seg_size));
                }
            }
        }
        if let Some(m) = must_reach {
            let reached = last.map(|l| l.segno >= m.segno).unwrap_or(false);
            if !reached && gaps.is_empty() {
                gaps.push(m.name(self.seg_size));
            }
        }
        Ok(Chain {
            start: start.name(self.seg_size),
            timelines,
            last_contiguous: last.map(|s| s.name(self.seg_size)),
            last_segment: last,
            gaps,
        })
    }
}

/// The result of a continuity check.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    pub start: String,
    pub timelines: Vec<u32>,
    /// Newest segment reachable without a gap.
    pub last_contiguous: Option<String>,
    #[serde(skip)]
    pub last_segment: Option<Segment>,
    /// Missing segments (the first few), in order.
    pub gaps: Vec<String>,
}

impl Chain {
    pub fn ok(&self) -> bool {
        self.gaps.is_empty()
    }
}

/// LSN of the start of a segment.
pub fn segment_start(seg: Segment, seg_size: u64) -> Lsn {
    Lsn(seg.segno * seg_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SZ: u64 = 16 * 1024 * 1024;

    fn archive(segs: &[(u32, u64)], hist: &[(u32, &str)]) -> Archive {
        let mut a = Archive {
            seg_size: SZ,
            ..Default::default()
        };
        for &(t, s) in segs {
            a.segments.entry(t).or_default().insert(s);
        }
        for &(t, h) in hist {
            a.histories.insert(t, parse_history(h));
        }
        a
    }

    #[test]
    fn contiguous_single_timeline() {
        let a = archive(&[(1, 2), (1, 3), (1, 4)], &[]);
        let c = a
            .chain(
                Segment { tli: 1, segno: 2 },
                Some(Segment { tli: 1, segno: 3 }),
            )
            .unwrap();
        assert!(c.ok(), "{c:?}");
        assert_eq!(
            c.last_contiguous.as_deref(),
            Some("000000010000000000000004")
        );
    }

    #[test]
    fn gap_is_named() {
        let a = archive(&[(1, 2), (1, 4)], &[]);
        let c = a.chain(Segment { tli: 1, segno: 2 }, None).unwrap();
        assert_eq!(c.gaps, vec!["000000010000000000000003"]);
    }

    #[test]
    fn follows_timeline_switch() {
        // tl1 ran until 0/5000100 (segment 5); tl2 starts in segment 5.
        let a = archive(
            &[(1, 2), (1, 3), (1, 4), (1, 5), (2, 5), (2, 6)],
            &[(2, "1\t0/5000100\tpitr\n")],
        );
        let c = a.chain(Segment { tli: 1, segno: 2 }, None).unwrap();
        assert!(c.ok(), "{c:?}");
        assert_eq!(c.timelines, vec![1, 2]);
        assert_eq!(
            c.last_contiguous.as_deref(),
            Some("000000020000000000000006")
        );
        // Missing tl2 segment 5 is a gap even though tl1 has segment 5.
        let a = archive(
            &[(1, 2), (1, 3), (1, 4), (1, 5), (2, 6)],
            &[(2, "1\t0/5000100\tpitr\n")],
        );
        let c = a.chain(Segment { tli: 1, segno: 2 }, None).unwrap();
        assert_eq!(c.gaps, vec!["000000020000000000000005"]);
    }

    #[test]
    fn must_reach_stop_segment() {
        let a = archive(&[(1, 2)], &[]);
        let c = a
            .chain(
                Segment { tli: 1, segno: 2 },
                Some(Segment { tli: 1, segno: 3 }),
            )
            .unwrap();
        assert!(!c.ok());
    }
}
