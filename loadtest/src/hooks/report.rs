//! The `hooks` run's report: one [`RunReport`] per run, the targets of issue 30 held against them
//! ([`Targets`]), as JSON and as a table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{counts, Latency};

use super::{ledger::Outage, Plan, COOL_DOWN};

#[derive(Debug, Serialize)]
pub struct HooksReport {
    pub scenario: &'static str,
    pub clients: usize,
    pub rooms: usize,
    pub rate: f64,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub hook_timeout_ms: f64,
    /// `--hook-on-error publish=…` on the nodes.
    pub on_error: &'static str,
    pub cool_down_s: f64,
    pub runs: Vec<RunReport>,
    pub targets: Targets,
}

/// One run of the chat.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub run: &'static str,
    pub node_args: Vec<String>,
    pub joined: usize,
    pub failed: BTreeMap<String, u64>,
    pub closed: BTreeMap<String, u64>,
    pub published: u64,
    /// Publishes answered `ok`.
    pub acked: u64,
    pub unavailable: u64,
    pub refused: u64,
    pub unanswered: u64,
    pub delivered: u64,
    /// Acknowledged lines a member that stayed open did not receive.
    pub lost: u64,
    /// Lines received whose publish was not acknowledged.
    pub delivered_unacked: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub masked: u64,
    /// Deliveries of acknowledged lines the backend masks.
    pub masked_expected: u64,
    /// Lines masked that should not be, or not masked that should.
    pub mask_wrong: u64,
    /// End to end, publisher to member.
    pub latency_ms: Latency,
    pub backend: Option<BackendSide>,
    /// End-to-end p99 less the backend's p99.
    pub added_p99_ms: Option<f64>,
    /// End-to-end p99 less the plain run's: what the hook adds on this machine, the generator's
    /// own delays (which the plain run has too) taken out.
    pub over_plain_p99_ms: Option<f64>,
    pub node_cpu_s: f64,
    /// From the first publish to the end of the drain.
    pub window_s: f64,
    pub node_cpu_us_per_publish: Option<f64>,
    pub outage: Option<OutageSide>,
}

/// The backend's side of a run.
#[derive(Debug, Serialize)]
pub struct BackendSide {
    /// From a request's headers to its answer, as the backend timed it.
    pub latency_ms: Latency,
    pub allowed: u64,
    pub masked: u64,
    pub bad: u64,
}

/// The outage run's timeline.
#[derive(Debug, Serialize)]
pub struct OutageSide {
    pub stop_at_s: f64,
    pub back_at_s: f64,
    pub publishing: Outage,
    /// From the stop to the first scrape that saw a breaker open.
    pub breaker_opened_after_ms: Option<f64>,
    pub breakers_open_max: f64,
    pub breakers_open_at_end: f64,
}

/// The targets of issue 30's "Measured" part, each `true` when met.
#[derive(Debug, Serialize)]
pub struct Targets {
    /// Every run: no acknowledged line lost, none out of order or twice, none delivered unacknowledged.
    pub nothing_lost_or_reordered: bool,
    /// The hook runs: exactly the lines the backend masked arrived masked.
    pub masks_right: bool,
    /// The hooks run: end-to-end p99 within the backend's p99 + 5 ms.
    pub added_p99_within_5ms: bool,
    /// The hooks run: end-to-end p99 within the plain run's p99 + the backend's p99 + 5 ms.
    pub over_plain_p99_within_5ms: bool,
    /// The outage run: publishes answered within the hook timeout while the backend was away:
    /// `unavailable` when denied, `ok` (and none `unavailable`) when allowed.
    pub answered_within_timeout: bool,
    pub breaker_opened: bool,
    /// The outage run: within one cool-down of the backend's return, an `ok` to a publish sent
    /// after it (denied) or the backend asked again (allowed).
    pub resumed_within_cool_down: bool,
}

