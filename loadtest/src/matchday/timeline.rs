//! The match over time: a sample a second, taken by a thread beside the match ([`Sampler`]: the
//! viewers in both rooms, what they received, what was acknowledged, connections closed, tries
//! failed, and the live latency over that second), drawn as an SVG ([`svg`]) with the phases as
//! bands and the deploy's and the failover's signals as marks.

use std::{
    sync::{atomic::Ordering, mpsc, Arc},
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;

use super::live::{Live, Phase};

/// One second of the match.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds into the run, at the end of the second.
    pub t_s: f64,
    pub phase: Phase,
    /// Viewers in both rooms.
    pub connected: usize,
    pub received_per_s: f64,
    pub acked_per_s: f64,
    /// Viewers' connections the nodes or the balancer closed.
    pub closed_per_s: f64,
    /// Tries to connect (viewers and publishers) that failed.
    pub failed_tries_per_s: f64,
    /// Live messages' latency over the second, when any came.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The thread that samples the match.
pub struct Sampler {
    stop: mpsc::Sender<()>,
    samples: JoinHandle<Vec<Sample>>,
}

/// How often the viewers connected are read for each phase's minimum.
const EVERY: Duration = Duration::from_millis(100);

impl Sampler {
    pub fn start(live: Arc<Live>) -> Sampler {
        let (stop, stopped) = mpsc::channel();
        let samples = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut last = (live.secs(), [0u64; 4]);
            loop {
                let connected = live.sample_connected();
                let t = live.secs();
                if t - last.0 >= 1.0 {
                    let now = [&live.received, &live.acked, &live.closed, &live.failed_tries]
                        .map(|c| c.load(Ordering::Relaxed));
                    let per_s = |k: usize| (now[k] - last.1[k]) as f64 / (t - last.0);
                    let h = live.latency_now.take();
                    let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e3);
                    samples.push(Sample {
                        t_s: t,
                        phase: live.phase(),
                        connected,
                        received_per_s: per_s(0),
                        acked_per_s: per_s(1),
                        closed_per_s: per_s(2),
                        failed_tries_per_s: per_s(3),
                        p50_ms: q(0.5),
                        p99_ms: q(0.99),
                    });
                    last = (t, now);
                }
                if stopped.recv_timeout(EVERY) != Err(mpsc::RecvTimeoutError::Timeout) {
                    return samples;
                }
            }
        });
        Sampler { stop, samples }
    }

    pub fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.samples.join().unwrap_or_default()
    }
}

