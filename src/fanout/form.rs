//! The forms a message's frames take on a node: one per encoding, compressed or not
//! (permessage-deflate), and, for sockets that joined with `delta`, with keyed values carried as
//! deltas. A topic counts its members per form and builds each form in use once per message
//! ([`super::lanes::frames_of`]); every socket of a form shares its frames.

use crate::encoding::Encoding;

/// How one socket reads a topic's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    pub encoding: Encoding,
    /// It negotiated permessage-deflate: frames worth compressing come compressed.
    pub deflate: bool,
    /// It joined the topic with `delta`: keyed values come whole or as deltas
    /// ([`crate::wire::Carried`]).
    pub delta: bool,
}

/// How many forms there are.
pub const FORMS: usize = 8;

impl Form {
    pub fn index(self) -> usize {
        self.encoding.index() * 4 + usize::from(self.deflate) * 2 + usize::from(self.delta)
    }

    pub fn all() -> impl Iterator<Item = Form> {
        Encoding::ALL.into_iter().flat_map(|encoding| {
            [(false, false), (false, true), (true, false), (true, true)]
                .into_iter()
                .map(move |(deflate, delta)| Form {
                    encoding,
                    deflate,
                    delta,
                })
        })
    }

    /// The same form, uncompressed.
    pub fn plain(self) -> Form {
        Form { deflate: false, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_has_its_own_index() {
        let mut seen = [false; FORMS];
        for form in Form::all() {
            assert!(!seen[form.index()], "{form:?} shares an index");
            seen[form.index()] = true;
            assert_eq!(form.plain().encoding, form.encoding);
            assert!(!form.plain().deflate);
        }
        assert!(seen.iter().all(|s| *s));
    }
}
