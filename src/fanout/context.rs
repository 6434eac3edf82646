//! Compression with context, still once per message (`--compress-context`): a room's compressed
//! frames may refer back to the room's messages before them, for every socket that is known to
//! have those messages last in its inflater's window.
//!
//! A frame compressed alone (`server_no_context_takeover`) has nothing to refer back to: a chat
//! line of 250 bytes saves a quarter. A client whose offer did not ask for
//! `server_no_context_takeover` keeps the node's context (RFC 7692 §7.1.1.1): its inflater's
//! window holds the payloads of the last compressed frames it read, in order (32 KiB of them;
//! uncompressed frames do not enter it). So a room keeps its last compressed messages' payloads
//! ([`Chain`], at most `--compress-context` bytes), and each message it compresses is compressed
//! once per node and encoding alone, as ever, and again after the last 1, 4 and 16 of those
//! messages (as many as it keeps: [`Link`]). Every socket that read the last N of them as its last
//! compressed frames gets the frame compressed after the most of them it read, the same bytes as
//! every other socket that read as many; every other socket gets the frame compressed alone, which
//! reads after anything. The shorter links are for a socket whose run is short: one that just
//! joined, or reads a chat and a scoreboard at once, whose values come between the lines.
//!
//! What a socket read last is [`Window`]'s, kept by its gate under the lock that orders its bytes
//! ([`super::gate::Gate::write_linked`]): a message of the chain that follows the one before it
//! lengthens its run; any other compressed frame (another room's, a replay's, a conflated value)
//! ends it. A linked frame goes only where the run covers every message it refers to: a socket
//! whose run was just ended gets the next message compressed alone, and the one after it linked
//! to that one. Nothing else is kept per socket: three numbers.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;

use crate::wire;

/// Message `n` of chain `chain` in its linked forms: `(need, frame)`, the frame compressed after
/// the `need` messages of the chain before it (numbers `n - need` to `n - 1`), most first. Empty:
/// the message is in the chain, but no linked frame would be smaller (or nothing is before it):
/// every socket gets it compressed alone.
#[derive(Debug, Clone)]
pub struct Link {
    pub chain: u64,
    pub n: u64,
    pub frames: Vec<(u32, Bytes)>,
}

/// A message's link as its frames carry it on every lane: `None` for a message in no chain.
pub type Linked = Option<std::sync::Arc<Link>>;

/// How many of the last messages the linked frames of a message refer back to, at most: a frame
/// for a socket that read the last one, the last four, the last sixteen (as many as the chain
/// keeps). Each is one more compression of the message per node.
const LEVELS: [usize; 3] = [16, 4, 1];

/// One room's last compressed messages in one encoding, as the clients' windows hold them.
#[derive(Debug)]
pub struct Chain {
    id: u64,
    /// Messages of the chain so far.
    n: u64,
    /// The payloads of the last messages, oldest first, one after the other.
    before: Vec<u8>,
    /// Their lengths, oldest first.
    lengths: VecDeque<usize>,
    /// The most bytes `before` keeps.
    cap: usize,
}

impl Chain {
    /// A chain that refers back at most `cap` bytes (a client's window holds 32 KiB).
    pub fn new(cap: usize) -> Chain {
        static IDS: AtomicU64 = AtomicU64::new(1);
        Chain {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            n: 0,
            before: Vec::new(),
            lengths: VecDeque::new(),
            cap: cap.min(32 << 10),
        }
    }

    /// Adds a message whose frame goes compressed (`alone`, made from `plain`): its link, with the
    /// frames compressed after the chain's last messages ([`LEVELS`]) that are smaller than it,
    /// and smaller than the ones after fewer messages. `None` for a frame that is not a data frame
    /// the node built.
    pub fn add(&mut self, plain: &Bytes, alone: &Bytes) -> Option<Link> {
        let payload = wire::payload_of(plain)?;
        self.n += 1;
        let mut needs: Vec<usize> = LEVELS.iter().map(|l| (*l).min(self.lengths.len())).collect();
        needs.dedup();
        let mut frames: Vec<(u32, Bytes)> = Vec::with_capacity(needs.len());
        // Fewest first, so each frame is kept only where it beats the one after fewer messages.
        for need in needs.into_iter().rev().filter(|n| *n > 0) {
            let from: usize = self.lengths.iter().rev().take(need).sum();
            let before = &self.before[self.before.len() - from..];
            let Some(linked) = wire::deflated_after(plain, before) else {
                continue;
            };
            let best = frames.last().map_or(alone.len(), |(_, f)| f.len());
            if linked.len() < best {
                frames.push((need as u32, linked));
            }
        }
        frames.reverse();
        let link = Link {
            chain: self.id,
            n: self.n,
            frames,
        };
        self.before.extend_from_slice(payload);
        self.lengths.push_back(payload.len());
        let mut drop = 0;
        while self.before.len() - drop > self.cap {
            drop += self.lengths.pop_front().unwrap_or(self.before.len());
        }
        self.before.drain(..drop.min(self.before.len()));
        Some(link)
    }
}

/// What one socket's inflater read last of a chain: the chain, the number of the last message it
/// read and how many of the chain it read in a row up to it with no other compressed frame between.
#[derive(Debug, Default)]
pub struct Window {
    chain: u64,
    last: u64,
    run: u32,
}

impl Window {
    /// A compressed frame that is not a chain's message goes out: the run is over.
    pub fn broken(&mut self) {
        self.run = 0;
    }

