//! A reference model for state backends: any backend must behave as this `BTreeMap` does.

use std::collections::BTreeMap;

pub mod keyed;
pub mod timers;

use super::{CaptureTarget, StateBackend, StateCapture, WriteBatch};
use crate::element::CheckpointId;
use crate::env::MemStorage;
use crate::key_group::{KeyGroup, KeyGroupRange};

/// A small, fixed PRNG (Knuth's MMIX LCG, high bits) for tests that must replay from a seed.
#[derive(Clone, Debug)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11 ^ self.0 << 53
    }

    /// A number in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }
}

type Model = BTreeMap<(KeyGroup, Vec<u8>), Vec<u8>>;

fn random_key(rng: &mut Lcg) -> Vec<u8> {
    // Few distinct keys, so that overwrites and deletes hit; some long ones, to leave inline storage.
    let length = [0_usize, 1, 2, 8, 18, 40][rng.below(6) as usize];
    (0..length).map(|_| rng.below(3) as u8).collect()
}

fn random_group(rng: &mut Lcg, range: KeyGroupRange) -> KeyGroup {
    KeyGroup(range.start() + rng.below(range.count() as u64) as u16)
}

/// Every entry of `backend`, by scanning each of its key groups.
fn scan_all(backend: &mut dyn StateBackend) -> Vec<(KeyGroup, Vec<u8>, Vec<u8>)> {
    let mut entries = Vec::new();
    for group in backend.key_groups().iter() {
        backend
            .scan(group, &mut |key, value| {
                entries.push((group, key.to_vec(), value.to_vec()));
                Ok(())
            })
            .unwrap();
    }
    entries
}

fn model_entries(model: &Model) -> Vec<(KeyGroup, Vec<u8>, Vec<u8>)> {
    model.iter().map(|((g, k), v)| (*g, k.clone(), v.clone())).collect()
}

/// Applies `op_count` random operations to `backend` and to a model and compares every read.
/// Snapshots are restored into a fresh backend from `fresh`, which then carries on. Captures
/// (checkpoints) are written a few steps later, while the backend goes on changing, and must
/// restore what the model held when they were taken; some complete (so a backend may share their
/// files), some never do.
pub fn check_backend_against_model(
    backend: &mut dyn StateBackend,
    rng: &mut Lcg,
    op_count: usize,
    mut fresh: impl FnMut() -> Box<dyn StateBackend>,
) {
    let range = backend.key_groups();
    assert!(range.count() > 0);
    let mut model = Model::new();
    let mut current: Option<Box<dyn StateBackend>> = None;
    let mut value = Vec::new();
    let mut storage = MemStorage::new();
    // Captures taken, not yet written: the model when taken, and the capture.
    let mut captures: Vec<(CheckpointId, Model, StateCapture)> = Vec::new();
    for step in 0..op_count {
        let backend: &mut dyn StateBackend = match current.as_mut() {
            Some(replaced) => replaced.as_mut(),
            None => &mut *backend,
        };
        let group = random_group(rng, range);
        let key = random_key(rng);
        match rng.below(100) {
            0..=39 => {
                let new_value: Vec<u8> = (0..rng.below(40)).map(|i| i as u8).collect();
                backend.put(group, &key, &new_value).unwrap();
                model.insert((group, key), new_value);
            }
            40..=54 => {
                backend.delete(group, &key).unwrap();
                model.remove(&(group, key));
            }
            55..=71 => {
                let found = backend.get(group, &key, &mut value).unwrap();
                let expected = model.get(&(group, key.clone()));
                assert_eq!(found.then_some(&value), expected, "step {step}: get {group:?} {key:?}");
            }
            72..=79 => {
                // Appends the step to the old value: a read-modify-write that sees absence as empty.
                let mut seen_old = None;
                backend
                    .merge(group, &key, &mut |old, new| {
                        seen_old = Some(old.map(<[u8]>::to_vec));
                        new.extend_from_slice(old.unwrap_or_default());
                        new.push(step as u8);
                        Ok(())
                    })
                    .unwrap();
                let expected_old = model.get(&(group, key.clone())).cloned();
                assert_eq!(seen_old, Some(expected_old.clone()), "step {step}: merge saw {group:?} {key:?}");
                let mut new_value = expected_old.unwrap_or_default();
                new_value.push(step as u8);
                model.insert((group, key), new_value);
            }
            80..=89 => {
                let mut batch = WriteBatch::new();
                for _ in 0..rng.below(5) {
                    let group = random_group(rng, range);
                    let key = random_key(rng);
                    if rng.below(2) == 0 {
                        batch.put(group, &key, &[step as u8]);
                        model.insert((group, key), vec![step as u8]);
                    } else {
                        batch.delete(group, &key);
                        model.remove(&(group, key));
                    }
                }
                backend.write_batch(&batch).unwrap();
            }
            90..=93 => {
                let found = backend.take(group, &key, &mut value).unwrap();
                let expected = model.remove(&(group, key.clone()));
                assert_eq!(found.then(|| value.clone()), expected, "step {step}: take {group:?} {key:?}");
            }
            94..=97 => {
                let mut seen = Vec::new();
                backend
                    .scan(group, &mut |key, value| {
                        seen.push((key.to_vec(), value.to_vec()));
                        Ok(())
                    })
                    .unwrap();
                let expected: Vec<(Vec<u8>, Vec<u8>)> = model
                    .range((group, Vec::new())..)
                    .take_while(|((g, _), _)| *g == group)
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(seen, expected, "step {step}: scan {group:?}");
            }
            98 => {
                let checkpoint = CheckpointId(step as u64 + 1);
                let target = CaptureTarget {
                    checkpoint,
                    path: format!("chk-{}/state", checkpoint.0),
                    shared_dir: "shared/state".to_string(),
                };
                captures.push((checkpoint, model.clone(), backend.capture(&target).unwrap()));
                if captures.len() < 3 {
                    continue;
                }
                // The oldest capture is written now; it completes or not, and may be recovered from.
                let (checkpoint, model_then, capture) = captures.remove(0);
                let mut files = capture.files;
                files.extend(capture.write.write(&mut storage).unwrap());
                let mut restored = fresh();
                restored.restore_files(&mut storage, &files).unwrap();
                assert_eq!(scan_all(restored.as_mut()), model_entries(&model_then), "step {step}: capture");
                match rng.below(3) {
                    0 => {}
                    1 => backend.checkpoint_complete(checkpoint),
                    _ => {
                        // Recovery: the restored backend carries on, with the model of then.
                        model = model_then;
                        captures.clear();
                        current = Some(restored);
                    }
                }
            }
            _ => {
                let snapshot = backend.snapshot().unwrap();
                let entries: Vec<(KeyGroup, Vec<u8>, Vec<u8>)> =
                    snapshot.entries().map(|(g, k, v)| (g, k.to_vec(), v.to_vec())).collect();
                let expected: Vec<(KeyGroup, Vec<u8>, Vec<u8>)> =
                    model.iter().map(|((g, k), v)| (*g, k.clone(), v.clone())).collect();
                assert_eq!(entries, expected, "step {step}: snapshot");
                let mut restored = fresh();
                restored.restore(&snapshot).unwrap();
                current = Some(restored);
            }
        }
    }
}
