//! Where each shard of a room with history stands on this node: the position of the last message
//! delivered per shard, so that a message that skips some is noticed ([`Heads::advance`]) and a
//! join that replayed history knows when this node has caught up with it ([`Heads::reached`]).
//! The hub keeps one per topic and forgets it with the topic, that is when its channels are
//! unsubscribed.

use super::pos::Pos;

/// A message's place after the last one delivered on its shard ([`Heads::advance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The next one (or the first, or of a new epoch): deliver it; it is the shard's head now.
    Next,
    /// At or before the head: delivered already.
    Stale,
    /// Messages after this head are missing: fill them in first (each advancing the head).
    Gap(Pos),
}

/// Per shard, the position of the last message delivered (none yet: `None`), and whether it is
/// only seeded ([`Heads::seed`]).
#[derive(Debug, Default)]
pub struct Heads(Vec<Option<Pos>>, Vec<bool>);

impl Heads {
    /// The last position delivered on `shard`, made room for.
    fn head(&mut self, shard: u32) -> &mut Option<Pos> {
        let shard = shard as usize;
        if self.0.len() <= shard {
            self.0.resize(shard + 1, None);
            self.1.resize(shard + 1, false);
        }
        self.1[shard] = false;
        &mut self.0[shard]
    }

    /// Where a join read a shard to stand, for a shard this node has delivered nothing on since it
    /// subscribed: what is at or before it is no member's (every member's join read after the
    /// subscription, so at or after it), and what comes after it will arrive. Without a seed a
    /// quiet shard would hold such a join until its next message. Seeds from several joins keep
    /// the lowest; a delivered message replaces the seed.
    pub fn seed(&mut self, shard: u32, pos: Pos) {
        let i = shard as usize;
        let seeded = self.1.get(i).copied().unwrap_or(false);
        let head = self.head(shard);
        match *head {
            None => *head = Some(pos),
            Some(h) if seeded && h.epoch == pos.epoch && pos.n < h.n => *head = Some(pos),
            Some(_) if !seeded => return,
            Some(_) => {}
        }
        self.1[i] = true;
    }

    /// Where a message with a position stands against the last one delivered on its shard; the
    /// shard's head moves to it when it is next.
    pub fn advance(&mut self, shard: u32, pos: Pos) -> Advance {
        let head = self.head(shard);
        match *head {
            Some(last) if last.epoch == pos.epoch && pos.n <= last.n => Advance::Stale,
            Some(last) if last.epoch == pos.epoch && pos.n > last.n + 1 => Advance::Gap(last),
            _ => {
                *head = Some(pos);
                Advance::Next
            }
        }
    }

    /// Moves a shard's head to `pos` whatever it was: after a gap, to what was read back of it
    /// and then to the message that showed it.
    pub fn skip_to(&mut self, shard: u32, pos: Pos) {
        *self.head(shard) = Some(pos);
    }

    /// Whether this node has delivered as far as `upto` (per shard) on every shard: each shard's
    /// head is there, or in another epoch, or nothing was asked of it.
    pub fn reached(&self, upto: &[Pos]) -> bool {
        upto.iter().enumerate().all(|(shard, p)| {
            p.n == 0
                || self
                    .0
                    .get(shard)
                    .copied()
                    .flatten()
                    .is_some_and(|h| h.epoch != p.epoch || h.n >= p.n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_stands_for_a_quiet_shard_until_a_message_is_delivered() {
        let mut heads = Heads::default();
        let p = |n| Pos { epoch: 1, n, id: None };
        assert!(!heads.reached(&[p(5)]));
        heads.seed(0, p(7));
        heads.seed(0, p(5));
        assert!(heads.reached(&[p(5)]) && !heads.reached(&[p(7)]), "the lowest seed");
        assert_eq!(heads.advance(0, p(5)), Advance::Stale, "no member's");
        assert_eq!(heads.advance(0, p(6)), Advance::Next);
        heads.seed(0, p(2));
        assert!(heads.reached(&[p(6)]), "a delivered head is not seeded over");
    }

    #[test]
    fn after_a_gap_read_back_in_part_the_next_message_is_not_a_gap_again() {
        let mut heads = Heads::default();
        let p = |n| Pos { epoch: 1, n, id: None };
        assert_eq!(heads.advance(0, p(1)), Advance::Next);
        assert_eq!(heads.advance(0, p(10)), Advance::Gap(p(1)));
        // History still had only 8 and 9 of the gap: the head moves past them, then to 10.
        for n in [8, 9, 10] {
            heads.skip_to(0, p(n));
        }
        assert_eq!(heads.advance(0, p(11)), Advance::Next);
        assert_eq!(heads.advance(0, p(10)), Advance::Stale);
    }
}
