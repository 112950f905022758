//! The checkpoint coordinator as pure decision logic: when to trigger, when a checkpoint is
//! complete, aborted or subsumed, what to keep and what to delete.
//!
//! The caller feeds it (`handle_*`) and performs its [`Action`]s in order. Completion has two
//! steps on purpose: when every task acknowledged, the coordinator asks for the manifest to be
//! made durable ([`Action::Persist`]); only when the caller reports it durable
//! ([`Coordinator::handle_persisted`]) is the checkpoint complete and announced
//! ([`Action::NotifyComplete`]). Nothing is announced before it is durable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::manifest::{end_of_input_dir, shared_dir, Manifest, TaskSnapshot, MANIFEST_VERSION};
use crate::dataflow::SubtaskId;
use crate::element::CheckpointId;
use crate::time::Instant;

/// The most checkpoints a coordinator lets be in flight at once, whatever the configuration.
pub const CONCURRENT_MAX: usize = 16;
/// Actions waiting to be polled; a caller that never polls is a bug.
const ACTIONS_MAX: usize = 1024;

/// A checkpoint taken on the coordinator's schedule, or a savepoint taken for the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Retained among the last `retained_count`, then deleted.
    Checkpoint,
    /// Kept until the user deletes it.
    Savepoint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Time between the triggers of periodic checkpoints.
    pub interval_ms: u64,
    /// A checkpoint not complete this long after its trigger is aborted.
    pub timeout_ms: u64,
    /// At most this many checkpoints in flight (1..=`CONCURRENT_MAX`).
    pub concurrent_max: usize,
    /// Completed periodic checkpoints kept (at least 1); older ones are deleted.
    pub retained_count: usize,
}

/// Why a checkpoint was given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortReason {
    Timeout,
    TaskFailed(SubtaskId),
    /// A newer checkpoint completed first.
    Subsumed(CheckpointId),
    /// Making the manifest durable failed (the message says how).
    PersistFailed(String),
}

/// What the caller must do, in the order polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Tell every source to record its offset and emit `Barrier(checkpoint)`.
    Trigger { checkpoint: CheckpointId, kind: CheckpointKind },
    /// Make the manifest durable (write, sync, replace the latest pointer, sync its directory),
    /// then call `handle_persisted` (or `handle_persist_failed`).
    Persist { manifest: Manifest },
    /// The checkpoint is complete and durable: sinks commit its transactions.
    NotifyComplete { checkpoint: CheckpointId },
    /// Tasks drop what they prepared for the checkpoint; sinks abort its transactions.
    Abort { checkpoint: CheckpointId, reason: AbortReason },
    /// Delete a checkpoint that is no longer retained, and the files no retained checkpoint uses.
    Discard { checkpoint: CheckpointId, files: Vec<String> },
}

/// An acknowledgement or report that does not fit the coordinator's state: a bug in the caller,
/// or a message from an older job attempt; the caller decides (the coordinator's state is unchanged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoordinatorError {
    #[error("acknowledgement of {checkpoint:?} from {subtask}, which is not a task of this job")]
    UnknownTask { checkpoint: CheckpointId, subtask: SubtaskId },
    #[error("second acknowledgement of {checkpoint:?} from {subtask}")]
    DuplicateAck { checkpoint: CheckpointId, subtask: SubtaskId },
    #[error("{checkpoint:?} was reported durable, but it is not waiting to be persisted")]
    NotPersisting { checkpoint: CheckpointId },
}

#[derive(Debug)]
struct Pending {
    kind: CheckpointKind,
    triggered_at: Instant,
    acks: BTreeMap<SubtaskId, TaskSnapshot>,
    /// All acknowledgements are in and the manifest is being made durable.
    persisting: bool,
}

/// The coordinator of one job attempt.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    job: String,
    max_parallelism: u16,
    tasks: BTreeSet<SubtaskId>,
    checkpoint_next: CheckpointId,
    trigger_last: Option<Instant>,
    savepoint_requested: bool,
    checkpoint_requested: bool,
    pending: BTreeMap<CheckpointId, Pending>,
    /// Completed checkpoints that are kept, oldest first.
    retained: VecDeque<Manifest>,
    /// Checkpoints whose persist failed, with their files. It may have failed after the pointer
    /// named the checkpoint (a failed sync of its directory after the rename), so a restart may
    /// restore it: its files stay until a newer checkpoint is durable.
    unsettled: Vec<(CheckpointId, Vec<String>)>,
    actions: VecDeque<Action>,
}

