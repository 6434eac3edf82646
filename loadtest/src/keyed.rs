//! Keyed messages on the wire, as the node frames them (`src/wire.rs`), JSON only: the frames a client of the `weak`
//! and `kickoff` scenarios sends (a `pub` with a `key`, a `join` with `latest`, a `leave`) and what
//! it reads off a `msg` frame beside the stamp [`wire::scan_json`] reads: its key, whether it is a
//! latest value sent on a join (`"latest":true`), and how many values of its key a socket that
//! fell behind did not get (`"skipped":N`).
//!
//! The node marks a conflated frame by putting `"skipped":N` first, in front of `"op"` (it does not
//! re-encode the rest), so such a frame is not recognised by [`wire::scan_json`]'s prefix; [`scan`]
//! takes the mark off before the stamp is read. Keys and rooms are the generator's own names and
//! need no escaping.

use std::borrow::Cow;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Stamp};

/// A `pub` of `data` (a JSON value as text) as the new value of `key`, answered (`id`).
pub fn pub_frame(room: &str, key: &str, id: i64, data: &str) -> Message {
    Message::Text(format!(r#"{{"op":"pub","room":"{room}","key":"{key}","id":{id},"data":{data}}}"#).into())
}

/// A `pub` of the stamped data of `size` bytes as the new value of `key`.
pub fn stamped_pub(room: &str, key: &str, id: i64, stamp: Stamp, size: usize) -> Message {
    pub_frame(room, key, id, &wire::json_data(stamp, size))
}

/// A `join` of `room` with an id; with `latest`, the room's latest values come first.
pub fn join_frame(room: &str, id: i64, latest: bool) -> Message {
    let latest = if latest { r#","latest":true"# } else { "" };
    Message::Text(format!(r#"{{"op":"join","room":"{room}","id":{id}{latest}}}"#).into())
}

/// A `leave` of `room` with an id.
pub fn leave_frame(room: &str, id: i64) -> Message {
    Message::Text(format!(r#"{{"op":"leave","room":"{room}","id":{id}}}"#).into())
}

/// What a `msg` frame says of its key, beside its stamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks<'a> {
    /// The message's key; `None` for an unkeyed message.
    pub key: Option<&'a str>,
    /// A latest value sent on a join (before the join's `ok`).
    pub latest: bool,
    /// Values of the key the socket did not get before this one (conflation).
    pub skipped: u64,
}

/// The `"skipped":N` the node puts first in a conflated frame, and the frame without it.
fn unmark(text: &str) -> (u64, Cow<'_, str>) {
    let Some(rest) = text.strip_prefix(r#"{"skipped":"#) else {
        return (0, Cow::Borrowed(text));
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (Ok(n), Some(after)) = (rest[..digits].parse::<u64>(), rest[digits..].strip_prefix(',')) else {
        return (0, Cow::Borrowed(text));
    };
    (n, Cow::Owned(format!("{{{after}")))
}

/// The key of a frame's head (its part before `"data":`), which holds no data.
fn key_of(head: &str) -> Option<&str> {
    let at = head.rfind(r#","key":""#)? + 8;
    let len = head[at..].find('"')?;
    Some(&head[at..at + len])
}

/// Reads a JSON text frame from the node. A `msg`'s stamp is read as [`wire::scan_json`] reads it
/// (a stamp's message is one of this run's publishers'), its marks from the frame's head. The
/// frame is returned with it: a conflated frame is read from a copy without its mark.
pub fn scan(text: &str) -> (Cow<'_, str>, Marks<'_>) {
    let (skipped, frame) = unmark(text);
    // The head, before the data, in the original text: the mark is in front of it.
    let head = match text.find(r#","data":"#) {
        Some(at) if text.starts_with(r#"{"op":"msg""#) || skipped > 0 => &text[..at],
        _ => "",
    };
    let marks = Marks {
        key: key_of(head),
        latest: head.contains(r#","latest":true"#),
        skipped,
    };
    (frame, marks)
}

/// The code of an `error` frame, from its JSON.
pub fn error_code(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v["op"] == "error").then(|| v["code"].as_str().unwrap_or("?").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Inbound;

    const STAMP: Stamp = Stamp {
        publisher: 0,
        seq: 41,
        ts_us: 1_790_000_000_000_123,
    };

    /// A `msg` frame as the node writes it (`src/wire.rs`): op, room, from, key, latest, data.
    fn node_frame(key: Option<&str>, latest: bool) -> String {
        let key = key.map_or(String::new(), |k| format!(r#","key":"{k}""#));
        let latest = if latest { r#","latest":true"# } else { "" };
        let data = wire::json_data(STAMP, 200);
        format!(r#"{{"op":"msg","room":"match:weak","from":"lt-score"{key}{latest},"data":{data}}}"#)
    }

    #[test]
    fn a_keyed_message_gives_its_key_and_its_stamp() {
        let text = node_frame(Some("score"), false);
        let (frame, marks) = scan(&text);
        assert_eq!(
            marks,
            Marks {
                key: Some("score"),
                latest: false,
                skipped: 0
            }
        );
        assert!(matches!(frame, Cow::Borrowed(_)), "no copy without a mark");
        assert_eq!(wire::scan_json(&frame), Inbound::Msg(STAMP, None));
        let unkeyed = node_frame(None, false);
        assert_eq!(scan(&unkeyed).1, Marks::default());
    }

    #[test]
    fn a_latest_value_sent_on_a_join_is_marked_latest() {
        let text = node_frame(Some("odds:17"), true);
        let (frame, marks) = scan(&text);
        assert_eq!((marks.key, marks.latest), (Some("odds:17"), true));
        assert_eq!(wire::scan_json(&frame), Inbound::Msg(STAMP, None));
    }

    #[test]
    fn a_conflated_frame_gives_what_it_skipped_and_is_read_without_the_mark() {
        // The node's `with_skipped`: the field first, the rest untouched.
        let text = node_frame(Some("score"), false).replacen('{', r#"{"skipped":12,"#, 1);
        let (frame, marks) = scan(&text);
        assert_eq!(
            marks,
            Marks {
                key: Some("score"),
                latest: false,
                skipped: 12
            }
        );
        assert_eq!(wire::scan_json(&frame), Inbound::Msg(STAMP, None));
        // Something that only looks like a mark is left alone.
        let odd = r#"{"skipped":x,"op":"msg"}"#;
        assert_eq!(scan(odd), (Cow::Borrowed(odd), Marks::default()));
    }

    #[test]
    fn the_data_is_not_searched_for_marks() {
        let data = r#"["x","key":"no",","latest":true"]"#;
        let text = format!(r#"{{"op":"msg","room":"r","from":"u","data":{data}}}"#);
        assert_eq!(scan(&text).1, Marks::default());
        // Answers are not messages.
        assert_eq!(scan(r#"{"op":"ok","id":3}"#).1, Marks::default());
    }

    #[test]
    fn frames_sent_are_what_the_contract_says() {
        let text = |m: Message| match m {
            Message::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
            _ => panic!("a text frame"),
        };
        let p = text(stamped_pub("match:weak", "score", 9, STAMP, 1024));
        assert_eq!(
            (p["op"].as_str(), p["key"].as_str(), p["id"].as_i64()),
            (Some("pub"), Some("score"), Some(9))
        );
        assert_eq!(p["data"][2], STAMP.ts_us);
        assert_eq!(
            text(join_frame("odds", 4, true)),
            serde_json::json!({"op":"join","room":"odds","id":4,"latest":true})
        );
        assert_eq!(
            text(join_frame("odds", 4, false)),
            serde_json::json!({"op":"join","room":"odds","id":4})
        );
        assert_eq!(
            text(leave_frame("odds", 5)),
            serde_json::json!({"op":"leave","room":"odds","id":5})
        );
        let e = r#"{"op":"error","id":2,"code":"too_many_keys","message":"x"}"#;
        assert_eq!(error_code(e).as_deref(), Some("too_many_keys"));
        assert_eq!(error_code(r#"{"op":"ok","id":2}"#), None);
    }
}
