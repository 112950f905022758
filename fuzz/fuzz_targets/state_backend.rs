//! The heap state backend (`state::HeapBackend`, through the `StateBackend` trait) of an
//! operator's subtasks, driven by an arbitrary sequence of operations and checked against a
//! `BTreeMap` model written here: every read (get, take, merge's old value, scans of a key group,
//! range scans of entries and of keys, size) must be what the model says.
//!
//! Keys follow the documented layout, `state id | key length | key | namespace | user key`, over
//! a few states (some declared `ordered`), keys, namespaces (one the prefix of another) and user
//! keys; each key's group is its key's hash (`MaxParallelism::key_group_of_bytes`) and each
//! operation goes to the subtask that owns the group. Checkpoints: every subtask captures, the
//! captures are written to a `MemStorage` some operations later while the state goes on changing
//! (copy-on-write), and a written checkpoint is complete. A crash drops every backend and the
//! captures not written, loses what the disk did not sync, and restores from the latest complete
//! checkpoint at a parallelism from the input (1 to 4 subtasks of 1 to 16 key groups): every
//! restored entry must be the model's of the moment of that capture. Portable snapshots are
//! taken and restored into a fresh backend too.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sabot_kernel::element::CheckpointId;
use sabot_kernel::env::MemStorage;
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use sabot_kernel::state::{CaptureTarget, HeapBackend, StateBackend, StateCapture, StateError, StateId, WriteBatch};

const OPS_MAX: usize = 256;
const STATE_COUNT: u16 = 3;
const KEY_COUNT: u8 = 12;
const NAMESPACES: [&[u8]; 4] = [b"", b"\x00", b"\x00\x01", b"window-7"];
const USER_KEYS: [&[u8]; 5] = [b"", b"\x00", b"\x00\x00", b"\x01", &[0xff; 20]];

/// An entry's address: state, key, namespace, user key (indices into the tables above).
#[derive(Clone, Copy, Debug)]
struct Address {
    state: u16,
    key: u8,
    namespace: usize,
    user_key: usize,
}

impl<'a> Arbitrary<'a> for Address {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Address> {
        Ok(Address {
            state: u.int_in_range(0..=STATE_COUNT - 1)?,
            key: u.int_in_range(0..=KEY_COUNT - 1)?,
            namespace: u.choose_index(NAMESPACES.len())?,
            user_key: u.choose_index(USER_KEYS.len())?,
        })
    }
}

/// How much of an address a range scan's prefix covers.
#[derive(Clone, Copy, Debug)]
enum Prefix {
    /// One byte: shorter than a state id.
    Byte,
    State,
    Key,
    Namespace,
    Entry,
}

#[derive(Clone, Debug)]
enum Op {
    Put(Address, Vec<u8>),
    Get(Address),
    Delete(Address),
    Append(Address, Vec<u8>),
    /// Appends a byte to the old value (absent: empty), seeing the old value.
    Merge(Address, u8),
    /// A merge whose function fails: nothing changes.
    MergeFails(Address),
    Take(Address),
    Batch(Vec<(Address, Option<Vec<u8>>)>),
    /// Every entry of the key group of the address's key, or of a group by number.
    Scan {
        address: Address,
        group: Option<u16>,
    },
    ScanRange {
        address: Address,
        prefix: Prefix,
        from: Option<Address>,
        limit: u8,
        keys_only: bool,
    },
    Declare {
        state: u16,
        other_name: bool,
        ordered: bool,
    },
    /// Every subtask captures a checkpoint.
    Capture,
    /// The oldest capture not yet written is written: its checkpoint is complete.
    Write {
        notify: bool,
    },
    /// Every subtask is lost; restore the latest complete checkpoint at `parallelism`.
    Crash {
        parallelism: u16,
    },
    /// A subtask's portable snapshot, restored into a fresh backend that carries on.
    Snapshot {
        subtask: u16,
    },
}

#[derive(Debug)]
struct Input {
    max_parallelism: u16,
    parallelism: u16,
    declared: Vec<(u16, bool)>,
    ops: Vec<Op>,
}