/// A phase's band: its name, start and end, seconds into the run.
pub type Band = (&'static str, f64, f64);

/// The timeline as an SVG: viewers connected and closes a second above; messages received a
/// second and the live p99 below; phases as bands, the SIGTERMs and the SIGKILL as marks.
pub fn svg(samples: &[Sample], bands: &[Band], events: &[(f64, String)], viewers: usize) -> String {
    let (w, left, right, top) = (960.0, 70.0, 70.0, 46.0);
    let (panel, gap) = (170.0, 40.0);
    let h = top + 2.0 * panel + gap + 40.0;
    let pw = w - left - right;
    let end = bands
        .last()
        .map_or(1.0, |b| b.2)
        .max(samples.last().map_or(1.0, |s| s.t_s));
    let x = |t: f64| left + pw * (t / end).clamp(0.0, 1.0);
    let tops = [top, top + panel + gap];
    let max = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max).max(1.0) * 1.1;
    let line = |f: &dyn Fn(&Sample) -> Option<f64>, max: f64, y0: f64| {
        samples
            .iter()
            .filter_map(|s| f(s).map(|v| format!("{:.1},{:.1}", x(s.t_s), y0 + panel * (1.0 - v / max))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"16\" text-anchor=\"middle\" font-size=\"14\">Match day: {viewers} viewers through HAProxy, phase by phase</text>\n",
        w / 2.0
    );
    for (k, (name, a, b)) in bands.iter().enumerate() {
        let fill = if k % 2 == 0 { "#f2f2f2" } else { "#e4e4e4" };
        svg += &format!(
            "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{name}</text>\n",
            x(*a),
            (x(*b) - x(*a)).max(0.0),
            2.0 * panel + gap,
            (x(*a) + x(*b)) / 2.0,
            top - 6.0
        );
    }
    for (t, what) in events {
        let mark = if what.contains("SIGKILL") {
            "kill"
        } else if what.contains("SIGTERM") {
            what.split(':').next().unwrap_or("")
        } else {
            continue;
        };
        svg += &format!(
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#555\" stroke-dasharray=\"3,3\"/>\n\
             <text x=\"{2:.1}\" y=\"{3:.1}\" font-size=\"9\" fill=\"#555\">{mark}</text>\n",
            x(*t),
            top + 2.0 * panel + gap,
            x(*t) + 2.0,
            top + panel + 12.0
        );
    }
    let step = [5.0, 10.0, 20.0, 30.0, 60.0]
        .into_iter()
        .find(|s| end / s <= 12.0)
        .unwrap_or(120.0);
    for k in 0..=(end / step) as usize {
        let t = k as f64 * step;
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{t:.0}</text>\n",
            x(t),
            top + 2.0 * panel + gap + 14.0
        );
    }
    let closed_max = max(&|s| s.closed_per_s);
    let received_max = max(&|s| s.received_per_s);
    let p99_max = max(&|s| s.p99_ms.unwrap_or(0.0));
    let axes = [
        (
            tops[0],
            "viewers in both rooms",
            viewers as f64,
            "#1f77b4",
            "closed by the node /s",
            closed_max,
            "#ff7f0e",
        ),
        (
            tops[1],
            "messages received /s",
            received_max,
            "#2ca02c",
            "p99 latency ms",
            p99_max,
            "#d62728",
        ),
    ];
    for (y0, left_name, left_max, left_colour, right_name, right_max, right_colour) in axes {
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"black\"/>\n\
             <text x=\"4\" y=\"{2:.1}\" fill=\"{left_colour}\">{left_max:.0}</text>\n\
             <text x=\"4\" y=\"{3:.1}\" fill=\"{left_colour}\">{left_name}</text>\n\
             <text x=\"{4:.1}\" y=\"{2:.1}\" fill=\"{right_colour}\">{right_max:.0}</text>\n\
             <text x=\"{4:.1}\" y=\"{3:.1}\" fill=\"{right_colour}\" text-anchor=\"end\" transform=\"translate({5:.1},0)\">{right_name}</text>\n",
            y0 + panel,
            left + pw,
            y0 + 10.0,
            y0 + panel / 2.0,
            left + pw + 4.0,
            right - 8.0,
        );
    }
    svg += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n\
         <polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"1.5\" points=\"{}\"/>\n\
         <polyline fill=\"none\" stroke=\"#2ca02c\" stroke-width=\"2\" points=\"{}\"/>\n\
         <polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" points=\"{}\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds into the run</text>\n</svg>\n",
        line(&|s| Some(s.connected as f64), (viewers as f64).max(1.0), tops[0]),
        line(&|s| Some(s.closed_per_s), closed_max, tops[0]),
        line(&|s| Some(s.received_per_s), received_max, tops[1]),
        line(&|s| s.p99_ms, p99_max, tops[1]),
        left + pw / 2.0,
        h - 12.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_draws_its_lines_bands_and_marks() {
        let sample = |t: f64, connected: usize| Sample {
            t_s: t,
            phase: Phase::Steady,
            connected,
            received_per_s: 100.0,
            acked_per_s: 10.0,
            closed_per_s: if t > 2.0 { 5.0 } else { 0.0 },
            failed_tries_per_s: 0.0,
            p50_ms: Some(3.0),
            p99_ms: (t > 1.0).then_some(12.0),
        };
        let samples = [sample(1.0, 50), sample(2.0, 100), sample(3.0, 90)];
        let bands = [("kickoff", 0.0, 1.5), ("steady", 1.5, 3.0)];
        let events = [
            (2.5, "node 1: SIGTERM".to_string()),
            (2.6, "node 1: exited".to_string()),
        ];
        let svg = svg(&samples, &bands, &events, 100);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains(">kickoff<") && svg.contains(">steady<"));
        assert_eq!(svg.matches("stroke-dasharray").count(), 1, "only the signal is marked");
        assert!(svg.contains(">node 1<"));
    }
}
