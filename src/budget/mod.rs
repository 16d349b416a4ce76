//! Budgets in money (`[[budgets]]`, docs/budgets.md): what a budget's periods are
//! ([`period`]), how its accounts reserve and settle ([`ledger`]), where local spend is
//! written down ([`state`]), and the set of budgets a request must fit ([`book`]).
//!
//! The request path asks [`Budgets::admit`] before a request is forwarded, with the
//! request's maximum cost; the [`Hold`] it gets back is settled with what the request
//! actually cost when its exchange ends.

pub mod book;
pub mod clock;
pub mod ledger;
pub mod period;
pub mod shared;
pub mod state;

pub use book::{Ask, BudgetView, Budgets, Hold, Refused};
