//! The node's side of permessage-deflate (RFC 7692) for the frames it sends: a payload compressed
//! with no context (`server_no_context_takeover`), so one compressed copy of a message is right for
//! every socket that negotiated the extension, whatever it was sent before. Each worker thread keeps
//! one compressor and resets it per message: its state (a few hundred KiB) is made once per thread,
//! never per message or per socket.
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
    COMPRESSOR.with_borrow_mut(|c| {
        c.reset();
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
}
