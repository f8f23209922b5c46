//! The engine's counters and timings through the [`metrics`](https://docs.rs/metrics) facade
//! (feature `metrics`): the embedding application installs the recorder it wants (a Prometheus
//! exporter, StatsD...). Without the feature these functions do nothing and cost nothing.
//!
//! | metric | kind | what |
//! | --- | --- | --- |
//! | `shardmeter_flush_rounds_total` | counter | writes started (a large round takes several) |
//! | `shardmeter_write_failures_total` | counter | writes that failed |
//! | `shardmeter_config_errors_total` | counter | of those, writes failed because the sink is misconfigured |
//! | `shardmeter_retries_total` | counter | writes that re-sent unacknowledged batches |
//! | `shardmeter_batches_written_total` | counter | batches the sink acknowledged |
//! | `shardmeter_duplicate_batches_total` | counter | of those, re-sends the sink had already applied (duplicates caught) |
//! | `shardmeter_keys_written_total` / `shardmeter_written_amount_total` | counter | increments and amount acknowledged |
//! | `shardmeter_keys_rejected_total` / `shardmeter_rejected_amount_total` | counter | increments the sink refused for good |
//! | `shardmeter_swept_amount_total` / `shardmeter_discarded_amount_total` | counter | collected from the ledger; collected while disabled |
//! | `shardmeter_sweeps_total` / `shardmeter_sessions_ended_total` | counter | full sweeps; session ends collected |
//! | `shardmeter_account_reads_total` | counter | global totals read for the read side |
//! | `shardmeter_pending_amount` / `shardmeter_pending_keys` | gauge | swept, not yet acknowledged |
//! | `shardmeter_tracked_accounts` | gauge | accounts the read side tracks |
//! | `shardmeter_flusher_longest_poll_seconds` | gauge | the longest time the flusher, or the write and read tasks it spawns, held a runtime worker (stall) |
//! | `shardmeter_flusher_longest_poll_cpu_seconds` | gauge | the most CPU time one poll of those tasks used (its work, without the OS's preemptions) |
//! | `shardmeter_flusher_long_polls_total` / `shardmeter_flusher_polls_total` | counter | polls of those tasks that used more than 1 ms of CPU; all their polls |
//! | `shardmeter_sweep_seconds` | histogram | one full sweep, slices and yields included |
//! | `shardmeter_write_seconds` | histogram | one write, send to answer |

use super::stats::StatsSnapshot;
use std::time::Duration;

/// Publishes the counters and gauges of `stats` (absolute values: the flusher's counters are
/// the source of truth, so a recorder installed late still reads the right totals).
pub(crate) fn export(stats: &StatsSnapshot) {
    #[cfg(feature = "metrics")]
    {
        let counters = [
            ("shardmeter_flush_rounds_total", stats.flushes),
            ("shardmeter_write_failures_total", stats.write_failures),
            ("shardmeter_config_errors_total", stats.config_errors),
            ("shardmeter_retries_total", stats.retries),
            ("shardmeter_batches_written_total", stats.batches_written),
            (
                "shardmeter_duplicate_batches_total",
                stats.duplicate_batches,
            ),
            ("shardmeter_keys_written_total", stats.keys_written),
            ("shardmeter_written_amount_total", stats.amount_written),
            ("shardmeter_keys_rejected_total", stats.keys_rejected),
            ("shardmeter_rejected_amount_total", stats.amount_rejected),
            ("shardmeter_swept_amount_total", stats.amount_swept),
            ("shardmeter_discarded_amount_total", stats.amount_discarded),
            ("shardmeter_sweeps_total", stats.sweeps),
            ("shardmeter_sessions_ended_total", stats.sessions_ended),
            ("shardmeter_account_reads_total", stats.account_reads),
            (
                "shardmeter_flusher_long_polls_total",
                stats.long_flusher_polls,
            ),
            ("shardmeter_flusher_polls_total", stats.flusher_polls),
        ];
        for (name, value) in counters {
            metrics::counter!(name).absolute(value);
        }
        let gauges = [
            ("shardmeter_pending_amount", stats.pending_amount as f64),
            ("shardmeter_pending_keys", stats.pending_keys as f64),
            ("shardmeter_tracked_accounts", stats.tracked_accounts as f64),
            (
                "shardmeter_flusher_longest_poll_seconds",
                stats.longest_flusher_poll_micros as f64 / 1e6,
            ),
            (
                "shardmeter_flusher_longest_poll_cpu_seconds",
                stats.longest_flusher_poll_cpu_micros as f64 / 1e6,
            ),
        ];
        for (name, value) in gauges {
            metrics::gauge!(name).set(value);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = stats;
}

/// One full sweep took `took`.
pub(crate) fn sweep_took(took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("shardmeter_sweep_seconds").record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = took;
}

/// One write took `took`.
pub(crate) fn write_took(took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("shardmeter_write_seconds").record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = took;
}
