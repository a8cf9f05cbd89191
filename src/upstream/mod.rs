//! IVS Chat, through the real `aws-sdk-ivschat`: the only home of SDK types.
//!
//! Whether it talks to AWS or to the embedded emulator, this is the same client
//! and the same code path; only the endpoint and credentials differ.
//!
//! Every attempt, retries included, first takes a slot from the [`Budget`]:
//! the SDK's own retries are off, because they would bypass it. Retries here
//! back off exponentially; a ThrottlingException also pauses the budget.
//!
//! `scopes.rs`: `Upstreams`, one scope (client and budget) per region served,
//! found from a room's ARN; `client.rs`: one region's IVS Chat, its calls and
//! the conversions of their answers; `errors.rs`: SDK errors as
//! `domain::Error`.
//!
//! [`Budget`]: crate::budget::Budget

mod client;
mod errors;
mod scopes;

pub use client::{BudgetFor, Pages, SendFailure, Upstream, UpstreamSettings};
pub use scopes::Upstreams;
