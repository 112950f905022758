//! Sabot's kernel: everything that decides, and nothing that touches the world.
//!
//! The kernel is synchronous and deterministic. Drivers feed it through `handle_*(now, …)` calls and
//! drain it through `poll_*` calls ([`node::Node`]); it reaches storage only through the traits of
//! [`env`]. The same inputs give the same outputs, bit for bit. See `ARCHITECTURE.md`.

/// Whether a planted bug (`testing::planted`) is switched on for this thread: always `false`
/// without the `testing` feature, so normal builds carry no trace of the bugs.
macro_rules! planted {
    ($bug:ident) => {{
        #[cfg(any(test, feature = "testing"))]
        let on = crate::testing::planted::is_on(crate::testing::planted::PlantedBug::$bug);
        #[cfg(not(any(test, feature = "testing")))]
        let on = false;
        on
    }};
}

pub mod checkpoint;
pub mod dataflow;
pub mod element;
pub mod env;
pub mod ipc;
pub mod key_group;
pub mod node;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod wire;
pub mod workload;
