//! Loom models of the shardmeter ledger live in `tests/`.
