//! Checkpoints: the decision logic of Chandy-Lamport snapshots as Flink uses them (DESIGN.md §4).
//!
//! The protocol, once, here:
//! 1. The [`coordinator::Coordinator`] picks checkpoint n and tells every source.
//! 2. A source records its offset for n, then emits `Barrier(n)` on every output.
//! 3. A task with several inputs aligns on `Barrier(n)`: it holds each input after its barrier
//!    until all inputs delivered it (aligned), or snapshots at the first barrier and records the
//!    in-flight elements the barrier overtook (unaligned).
//! 4. At alignment the task snapshots its state, forwards `Barrier(n)` and acknowledges n to the
//!    coordinator with the handles of what it wrote.
//! 5. A sink pre-commits the output of epoch n as a transaction on `Barrier(n)`.
//! 6. With every acknowledgement in, the coordinator makes n durable — the [`manifest`] written and
//!    synced, then the pointer to the latest checkpoint atomically replaced, then its directory
//!    synced — and only then announces completion; sinks commit transaction n.
//! 7. On any failure every task restarts from the latest completed checkpoint.
//!
//! Everything here is pure: inputs are calls with `now`, outputs are actions the caller performs.

pub mod align;
pub mod coordinator;
pub mod inflight;
pub mod manifest;