impl Targets {
    fn of(plan: &Plan, runs: &[RunReport]) -> Targets {
        let run = |name: &str| runs.iter().find(|r| r.run == name);
        let outage = run("outage").and_then(|r| r.outage.as_ref());
        let timeout_ms = plan.hook_timeout.as_secs_f64() * 1e3;
        Targets {
            nothing_lost_or_reordered: runs
                .iter()
                .all(|r| r.lost + r.reordered + r.duplicates + r.delivered_unacked == 0),
            masks_right: runs
                .iter()
                .filter(|r| r.backend.is_some())
                .all(|r| r.mask_wrong == 0 && r.masked == r.masked_expected),
            added_p99_within_5ms: run("hooks").and_then(|r| r.added_p99_ms).is_some_and(|a| a <= 5.0),
            over_plain_p99_within_5ms: run("hooks")
                .and_then(|r| Some(r.over_plain_p99_ms? - r.backend.as_ref()?.latency_ms.p99))
                .is_some_and(|a| a <= 5.0),
            answered_within_timeout: outage.is_some_and(|o| {
                let p = &o.publishing;
                if plan.allow {
                    p.unavailable == 0 && p.allowed > 0 && p.allowed_answer_max_ms.is_some_and(|m| m <= timeout_ms)
                } else {
                    p.unavailable > 0 && p.unavailable_answer_max_ms.is_some_and(|m| m <= timeout_ms)
                }
            }),
            breaker_opened: outage.is_some_and(|o| o.breakers_open_max > 0.0),
            resumed_within_cool_down: outage.is_some_and(|o| {
                let p = &o.publishing;
                let resumed = if plan.allow {
                    p.backend_back_after_ms
                } else {
                    p.resumed_after_ms
                };
                resumed.is_some_and(|r| r <= COOL_DOWN.as_secs_f64() * 1e3)
            }),
        }
    }
}

