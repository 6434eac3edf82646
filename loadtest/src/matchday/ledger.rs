//! The match's books: what each publisher sent and had acknowledged, by sequence number and the
//! phase it was sent in ([`Sent`]); what each viewer received and when it was in each room
//! ([`Received`]); and from the two, per phase and room ([`tally`]), the acknowledged messages
//! lost, the duplicates and the reorders per sender. Pure, so the rules are tested without
//! sockets.
//!
//! What counts, per message (a message belongs to the phase it was sent in):
//! - **Lost**: an acknowledged message that a viewer counted for it never received, to the run's
//!   end. In the score room (history) a viewer counts for every message sent after its first
//!   join's `ok`, if it was in the room again when the run ended: a viewer that was away came back
//!   with `since`, and the replay must have brought what it missed. In the chat room (no history)
//!   a viewer counts for a message when one of its connections was in the room from before the
//!   message was sent until [`GRACE`] after: what was sent while it was away, or as it went, is
//!   not owed to it. (A rule per phase, "in the room for the whole phase", would count no viewer
//!   in a rolling deploy, where every viewer moves at least once; per message it counts every
//!   viewer that phase would, and more.)
//! - **Duplicates**: a message of a sender a viewer had received already; **reorders**: an
//!   acknowledged message a viewer received after a later one of the same sender. Both in the
//!   phase they were received in, for every viewer. An unacknowledged message can overtake: its
//!   publisher's connection died with it in flight, and the next one went out through another
//!   node; the contract orders what a sender had acknowledged.

use std::ops::Range;

use crate::{
    stats::{Seen, Stream},
    wire::Stamp,
};

use super::live::{Room, PHASES};

/// How long after it was sent a message may still be on its way.
pub const GRACE: f64 = 2.0;

/// One publisher's messages, by sequence number.
#[derive(Debug, Clone)]
pub struct Sent {
    pub room: Room,
    /// The phase each was sent in (phases only go forward).
    pub phase: Vec<u8>,
    /// When each was sent, seconds into the run.
    pub at: Vec<f64>,
    pub acked: Vec<bool>,
}

impl Sent {
    pub fn new(room: Room) -> Sent {
        Sent {
            room,
            phase: Vec::new(),
            at: Vec::new(),
            acked: Vec::new(),
        }
    }

    /// A message sent in `phase`, `at` seconds into the run: its sequence number.
    pub fn send(&mut self, phase: usize, at: f64) -> u64 {
        self.phase.push(phase as u8);
        self.at.push(at);
        self.acked.push(false);
        self.phase.len() as u64 - 1
    }

    /// The node acknowledged `seq`; false when no such message was sent.
    pub fn ack(&mut self, seq: u64) -> bool {
        match self.acked.get_mut(seq as usize) {
            Some(a) => {
                *a = true;
                true
            }
            None => false,
        }
    }

    pub fn sent(&self) -> u64 {
        self.phase.len() as u64
    }

    fn is_acked(&self, seq: u64) -> bool {
        self.acked.get(seq as usize).copied().unwrap_or(false)
    }

    /// The sequence numbers sent in `phase`.
    fn of_phase(&self, phase: usize) -> Range<u64> {
        let lo = self.phase.partition_point(|p| (*p as usize) < phase) as u64;
        let hi = self.phase.partition_point(|p| (*p as usize) <= phase) as u64;
        lo..hi
    }

    /// The sequence numbers sent after `from` and no later than `to`, seconds into the run.
    fn sent_within(&self, from: f64, to: f64) -> Range<u64> {
        let lo = self.at.partition_point(|t| *t <= from) as u64;
        let hi = self.at.partition_point(|t| *t <= to) as u64;
        lo..hi.max(lo)
    }
}

/// Acknowledged messages of one publisher, counted over ranges of sequence numbers.
struct AckedCount(Vec<u32>);

impl AckedCount {
    fn of(sent: &Sent) -> AckedCount {
        let mut prefix = Vec::with_capacity(sent.acked.len() + 1);
        let mut n = 0;
        prefix.push(0);
        for a in &sent.acked {
            n += u32::from(*a);
            prefix.push(n);
        }
        AckedCount(prefix)
    }

    fn within(&self, r: Range<u64>) -> u64 {
        let at = |i: u64| self.0[(i as usize).min(self.0.len() - 1)];
        u64::from(at(r.end) - at(r.start.min(r.end)))
    }
}

