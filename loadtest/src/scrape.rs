//! The nodes' own counters, read from `GET /metrics` (Prometheus text): what a scenario cannot see
//! from its clients, such as how many sockets a node is conflating, or when it closed one with 4008
//! (a close frame a weak client reads only after everything queued before it).

use crate::procs::get;

/// The keyed-message and slow-consumer series a scenario of keyed messages reads.
pub const CONFLATING: &str = "shardcast_conflating_sockets";
pub const CONFLATED: &str = "shardcast_conflated_values_total";
pub const LATEST_SENT: &str = "shardcast_latest_values_sent_total";
pub const SLOW_DROPS: &str = "shardcast_slow_consumer_drops_total";
/// Outbound bytes queued over all of a node's sockets (the node samples it every second).
pub const QUEUED: &str = "shardcast_outbound_queued_bytes";

/// The sum of every sample of `name` (all its label sets) in a `/metrics` text; 0 when absent.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `names` summed over the nodes on `ports`: one scrape of each node.
pub fn sums<const N: usize>(ports: &[u16], names: [&str; N]) -> [f64; N] {
    let mut out = [0.0; N];
    for port in ports {
        let text = get(*port, "/metrics");
        for (name, total) in names.iter().zip(&mut out) {
            *total += sum(&text, name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_summed_over_its_labels_and_not_confused_with_a_longer_name() {
        let text = "# HELP shardcast_slow_consumer_drops_total Sockets closed with 4008.\n\
                    # TYPE shardcast_slow_consumer_drops_total counter\n\
                    shardcast_slow_consumer_drops_total 3\n\
                    shardcast_conflating_sockets 2\n\
                    shardcast_conflating_sockets_peak 9\n\
                    shardcast_conflated_values_total{room=\"a\"} 10\n\
                    shardcast_conflated_values_total{room=\"b\"} 5.5\n";
        assert_eq!(sum(text, SLOW_DROPS), 3.0);
        assert_eq!(sum(text, CONFLATING), 2.0);
        assert_eq!(sum(text, CONFLATED), 15.5);
        assert_eq!(sum(text, LATEST_SENT), 0.0);
        assert_eq!(sum("", CONFLATING), 0.0);
    }
}
