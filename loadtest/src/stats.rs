//! Delivery accounting: per-publisher sequence tracking on each subscriber (gaps, duplicates,
//! reorders), publishes waiting for their answer, the shared latency histograms, and what a feed
//! reader's socket carried beside the payloads it rebuilt ([`WireTally`]).

use std::{collections::VecDeque, ops::Range, sync::Mutex, time::Duration};

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Gaps one stream remembers; past this the oldest gap is forgotten, and a message filling it
/// later is counted as a duplicate instead of a reorder.
const MAX_GAPS: usize = 1024;

/// What one received sequence number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one expected.
    InOrder,
    /// Ahead of the next expected: this many were skipped (so far).
    Gap(u64),
    /// Behind: it fills an earlier gap.
    Late,
    /// Already received.
    Duplicate,
}

/// The messages of one publisher as one subscriber received them.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// One past the highest sequence number received.
    next: u64,
    /// Sequence numbers below `next` not received yet, as sorted disjoint ranges.
    gaps: Vec<Range<u64>>,
    /// Distinct sequence numbers received.
    pub distinct: u64,
}

impl Stream {
    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq >= self.next {
            let skipped = seq - self.next;
            if skipped > 0 {
                if self.gaps.len() == MAX_GAPS {
                    self.gaps.remove(0);
                }
                self.gaps.push(self.next..seq);
            }
            self.next = seq + 1;
            self.distinct += 1;
            return if skipped == 0 {
                Seen::InOrder
            } else {
                Seen::Gap(skipped)
            };
        }
        // Gaps are sorted and disjoint: find the one that could hold `seq`.
        let i = self.gaps.partition_point(|g| g.end <= seq);
        match self.gaps.get(i) {
            Some(g) if g.start <= seq => {
                let g = g.clone();
                match (g.start == seq, g.end == seq + 1) {
                    (true, true) => {
                        self.gaps.remove(i);
                    }
                    (true, false) => self.gaps[i].start = seq + 1,
                    (false, true) => self.gaps[i].end = seq,
                    (false, false) => {
                        self.gaps[i].end = seq;
                        self.gaps.insert(i + 1, seq + 1..g.end);
                    }
                }
                self.distinct += 1;
                Seen::Late
            }
            _ => Seen::Duplicate,
        }
    }

    /// Messages of `0..sent` never received.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.distinct)
    }

    /// The sequence numbers of `0..sent` not received, as sorted disjoint ranges: the gaps it
    /// remembers, then everything from one past the highest received.
    pub fn missing(&self, sent: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        let tail = (self.next < sent).then_some(self.next..sent);
        self.gaps
            .iter()
            .map(move |g| g.start.min(sent)..g.end.min(sent))
            .chain(tail)
            .filter(|r| !r.is_empty())
    }
}

/// Counters of one connection, summed over all at the end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub received: u64,
    /// Sequence numbers skipped when a later one arrived first (some may arrive late after).
    pub gap_missing: u64,
    pub reordered: u64,
    pub duplicates: u64,
}

impl Tally {
    pub fn count(&mut self, seen: Seen) {
        self.received += 1;
        match seen {
            Seen::InOrder => {}
            Seen::Gap(n) => self.gap_missing += n,
            Seen::Late => self.reordered += 1,
            Seen::Duplicate => self.duplicates += 1,
        }
    }

    pub fn add(&mut self, other: &Tally) {
        self.received += other.received;
        self.gap_missing += other.gap_missing;
        self.reordered += other.reordered;
        self.duplicates += other.duplicates;
    }
}

/// How a feed reader reads: whether it offers permessage-deflate, and whether it joins with
/// `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Reading {
    pub deflate: bool,
    pub delta: bool,
}

impl Reading {
    /// The four ways, plain first.
    pub const ALL: [Reading; 4] = [
        Reading {
            deflate: false,
            delta: false,
        },
        Reading {
            deflate: false,
            delta: true,
        },
        Reading {
            deflate: true,
            delta: false,
        },
        Reading {
            deflate: true,
            delta: true,
        },
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match (self.deflate, self.delta) {
            (false, false) => "plain",
            (false, true) => "delta",
            (true, false) => "deflate",
            (true, true) => "delta+deflate",
        }
    }
}