/// What one viewer received, and when it was in each room (seconds into the run).
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Per publisher, by sequence number.
    pub streams: Vec<Stream>,
    /// Arrivals after a later message of the same sender: (phase received, publisher, seq).
    pub late: Vec<(u8, u32, u64)>,
    /// Per phase received and room.
    pub duplicates: Vec<[u64; 2]>,
    /// Messages of no publisher of the run.
    pub unexpected: u64,
    /// When it first joined the score room.
    pub score_since: Option<f64>,
    /// Each connection's time in the chat room: from the join's `ok` to its loss.
    pub chat_spans: Vec<(f64, f64)>,
    /// In both rooms when the run ended.
    pub joined_at_end: bool,
}

impl Received {
    pub fn new(publishers: usize) -> Received {
        Received {
            streams: vec![Stream::default(); publishers],
            duplicates: vec![[0; 2]; PHASES.len()],
            ..Received::default()
        }
    }

    /// A message received in `phase`, in `room`; false when it is a duplicate or of no publisher.
    pub fn message(&mut self, phase: usize, room: Room, stamp: Stamp) -> bool {
        let Some(stream) = self.streams.get_mut(stamp.publisher as usize) else {
            self.unexpected += 1;
            return false;
        };
        match stream.observe(stamp.seq) {
            Seen::Duplicate => {
                self.duplicates[phase][room.index()] += 1;
                false
            }
            Seen::Late => {
                self.late.push((phase as u8, stamp.publisher, stamp.seq));
                true
            }
            Seen::InOrder | Seen::Gap(_) => true,
        }
    }

    /// The messages of `sent` this viewer is owed (see the module's rules).
    fn owed(&self, sent: &Sent) -> Vec<Range<u64>> {
        match sent.room {
            Room::Score => match self.score_since {
                Some(t) if self.joined_at_end => vec![sent.sent_within(t, f64::INFINITY)],
                _ => Vec::new(),
            },
            Room::Chat => self
                .chat_spans
                .iter()
                .map(|(a, b)| sent.sent_within(*a, b - GRACE))
                .collect(),
        }
    }
}

/// One room over one phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Viewers owed at least one acknowledged message of the phase (see the module's rules).
    pub viewers_counted: u64,
    /// Acknowledged messages of the phase owed, summed over the viewers.
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

