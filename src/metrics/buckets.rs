//! The histograms' buckets, each chosen for what it times.

/// From 100 µs to 10 minutes: quick refusals to long streams.
pub(super) const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// ezgate's own time per request: microseconds normally.
pub(super) const OVERHEAD_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.05, 0.25, 1.0,
];

/// Time to first token: 50 ms to 30 s (a model's first token takes from a few hundred
/// milliseconds to tens of seconds for a reasoning model).
pub(super) const TTFT_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
];
/// Time per output token: 1 ms to 1 s.
pub(super) const TPOT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.25, 0.5, 1.0,
];
/// A shared-store check: 100 µs (Redis next door) to 5 s (far beyond any sane
/// `redis.timeout`, whose time is what a check that gets no answer takes).
pub(super) const STORE_CHECK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
