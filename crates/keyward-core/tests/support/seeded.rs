//! The proptest runner every fuzz suite uses (this crate's, and the server's through a `#[path]`
//! module): a fixed seed, so CI never fails on a case no one can replay, and no regression files.
//! `KEYWARD_FUZZ_SEED=<u64>` explores another part of the input space and `KEYWARD_FUZZ_SCALE=<n>`
//! runs n times as many cases.

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A runner for `cases` cases (times `KEYWARD_FUZZ_SCALE`) from the fixed or the given seed, whose
/// shrinking stops after `max_shrink_iters` steps or `max_shrink_time` milliseconds, so that a failure
/// is reported within seconds.
pub fn runner(cases: u32, max_shrink_iters: u32, max_shrink_time: u32) -> TestRunner {
    let scale = std::env::var("KEYWARD_FUZZ_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1);
    let config = Config {
        cases: cases.saturating_mul(scale),
        failure_persistence: None,
        max_shrink_iters,
        max_shrink_time,
        ..Config::default()
    };
    let rng = match std::env::var("KEYWARD_FUZZ_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(seed) => TestRng::from_seed(RngAlgorithm::ChaCha, &[seed.to_le_bytes(); 4].concat()),
        None => TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    };
    TestRunner::new_with_rng(config, rng)
}