fn value(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let length = u.int_in_range(0..=40)?;
    (0..length).map(|_| u8::arbitrary(u)).collect()
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Input> {
        let max_parallelism = u.int_in_range(1..=16)?;
        let parallelism = u.int_in_range(1..=max_parallelism.min(4))?;
        let declared = (0..STATE_COUNT)
            .filter_map(|state| match u.int_in_range(0..=2) {
                Ok(0) => None,
                Ok(kind) => Some(Ok((state, kind == 2))),
                Err(e) => Some(Err(e)),
            })
            .collect::<arbitrary::Result<Vec<_>>>()?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < OPS_MAX {
            let op = match u.int_in_range(0..=29)? {
                0..=5 => Op::Put(Address::arbitrary(u)?, value(u)?),
                6..=8 => Op::Get(Address::arbitrary(u)?),
                9..=10 => Op::Delete(Address::arbitrary(u)?),
                11..=12 => Op::Append(Address::arbitrary(u)?, value(u)?),
                13 => Op::Merge(Address::arbitrary(u)?, u8::arbitrary(u)?),
                14 => Op::MergeFails(Address::arbitrary(u)?),
                15 => Op::Take(Address::arbitrary(u)?),
                16 => {
                    let count = u.int_in_range(0..=4)?;
                    let ops = (0..count)
                        .map(|_| Ok((Address::arbitrary(u)?, if bool::arbitrary(u)? { Some(value(u)?) } else { None })))
                        .collect::<arbitrary::Result<Vec<_>>>()?;
                    Op::Batch(ops)
                }
                17..=18 => {
                    let group = if bool::arbitrary(u)? { Some(u16::arbitrary(u)?) } else { None };
                    Op::Scan { address: Address::arbitrary(u)?, group }
                }
                19..=21 => {
                    let prefix = match u.int_in_range(0..=4)? {
                        0 => Prefix::Byte,
                        1 => Prefix::State,
                        2 => Prefix::Key,
                        3 => Prefix::Namespace,
                        _ => Prefix::Entry,
                    };
                    let from = if bool::arbitrary(u)? { Some(Address::arbitrary(u)?) } else { None };
                    Op::ScanRange {
                        address: Address::arbitrary(u)?,
                        prefix,
                        from,
                        limit: u8::arbitrary(u)?,
                        keys_only: bool::arbitrary(u)?,
                    }
                }
                22 => Op::Declare {
                    state: u.int_in_range(0..=STATE_COUNT - 1)?,
                    other_name: bool::arbitrary(u)?,
                    ordered: bool::arbitrary(u)?,
                },
                23..=24 => Op::Capture,
                25..=26 => Op::Write { notify: bool::arbitrary(u)? },
                27 => Op::Crash { parallelism: u.int_in_range(1..=max_parallelism.min(4))? },
                _ => Op::Snapshot { subtask: u16::arbitrary(u)? },
            };
            ops.push(op);
        }
        Ok(Input { max_parallelism, parallelism, declared, ops })
    }
}

fn key_bytes(key: u8) -> Vec<u8> {
    match key % 4 {
        0 if key == 0 => Vec::new(),
        0 => vec![key],
        1 => vec![0, key],
        2 => u64::from(key).to_be_bytes().to_vec(),
        _ => vec![key; 30],
    }
}

/// The layout's parts of an address, in order.
fn parts(address: Address) -> [Vec<u8>; 4] {
    let key = key_bytes(address.key);
    let mut header = StateId(address.state).prefix().to_vec();
    header.extend_from_slice(&(key.len() as u16).to_be_bytes());
    header.extend_from_slice(&key);
    [header, key, NAMESPACES[address.namespace].to_vec(), USER_KEYS[address.user_key].to_vec()]
}

fn encoded(address: Address) -> Vec<u8> {
    let [header, _, namespace, user_key] = parts(address);
    [header, namespace, user_key].concat()
}

type Model = BTreeMap<(KeyGroup, Vec<u8>), Vec<u8>>;

/// A checkpoint every subtask captured, not yet written.
struct Pending {
    checkpoint: CheckpointId,
    model: Model,
    captures: Vec<StateCapture>,
}

struct Complete {
    model: Model,
    files: Vec<String>,
}

struct Subtask {
    backend: HeapBackend,
    range: KeyGroupRange,
    /// Declared states: name and whether ordered.
    declared: BTreeMap<u16, (String, bool)>,
}

struct Run {
    max: MaxParallelism,
    subtasks: Vec<Subtask>,
    model: Model,
    storage: MemStorage,
    pending: Vec<Pending>,
    complete: Option<Complete>,
    checkpoint_next: u64,
    step: usize,
}

fn name(state: u16, other: bool) -> String {
    if other {
        format!("other-{state}")
    } else {
        format!("state-{state}")
    }
}

fn entries_of(model: &Model, group: KeyGroup) -> Vec<(Vec<u8>, Vec<u8>)> {
    model
        .range((group, Vec::new())..)
        .take_while(|((g, _), _)| *g == group)
        .map(|((_, k), v)| (k.clone(), v.clone()))
        .collect()
}

