//! The node's side of permessage-deflate (RFC 7692) for the frames it sends: a payload compressed
//! with no context (`server_no_context_takeover`), so one compressed copy of a message is right for
//! every socket that negotiated the extension, whatever it was sent before; or compressed after
//! given bytes ([`deflate_after`]), right for every socket whose inflater's window ends with them
//! ([`crate::fanout::context`]). Each worker thread keeps one compressor and resets it per message:
//! its state (a few hundred KiB) is made once per thread, never per message or per socket.
//!
//! Framing (RSV1, the header) is [`crate::wire`]'s; this is the payload only.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What a sync flush ends a deflate block with; RFC 7692 §7.2.1 drops it from the payload and the
/// reader appends it again before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
}

/// `payload` compressed on its own, as a frame with RSV1 carries it.
pub fn deflate(payload: &[u8]) -> Vec<u8> {
    deflate_after(&[], payload)
}

/// `payload` compressed as the continuation of a stream that carried `before`: it may refer back
/// to `before`'s bytes (its last 32 KiB), so only an inflater whose window ends with them reads it.
/// With `before` empty, compressed on its own.
pub fn deflate_after(before: &[u8], payload: &[u8]) -> Vec<u8> {
    COMPRESSOR.with_borrow_mut(|c| {
        c.reset();
        if !before.is_empty() {
            // Right after a reset a raw compressor takes a dictionary; it does not fail then.
            let _ = c.set_dictionary(before);
        }
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let read = c.total_in() as usize;
            // A Vec has room or is grown below; a compressor fed from memory does not fail.
            let _ = c.compress_vec(&payload[read..], &mut out, FlushCompress::Sync);
            if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        out
    })
}

/// A payload [`deflate`] made, inflated again; `None` when it is not one or inflates past `limit`.
/// For the rare edit of a frame already compressed (a conflated value's `skipped` count).
pub fn inflate(payload: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity((payload.len() * 4).min(limit) + 64);
    for input in [payload, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let read = (d.total_in() - start) as usize;
            if read == input.len() {
                break;
            }
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return None;
                }
                out.reserve(out.capacity());
            }
            let before = (d.total_in(), d.total_out());
            match d.decompress_vec(&input[read..], &mut out, FlushDecompress::Sync) {
                Ok(Status::StreamEnd) => break,
                Ok(_) if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
    (out.len() <= limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_deflates_without_the_sync_tail_and_inflates_back() {
        let payload =
            br#"{"op":"msg","room":"match:1","data":{"home":1,"away":0,"home_team":"home","away_team":"away"}}"#
                .repeat(20);
        let small = deflate(&payload);
        assert!(!small.ends_with(&TAIL), "the sync flush's tail is dropped");
        assert!(
            small.len() * 4 < payload.len(),
            "repetitive JSON compresses: {} of {}",
            small.len(),
            payload.len()
        );
        assert_eq!(inflate(&small, 1 << 20).as_deref(), Some(&payload[..]));
        // The compressor is reused: a second message is compressed as if it were the first.
        assert_eq!(
            deflate(&payload),
            small,
            "no context carried from one message to the next"
        );
        assert_eq!(inflate(&small, 100), None, "past the limit");
        assert_eq!(inflate(b"\xff\xff\xff\xff", 1 << 20), None, "not deflate");
        assert_eq!(inflate(&deflate(b""), 10).as_deref(), Some(&b""[..]));
    }

    /// Inflates `payload` with an inflater whose window holds `before`, as a client's that kept
    /// its context does.
    fn inflate_after(before: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut d = Decompress::new(false);
        if !before.is_empty() {
            d.set_dictionary(before).unwrap();
        }
        let mut out = Vec::with_capacity(1 << 16);
        let input = [payload, &TAIL[..]].concat();
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
        out
    }

    #[test]
    fn a_payload_compressed_after_others_refers_back_to_them_and_reads_only_after_them() {
        let before = br#"{"user":"north_stand","text":"What a pass from midfield, the keeper was never going to reach that one"}"#;
        let payload = br#"{"user":"north_stand","text":"The keeper was never going to reach that pass from midfield"}"#;
        let alone = deflate(payload);
        let after = deflate_after(before, payload);
        assert!(
            after.len() * 2 < alone.len(),
            "after the line before: {} B, alone: {} B",
            after.len(),
            alone.len()
        );
        assert_eq!(inflate_after(before, &after), payload);
        assert_eq!(inflate_after(b"", &alone), payload);
        assert_eq!(
            inflate_after(before, &alone),
            payload,
            "a frame alone reads after anything"
        );
        // Read after other bytes, it is not the payload (or not deflate at all).
        let mut d = Decompress::new(false);
        d.set_dictionary(&vec![b'x'; before.len()]).unwrap();
        let mut out = Vec::with_capacity(1 << 16);
        let wrong = d.decompress_vec(&[&after[..], &TAIL].concat(), &mut out, FlushDecompress::Sync);
        assert!(wrong.is_err() || out != payload);
        assert_eq!(deflate_after(b"", payload), alone, "nothing before: alone");
        // The compressor is reset between messages: the dictionary does not stay.
        assert_eq!(deflate(payload), alone);
    }
}
