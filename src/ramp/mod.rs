//! The automated ramp: moves new sessions from v1 to v2 in steps, judging each step against
//! v1 from the proxy's own counters, and aborts on its own (new sessions back to v1, every pin
//! where it is) when v2 does worse.
//!
//! The plan (steps and analysis settings) is [`crate::config::ramp`].
//!
//! - [`guard`]: the verdict on one analysis window (pass, fail, inconclusive);
//! - [`machine`]: the states and how time, verdicts and commands move a ramp between them;
//! - [`window`]: both pools' traffic over the analysis window, from the proxy's own counters;
//! - `gates`: the webhooks asked before each step and told of an abort;
//! - `runner`: the ramp in a running proxy (or fleet): analyses, storing, leading.

pub(crate) mod gates;
pub mod guard;
pub mod machine;
pub(crate) mod runner;
pub mod window;