impl HooksReport {
    pub fn new(plan: &Plan, mut runs: Vec<RunReport>) -> HooksReport {
        let plain = runs.iter().find(|r| r.run == "plain").map(|r| r.latency_ms.p99);
        for r in runs.iter_mut().filter(|r| r.backend.is_some()) {
            r.over_plain_p99_ms = plain.map(|p| r.latency_ms.p99 - p);
        }
        HooksReport {
            scenario: "hooks",
            clients: plan.clients,
            rooms: plan.rooms,
            rate: plan.rate,
            payload_bytes: plan.payload_bytes,
            duration_s: plan.duration.as_secs_f64(),
            hook_timeout_ms: plan.hook_timeout.as_secs_f64() * 1e3,
            on_error: if plan.allow { "allow" } else { "deny" },
            cool_down_s: COOL_DOWN.as_secs_f64(),
            targets: Targets::of(plan, &runs),
            runs,
        }
    }

    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "hooks: {} members in {} rooms, {} msg/s for {} s, hook timeout {} ms, on error {}, cool-down {} s",
            self.clients, self.rooms, self.rate, self.duration_s, self.hook_timeout_ms, self.on_error, self.cool_down_s
        );
        for r in &self.runs {
            let _ = writeln!(t, "\n{}  {}", r.run, r.node_args.join(" "));
            let _ = writeln!(
                t,
                "  members      joined {}; failed {}; closed {}",
                r.joined,
                counts(&r.failed),
                counts(&r.closed)
            );
            let _ = writeln!(
                t,
                "  publishes    {} sent, {} ok, {} unavailable, {} refused, {} unanswered",
                r.published, r.acked, r.unavailable, r.refused, r.unanswered
            );
            let _ = writeln!(
                t,
                "  deliveries   {} ({} lost among acked, {} unacked, {} reordered, {} duplicates)",
                r.delivered, r.lost, r.delivered_unacked, r.reordered, r.duplicates
            );
            let _ = writeln!(
                t,
                "  masked       {} of {} expected, {} wrong",
                r.masked, r.masked_expected, r.mask_wrong
            );
            let _ = writeln!(t, "  latency ms   {}", r.latency_ms.full());
            if let Some(b) = &r.backend {
                let _ = writeln!(t, "  backend ms   {}", b.latency_ms.brief());
            }
            if let Some(a) = r.added_p99_ms {
                let over = r.over_plain_p99_ms.map_or("-".into(), |o| format!("{o:.2} ms"));
                let _ = writeln!(
                    t,
                    "  added p99    {a:.2} ms over the backend's, {over} over the plain run's"
                );
            }
            let _ = writeln!(
                t,
                "  node CPU     {:.2} s over {:.1} s, {} µs/publish",
                r.node_cpu_s,
                r.window_s,
                r.node_cpu_us_per_publish.map_or("-".into(), |c| format!("{c:.1}"))
            );
            if let Some(o) = &r.outage {
                let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
                let p = &o.publishing;
                let _ = writeln!(
                    t,
                    "  outage       backend stopped at {:.1} s, back at {:.1} s; first unavailable {} after the \
                     stop (slowest {}); {} allowed meanwhile (slowest {}); breaker open {} after the stop (max \
                     {}, {} at the end); backend asked again {} and an ok to a new publish {} after the return",
                    o.stop_at_s,
                    o.back_at_s,
                    ms(p.first_unavailable_after_ms),
                    ms(p.unavailable_answer_max_ms),
                    p.allowed,
                    ms(p.allowed_answer_max_ms),
                    ms(o.breaker_opened_after_ms),
                    o.breakers_open_max,
                    o.breakers_open_at_end,
                    ms(p.backend_back_after_ms),
                    ms(p.resumed_after_ms)
                );
            }
        }
        let _ = writeln!(
            t,
            "\ntargets      {}",
            serde_json::to_string(&self.targets).unwrap_or_default()
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Args;

    fn latency(p99: f64) -> Latency {
        Latency {
            count: 1,
            p50: p99,
            p90: p99,
            p99,
            p999: p99,
            max: p99,
        }
    }

    fn run(name: &'static str, p99: f64, backend_p99: Option<f64>) -> RunReport {
        RunReport {
            run: name,
            node_args: Vec::new(),
            joined: 0,
            failed: BTreeMap::new(),
            closed: BTreeMap::new(),
            published: 0,
            acked: 0,
            unavailable: 0,
            refused: 0,
            unanswered: 0,
            delivered: 0,
            lost: 0,
            delivered_unacked: 0,
            reordered: 0,
            duplicates: 0,
            masked: 0,
            masked_expected: 0,
            mask_wrong: 0,
            latency_ms: latency(p99),
            backend: backend_p99.map(|b| BackendSide {
                latency_ms: latency(b),
                allowed: 0,
                masked: 0,
                bad: 0,
            }),
            added_p99_ms: backend_p99.map(|b| p99 - b),
            over_plain_p99_ms: None,
            node_cpu_s: 0.0,
            window_s: 0.0,
            node_cpu_us_per_publish: None,
            outage: None,
        }
    }

    #[test]
    fn the_hooks_p99_is_held_against_the_backends_and_the_plain_runs() {
        let plan = Plan::from_args(&Args::of("lt hooks --node-bin /bin/true")).unwrap();
        let report = HooksReport::new(&plan, vec![run("plain", 4.0, None), run("hooks", 9.5, Some(0.5))]);
        assert_eq!(report.runs[1].over_plain_p99_ms, Some(5.5));
        assert_eq!(report.runs[0].over_plain_p99_ms, None, "the plain run has no hook");
        assert!(!report.targets.added_p99_within_5ms, "9.0 ms over the backend's");
        assert!(
            report.targets.over_plain_p99_within_5ms,
            "5.0 ms over the plain run's and the backend's"
        );
        let slow = HooksReport::new(&plan, vec![run("plain", 4.0, None), run("hooks", 9.6, Some(0.5))]);
        assert!(!slow.targets.over_plain_p99_within_5ms);
        assert!(!report.targets.breaker_opened, "no outage run");
    }
}