/// What feed readers' sockets carried, summed over readers: the bytes the kernel delivered
/// (framing, envelope and all) beside the bytes of the values they rebuilt.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireTally {
    pub readers: u64,
    /// Readers whose node agreed to permessage-deflate.
    pub negotiated: u64,
    /// Messages that gave a value.
    pub messages: u64,
    /// Bytes read from the sockets from the join's answer on.
    pub read_bytes: u64,
    /// Bytes of the values rebuilt (uncompressed, whole).
    pub payload_bytes: u64,
    /// Messages that came compressed (RSV1).
    pub compressed: u64,
    /// Keyed values that came as a delta, and whole as a delta's base.
    pub deltas: u64,
    pub wholes: u64,
    /// Frames whose value could not be rebuilt, or was not the value published.
    pub corrupted: u64,
    /// Values rebuilt with nothing recorded to check them against.
    pub unchecked: u64,
}

impl WireTally {
    pub fn add(&mut self, o: &WireTally) {
        self.readers += o.readers;
        self.negotiated += o.negotiated;
        self.messages += o.messages;
        self.read_bytes += o.read_bytes;
        self.payload_bytes += o.payload_bytes;
        self.compressed += o.compressed;
        self.deltas += o.deltas;
        self.wholes += o.wholes;
        self.corrupted += o.corrupted;
        self.unchecked += o.unchecked;
    }
}

/// Publishes sent on one socket and not answered yet, oldest first: a node answers a socket's
/// commands in order, so an answer also settles every older publish still waiting (never answered).
#[derive(Debug, Default)]
pub struct Pending(VecDeque<(i64, Instant)>);

impl Pending {
    pub fn sent(&mut self, id: i64, at: Instant) {
        self.0.push_back((id, at));
    }

    /// The answer to `id`: how long it took, if that publish was waiting.
    pub fn answered(&mut self, id: i64, now: Instant) -> Option<Duration> {
        while let Some((n, at)) = self.0.front().copied().filter(|(n, _)| *n <= id) {
            self.0.pop_front();
            if n == id {
                return Some(now.saturating_duration_since(at));
            }
        }
        None
    }
}

/// End-to-end latency in microseconds, 1 µs to 10 min at 3 significant digits, sharded so the
/// runtime's threads rarely meet on a lock.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

const MAX_US: u64 = 600_000_000;

