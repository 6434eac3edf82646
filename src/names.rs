//! The rules for room names, user ids and node ids: what may become part of a Redis channel name
//! and of every frame a client receives.

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
        Err(NameError::Empty)
    } else if name.len() > MAX_NAME_BYTES {
        Err(NameError::TooLong)
    } else if name.chars().any(char::is_control) {
        Err(NameError::Control)
    } else {
        Ok(())
    }
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
}