impl Coordinator {
    /// A coordinator for `tasks`, continuing after `restored` (the checkpoint the job restarted
    /// from, which stays retained) so that ids never repeat across attempts.
    pub fn new(
        config: CoordinatorConfig,
        job: &str,
        max_parallelism: u16,
        tasks: impl IntoIterator<Item = SubtaskId>,
        restored: Option<Manifest>,
    ) -> Coordinator {
        assert!((1..=CONCURRENT_MAX).contains(&config.concurrent_max), "concurrent_max {}", config.concurrent_max);
        assert!(config.retained_count >= 1, "retained_count {}", config.retained_count);
        assert!(config.interval_ms >= 1 && config.timeout_ms >= 1, "interval and timeout must be positive");
        let tasks: BTreeSet<SubtaskId> = tasks.into_iter().collect();
        assert!(!tasks.is_empty(), "a job has tasks");
        let checkpoint_next = restored.as_ref().map_or(CheckpointId(1), |m| CheckpointId(m.checkpoint.0 + 1));
        Coordinator {
            config,
            job: job.to_string(),
            max_parallelism,
            tasks,
            checkpoint_next,
            trigger_last: None,
            savepoint_requested: false,
            checkpoint_requested: false,
            pending: BTreeMap::new(),
            retained: restored.into_iter().collect(),
            unsettled: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// Numbers this attempt's checkpoints after `newest_seen` (`Recovery::checkpoint_id_max`):
    /// ids never repeat across attempts, also when recovery passed over newer checkpoints.
    pub fn continue_after(&mut self, newest_seen: CheckpointId) {
        assert!(self.pending.is_empty() && self.trigger_last.is_none(), "continue_after before the first trigger");
        assert!(newest_seen < CheckpointId::END_OF_INPUT, "checkpoint id {newest_seen:?} is reserved");
        self.checkpoint_next = self.checkpoint_next.max(CheckpointId(newest_seen.0 + 1));
    }

    fn push(&mut self, action: Action) {
        assert!(self.actions.len() < ACTIONS_MAX, "coordinator actions are not being polled");
        self.actions.push_back(action);
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next time `handle_timeout` has something to do: a trigger or a timeout.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let requested = self.savepoint_requested || self.checkpoint_requested;
        let trigger = if self.pending.len() < self.config.concurrent_max {
            let due = self.trigger_last.map_or(Instant(0), |last| last.saturating_add_ms(self.config.interval_ms));
            Some(if requested { Instant(0) } else { due })
        } else {
            None
        };
        let expiry = self.pending.values().map(|p| p.triggered_at.saturating_add_ms(self.config.timeout_ms)).min();
        trigger.into_iter().chain(expiry).min()
    }

    /// Asks for a savepoint at the next `handle_timeout`, regardless of the interval.
    pub fn request_savepoint(&mut self) {
        self.savepoint_requested = true;
    }

    /// Asks for a checkpoint at the next `handle_timeout`, regardless of the interval: when every
    /// task has finished, the checkpoint that commits the final output need not wait.
    pub fn request_checkpoint(&mut self) {
        self.checkpoint_requested = true;
    }

    /// The latest completed checkpoint or savepoint.
    pub fn latest_completed(&self) -> Option<&Manifest> {
        self.retained.iter().max_by_key(|m| m.checkpoint)
    }

    pub fn in_flight_count(&self) -> usize {
        self.pending.len()
    }

    /// Aborts checkpoints past their timeout, then triggers one if it is due and allowed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<CheckpointId> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.persisting && now >= p.triggered_at.saturating_add_ms(self.config.timeout_ms))
            .map(|(&id, _)| id)
            .collect();
        for checkpoint in expired {
            self.abort(checkpoint, AbortReason::Timeout);
        }
        if self.pending.len() >= self.config.concurrent_max {
            return;
        }
        let due = self.trigger_last.is_none_or(|last| now >= last.saturating_add_ms(self.config.interval_ms));
        if !(due || self.savepoint_requested || self.checkpoint_requested) {
            return;
        }
        let kind = if self.savepoint_requested { CheckpointKind::Savepoint } else { CheckpointKind::Checkpoint };
        self.savepoint_requested = false;
        self.checkpoint_requested = false;
        let checkpoint = self.checkpoint_next;
        self.checkpoint_next = CheckpointId(checkpoint.0 + 1);
        self.trigger_last = Some(now);
        self.pending.insert(checkpoint, Pending { kind, triggered_at: now, acks: BTreeMap::new(), persisting: false });
        self.push(Action::Trigger { checkpoint, kind });
    }

    /// A task finished its part of `checkpoint`. Acknowledgements of checkpoints that are no
    /// longer pending (aborted, subsumed) are expected after failures and are ignored.
    pub fn handle_ack(&mut self, checkpoint: CheckpointId, snapshot: TaskSnapshot) -> Result<(), CoordinatorError> {
        let subtask = snapshot.subtask;
        if !self.tasks.contains(&subtask) {
            return Err(CoordinatorError::UnknownTask { checkpoint, subtask });
        }
        let Some(pending) = self.pending.get_mut(&checkpoint) else {
            return Ok(());
        };
        if pending.acks.contains_key(&subtask) {
            return Err(CoordinatorError::DuplicateAck { checkpoint, subtask });
        }
        pending.acks.insert(subtask, snapshot);
        if pending.acks.len() == self.tasks.len() {
            assert!(pending.acks.keys().eq(self.tasks.iter()), "acks of {checkpoint:?} are from exactly the tasks");
            pending.persisting = true;
            if planted!(AnnounceBeforeDurable) {
                self.actions.push_back(Action::NotifyComplete { checkpoint });
            }
            let manifest = Manifest {
                version: MANIFEST_VERSION,
                job: self.job.clone(),
                checkpoint,
                savepoint: pending.kind == CheckpointKind::Savepoint,
                max_parallelism: self.max_parallelism,
                tasks: pending.acks.values().cloned().collect(),
            };
            self.push(Action::Persist { manifest });
        }
        Ok(())
    }

    /// The manifest of `checkpoint` is durable: it is complete. Older pending checkpoints are
    /// subsumed, and periodic checkpoints beyond `retained_count` are discarded.
    pub fn handle_persisted(&mut self, checkpoint: CheckpointId) -> Result<(), CoordinatorError> {
        if !self.pending.get(&checkpoint).is_some_and(|p| p.persisting) {
            return Err(CoordinatorError::NotPersisting { checkpoint });
        }
        let pending = self.pending.remove(&checkpoint).expect("checked above");
        // Retained first: the subsumed checkpoints' files that this one shares must survive.
        self.retained.push_back(Manifest {
            version: MANIFEST_VERSION,
            job: self.job.clone(),
            checkpoint,
            savepoint: pending.kind == CheckpointKind::Savepoint,
            max_parallelism: self.max_parallelism,
            tasks: pending.acks.into_values().collect(),
        });
        let older: Vec<CheckpointId> = self.pending.range(..checkpoint).map(|(&id, _)| id).collect();
        for id in older {
            self.abort(id, AbortReason::Subsumed(checkpoint));
        }
        self.push(Action::NotifyComplete { checkpoint });
        // The pointer names this checkpoint now, durably: older unsettled ones are out of the state.
        let (settled, unsettled) =
            std::mem::take(&mut self.unsettled).into_iter().partition(|(id, _)| *id < checkpoint);
        self.unsettled = unsettled;
        self.discard_beyond_retention();
        for (id, files) in settled {
            let files = self.unreferenced(files);
            self.push(Action::Discard { checkpoint: id, files });
        }
        Ok(())
    }

    /// Making the manifest of `checkpoint` durable failed: the checkpoint is aborted, and its
    /// files are kept until a newer checkpoint is durable (the pointer may name it).
    pub fn handle_persist_failed(&mut self, checkpoint: CheckpointId, message: &str) -> Result<(), CoordinatorError> {
        if !self.pending.get(&checkpoint).is_some_and(|p| p.persisting) {
            return Err(CoordinatorError::NotPersisting { checkpoint });
        }
        self.abort(checkpoint, AbortReason::PersistFailed(message.to_string()));
        Ok(())
    }

    /// A task failed: every pending checkpoint is aborted (the job restarts from the latest
    /// completed one).
    pub fn handle_task_failure(&mut self, subtask: SubtaskId) {
        let pending: Vec<CheckpointId> = self.pending.keys().copied().collect();
        for checkpoint in pending {
            self.abort(checkpoint, AbortReason::TaskFailed(subtask));
        }
    }

    fn abort(&mut self, checkpoint: CheckpointId, reason: AbortReason) {
        let pending = self.pending.remove(&checkpoint).expect("aborting a pending checkpoint");
        let files: Vec<String> = pending.acks.values().flat_map(|s| s.files.iter().cloned()).collect();
        let persist_failed = matches!(reason, AbortReason::PersistFailed(_));
        self.push(Action::Abort { checkpoint, reason });
        // What the aborted checkpoint wrote goes, except files a retained checkpoint shares, and
        // shared and end-of-input files: a later checkpoint, still in flight or not triggered
        // yet, may refer to them without having acknowledged yet (a finished task acknowledges
        // every later checkpoint with its final snapshot). (Periodic discarding deletes shared
        // files: one no retained checkpoint refers to is out of the state for good, so no later
        // checkpoint refers to it either.)
        let kept = [format!("{}/", shared_dir()), format!("{}/", end_of_input_dir())];
        let files: Vec<String> =
            files.into_iter().filter(|file| !kept.iter().any(|dir| file.starts_with(dir))).collect();
        if persist_failed {
            self.unsettled.push((checkpoint, files));
            return;
        }
        let files = self.unreferenced(files);
        self.push(Action::Discard { checkpoint, files });
    }

    /// Keeps the newest `retained_count` periodic checkpoints (savepoints stay) and discards the
    /// rest, except their end-of-input files: a task restored from its final snapshot runs to its
    /// end again and writes the same final snapshot under the same names, which every later
    /// checkpoint then carries, also after a discard of the restored checkpoint was decided
    /// (there is one such file per sink subtask; a restart's `manifest::sweep_before` deletes
    /// those no remaining checkpoint names).
    fn discard_beyond_retention(&mut self) {
        let end_of_input = format!("{}/", end_of_input_dir());
        while self.retained.iter().filter(|m| !m.savepoint).count() > self.config.retained_count {
            let position = self.retained.iter().position(|m| !m.savepoint).expect("counted above");
            let oldest = self.retained.remove(position).expect("position is in range");
            let files = oldest.tasks.iter().flat_map(|s| s.files.iter().cloned());
            let files = self.unreferenced(files.filter(|file| !file.starts_with(&end_of_input)).collect());
            self.push(Action::Discard { checkpoint: oldest.checkpoint, files });
        }
    }

    /// The files of `files` that no retained or unsettled checkpoint and no pending
    /// acknowledgement refers to.
    fn unreferenced(&self, files: Vec<String>) -> Vec<String> {
        let used: BTreeSet<&String> = self
            .retained
            .iter()
            .flat_map(|m| m.tasks.iter())
            .chain(self.pending.values().flat_map(|p| p.acks.values()))
            .flat_map(|s| s.files.iter())
            .chain(self.unsettled.iter().flat_map(|(_, files)| files.iter()))
            .collect();
        let mut files: Vec<String> = files.into_iter().filter(|f| !used.contains(f)).collect();
        files.sort();
        files.dedup();
        files
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::dataflow::VertexId;
    use crate::state::testing::Lcg;

    fn task(index: u16) -> SubtaskId {
        SubtaskId { vertex: VertexId(0), index }
    }

    fn config() -> CoordinatorConfig {
        CoordinatorConfig { interval_ms: 100, timeout_ms: 1_000, concurrent_max: 2, retained_count: 2 }
    }

    fn coordinator() -> Coordinator {
        Coordinator::new(config(), "job", 128, [task(0), task(1)], None)
    }

    fn snapshot(index: u16, files: &[&str]) -> TaskSnapshot {
        TaskSnapshot {
            subtask: task(index),
            source_positions: vec![],
            files: files.iter().map(|f| f.to_string()).collect(),
            pending_output: vec![],
        }
    }

    fn drain(coordinator: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| coordinator.poll_action()).collect()
    }

    fn ack_all(coordinator: &mut Coordinator, id: u64, files: &[&str]) {
        coordinator.handle_ack(CheckpointId(id), snapshot(0, files)).unwrap();
        coordinator.handle_ack(CheckpointId(id), snapshot(1, &[])).unwrap();
    }

    // Goal: triggers follow the interval and the in-flight bound; completion needs every ack,
    // then durability, then it is announced. Method: a script with the expected actions.
    #[test]
    fn triggers_completes_only_after_persisted() {
        let mut c = coordinator();
        c.handle_timeout(Instant(0));
        assert_eq!(
            drain(&mut c),
            vec![Action::Trigger { checkpoint: CheckpointId(1), kind: CheckpointKind::Checkpoint }]
        );
        c.handle_timeout(Instant(99));
        assert!(drain(&mut c).is_empty(), "not due before the interval");
        c.handle_timeout(Instant(100));
        c.handle_timeout(Instant(300));
        assert_eq!(drain(&mut c).len(), 1, "at most two in flight");
        assert_eq!(c.poll_timeout(), Some(Instant(1_000)), "the next event is checkpoint 1's timeout");
        c.handle_ack(CheckpointId(1), snapshot(0, &["a"])).unwrap();
        assert!(drain(&mut c).is_empty(), "one ack of two");
        c.handle_ack(CheckpointId(1), snapshot(1, &[])).unwrap();
        let actions = drain(&mut c);
        let [Action::Persist { manifest }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!(manifest.checkpoint, CheckpointId(1));
        assert_eq!(manifest.tasks.len(), 2);
        assert!(c.latest_completed().is_none(), "not complete before it is durable");
        c.handle_persisted(CheckpointId(1)).unwrap();
        assert_eq!(drain(&mut c), vec![Action::NotifyComplete { checkpoint: CheckpointId(1) }]);
        assert_eq!(c.latest_completed().map(|m| m.checkpoint), Some(CheckpointId(1)));
    }

    // Goal: an aborted checkpoint's own files go; its files in the shared directory stay, since a
    // later checkpoint still in flight may refer to them without having acknowledged yet. Once
    // discarded beyond retention, a shared file goes if no retained checkpoint refers to it.
    #[test]
    fn aborts_keep_shared_files_retention_deletes_them() {
        let mut c = coordinator();
        c.handle_timeout(Instant(0));
        drain(&mut c);
        let (own, shared) = ("checkpoints/chk-1/state".to_string(), format!("{}/w/1.sst", shared_dir()));
        c.handle_ack(CheckpointId(1), snapshot(0, &[&own, &shared])).unwrap();
        c.handle_task_failure(task(1));
        let actions = drain(&mut c);
        assert!(actions.contains(&Action::Discard { checkpoint: CheckpointId(1), files: vec![own] }), "{actions:?}");

        let older = format!("{}/w/2.sst", shared_dir());
        for id in 2..=4 {
            c.handle_timeout(Instant(id * 100));
            drain(&mut c);
            ack_all(&mut c, id, &[older.as_str(), shared.as_str()][..if id == 2 { 2 } else { 1 }]);
            c.handle_persisted(CheckpointId(id)).unwrap();
        }
        let actions = drain(&mut c);
        let discard = Action::Discard { checkpoint: CheckpointId(2), files: vec![shared.clone()] };
        assert!(actions.contains(&discard), "2.sst is still in 3 and 4; 1.sst only was in 2: {actions:?}");
    }

    // Goal: timeouts, task failures and a newer completion abort pending checkpoints and discard
    // what they wrote; old checkpoints beyond retention are discarded, but never a file that a
    // retained checkpoint still shares (incremental state).
    #[test]
    fn aborts_subsumes_and_discards_unshared_files() {
        let mut c = coordinator();
        c.handle_timeout(Instant(0));
        c.handle_timeout(Instant(100));
        drain(&mut c);
        ack_all(&mut c, 2, &["shared", "only-2"]);
        c.handle_persisted(CheckpointId(2)).unwrap();
        let actions = drain(&mut c);
        assert!(actions
            .contains(&Action::Abort { checkpoint: CheckpointId(1), reason: AbortReason::Subsumed(CheckpointId(2)) }));
        assert!(actions.contains(&Action::NotifyComplete { checkpoint: CheckpointId(2) }));
        // A late ack of the subsumed checkpoint is expected and ignored.
        assert_eq!(c.handle_ack(CheckpointId(1), snapshot(0, &[])), Ok(()));
        for (id, at) in [(3, 200), (4, 300)] {
            c.handle_timeout(Instant(at));
            drain(&mut c);
            ack_all(&mut c, id, &["shared", &format!("only-{id}")]);
            c.handle_persisted(CheckpointId(id)).unwrap();
        }
        let actions = drain(&mut c);
        let discarded: Vec<&Action> = actions.iter().filter(|a| matches!(a, Action::Discard { .. })).collect();
        assert_eq!(
            discarded,
            vec![&Action::Discard { checkpoint: CheckpointId(2), files: vec!["only-2".into()] }],
            "checkpoint 2 leaves retention; 'shared' is still used by 3 and 4"
        );
        c.handle_timeout(Instant(400));
        drain(&mut c);
        c.handle_ack(CheckpointId(5), snapshot(0, &["only-5"])).unwrap();
        c.handle_timeout(Instant(1_400));
        let actions = drain(&mut c);
        assert_eq!(actions[0], Action::Abort { checkpoint: CheckpointId(5), reason: AbortReason::Timeout });
        assert_eq!(actions[1], Action::Discard { checkpoint: CheckpointId(5), files: vec!["only-5".into()] });
        drain(&mut c);
        c.handle_task_failure(task(1));
        let actions = drain(&mut c);
        assert!(matches!(actions[0], Action::Abort { reason: AbortReason::TaskFailed(_), .. }), "{actions:?}");
    }

    // Goal (regression, found by the simulator: `sim/tests/regressions.rs`,
    // `aborted_checkpoint_keeps_the_final_snapshot`): a finished task acknowledges every later
    // checkpoint with the files of its final snapshot; aborting one of those checkpoints must not
    // delete them, or the next checkpoint completes naming a file that is gone and no recovery
    // can use it. Method: checkpoint 1 carries a final-snapshot file and times out; checkpoint 2
    // carries it and completes; nothing discarded the file.
    #[test]
    fn aborted_checkpoint_keeps_the_final_snapshot() {
        let mut c = coordinator();
        let last = format!("{}/sink-00001-00000.sequence", end_of_input_dir());
        c.handle_timeout(Instant(0));
        drain(&mut c);
        c.handle_ack(CheckpointId(1), snapshot(0, &[&last, "only-1"])).unwrap();
        c.handle_timeout(Instant(1_000));
        let actions = drain(&mut c);
        assert_eq!(actions[1], Action::Discard { checkpoint: CheckpointId(1), files: vec!["only-1".into()] });
        ack_all(&mut c, 2, &[&last]);
        c.handle_persisted(CheckpointId(2)).unwrap();
        let deleted: Vec<String> = drain(&mut c)
            .into_iter()
            .flat_map(|a| match a {
                Action::Discard { files, .. } => files,
                _ => vec![],
            })
            .collect();
        assert!(!deleted.contains(&last), "{deleted:?}");
    }

    // Goal (regression, found by the `cluster` fuzz target: `sim/tests/regressions.rs`,
    // `retention_keeps_the_final_snapshot_a_restored_task_writes_again`): a task restored from
    // its final snapshot ran to its end again and wrote the same final-snapshot file, after its
    // next checkpoint (taken before it finished) completed; retention then discarded the
    // restored checkpoint with that file, and every later checkpoint completed naming a file
    // that was gone, so no recovery could use them. Method: checkpoint 1 names the final
    // snapshot; checkpoint 2 does not (the restored task had not finished yet); retention
    // discards 1 but not the final snapshot, which checkpoint 3 names again.
    #[test]
    fn retention_keeps_the_final_snapshot() {
        let config = CoordinatorConfig { retained_count: 1, ..config() };
        let mut c = Coordinator::new(config, "job", 128, [task(0), task(1)], None);
        let last = format!("{}/sink-00001-00000.sequence", end_of_input_dir());
        let mut deleted = Vec::new();
        for (id, files) in [(1, vec![last.as_str(), "only-1"]), (2, vec!["only-2"]), (3, vec![last.as_str()])] {
            c.handle_timeout(Instant(id * 1_000));
            drain(&mut c);
            ack_all(&mut c, id, &files);
            c.handle_persisted(CheckpointId(id)).unwrap();
            deleted.extend(drain(&mut c).into_iter().flat_map(|a| match a {
                Action::Discard { files, .. } => files,
                _ => vec![],
            }));
        }
        assert_eq!(deleted, vec!["only-1".to_string(), "only-2".to_string()]);
    }

    // Goal (regression, found by the `cluster` fuzz target: `sim/tests/regressions.rs`,
    // `a_checkpoint_whose_persist_failed_keeps_its_files`): persisting checkpoint 1 failed when
    // syncing the directory after the pointer's rename, so the pointer named 1; the abort deleted
    // its files, and every restart refused to start ('misses its file'). Method: after a failed
    // persist nothing of the checkpoint is discarded; once checkpoint 2 is durable, checkpoint
    // 1's files are, except those a retained checkpoint shares.
    #[test]
    fn a_failed_persist_keeps_the_files_until_a_newer_checkpoint_is_durable() {
        let config = CoordinatorConfig { concurrent_max: 1, retained_count: 1, ..config() };
        let mut c = Coordinator::new(config, "job", 128, [task(0), task(1)], None);
        let discards = |c: &mut Coordinator| -> Vec<(u64, Vec<String>)> {
            drain(c)
                .into_iter()
                .filter_map(|a| match a {
                    Action::Discard { checkpoint, files } => Some((checkpoint.0, files)),
                    _ => None,
                })
                .collect()
        };
        c.handle_timeout(Instant(0));
        drain(&mut c);
        ack_all(&mut c, 1, &["only-1", "shared-1-2"]);
        drain(&mut c);
        c.handle_persist_failed(CheckpointId(1), "directory sync failed").unwrap();
        assert_eq!(discards(&mut c), vec![], "the pointer may name checkpoint 1");
        c.handle_timeout(Instant(100));
        drain(&mut c);
        ack_all(&mut c, 2, &["only-2", "shared-1-2"]);
        drain(&mut c);
        c.handle_persisted(CheckpointId(2)).unwrap();
        assert_eq!(discards(&mut c), vec![(1, vec!["only-1".to_string()])]);
    }

    // Goal: savepoints are taken on request and outlive retention; a restored coordinator goes on
    // with fresh ids; acknowledgements that make no sense are errors.
    #[test]
    fn savepoints_restoring_and_bad_acks() {
        let mut c = coordinator();
        c.handle_timeout(Instant(0));
        ack_all(&mut c, 1, &[]);
        c.handle_persisted(CheckpointId(1)).unwrap();
        drain(&mut c);
        c.request_savepoint();
        c.handle_timeout(Instant(1));
        assert_eq!(
            drain(&mut c),
            vec![Action::Trigger { checkpoint: CheckpointId(2), kind: CheckpointKind::Savepoint }]
        );
        ack_all(&mut c, 2, &["savepoint-file"]);
        drain(&mut c);
        c.handle_persisted(CheckpointId(2)).unwrap();
        let savepoint = c.latest_completed().cloned().unwrap();
        assert!(savepoint.savepoint);
        // The savepoint's trigger at 1 counts for the interval too.
        for (id, at) in [(3, 101), (4, 201), (5, 301)] {
            c.handle_timeout(Instant(at));
            drain(&mut c);
            ack_all(&mut c, id, &[]);
            c.handle_persisted(CheckpointId(id)).unwrap();
        }
        let discards: Vec<CheckpointId> = drain(&mut c)
            .into_iter()
            .filter_map(|a| match a {
                Action::Discard { checkpoint, .. } => Some(checkpoint),
                _ => None,
            })
            .collect();
        assert!(!discards.contains(&CheckpointId(2)), "the savepoint is kept: {discards:?}");
        assert_eq!(
            c.handle_ack(CheckpointId(9), snapshot(7, &[])),
            Err(CoordinatorError::UnknownTask { checkpoint: CheckpointId(9), subtask: task(7) })
        );
        assert_eq!(
            c.handle_persisted(CheckpointId(3)),
            Err(CoordinatorError::NotPersisting { checkpoint: CheckpointId(3) })
        );
        c.handle_timeout(Instant(401));
        c.handle_ack(CheckpointId(6), snapshot(0, &[])).unwrap();
        assert_eq!(
            c.handle_ack(CheckpointId(6), snapshot(0, &[])),
            Err(CoordinatorError::DuplicateAck { checkpoint: CheckpointId(6), subtask: task(0) })
        );

        drain(&mut c);
        c.handle_ack(CheckpointId(6), snapshot(1, &[])).unwrap();
        drain(&mut c);
        c.handle_persisted(CheckpointId(6)).unwrap();
        c.request_checkpoint();
        assert_eq!(c.poll_timeout(), Some(Instant(0)), "a requested checkpoint is due at once");
        c.handle_timeout(Instant(402));
        assert!(
            drain(&mut c).contains(&Action::Trigger { checkpoint: CheckpointId(7), kind: CheckpointKind::Checkpoint })
        );

        let mut restored = Coordinator::new(config(), "job", 128, [task(0), task(1)], Some(savepoint));
        restored.handle_timeout(Instant(0));
        assert_eq!(
            drain(&mut restored),
            vec![Action::Trigger { checkpoint: CheckpointId(3), kind: CheckpointKind::Checkpoint }]
        );
    }

    // Goal: under any interleaving of triggers, acks, durability reports, timeouts and failures,
    // completions are announced in increasing order, each after its Persist, and no discarded
    // file is used by a retained checkpoint. Method: seeded random events (seed printed).
    #[test]
    fn random_schedules_keep_the_invariants() {
        for seed in 0..200_u64 {
            println!("seed {seed}");
            let mut rng = Lcg::new(seed);
            let mut c = coordinator();
            let mut now = 0_u64;
            let mut persisting: BTreeSet<CheckpointId> = BTreeSet::new();
            let mut triggered: Vec<CheckpointId> = Vec::new();
            let mut announced: Vec<CheckpointId> = Vec::new();
            let mut reported_durable: BTreeSet<CheckpointId> = BTreeSet::new();
            for _ in 0..300 {
                match rng.below(10) {
                    0..=2 => {
                        now += rng.below(300);
                        c.handle_timeout(Instant(now));
                    }
                    3..=6 if !triggered.is_empty() => {
                        let id = triggered[rng.below(triggered.len() as u64) as usize];
                        let file = format!("f{}", rng.below(6));
                        let _ = c.handle_ack(id, snapshot(rng.below(2) as u16, &[&file]));
                    }
                    7 | 8 if !persisting.is_empty() => {
                        let id = *persisting.iter().next().unwrap();
                        persisting.remove(&id);
                        if rng.below(5) == 0 {
                            let _ = c.handle_persist_failed(id, "disk full");
                        } else if c.handle_persisted(id).is_ok() {
                            reported_durable.insert(id);
                        }
                    }
                    9 => c.handle_task_failure(task(0)),
                    _ => {}
                }
                for action in drain(&mut c) {
                    match action {
                        Action::Trigger { checkpoint, .. } => triggered.push(checkpoint),
                        Action::Persist { manifest } => {
                            persisting.insert(manifest.checkpoint);
                        }
                        Action::NotifyComplete { checkpoint } => {
                            assert!(announced.last().is_none_or(|&last| last < checkpoint), "seed {seed}: order");
                            assert!(reported_durable.contains(&checkpoint), "seed {seed}: announced before durable");
                            announced.push(checkpoint);
                        }
                        Action::Abort { checkpoint, .. } => {
                            persisting.remove(&checkpoint);
                        }
                        Action::Discard { files, .. } => {
                            let used: BTreeSet<&String> =
                                c.retained.iter().flat_map(|m| m.tasks.iter()).flat_map(|t| t.files.iter()).collect();
                            assert!(files.iter().all(|f| !used.contains(f)), "seed {seed}: discarded a retained file");
                        }
                    }
                }
                assert!(c.in_flight_count() <= 2, "seed {seed}");
            }
        }
    }
}
