//! The budgets' clock: the wall clock, or, for a test of a period's rollover, a clock that
//! starts at the instant `EZGATE_BUDGET_CLOCK` names (RFC 3339) and runs at the wall clock's
//! pace from there (docs/budgets.md, "Testing a rollover"). Read once per process.

use std::sync::OnceLock;

use jiff::{SignedDuration, Timestamp};

/// The variable that sets the budgets' clock.
pub const VAR: &str = "EZGATE_BUDGET_CLOCK";

/// How far the budgets' clock is from the wall clock.
fn offset() -> SignedDuration {
    static OFFSET: OnceLock<SignedDuration> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let Ok(text) = std::env::var(VAR) else {
            return SignedDuration::ZERO;
        };
        match text.parse::<Timestamp>() {
            Ok(start) => start.duration_since(Timestamp::now()),
            Err(e) => {
                tracing::error!(
                    "{VAR}={text:?} is not an RFC 3339 instant ({e}); budgets use the wall clock"
                );
                SignedDuration::ZERO
            }
        }
    })
}

/// Now, as the budgets count time.
pub fn now() -> Timestamp {
    let wall = Timestamp::now();
    wall.checked_add(offset()).unwrap_or(wall)
}