fn scan(backend: &mut HeapBackend, group: KeyGroup) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut seen = Vec::new();
    backend
        .scan(group, &mut |key, value| {
            seen.push((key.to_vec(), value.to_vec()));
            Ok(())
        })
        .expect("a scan of the heap");
    seen
}

impl Run {
    fn new_subtasks(&mut self, parallelism: u16, declared: &BTreeMap<u16, (String, bool)>) {
        self.subtasks = (0..parallelism)
            .map(|index| {
                let range = self.max.range_of(index, parallelism);
                let mut backend = HeapBackend::new(range);
                for (&state, (name, ordered)) in declared {
                    backend.declare_state(StateId(state), name, *ordered).expect("a declaration into an empty backend");
                }
                Subtask { backend, range, declared: declared.clone() }
            })
            .collect();
    }

    fn group_of(&self, address: Address) -> KeyGroup {
        self.max.key_group_of_bytes(&key_bytes(address.key))
    }

    fn subtask_of(&mut self, group: KeyGroup) -> &mut Subtask {
        let index = self.max.subtask_of(group, self.subtasks.len() as u16);
        let subtask = &mut self.subtasks[usize::from(index)];
        assert!(subtask.range.contains(group), "key group {group:?} outside {:?}", subtask.range);
        subtask
    }

    fn check_size(&self, subtask: usize) {
        let Subtask { backend, range, .. } = &self.subtasks[subtask];
        let expected: u64 = self
            .model
            .iter()
            .filter(|((group, _), _)| range.contains(*group))
            .map(|((_, key), value)| (key.len() + value.len()) as u64)
            .sum();
        assert_eq!(backend.size_bytes(), expected, "step {}: size of subtask {subtask} {range:?}", self.step);
    }

    fn check_all(&mut self, what: &str) {
        let step = self.step;
        for index in 0..self.subtasks.len() {
            let range = self.subtasks[index].range;
            for group in range.iter() {
                let seen = scan(&mut self.subtasks[index].backend, group);
                assert_eq!(seen, entries_of(&self.model, group), "step {step}: {what}: key group {group:?}");
            }
            self.check_size(index);
        }
    }

    fn apply(&mut self, op: Op) {
        let step = self.step;
        match op {
            Op::Put(address, value) => {
                let (group, key) = (self.group_of(address), encoded(address));
                self.subtask_of(group).backend.put(group, &key, &value).expect("a put");
                self.model.insert((group, key), value);
            }
            Op::Get(address) => {
                let (group, key) = (self.group_of(address), encoded(address));
                let mut value = vec![0xee];
                let found = self.subtask_of(group).backend.get(group, &key, &mut value).expect("a get");
                let expected = self.model.get(&(group, key.clone()));
                assert_eq!(found.then_some(&value), expected, "step {step}: get {address:?}");
            }
            Op::Delete(address) => {
                let (group, key) = (self.group_of(address), encoded(address));
                self.subtask_of(group).backend.delete(group, &key).expect("a delete");
                self.model.remove(&(group, key));
            }
            Op::Append(address, bytes) => {
                let (group, key) = (self.group_of(address), encoded(address));
                self.subtask_of(group).backend.append(group, &key, &bytes).expect("an append");
                self.model.entry((group, key)).or_default().extend_from_slice(&bytes);
            }
            Op::Merge(address, byte) => {
                let (group, key) = (self.group_of(address), encoded(address));
                let expected_old = self.model.get(&(group, key.clone())).cloned();
                let mut seen_old = None;
                self.subtask_of(group)
                    .backend
                    .merge(group, &key, &mut |old, new| {
                        seen_old = Some(old.map(<[u8]>::to_vec));
                        new.extend_from_slice(old.unwrap_or_default());
                        new.push(byte);
                        Ok(())
                    })
                    .expect("a merge");
                assert_eq!(seen_old, Some(expected_old), "step {step}: merge saw {address:?}");
                self.model.entry((group, key)).or_default().push(byte);
            }
            Op::MergeFails(address) => {
                let (group, key) = (self.group_of(address), encoded(address));
                let result = self.subtask_of(group).backend.merge(group, &key, &mut |_, new| {
                    new.extend_from_slice(b"never stored");
                    Err(StateError::Backend("the merge function failed".into()))
                });
                assert!(matches!(result, Err(StateError::Backend(_))), "step {step}: a failed merge: {result:?}");
            }
            Op::Take(address) => {
                let (group, key) = (self.group_of(address), encoded(address));
                let mut value = vec![0xee];
                let found = self.subtask_of(group).backend.take(group, &key, &mut value).expect("a take");
                let expected = self.model.remove(&(group, key));
                assert_eq!(found.then_some(value), expected, "step {step}: take {address:?}");
            }
            Op::Batch(ops) => self.batch(ops),
            Op::Scan { address, group } => {
                let group = match group {
                    Some(number) => KeyGroup(number % self.max.get()),
                    None => self.group_of(address),
                };
                let seen = scan(&mut self.subtask_of(group).backend, group);
                assert_eq!(seen, entries_of(&self.model, group), "step {step}: scan of {group:?}");
            }
            Op::ScanRange { address, prefix, from, limit, keys_only } => {
                self.scan_range(address, prefix, from, limit, keys_only)
            }
            Op::Declare { state, other_name, ordered } => self.declare(state, &name(state, other_name), ordered),
            Op::Capture => self.capture(),
            Op::Write { notify } => self.write(notify),
            Op::Crash { parallelism } => self.crash(parallelism),
            Op::Snapshot { subtask } => self.snapshot(usize::from(subtask) % self.subtasks.len()),
        }
    }

