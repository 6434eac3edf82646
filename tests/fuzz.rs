//! Property-based fuzzing of everything that decodes bytes from outside: client frames in both
//! encodings, the bus envelope, and building client frames from an envelope's data. Nothing may
//! panic; what decodes must re-encode consistently. Cases per property: `PROPTEST_CASES` (default
//! 2000 here), so CI runs each for a bounded time.

use bytes::Bytes;
use proptest::prelude::*;
use shardcast::{
    envelope::{Envelope, Kind},
    frame::{
        broadcast_frame, data_depth_ok, decode_binary, decode_text, json_to_msgpack, Command, Encoding,
        DEFAULT_DATA_DEPTH,
    },
};
use tokio_tungstenite::tungstenite::{protocol::Role, Message, WebSocket};

/// A wire frame read as a client reads it: exactly one message.
fn read(frame: &Bytes) -> Message {
    let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(frame.to_vec()), Role::Client, None);
    let msg = ws.read().expect("a whole frame");
    assert!(ws.read().is_err(), "one frame only");
    msg
}

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON-ish text: fragments of the contract glued at random, which reach deeper than pure noise.
fn jsonish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"op\"",
        "\"join\"",
        "\"pub\"",
        "\"dm\"",
        "\"ping\"",
        "\"leave\"",
        "\"room\"",
        "\"to\"",
        "\"data\"",
        "\"id\"",
        "1",
        "-7",
        "1e999",
        "null",
        "true",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"x\"",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::hash_map(".{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn text_frames_never_panic(s in any::<String>()) {
        let _ = decode_text(&s, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn contract_shaped_text_never_panics(s in jsonish()) {
        let _ = decode_text(&s, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn binary_frames_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_binary(&b, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn envelopes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&Bytes::from(b));
    }

    #[test]
    fn envelope_prefixes_and_mutations_never_panic(data in any_json(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
        let env = Envelope {
            kind: Kind::Room,
            origin: "n".into(),
            target: "r".into(),
            from: "u".into(),
            ts_us: 1,
            format: Encoding::Json,
            data: Bytes::from(data.to_string()),
        };
        let wire = env.encode();
        prop_assert_eq!(Envelope::decode(&wire).unwrap(), env.clone());
        let _ = Envelope::decode(&wire.slice(..cut % (wire.len() + 1)));
        let mut bytes = wire.to_vec();
        let i = flip.0 % bytes.len();
        bytes[i] ^= flip.1;
        if let Ok(mutated) = Envelope::decode(&Bytes::from(bytes)) {
            // Whatever decodes must build frames or refuse, never panic.
            for enc in Encoding::ALL {
                let _ = broadcast_frame(enc, &mutated);
            }
        }
    }

    #[test]
    fn published_data_reaches_both_encodings_intact(data in any_json()) {
        let text = serde_json::json!({"op":"pub","room":"r","data":data}).to_string();
        let Command::Pub { data: d, .. } = decode_text(&text, DEFAULT_DATA_DEPTH).unwrap().command else { panic!("not a pub") };
        let env = Envelope { kind: Kind::Room, origin: "n".into(), target: "r".into(), from: "u".into(), ts_us: 1, format: d.format, data: d.bytes };
        let json_frame = broadcast_frame(Encoding::Json, &env).unwrap();
        let v: serde_json::Value = serde_json::from_str(read(&json_frame).to_text().unwrap()).unwrap();
        prop_assert_eq!(&v["data"], &data);
        let mp_frame = broadcast_frame(Encoding::MsgPack, &env).unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&read(&mp_frame).into_data()).unwrap();
        prop_assert_eq!(&v["data"], &data);
    }

    #[test]
    fn msgpack_commands_round_trip(data in any_json(), id in any::<i64>()) {
        let frame = rmp_serde::to_vec_named(&serde_json::json!({"op":"pub","room":"r","data":data,"id":id})).unwrap();
        let req = decode_binary(&frame, DEFAULT_DATA_DEPTH).unwrap();
        prop_assert_eq!(req.id, Some(id));
        let Command::Pub { data: d, .. } = req.command else { panic!("not a pub") };
        let back: serde_json::Value = rmp_serde::from_slice(&d.bytes).unwrap();
        prop_assert_eq!(back, data);
    }
}

/// The nesting of a JSON value, measured the slow way.
fn depth_of(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

/// Bytes that nest deep in both encodings: mostly MessagePack arrays of thousands of items (0xdc
/// and a 16-bit count) and JSON `[`, which stay open, some that close at once, and noise.
fn deep_noise() -> impl Strategy<Value = Vec<u8>> {
    let bytes = vec![0xdc, 0xdc, 0xdc, 0xff, 0xff, b'[', b'[', 0x91, b'"', b'\\', 0x01, b']'];
    prop_oneof![
        3 => prop::collection::vec(prop::sample::select(bytes), 0..600),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn data_depth_agrees_with_the_value_in_both_encodings(data in any_json(), max in 0usize..8) {
        let text = data.to_string();
        let want = depth_of(&data) <= max;
        prop_assert_eq!(data_depth_ok(Encoding::Json, text.as_bytes(), max), want);
        let mp = json_to_msgpack(text.as_bytes()).unwrap();
        prop_assert_eq!(data_depth_ok(Encoding::MsgPack, &mp, max), want);
    }

    #[test]
    fn data_depth_never_panics_on_noise(b in deep_noise(), max in 0usize..200) {
        let _ = data_depth_ok(Encoding::Json, &b, max);
        let _ = data_depth_ok(Encoding::MsgPack, &b, max);
    }
}
