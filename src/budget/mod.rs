//! Budgets in money (`[[budgets]]`, docs/budgets.md): what a budget's periods are
//! ([`period`]) and how its accounts reserve and settle ([`ledger`]). The request path's
//! admission, the stores (local with `server.state_dir`, Redis) and the refusals build on
//! these.

pub mod ledger;
pub mod period;
pub mod state;
