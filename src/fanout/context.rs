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
//! twice, once per node and encoding: alone, as ever, and after those messages ([`Link`]). Every
//! socket that read exactly those messages as its last compressed frames gets the linked frame,
//! the same bytes for all of them; every other socket gets the frame compressed alone, which reads
//! after anything.
//!
//! What a socket read last is [`Window`]'s, kept by its gate under the lock that orders its bytes
//! ([`super::gate::Gate::write_linked`]): a message of the chain that follows the one before it
//! lengthens its run; any other compressed frame (another room's, a replay's, a conflated value)
//! ends it. A linked frame goes only where the run covers every message it refers to. A socket
//! that just joined, or reads several busy rooms, gets frames compressed alone until it has read
//! a room's last messages in a row. Nothing else is kept per socket: three numbers.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;

use crate::wire;

/// A message of a room's chain in its linked form: the frame compressed after the `need` messages
/// of chain `chain` before it (numbers `n - need` to `n - 1`).
#[derive(Debug, Clone)]
pub struct Link {
    pub chain: u64,
    pub n: u64,
    pub need: u32,
    /// `None`: the message is in the chain, but its linked frame would not be smaller (or there is
    /// nothing before it): every socket gets it compressed alone.
    pub frame: Option<Bytes>,
}

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
    /// frame compressed after the chain's last messages where that is smaller. `None` for a frame
    /// that is not a data frame the node built.
    pub fn add(&mut self, plain: &Bytes, alone: &Bytes) -> Option<Link> {
        let payload = wire::payload_of(plain)?;
        self.n += 1;
        let frame = (!self.before.is_empty())
            .then(|| wire::deflated_after(plain, &self.before))
            .flatten()
            .filter(|linked| linked.len() < alone.len());
        let link = Link {
            chain: self.id,
            n: self.n,
            need: self.lengths.len() as u32,
            frame,
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

    /// Message `link` of a chain goes out, linked or alone (both inflate to the same payload):
    /// true when the socket read every message it refers to, so the linked frame is the one.
    pub fn take(&mut self, link: &Link) -> bool {
        let follows = self.chain == link.chain && self.last + 1 == link.n;
        let linked = follows && self.run >= link.need && link.frame.is_some();
        self.run = if follows { self.run.saturating_add(1) } else { 1 };
        self.chain = link.chain;
        self.last = link.n;
        linked
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

    #[test]
    fn a_chain_links_each_message_to_the_ones_before_within_its_bytes() {
        let mut chain = Chain::new(600);
        let mut links = Vec::new();
        for i in 0..8 {
            let plain = line(i);
            let alone = wire::deflated(&plain, 0).unwrap();
            let link = chain.add(&plain, &alone).unwrap();
            if let Some(linked) = &link.frame {
                assert!(linked.len() * 2 < alone.len(), "{} of {}", linked.len(), alone.len());
                // Read by an inflater that had the `need` messages before it, it is the message.
                let before: Vec<u8> = (i - link.need as usize..i)
                    .flat_map(|j| wire::payload_of(&line(j)).unwrap().to_vec())
                    .collect();
                let mut d = flate2::Decompress::new(false);
                d.set_dictionary(&before).unwrap();
                let mut out = Vec::with_capacity(4096);
                let payload = [body(linked), &[0, 0, 0xff, 0xff]].concat();
                d.decompress_vec(&payload, &mut out, flate2::FlushDecompress::Sync)
                    .unwrap();
                assert_eq!(out, wire::payload_of(&plain).unwrap());
            }
            links.push(link);
        }
        assert_eq!(
            links.iter().map(|l| l.n).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        assert!(links[0].frame.is_none(), "nothing before the first");
        // About 140 B a line: 600 B hold the last four, never more.
        assert!((120..150).contains(&line(0).len()));
        assert_eq!(
            links.iter().map(|l| l.need).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 4, 4, 4]
        );
        assert!(links[1..].iter().all(|l| l.frame.is_some()));
        let other = Chain::new(600);
        assert_ne!(other.id, chain.id, "chains are told apart");
    }

    #[test]
    fn a_socket_gets_the_linked_frame_only_after_every_message_it_refers_to() {
        let link = |chain, n, need| Link {
            chain,
            n,
            need,
            frame: Some(Bytes::from_static(b"linked")),
        };
        let mut w = Window::default();
        assert!(!w.take(&link(1, 5, 2)), "a new socket had nothing before");
        assert!(!w.take(&link(1, 6, 2)), "one before, two needed");
        assert!(w.take(&link(1, 7, 2)));
        assert!(w.take(&link(1, 8, 2)));
        w.broken();
        assert!(!w.take(&link(1, 9, 1)), "another compressed frame came between");
        assert!(w.take(&link(1, 10, 1)));
        assert!(!w.take(&link(1, 12, 1)), "message 11 was not read");
        assert!(!w.take(&link(2, 13, 0)), "another chain");
        assert!(!w.take(&link(1, 13, 1)), "chain 2 came between");
        let mut alone = link(1, 14, 0);
        alone.frame = None;
        assert!(!w.take(&alone), "no linked frame: alone");
        assert!(w.take(&link(1, 15, 2)), "the message read alone still counts");
    }
}
