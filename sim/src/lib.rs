//! Sabot's deterministic simulator (DESIGN.md §5): a world drawn from a seed — topology,
//! workload, checkpoint settings, network behaviour and a fault plan — run to the end, judged by
//! an exactly-once oracle against a failure-free reference run, with a trace hash that must
//! repeat for the same seed.
//!
//! Levels (`sabot-sim --level`):
//! - `kernel` ([`kernel_level`]): the kernel's single-threaded cluster harness
//!   (`sabot_kernel::testing::cluster`) with the faulty disk (`env::fault_storage`): fast, no
//!   async, thousands of seeds a minute.
//! - `madsim` ([`madsim_level`], `--cfg madsim` builds only): the real coordinator, workers and
//!   TCP transport of the root package on madsim, one simulated host per process, with kills,
//!   partitions and isolated processes.
//!
//! [`swarm`] draws a run's options from its seed, [`oracle`] judges the outcome, [`sweep`] runs
//! many seeds on threads. [`trace_tla`] turns runs' protocol events into a TLA+ module for the
//! trace validation (`tla/Trace.tla`).

pub mod kernel_level;
pub mod oracle;
pub mod swarm;
pub mod sweep;
pub mod trace_tla;

pub use sabot_kernel::testing::{run_checkpointed, run_in_memory};

#[cfg(madsim)]
pub mod madsim_level;

/// Which simulator runs a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The kernel's cluster harness.
    Kernel,
    /// The real driver on madsim (`--cfg madsim` builds only).
    Madsim,
}

impl Level {
    pub fn from_name(name: &str) -> Option<Level> {
        match name {
            "kernel" => Some(Level::Kernel),
            "madsim" => Some(Level::Madsim),
            _ => None,
        }
    }
}