impl Latencies {
    pub fn new(shards: usize) -> Latencies {
        let one = || Mutex::new(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds"));
        Latencies {
            shards: (0..shards.max(1)).map(|_| one()).collect(),
        }
    }

    pub fn record(&self, shard: usize, us: u64) {
        let mut h = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        h.saturating_record(us.clamp(1, MAX_US));
    }

    /// What was recorded since the last take, merged; the shards start empty again.
    pub fn take(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds");
        for s in &self.shards {
            let mut h = s.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*h).expect("same bounds");
            h.reset();
        }
        all
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds");
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(seqs: &[u64]) -> (Stream, Tally) {
        let mut s = Stream::default();
        let mut t = Tally::default();
        for &q in seqs {
            t.count(s.observe(q));
        }
        (s, t)
    }

    #[test]
    fn in_order_stream_has_nothing_to_report() {
        let (s, t) = feed(&[0, 1, 2, 3]);
        assert_eq!(
            t,
            Tally {
                received: 4,
                ..Tally::default()
            }
        );
        assert_eq!((s.distinct, s.lost(4)), (4, 0));
    }

    #[test]
    fn gaps_count_the_skipped_and_the_tail_counts_as_lost() {
        let (s, t) = feed(&[0, 1, 4, 5, 9]);
        assert_eq!(t.gap_missing, 2 + 3);
        assert_eq!((t.reordered, t.duplicates), (0, 0));
        // Ten were sent (0..10): 2, 3, 6, 7, 8 never came.
        assert_eq!(s.lost(10), 5);
        // And an eleventh that never came at all is lost without any gap.
        assert_eq!(s.lost(11), 6);
    }

    #[test]
    fn late_arrivals_fill_gaps_and_repeats_are_duplicates() {
        let (s, t) = feed(&[0, 5, 2, 1, 4, 3, 3, 5, 0, 6]);
        assert_eq!(t.received, 10);
        assert_eq!(t.gap_missing, 4);
        assert_eq!(t.reordered, 4);
        assert_eq!(t.duplicates, 3);
        assert_eq!(s.lost(7), 0);
        assert!(s.gaps.is_empty());
    }

    #[test]
    fn a_late_message_in_the_middle_splits_its_gap() {
        let (mut s, _) = feed(&[0, 10]);
        assert_eq!(s.observe(5), Seen::Late);
        assert_eq!(s.gaps, vec![1..5, 6..10]);
        assert_eq!(s.observe(5), Seen::Duplicate);
        assert_eq!(s.observe(1), Seen::Late);
        assert_eq!(s.observe(9), Seen::Late);
        assert_eq!(s.gaps, vec![2..5, 6..9]);
        assert_eq!(s.lost(11), 6);
    }

    #[test]
    fn what_is_missing_is_the_gaps_and_the_tail() {
        let (s, _) = feed(&[0, 1, 4, 5, 9]);
        assert_eq!(s.missing(12).collect::<Vec<_>>(), vec![2..4, 6..9, 10..12]);
        assert_eq!(
            s.missing(7).collect::<Vec<_>>(),
            vec![2..4, 6..7],
            "cut at what was sent"
        );
        assert_eq!(s.missing(2).count(), 0);
        assert_eq!(Stream::default().missing(3).collect::<Vec<_>>(), vec![0..3]);
    }

    #[test]
    fn a_stream_that_starts_late_counts_the_start_as_a_gap() {
        let (s, t) = feed(&[3, 4]);
        assert_eq!(t.gap_missing, 3);
        assert_eq!(s.lost(5), 3);
    }

    #[test]
    fn gap_memory_is_bounded() {
        let mut s = Stream::default();
        for i in 0..(MAX_GAPS as u64 + 10) {
            s.observe(i * 2);
        }
        assert_eq!(s.gaps.len(), MAX_GAPS);
        // The oldest gaps were forgotten: their late message counts as a duplicate.
        assert_eq!(s.observe(1), Seen::Duplicate);
        assert_eq!(s.observe(2 * MAX_GAPS as u64 + 17), Seen::Late);
    }

    #[test]
    fn an_answer_times_its_publish_and_settles_the_older_ones() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pending::default();
        for id in 2..6 {
            p.sent(id, t0 + ms(10 * id as u64));
        }
        assert_eq!(p.answered(2, t0 + ms(25)), Some(ms(5)));
        assert_eq!(p.answered(1, t0 + ms(30)), None, "not waiting");
        // 3 was never answered: 4's answer settles it.
        assert_eq!(p.answered(4, t0 + ms(70)), Some(ms(30)));
        assert_eq!(p.answered(3, t0 + ms(80)), None);
        assert_eq!(p.answered(5, t0 + ms(90)), Some(ms(40)));
        assert_eq!(p.answered(6, t0 + ms(95)), None);
        assert!(p.0.is_empty());
    }

    #[test]
    fn latencies_merge_across_shards() {
        let l = Latencies::new(4);
        for i in 0..1000u64 {
            l.record(i as usize, i + 1);
        }
        l.record(0, 0);
        l.record(1, u64::MAX);
        let h = l.merged();
        assert_eq!(h.len(), 1002);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= MAX_US);
        let p50 = h.value_at_quantile(0.5);
        assert!((495..=505).contains(&p50), "{p50}");
        assert_eq!(l.take().len(), 1002);
        assert_eq!(l.take().len(), 0, "a take empties the shards");
        assert_eq!(l.merged().len(), 0);
    }
}
