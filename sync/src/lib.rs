//! The memory the driver's threads share, as small primitives: the bounded channel between
//! nodes (`channel`), the flow-control credits of channels between processes (`credits`), the
//! handoff of snapshot writes to writer threads (`handoff`), the RocksDB
//! checkpoint that the task and a writer may both need first (`settle`), the notification of
//! completed checkpoints (`completed`), the alignment board (`board`), and the wake-up they use
//! (`signal`).
//!
//! They are written against `shim`, which names `std::sync` in a normal build and `loom::sync`
//! under `--cfg loom`: the loom models (`tests/loom.rs`, run by `scripts/loom.sh`) check the same
//! code the driver runs. Nothing here knows tokio; waiting is plain `async` on [`signal::Signal`],
//! which any executor (tokio, madsim, `loom::future::block_on`) can poll. No threads are started
//! here, and the kernel does not use this crate.

pub mod board;
pub mod channel;
pub mod completed;
pub mod credits;
pub mod handoff;
pub mod settle;
pub mod shim;
pub mod signal;
