//! When each join of the `kickoff` run is due, and which socket makes it: the joins are spread
//! evenly over the window (join `j` of `n` at `j/n` of it), dealt to the sockets in turn, so a
//! socket's joins are `sockets` joins apart and the node sees a steady arrival of joins whatever
//! the number of sockets.

use std::time::Duration;

/// When join `j` of `joins` is due, from the window's start.
pub fn due(j: usize, joins: usize, window: Duration) -> Duration {
    if joins == 0 {
        return Duration::ZERO;
    }
    window.mul_f64(j as f64 / joins as f64)
}

/// The joins socket `socket` of `sockets` makes, in order.
pub fn joins_of(socket: usize, sockets: usize, joins: usize) -> impl Iterator<Item = usize> {
    (socket..joins).step_by(sockets.max(1))
}

/// When socket `i` of a ramp at `per_sec` connects, from the ramp's start.
pub fn connect_at(i: usize, per_sec: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_joins_are_spread_over_the_window_and_dealt_in_turn() {
        let w = Duration::from_secs(10);
        assert_eq!(due(0, 10_000, w), Duration::ZERO);
        assert_eq!(due(5_000, 10_000, w), Duration::from_secs(5));
        assert_eq!(due(9_999, 10_000, w), Duration::from_millis(9_999));
        assert_eq!(due(3, 0, w), Duration::ZERO);
        // 10,000 joins over 1,000 sockets: 10 each, a second apart.
        let mine: Vec<usize> = joins_of(7, 1_000, 10_000).collect();
        assert_eq!(mine.len(), 10);
        assert_eq!((mine[0], mine[1], mine[9]), (7, 1_007, 9_007));
        assert_eq!(
            due(mine[1], 10_000, w) - due(mine[0], 10_000, w),
            Duration::from_secs(1)
        );
        // Every join is made once, by one socket.
        let mut all: Vec<usize> = (0..1_000).flat_map(|s| joins_of(s, 1_000, 10_000)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        // More sockets than joins: the extra sockets make none.
        assert_eq!(joins_of(12, 20, 10).count(), 0);
    }

    #[test]
    fn the_ramp_connects_at_its_rate() {
        assert_eq!(connect_at(0, 500.0), Duration::ZERO);
        assert_eq!(connect_at(1_000, 500.0), Duration::from_secs(2));
    }
}
