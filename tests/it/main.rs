//! Integration tests: the real `ezgate` binary against the `ezlink-emulator` upstream.

mod harness;
mod schema;

mod cancellation;
mod errors;
mod failures;
mod forwarding;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod tls;
