//! Signed requests: every hook request carries the time it was made and, with `--hook-secret`, an
//! HMAC-SHA256 of that time and its body, so a backend can refuse a forged request (wrong
//! signature) and a replayed one (a time too far from its own clock). docs/protocol.md shows a
//! backend's check.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Seconds since the Unix epoch when the request was made, as decimal digits.
pub const TIMESTAMP: &str = "x-shardcast-timestamp";
/// `sha256=` and the lower-case hex HMAC-SHA256, keyed with `--hook-secret`, of the timestamp
/// header's value, a `.`, and the body's bytes.
pub const SIGNATURE: &str = "x-shardcast-signature";

/// The [`SIGNATURE`] header's value for `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 2 * digest.len());
    out.push_str("sha256=");
    for byte in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_time_dot_body_as_a_backend_computes_it() {
        // Python's `hmac.new(b"secret", b"1700000000." + body, hashlib.sha256).hexdigest()`.
        let body = br#"{"user":"u"}"#;
        assert_eq!(
            signature(b"secret", "1700000000", body),
            "sha256=ff530a2340dd4022849f79a1586006269729557579cb9c2b290c1a79d6a1448b"
        );
        let s = signature(b"secret", "1700000000", body);
        assert_ne!(s, signature(b"secret", "1700000001", body), "the time is signed");
        assert_ne!(
            s,
            signature(b"secret", "1700000000", br#"{"user":"v"}"#),
            "the body is signed"
        );
    }
}
