//! The rules for room names, user ids and node ids: what may become part of a Redis channel name
//! and of every frame a client receives.
//!
//! Names are compared byte for byte and never normalized: `é` written precomposed and decomposed
//! are two different rooms (applications that want one should normalize before they send).
//! Characters that hide text or reorder how it is shown are refused: control characters, the
//! invisible U+200B, the line and paragraph separators U+2028/U+2029 and the bidirectional
//! controls (U+202A to U+202E, U+2066 to U+2069). The joiners U+200C and U+200D stay allowed:
//! scripts and emoji sequences need them.
//!
//! Braces are refused too: Redis Cluster hashes only what is between the first `{` and the next
//! `}` of a channel name, so a room named `{hot}` would put all its shard channels on one slot
//! (and one master), and a brace in a name could pin other rooms' channels together.

/// Longest room or user name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {MAX_NAME_BYTES} bytes")]
    TooLong,
    #[error("has a control character")]
    Control,
    #[error("longer than {0} bytes")]
    Longer(usize),
    #[error("may only have ASCII letters, digits and - _ . : @")]
    Alphabet,
    #[error("has a brace ({{ or }}), which Redis Cluster reads as a hash tag")]
    Brace,
    #[error("has an invisible or bidirectional control character")]
    Invisible,
}

/// The node's own, stricter rules on top of [`check`] (`--max-name-bytes`, `--ascii-names`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_bytes: usize,
    pub ascii_only: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_bytes: MAX_NAME_BYTES,
            ascii_only: false,
        }
    }
}

impl Policy {
    pub fn check(&self, name: &str) -> Result<(), NameError> {
        check(name)?;
        if name.len() > self.max_bytes {
            return Err(NameError::Longer(self.max_bytes));
        }
        if self.ascii_only && !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)) {
            return Err(NameError::Alphabet);
        }
        Ok(())
    }
}

/// Checks a room name, user id or node id.
pub fn check(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    for c in name.chars() {
        if c.is_control() {
            return Err(NameError::Control);
        }
        if c == '{' || c == '}' {
            return Err(NameError::Brace);
        }
        if is_invisible(c) {
            return Err(NameError::Invisible);
        }
    }
    Ok(())
}

/// Whether `c` is one of the invisible or direction-changing characters names may not have.
pub fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["stadium", "match:42", "ü-bahn", "a b", &"x".repeat(MAX_NAME_BYTES)] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_policy_narrows_length_and_alphabet() {
        let p = Policy {
            max_bytes: 8,
            ascii_only: true,
        };
        assert_eq!(p.check("match:42"), Ok(()));
        assert_eq!(p.check("a@b.c-d_e"), Err(NameError::Longer(8)));
        assert_eq!(p.check("ü"), Err(NameError::Alphabet));
        assert_eq!(p.check("a b"), Err(NameError::Alphabet));
        assert_eq!(p.check(""), Err(NameError::Empty));
        assert_eq!(Policy::default().check("ü b"), Ok(()));
    }

    #[test]
    fn refuses_empty_long_and_control() {
        assert_eq!(check(""), Err(NameError::Empty));
        assert_eq!(check(&"x".repeat(MAX_NAME_BYTES + 1)), Err(NameError::TooLong));
        assert_eq!(check("a\nb"), Err(NameError::Control));
        assert_eq!(check("a\u{0}b"), Err(NameError::Control));
        assert_eq!(check("\u{7f}"), Err(NameError::Control));
    }

    #[test]
    fn refuses_braces_anywhere() {
        for bad in ["{hot}", "hot{", "}", "a{b}c", "{"] {
            assert_eq!(check(bad), Err(NameError::Brace), "{bad}");
        }
    }

    #[test]
    fn refuses_invisible_and_bidi_controls_but_keeps_joiners() {
        for c in [
            '\u{200B}', '\u{2028}', '\u{2029}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}',
            '\u{2067}', '\u{2068}', '\u{2069}',
        ] {
            let name = format!("a{c}b");
            assert_eq!(check(&name), Err(NameError::Invisible), "U+{:04X}", c as u32);
        }
        // Zero-width joiner and non-joiner: emoji sequences and several scripts need them.
        assert_eq!(check("\u{1F468}\u{200D}\u{1F469}"), Ok(()));
        assert_eq!(check("\u{645}\u{200C}\u{6CC}"), Ok(()));
        // The neighbours of the refused ranges stay allowed.
        for c in [
            '\u{200A}', '\u{200C}', '\u{200D}', '\u{2027}', '\u{202F}', '\u{2065}', '\u{206A}',
        ] {
            assert_eq!(check(&format!("a{c}b")), Ok(()), "U+{:04X}", c as u32);
        }
    }
}
