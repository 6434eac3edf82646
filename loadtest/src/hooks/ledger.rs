//! What a `hooks` run's members keep of their publishes ([`Sent`], [`Answer`]) and the checks over
//! it, pure and tested without a node: which acknowledged lines a member missed, when publishing
//! failed and resumed around a backend outage, and the report's arithmetic (CPU per publish, the
//! latency the node adds to the backend's).

use std::collections::HashSet;

/// How the node answered a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `ok`: published.
    Ok,
    /// `error` with code `unavailable`: the hook's backend failed.
    Unavailable,
    /// Any other `error`.
    Refused,
}

/// One publish: when it went out (µs since the epoch) and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub at_us: u64,
    pub answer: Option<(u64, Answer)>,
}

/// Sequence numbers of a publisher's acknowledged publishes, in order.
pub fn acked(sent: &[Sent]) -> Vec<u64> {
    sent.iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.answer, Some((_, Answer::Ok))))
        .map(|(seq, _)| seq as u64)
        .collect()
}

/// Of `acked` (sorted), those a member did not receive, given what it received from that
/// publisher (any order).
pub fn missed(acked: &[u64], got: &[u64]) -> u64 {
    let mut got = got.to_vec();
    got.sort_unstable();
    acked.iter().filter(|s| got.binary_search(s).is_err()).count() as u64
}

/// Of the lines a member received (publisher, seq, whether masked): how many were masked, and how
/// many were masked though the backend did not mask them or plain though it did.
pub fn masks_seen(received: &[(u32, u64, bool)], masked_by_backend: &HashSet<(u32, u64)>) -> (u64, u64) {
    let masked = received.iter().filter(|r| r.2).count() as u64;
    let wrong = received
        .iter()
        .filter(|(p, s, masked)| *masked != masked_by_backend.contains(&(*p, *s)))
        .count() as u64;
    (masked, wrong)
}

/// What happened to publishing around a backend outage, milliseconds.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Outage {
    /// From the stop to the first `unavailable` answer.
    pub first_unavailable_after_ms: Option<f64>,
    /// The longest an `unavailable` answer took after its publish.
    pub unavailable_answer_max_ms: Option<f64>,
    pub unavailable: u64,
    /// Publishes sent while the backend was away and answered `ok` (`--hook-on-error publish=allow`).
    pub allowed: u64,
    /// The longest such an `ok` took after its publish.
    pub allowed_answer_max_ms: Option<f64>,
    /// From the backend's return to the first `ok` to a publish sent after it.
    pub resumed_after_ms: Option<f64>,
    /// From the backend's return to its first answer.
    pub backend_back_after_ms: Option<f64>,
}

/// [`Outage`] over every publish of the run, the backend stopped at `stop_us` and back at
/// `back_us` (µs since the epoch), the backend answering at `answered_at_us`.
pub fn outage<'a>(sent: impl Iterator<Item = &'a Sent>, stop_us: u64, back_us: u64, answered_at_us: &[u64]) -> Outage {
    let ms = |us: u64| us as f64 / 1e3;
    let mut o = Outage {
        backend_back_after_ms: answered_at_us
            .iter()
            .filter(|at| **at >= back_us)
            .min()
            .map(|at| ms(at - back_us)),
        ..Outage::default()
    };
    for s in sent {
        match s.answer {
            Some((at, Answer::Unavailable)) => {
                o.unavailable += 1;
                if at >= stop_us {
                    let after = ms(at - stop_us);
                    o.first_unavailable_after_ms = Some(o.first_unavailable_after_ms.map_or(after, |f| f.min(after)));
                }
                let took = ms(at.saturating_sub(s.at_us));
                o.unavailable_answer_max_ms = Some(o.unavailable_answer_max_ms.map_or(took, |m| m.max(took)));
            }
            Some((at, Answer::Ok)) if (stop_us..back_us).contains(&s.at_us) => {
                o.allowed += 1;
                let took = ms(at.saturating_sub(s.at_us));
                o.allowed_answer_max_ms = Some(o.allowed_answer_max_ms.map_or(took, |m| m.max(took)));
            }
            Some((at, Answer::Ok)) if s.at_us >= back_us => {
                let after = ms(at - back_us);
                o.resumed_after_ms = Some(o.resumed_after_ms.map_or(after, |f| f.min(after)));
            }
            _ => {}
        }
    }
    o
}

