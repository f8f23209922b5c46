//! Adding random amounts the way the load tests do.

use super::Rng;
use shardmeter::Session;
use std::ops::Range;

/// Adds `count` amounts drawn from `amounts` to `channels` (handles of one session), each to a
/// channel picked at random; returns their sum.
pub fn add_random(rng: &mut Rng, channels: &[Session], count: u64, amounts: Range<u64>) -> u64 {
    let mut sum = 0;
    for _ in 0..count {
        let amount = amounts.start + rng.below(amounts.end - amounts.start);
        channels[rng.below(channels.len() as u64) as usize].add(amount);
        sum += amount;
    }
    sum
}
