//! Placeholder until the hot-path benches land.
fn main() {}
