//! Sabot in the real world: the tokio driver, RocksDB keyed state, local-disk storage, and the
//! `sabot` command's job runner. All decisions are the kernel's (`sabot-kernel`); this crate
//! only moves elements, reads clocks and touches disks. See `ARCHITECTURE.md`.

pub mod buggify;
pub mod clock;
pub mod driver;
pub mod fs_storage;
#[cfg(not(madsim))]
pub mod rocks;
pub mod tcp;

pub use sabot_kernel as kernel;