    /// A write batch for the subtask of the first operation's key group: the operations whose
    /// groups it owns, in order.
    fn batch(&mut self, ops: Vec<(Address, Option<Vec<u8>>)>) {
        let Some(&(first, _)) = ops.first() else { return };
        let range = self.subtask_of(self.group_of(first)).range;
        let mut batch = WriteBatch::new();
        for (address, value) in ops {
            let (group, key) = (self.group_of(address), encoded(address));
            if !range.contains(group) {
                continue;
            }
            match value {
                Some(value) => {
                    batch.put(group, &key, &value);
                    self.model.insert((group, key), value);
                }
                None => {
                    batch.delete(group, &key);
                    self.model.remove(&(group, key));
                }
            }
        }
        let group = self.group_of(first);
        self.subtask_of(group).backend.write_batch(&batch).expect("a write batch");
    }

    fn scan_range(&mut self, address: Address, prefix: Prefix, from: Option<Address>, limit: u8, keys_only: bool) {
        let step = self.step;
        let group = self.group_of(address);
        let [header, _, namespace, user_key] = parts(address);
        let prefix = match prefix {
            Prefix::Byte => header[..1].to_vec(),
            Prefix::State => header[..2].to_vec(),
            Prefix::Key => header,
            Prefix::Namespace => [header, namespace].concat(),
            Prefix::Entry => [header, namespace, user_key].concat(),
        };
        let from = from.map(encoded).unwrap_or_default();
        let limit = usize::from(limit % 8) + 1;
        let expected: Vec<(Vec<u8>, Vec<u8>)> = entries_of(&self.model, group)
            .into_iter()
            .filter(|(key, _)| key.starts_with(&prefix) && *key >= from)
            .take(limit)
            .collect();
        let backend = &mut self.subtask_of(group).backend;
        let mut seen = Vec::new();
        if keys_only {
            backend
                .scan_range_keys(group, &prefix, &from, &mut |key| {
                    seen.push((key.to_vec(), Vec::new()));
                    Ok(seen.len() < limit)
                })
                .expect("a range scan of keys");
            let keys: Vec<_> = expected.into_iter().map(|(key, _)| (key, Vec::new())).collect();
            assert_eq!(seen, keys, "step {step}: keys from {from:?} with prefix {prefix:?} in {group:?}");
        } else {
            backend
                .scan_range(group, &prefix, &from, &mut |key, value| {
                    seen.push((key.to_vec(), value.to_vec()));
                    Ok(seen.len() < limit)
                })
                .expect("a range scan");
            assert_eq!(seen, expected, "step {step}: entries from {from:?} with prefix {prefix:?} in {group:?}");
        }
    }

    /// Declares a state on every subtask: refused if declared under another name, or new,
    /// ordered, and the subtask holds entries already.
    fn declare(&mut self, state: u16, name: &str, ordered: bool) {
        let step = self.step;
        for index in 0..self.subtasks.len() {
            let range = self.subtasks[index].range;
            let holds_entries = self.model.keys().any(|(group, _)| range.contains(*group));
            let subtask = &mut self.subtasks[index];
            let refused = match subtask.declared.get(&state) {
                Some((declared, _)) => declared != name,
                None => ordered && holds_entries,
            };
            let result = subtask.backend.declare_state(StateId(state), name, ordered);
            assert_eq!(
                result.is_err(),
                refused,
                "step {step}: declaring {state} {name:?} (ordered: {ordered}) on subtask {index} \
                 (declared {:?}, holds entries: {holds_entries}): {result:?}",
                subtask.declared
            );
            if !refused {
                subtask.declared.entry(state).or_insert_with(|| (name.to_string(), ordered));
            }
        }
    }

