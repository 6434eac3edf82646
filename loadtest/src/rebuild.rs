//! A viewer's side of shared deltas per key (JSON encoding): from a node's `msg` frame, the value
//! the app would be handed. A socket that joined with `delta` gets a keyed value either whole
//! (`"delta":false`, `data` a JSON string holding the value's text) or as a fossil delta from the
//! previous value of that key it got (`"delta":true`, `data` a string holding the delta); this keeps
//! the last value per (room, key) and applies the deltas. Any other message carries its value as
//! it is (`"data":VALUE}`, the node's framing puts `data` last).
//!
//! Pure: what was published, and whether a value matches it, is the viewer's to check.

use std::{borrow::Cow, collections::HashMap};

use crate::keyed;

/// How a value came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// In the frame as it is (no delta asked for, or an unkeyed message).
    Plain,
    /// Whole, as the base of the next delta (`"delta":false`).
    Whole,
    /// A delta from the key's previous value (`"delta":true`).
    Delta,
}

/// Why a frame gave no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Not a `msg` frame with `data`.
    NoData,
    /// `data` is a string but not a valid one, or what follows it is not `"delta":…}`.
    BadString,
    /// A delta for a key this socket has no value of.
    NoBase,
    /// A delta that does not apply to the value this socket has (fossil's checksum, or its form).
    DeltaFails,
}

/// The last value of each (room, key) one socket rebuilt.
#[derive(Debug, Default)]
pub struct Rebuild {
    last: HashMap<(String, String), Vec<u8>>,
}

impl Rebuild {
    /// The value a `msg` frame carries, whole, and how it came: borrowed from the frame, or from
    /// the key's last value, which it now is (no copy of a value per message).
    pub fn value<'a>(&'a mut self, frame: &'a str) -> Result<(Cow<'a, [u8]>, Form), Broken> {
        if !frame.starts_with(r#"{"op":"msg""#) {
            return Err(Broken::NoData);
        }
        let at = frame.find(r#","data":"#).ok_or(Broken::NoData)?;
        let rest = &frame[at + 8..];
        if !rest.starts_with('"') {
            let value = rest.strip_suffix('}').ok_or(Broken::NoData)?;
            return Ok((Cow::Borrowed(value.as_bytes()), Form::Plain));
        }
        let mut strings = serde_json::Deserializer::from_str(rest).into_iter::<String>();
        let data = match strings.next() {
            Some(Ok(s)) => s,
            _ => return Err(Broken::BadString),
        };
        let delta = match &rest[strings.byte_offset()..] {
            r#","delta":true}"# => true,
            r#","delta":false}"# => false,
            _ => return Err(Broken::BadString),
        };
        let (_, marks) = keyed::scan(frame);
        let slot = (room_of(frame).to_owned(), marks.key.unwrap_or_default().to_owned());
        if !delta {
            let last = self.last.entry(slot).or_default();
            *last = data.into_bytes();
            return Ok((Cow::Borrowed(&last[..]), Form::Whole));
        }
        let base = self.last.get_mut(&slot).ok_or(Broken::NoBase)?;
        *base = fossil_delta::apply(&base[..], data.as_bytes()).map_err(|_| Broken::DeltaFails)?;
        Ok((Cow::Borrowed(&base[..]), Form::Delta))
    }
}

/// The room of a `msg` frame, which the node writes second (generator names need no escaping).
fn room_of(frame: &str) -> &str {
    frame
        .strip_prefix(r#"{"op":"msg","room":""#)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyed frame as the node writes it for a socket that joined with `delta`.
    fn keyed(key: &str, data: &[u8], delta: bool) -> String {
        let data = serde_json::to_string(std::str::from_utf8(data).unwrap()).unwrap();
        format!(r#"{{"op":"msg","room":"stadium","from":"lt-p0","key":"{key}","data":{data},"delta":{delta}}}"#)
    }

    /// The value of `frame` rebuilt, owned.
    fn read(r: &mut Rebuild, frame: &str) -> Result<(Vec<u8>, Form), Broken> {
        r.value(frame).map(|(v, form)| (v.into_owned(), form))
    }

    const V1: &str = r#"{"at":[0,0,1],"home":{"name":"Harbour City","score":0,"lineup":["A. Silva","B. Okafor","C. Lindqvist","D. Moreau"]},"away":{"name":"Redmoor United","score":0},"clock":"12:01","events":[]}"#;
    const V2: &str = r#"{"at":[0,1,2],"home":{"name":"Harbour City","score":1,"lineup":["A. Silva","B. Okafor","C. Lindqvist","D. Moreau"]},"away":{"name":"Redmoor United","score":0},"clock":"12:04","events":["goal"]}"#;

    #[test]
    fn a_whole_value_then_a_delta_rebuild_each_value() {
        let mut r = Rebuild::default();
        let (v, form) = read(&mut r, &keyed("match:0", V1.as_bytes(), false)).unwrap();
        assert_eq!((&v[..], form), (V1.as_bytes(), Form::Whole));
        let d = fossil_delta::delta(V2, V1);
        assert!(d.len() < V2.len() / 2);
        let (v, form) = read(&mut r, &keyed("match:0", &d, true)).unwrap();
        assert_eq!((&v[..], form), (V2.as_bytes(), Form::Delta));
        // The base is now V2: a delta from V2 applies again.
        let v3 = V2.replace("12:04", "12:09");
        let (v, _) = read(&mut r, &keyed("match:0", &fossil_delta::delta(&v3, V2), true)).unwrap();
        assert_eq!(&v[..], v3.as_bytes());
    }

    #[test]
    fn a_delta_without_its_base_or_on_another_base_is_broken() {
        let mut r = Rebuild::default();
        let d = fossil_delta::delta(V2, V1);
        assert_eq!(read(&mut r, &keyed("match:0", &d, true)).unwrap_err(), Broken::NoBase);
        read(&mut r, &keyed("other", V1.as_bytes(), false)).unwrap();
        assert_eq!(
            read(&mut r, &keyed("match:0", &d, true)).unwrap_err(),
            Broken::NoBase,
            "per key"
        );
        read(&mut r, &keyed("match:0", br#"{"at":[0,0,1]}"#, false)).unwrap();
        assert_eq!(
            read(&mut r, &keyed("match:0", &d, true)).unwrap_err(),
            Broken::DeltaFails
        );
    }

    #[test]
    fn plain_values_are_read_as_they_are() {
        let mut r = Rebuild::default();
        let f = format!(r#"{{"op":"msg","room":"stadium","from":"lt-p3","data":{V1}}}"#);
        assert_eq!(read(&mut r, &f).unwrap(), (V1.as_bytes().to_vec(), Form::Plain));
        assert!(matches!(r.value(&f), Ok((Cow::Borrowed(_), _))), "no copy");
        assert_eq!(read(&mut r, r#"{"op":"ok","id":1}"#).unwrap_err(), Broken::NoData);
        let cut = keyed("k", V1.as_bytes(), false).replace(r#","delta":false}"#, "}");
        assert_eq!(read(&mut r, &cut).unwrap_err(), Broken::BadString);
    }
}