/// Per phase (`phases` of them), per room (indexed by [`Room::index`]): the books balanced.
pub fn tally(publishers: &[Sent], viewers: &[Received], phases: usize) -> Vec<[Tally; 2]> {
    let counts: Vec<AckedCount> = publishers.iter().map(AckedCount::of).collect();
    let mut out = vec![[Tally::default(), Tally::default()]; phases];
    for v in viewers {
        let mut owed_in = vec![[false; 2]; phases];
        for (p, sent) in publishers.iter().enumerate() {
            let r = sent.room.index();
            // A viewer with no stream of this publisher received none of it.
            let none = Stream::default();
            let missing: Vec<Range<u64>> = v.streams.get(p).unwrap_or(&none).missing(sent.sent()).collect();
            for owed in v.owed(sent) {
                for (k, t) in out.iter_mut().enumerate() {
                    let phase = sent.of_phase(k);
                    let span = owed.start.max(phase.start)..owed.end.min(phase.end);
                    let expected = counts[p].within(span.clone());
                    if expected == 0 {
                        continue;
                    }
                    owed_in[k][r] = true;
                    t[r].expected += expected;
                    for gap in &missing {
                        let (lo, hi) = (gap.start.max(span.start), gap.end.min(span.end));
                        if lo < hi {
                            t[r].lost += counts[p].within(lo..hi);
                        }
                    }
                }
            }
        }
        for (k, t) in out.iter_mut().enumerate() {
            for r in 0..2 {
                t[r].viewers_counted += u64::from(owed_in[k][r]);
                t[r].duplicates += v.duplicates.get(k).map_or(0, |d| d[r]);
            }
        }
        for &(k, p, seq) in &v.late {
            if let Some(sent) = publishers.get(p as usize).filter(|s| s.is_acked(seq)) {
                if let Some(t) = out.get_mut(k as usize) {
                    t[sent.room.index()].reordered += 1;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(publisher: u32, seq: u64) -> Stamp {
        Stamp {
            publisher,
            seq,
            ts_us: 0,
        }
    }

    /// A publisher of `room` that sent one message a second: `per_phase[k]` in phase k, all
    /// acknowledged but those in `unacked`. Message n is sent at n + 0.5 s.
    fn publisher(room: Room, per_phase: &[u64], unacked: &[u64]) -> Sent {
        let mut s = Sent::new(room);
        for (k, n) in per_phase.iter().enumerate() {
            for _ in 0..*n {
                let seq = s.send(k, s.sent() as f64 + 0.5);
                if !unacked.contains(&seq) {
                    s.ack(seq);
                }
            }
        }
        s
    }

    #[test]
    fn a_publishers_messages_are_found_by_phase_time_and_acknowledgement() {
        let s = publisher(Room::Score, &[3, 0, 4], &[1, 5]);
        assert_eq!((s.of_phase(0), s.of_phase(1), s.of_phase(2)), (0..3, 3..3, 3..7));
        assert_eq!((s.sent_within(1.0, 3.5), s.sent_within(6.0, 2.0)), (1..4, 6..6));
        let c = AckedCount::of(&s);
        assert_eq!((c.within(0..3), c.within(3..7), c.within(0..100)), (2, 3, 5));
        assert!(!Sent::new(Room::Chat).clone().ack(0), "nothing sent");
    }

    #[test]
    fn a_score_viewer_is_owed_what_came_after_its_join_if_it_is_back_at_the_end() {
        // Publisher 0: score, 5 a phase (0..5, 5..10, 10..15), seq 7 never acknowledged.
        let sent = [publisher(Room::Score, &[5, 5, 5], &[7])];
        let mut v = Received::new(1);
        v.score_since = Some(3.0);
        v.joined_at_end = true;
        // Got 0..6, missed 6..9 (7 unacknowledged), got 9..15.
        for seq in (0..6).chain(9..15) {
            v.message(0, Room::Score, stamp(0, seq));
        }
        let t = tally(&sent, &[v.clone()], 3);
        let score = |k: usize| (t[k][0].viewers_counted, t[k][0].expected, t[k][0].lost);
        assert_eq!(score(0), (1, 2, 0), "3 and 4 came after the join at 3 s");
        assert_eq!(score(1), (1, 4, 2), "6 and 8 lost; 7 was never acknowledged");
        assert_eq!(score(2), (1, 5, 0));
        // Away at the end: owed nothing.
        v.joined_at_end = false;
        assert_eq!(tally(&sent, &[v], 3)[1][0], Tally::default());
    }

    #[test]
    fn a_chat_viewer_is_owed_what_was_sent_while_one_connection_was_in_the_room() {
        // Two chat publishers (1 and 2 beside the score's 0), 4 messages a phase each: phase 0
        // sent at 0.5..3.5 s, phase 1 at 4.5..7.5, phase 2 at 8.5..11.5.
        let sent = [
            publisher(Room::Score, &[0, 0, 0], &[]),
            publisher(Room::Chat, &[4, 4, 4], &[]),
            publisher(Room::Chat, &[4, 4, 4], &[]),
        ];
        let mut v = Received::new(3);
        // In the room from 1 s to 7 s (owed what was sent until 5 s), and from 9 s to the end.
        v.chat_spans = vec![(1.0, 7.0), (9.0, 40.0)];
        for seq in 0..12 {
            v.message(0, Room::Chat, stamp(1, seq));
        }
        // Publisher 2: seq 1 (1.5 s) and 10 (10.5 s) missing, and 6 (6.5 s: not owed).
        for seq in [0, 2, 3, 4, 5, 7, 8, 9, 11] {
            v.message(0, Room::Chat, stamp(2, seq));
        }
        let t = tally(&sent, &[v], 3);
        let chat = |k: usize| (t[k][1].viewers_counted, t[k][1].expected, t[k][1].lost);
        assert_eq!(chat(0), (1, 6, 1), "1..4 of each publisher, seq 1 of publisher 2 lost");
        assert_eq!(chat(1), (1, 2, 0), "only seq 4 (4.5 s) of each");
        assert_eq!(chat(2), (1, 6, 1), "9..12 of each, seq 10 of publisher 2 lost");
        assert_eq!(t[1][0], Tally::default(), "no score room owed");
    }

    #[test]
    fn duplicates_and_acknowledged_reorders_count_where_received() {
        let sent = [publisher(Room::Score, &[6], &[2]), publisher(Room::Chat, &[6], &[])];
        let mut v = Received::new(2);
        for seq in [0, 1, 3, 2, 4, 4] {
            v.message(0, Room::Score, stamp(0, seq));
        }
        // Chat: 5 before 4 (a reorder, both acknowledged), 1 twice.
        for (phase, seq) in [(0, 0), (0, 1), (1, 1), (1, 2), (1, 3), (1, 5), (1, 4)] {
            v.message(phase, Room::Chat, stamp(1, seq));
        }
        assert!(!v.message(0, Room::Chat, stamp(9, 0)), "no such publisher");
        assert_eq!(v.unexpected, 1);
        let t = tally(&sent, &[v], 2);
        assert_eq!(
            (t[0][0].duplicates, t[0][0].reordered),
            (1, 0),
            "2 came late but was unacknowledged"
        );
        assert_eq!((t[1][1].duplicates, t[1][1].reordered), (1, 1));
        assert_eq!((t[0][1].duplicates, t[0][1].reordered), (0, 0));
    }
}