    /// Message `link` of a chain goes out, linked or alone (every form inflates to the same
    /// payload): the linked frame that refers to the most messages the socket read last, if any.
    pub fn take<'a>(&mut self, link: &'a Link) -> Option<&'a Bytes> {
        let follows = self.chain == link.chain && self.last + 1 == link.n;
        let run = if follows { self.run } else { 0 };
        self.run = run.saturating_add(1);
        self.chain = link.chain;
        self.last = link.n;
        link.frames
            .iter()
            .find(|(need, _)| *need <= run)
            .map(|(_, frame)| frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Payload;

    /// A server frame's payload (frames here are under 64 KiB).
    fn body(frame: &[u8]) -> &[u8] {
        match frame[1] & 0x7f {
            126 => &frame[4..],
            _ => &frame[2..],
        }
    }

    fn text(s: &str) -> Bytes {
        let mut p = Payload::with_capacity(s.len());
        p.put(s.as_bytes());
        p.text()
    }

    fn line(i: usize) -> Bytes {
        text(&format!(
            r#"{{"op":"msg","room":"chat","data":{{"user":"fan{}","text":"what a pass from midfield, the keeper was never going to reach that one, minute {i}"}}}}"#,
            i % 3
        ))
    }

    /// `linked` inflated by an inflater whose window ends with `before`.
    fn inflated_after(before: &[u8], linked: &[u8]) -> Vec<u8> {
        let mut d = flate2::Decompress::new(false);
        d.set_dictionary(before).unwrap();
        let mut out = Vec::with_capacity(4096);
        let payload = [body(linked), &[0, 0, 0xff, 0xff]].concat();
        d.decompress_vec(&payload, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn a_chain_links_each_message_to_the_ones_before_within_its_bytes() {
        // About 140 B a line: 600 B hold the last four, never more.
        assert!((120..150).contains(&line(0).len()));
        let mut chain = Chain::new(600);
        let mut links = Vec::new();
        for i in 0..8 {
            let plain = line(i);
            let alone = wire::deflated(&plain, 0).unwrap();
            let link = chain.add(&plain, &alone).unwrap();
            let mut larger = alone.len();
            for (need, linked) in link.frames.iter().rev() {
                assert!(linked.len() < larger, "each smaller than the one after fewer");
                larger = linked.len();
                // Read by an inflater that had the `need` lines before it, it is the line.
                let before: Vec<u8> = (i - *need as usize..i)
                    .flat_map(|j| wire::payload_of(&line(j)).unwrap().to_vec())
                    .collect();
                assert_eq!(inflated_after(&before, linked), wire::payload_of(&plain).unwrap());
            }
            links.push(link);
        }
        assert_eq!(
            links.iter().map(|l| l.n).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        assert!(links[0].frames.is_empty(), "nothing before the first");
        for link in &links[1..] {
            let needs: Vec<u32> = link.frames.iter().map(|(n, _)| *n).collect();
            assert_eq!(needs.last(), Some(&1), "one after the line before: {needs:?}");
            assert!(needs.windows(2).all(|w| w[0] > w[1]), "most first: {needs:?}");
            assert!(needs[0] <= 4, "never past the bytes kept: {needs:?}");
            let (_, after_one) = link.frames.last().unwrap();
            let alone = wire::deflated(&line(link.n as usize - 1), 0).unwrap();
            assert!(
                after_one.len() * 2 < alone.len(),
                "{} of {}",
                after_one.len(),
                alone.len()
            );
        }
        assert!(
            links.iter().any(|l| l.frames.first().is_some_and(|(n, _)| *n == 4)),
            "four lines before one of them"
        );
        let other = Chain::new(600);
        assert_ne!(other.id, chain.id, "chains are told apart");
    }

    #[test]
    fn a_socket_gets_the_frame_linked_to_the_most_messages_it_read_last() {
        let link = |chain, n| Link {
            chain,
            n,
            frames: vec![(4, Bytes::from_static(b"four")), (1, Bytes::from_static(b"one"))],
        };
        let mut w = Window::default();
        let mut take = |chain, n| w.take(&link(chain, n)).map(|b| b.to_vec());
        assert_eq!(take(1, 5), None, "a new socket had nothing before");
        assert_eq!(take(1, 6).as_deref(), Some(&b"one"[..]));
        assert_eq!(take(1, 7).as_deref(), Some(&b"one"[..]));
        assert_eq!(take(1, 8).as_deref(), Some(&b"one"[..]), "three before, four needed");
        assert_eq!(take(1, 9).as_deref(), Some(&b"four"[..]));
        assert_eq!(take(1, 10).as_deref(), Some(&b"four"[..]));
        w.broken();
        let mut take = |chain, n| w.take(&link(chain, n)).map(|b| b.to_vec());
        assert_eq!(take(1, 11), None, "another compressed frame came between");
        assert_eq!(take(1, 12).as_deref(), Some(&b"one"[..]));
        assert_eq!(take(1, 14), None, "message 13 was not read");
        assert_eq!(take(2, 15), None, "another chain");
        assert_eq!(take(1, 15), None, "chain 2 came between");
        let alone = Link {
            chain: 1,
            n: 16,
            frames: Vec::new(),
        };
        assert_eq!(w.take(&alone), None, "no linked frame: alone");
        assert_eq!(
            w.take(&link(1, 17)).map(|b| b.to_vec()).as_deref(),
            Some(&b"one"[..]),
            "the message read alone still counts"
        );
    }
}