    fn capture(&mut self) {
        let checkpoint = CheckpointId(self.checkpoint_next);
        self.checkpoint_next += 1;
        let mut captures = Vec::new();
        for (index, subtask) in self.subtasks.iter_mut().enumerate() {
            let target = CaptureTarget {
                checkpoint,
                path: format!("checkpoints/chk-{:020}/op-{index:05}", checkpoint.0),
                shared_dir: "checkpoints/shared/op".into(),
            };
            captures.push(subtask.backend.capture(&target).expect("a capture"));
        }
        self.pending.push(Pending { checkpoint, model: self.model.clone(), captures });
    }

    fn write(&mut self, notify: bool) {
        if self.pending.is_empty() {
            return;
        }
        let Pending { checkpoint, model, captures } = self.pending.remove(0);
        let mut files = Vec::new();
        for capture in captures {
            files.extend(capture.files);
            files.extend(capture.write.write(&mut self.storage).expect("a capture's write"));
        }
        if notify {
            self.subtasks.iter_mut().for_each(|subtask| subtask.backend.checkpoint_complete(checkpoint));
        }
        self.complete = Some(Complete { model, files });
    }

    fn crash(&mut self, parallelism: u16) {
        self.pending.clear();
        self.storage.crash();
        // The states every subtask declared, as a restarted operator declares them.
        let mut declared = self.subtasks[0].declared.clone();
        declared.retain(|state, declaration| self.subtasks.iter().all(|s| s.declared.get(state) == Some(declaration)));
        self.new_subtasks(parallelism, &declared);
        let Some(complete) = &self.complete else {
            self.model.clear();
            return;
        };
        self.model = complete.model.clone();
        let files = complete.files.clone();
        for subtask in &mut self.subtasks {
            subtask.backend.restore_files(&mut self.storage, &files).expect("a restore of a complete checkpoint");
        }
        self.check_all("restored");
    }

    fn snapshot(&mut self, index: usize) {
        let step = self.step;
        let subtask = &mut self.subtasks[index];
        let snapshot = subtask.backend.snapshot().expect("a snapshot");
        let entries: Vec<_> = snapshot.entries().map(|(g, k, v)| ((g, k.to_vec()), v.to_vec())).collect();
        let range = subtask.range;
        let expected: Vec<_> =
            self.model.iter().filter(|((g, _), _)| range.contains(*g)).map(|(a, v)| (a.clone(), v.clone())).collect();
        assert_eq!(entries, expected, "step {step}: snapshot of subtask {index}");
        let mut fresh = HeapBackend::new(range);
        for (&state, (name, ordered)) in &subtask.declared {
            fresh.declare_state(StateId(state), name, *ordered).expect("a declaration into an empty backend");
        }
        fresh.restore(&snapshot).expect("a restore of a snapshot");
        subtask.backend = fresh;
        self.check_size(index);
    }
}

fuzz_target!(|input: Input| {
    let max = MaxParallelism::new(input.max_parallelism).expect("1 to 16 key groups");
    let declared: BTreeMap<u16, (String, bool)> =
        input.declared.iter().map(|&(state, ordered)| (state, (name(state, false), ordered))).collect();
    let mut run = Run {
        max,
        subtasks: Vec::new(),
        model: Model::new(),
        storage: MemStorage::new(),
        pending: Vec::new(),
        complete: None,
        checkpoint_next: 1,
        step: 0,
    };
    run.new_subtasks(input.parallelism, &declared);
    for (step, op) in input.ops.into_iter().enumerate() {
        run.step = step;
        run.apply(op);
    }
    run.step = usize::MAX;
    run.check_all("at the end");
    // Every pending capture still writes what the model held when it was taken.
    while !run.pending.is_empty() {
        run.write(false);
        let complete = run.complete.as_ref().expect("written");
        let (model, files) = (complete.model.clone(), complete.files.clone());
        let mut restored = HeapBackend::new(KeyGroupRange::all(max));
        restored.restore_files(&mut run.storage, &files).expect("a restore of a written capture");
        let mut entries = Vec::new();
        for group in KeyGroupRange::all(max).iter() {
            entries.extend(scan(&mut restored, group).into_iter().map(|(k, v)| ((group, k), v)));
        }
        assert_eq!(entries, model.into_iter().collect::<Vec<_>>(), "a capture written at the end");
    }
});