/// The node's CPU per acknowledged publish, µs.
pub fn cpu_per_publish_us(cpu_ns: u64, publishes: u64) -> Option<f64> {
    (publishes > 0).then(|| cpu_ns as f64 / publishes as f64 / 1e3)
}

/// The latency the node adds to the backend's: the end-to-end p99 less the backend's p99, ms.
pub fn added_ms(end_to_end_p99: f64, backend_p99: f64) -> f64 {
    end_to_end_p99 - backend_p99
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(at_us: u64, answer: Option<(u64, Answer)>) -> Sent {
        Sent { at_us, answer }
    }

    #[test]
    fn only_acknowledged_lines_a_member_did_not_receive_are_missed() {
        let log = [
            sent(0, Some((1, Answer::Ok))),
            sent(2, Some((3, Answer::Unavailable))),
            sent(4, None),
            sent(6, Some((7, Answer::Ok))),
        ];
        assert_eq!(acked(&log), [0, 3]);
        assert_eq!(missed(&[0, 3], &[3, 0]), 0, "received out of order");
        assert_eq!(missed(&[0, 3], &[0, 1]), 1, "a refused line received does not make up");
        assert_eq!(missed(&[0, 3], &[]), 2);
        assert_eq!(missed(&[], &[5]), 0);
    }

    #[test]
    fn an_outage_is_timed_from_the_stop_and_from_the_return() {
        let log = [
            sent(900, Some((950, Answer::Ok))),
            // Sent before the stop, answered after it: still the first after the stop.
            sent(990, Some((1_400, Answer::Unavailable))),
            sent(1_500, Some((3_500, Answer::Unavailable))),
            sent(5_000, Some((5_100, Answer::Unavailable))),
            // Sent before the return: allowed, not a resumption.
            sent(5_900, Some((6_200, Answer::Ok))),
            sent(6_300, Some((6_400, Answer::Ok))),
            sent(7_000, Some((7_050, Answer::Ok))),
        ];
        let o = outage(log.iter(), 1_000, 6_000, &[900, 6_250, 6_100]);
        assert_eq!(o.unavailable, 3);
        assert_eq!(
            (o.allowed, o.allowed_answer_max_ms),
            (1, Some(0.3)),
            "the ok sent at 5,900"
        );
        assert_eq!(o.backend_back_after_ms, Some(0.1));
        assert_eq!(o.first_unavailable_after_ms, Some(0.4));
        assert_eq!(o.unavailable_answer_max_ms, Some(2.0));
        assert_eq!(o.resumed_after_ms, Some(0.4));
        assert_eq!(outage(log[..1].iter(), 1_000, 6_000, &[]), Outage::default());
    }

    #[test]
    fn a_line_is_wrong_when_masked_otherwise_than_the_backend_masked_it() {
        let by_backend: HashSet<(u32, u64)> = [(1, 2), (4, 0)].into();
        let got = [(1, 2, true), (1, 3, false), (4, 0, false), (5, 1, true)];
        assert_eq!(masks_seen(&got, &by_backend), (2, 2));
        assert_eq!(masks_seen(&got[..2], &by_backend), (1, 0));
    }

    #[test]
    fn the_report_divides_by_publishes_and_subtracts_the_backend() {
        assert_eq!(cpu_per_publish_us(3_000_000, 1_000), Some(3.0));
        assert_eq!(cpu_per_publish_us(3_000_000, 0), None);
        assert_eq!(added_ms(4.5, 0.25), 4.25);
    }
}
