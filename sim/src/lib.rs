//! Sabot's deterministic simulator (madsim): seeded crashes, partitions, disk faults and clock
//! skew around the real driver, and an oracle that checks exactly-once output against a
//! failure-free run. See `ARCHITECTURE.md` and DESIGN.md §5.
//!
//! What exists today is the pure, single-threaded level the simulator builds on:
//! `sabot_kernel::testing::run_in_memory` steps every node of a plan with in-memory storage, and
//! `run_checkpointed` adds the checkpoint coordinator, seeded crashes (unsynced data lost) and full
//! disks; the kernel's tests compare their output with reference models. The madsim world, the fault
//! plans and the oracle are the simulator issue's work; this crate is their home, kept in the
//! workspace so that it builds (and stays buildable) from the first commit.

pub use sabot_kernel::testing::{run_checkpointed, run_in_memory};

#[cfg(madsim)]
pub mod madsim_level;
