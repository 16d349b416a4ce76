//! Integration tests: the real `ezgate` binary against the `ezlink-emulator` upstream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod harness;
mod schema;

mod admin;
mod attacks;
mod bodies;
mod budgets;
mod budgets_fleet;
mod cancellation;
mod cost;
mod errors;
mod failures;
mod forwarding;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod pacing;
mod pacing_fleet;
mod passthrough;
mod promises;
mod quota;
mod redis;
mod redis_ha;
mod redis_leases;
mod redis_servers;
mod routes;
mod secrets;
mod startup;
mod tls;
mod tokens;
mod tracing;
mod websocket;
