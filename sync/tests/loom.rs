//! Loom models of every place where the driver's threads share memory: each model runs the
//! crate's own primitive (the code the driver runs, built against `loom::sync` by the shim) on a
//! few loom threads, in every interleaving loom explores, and asserts the primitive's contract.
//! Waiting is `loom::future::block_on` over the primitives' async waits, so a lost wake-up is a
//! deadlock, which loom reports.
//!
//! Run by `scripts/loom.sh` (`RUSTFLAGS="--cfg loom" cargo test --release -p sabot-sync --test
//! loom`). Each model names its preemption bound (`None`: every interleaving), which
//! `LOOM_MAX_PREEMPTIONS` overrides for all, and prints how many interleavings it explored and
//! how long it took. The bounds keep the whole run near half a minute on two cores: the models
//! with few locks per thread are exhaustive; the handoff's and the credit loop's are bounded at
//! four preemptions (exhaustive runs take over a minute each); the channel, completion and board
//! models (three threads, many locks) at two (at three they take two to six minutes each). Two
//! preemptions already cover a look and a wait split by another thread's change, which is how
//! these primitives would lose a wake-up or read a stale value.
#![cfg(loom)]

use std::collections::BTreeMap;

use loom::future::block_on;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use sabot_sync::board::MinimumBoard;
use sabot_sync::channel::{self, TryRecvError};
use sabot_sync::completed::Completed;
use sabot_sync::credits::{ReceiveCredits, SendCredits};
use sabot_sync::handoff::{Handoff, Outcome};
use sabot_sync::settle::Settle;
use sabot_sync::signal::Signal;

/// The bound of the models with three threads that each take and release many locks.
const PREEMPTIONS_LARGE: Option<usize> = Some(2);
/// The bound of the models whose threads take fewer locks.
const PREEMPTIONS_SMALL: Option<usize> = Some(4);

/// Explores `model` with at most `preemptions` preemptions per interleaving (unless
/// `LOOM_MAX_PREEMPTIONS` is set), printing its name, the interleavings explored and the time.
fn check(name: &str, preemptions: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = preemptions;
    }
    let bound = builder.preemption_bound;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    let started = std::time::Instant::now();
    builder.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        model();
    });
    let count = count.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("loom model {name}: {count} interleavings in {:.2?} (preemption bound {bound:?})", started.elapsed());
}

// The channel between nodes. Two senders, one of which sends two elements, into a channel of
// capacity one, so both senders wait for room in some interleavings; the receiver takes every
// element, then sees the channel end once both senders are gone.
#[test]
fn channel_delivers_each_element_once_in_sender_order_within_capacity() {
    check("channel_delivers_each_element_once_in_sender_order_within_capacity", PREEMPTIONS_LARGE, || {
        let (sender_a, mut receiver) = channel::bounded::<(char, u32)>(1);
        let sender_b = sender_a.clone();
        let a = thread::spawn(move || {
            for index in 0..2 {
                block_on(sender_a.send(('a', index))).expect("the receiver is open");
            }
        });
        let b = thread::spawn(move || block_on(sender_b.send(('b', 0))).expect("the receiver is open"));
        let mut next: BTreeMap<char, u32> = BTreeMap::new();
        for _ in 0..3 {
            assert!(receiver.len() <= receiver.capacity(), "{} queued", receiver.len());
            let (sender, index) = block_on(receiver.recv()).expect("senders are open until everything is sent");
            let expected = next.entry(sender).or_insert(0);
            assert_eq!(index, *expected, "sender {sender}: element {index} out of order");
            *expected += 1;
        }
        assert_eq!(next, BTreeMap::from([('a', 2), ('b', 1)]), "every element once");
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(block_on(receiver.recv()), None, "nothing after the last element");
        assert_eq!(receiver.try_recv(), Err(TryRecvError::Disconnected));
    });
}

// Credit-based flow control between processes, with a window of two: a sending endpoint takes a
// credit per element and waits for credits when it has none; the receiving side counts what
// arrives (refusing anything beyond the window) and, once its node took two elements, grants
// them back (the credit frame, which the sender's reader hands to its credits). Every element
// arrives once, in order, the window is never exceeded, and the sender's waits always end.
#[test]
fn credits_never_exceed_the_window_and_grants_wake_the_sender() {
    check("credits_never_exceed_the_window_and_grants_wake_the_sender", PREEMPTIONS_SMALL, || {
        let send: Arc<SendCredits<u8, u16>> = Arc::new(SendCredits::new(2, [0]));
        let receive: Arc<ReceiveCredits<u8>> = Arc::new(ReceiveCredits::new(2, [0]));
        // The connection: elements in flight, in order.
        let (wire, mut arriving) = channel::bounded::<u32>(8);
        let sender = {
            let send = send.clone();
            thread::spawn(move || {
                for index in 0..4 {
                    while !send.try_take(&0) {
                        block_on(send.writable(&0, &1)).expect("the peer is not lost");
                    }
                    wire.try_send(index).expect("the wire holds more than the window");
                }
            })
        };
        let mut taken_since_grant = 0;
        for expected in 0..4 {
            let index = block_on(arriving.recv()).expect("the sender sends four");
            receive.receive(&0).expect("an element beyond the window");
            assert_eq!(index, expected, "out of order");
            taken_since_grant += 1;
            if taken_since_grant == 2 {
                receive.grant(&0, taken_since_grant);
                send.grant(&0, taken_since_grant).expect("a grant beyond the window");
                taken_since_grant = 0;
            }
        }
        sender.join().unwrap();
        assert_eq!(send.available(&0), 2, "every credit back");
    });
}

// A sending endpoint waits for credits from a peer process that is lost instead: its wait ends
// with the reason, never hangs.
#[test]
fn credits_wait_ends_when_the_peer_is_lost() {
    check("credits_wait_ends_when_the_peer_is_lost", None, || {
        let send: Arc<SendCredits<u8, u16>> = Arc::new(SendCredits::new(1, [0]));
        assert!(send.try_take(&0));
        let lost = {
            let send = send.clone();
            thread::spawn(move || send.lose(1, "connection reset".into()))
        };
        assert_eq!(block_on(send.writable(&0, &1)), Err("connection reset".to_string()));
        lost.join().unwrap();
    });
}

// A node stops (its receiver is dropped) while a peer waits for room in its full channel: the
// peer's wait ends with the channel closed, never hangs; an element is received at most once.
#[test]
fn channel_receiver_drop_ends_a_senders_wait() {
    check("channel_receiver_drop_ends_a_senders_wait", None, || {
        let (sender, mut receiver) = channel::bounded::<u32>(1);
        sender.try_send(0).expect("an empty channel has room");
        let peer = thread::spawn(move || {
            // Waits for room: the receiver may take the first element, or be dropped, first.
            block_on(sender.send(1)).is_ok()
        });
        let first = receiver.try_recv().ok();
        assert!(matches!(first, None | Some(0)), "{first:?} before the first element was taken");
        drop(receiver);
        let _sent = peer.join().unwrap();
    });
}

// The wake-up every primitive relies on: a waiter that registers, looks at the shared state and
// then waits is woken by a change made at any point after its registration.
#[test]
fn signal_wakes_a_waiter_registered_before_it_looked() {
    check("signal_wakes_a_waiter_registered_before_it_looked", None, || {
        let signal = Arc::new(Signal::new());
        let flag = Arc::new(AtomicBool::new(false));
        let (signal_set, flag_set) = (signal.clone(), flag.clone());
        let setter = thread::spawn(move || {
            flag_set.store(true, Ordering::Release);
            signal_set.notify();
        });
        loop {
            let notified = signal.notified();
            if flag.load(Ordering::Acquire) {
                break;
            }
            block_on(notified);
        }
        setter.join().unwrap();
        assert_eq!(signal.waiter_count(), 0, "a completed waiter left in the list");
    });
}

// The snapshot-write handoff. The task submits two writes of one subtask (checkpoints 1 and 2)
// and starts a writer for each; the writers finish in any order, the second one dies without
// completing (a panicking writer drops its ticket). The task takes 1 before 2, each exactly
// once, 1 only with its file durable, 2 as abandoned (never lost), and never waits forever.
#[test]
fn handoff_acknowledges_after_the_write_in_submission_order() {
    check("handoff_acknowledges_after_the_write_in_submission_order", PREEMPTIONS_SMALL, || {
        let handoff: Arc<Handoff<u16, u64, &'static str>> = Arc::new(Handoff::new(4));
        let durable = Arc::new(AtomicBool::new(false));
        let first = Handoff::submit(&handoff, 0, 1);
        let second = Handoff::submit(&handoff, 0, 2);
        let written = durable.clone();
        let writer_first = thread::spawn(move || {
            // Relaxed on purpose: only the handoff may make it visible to the task.
            written.store(true, Ordering::Relaxed);
            first.complete("files of 1");
        });
        let writer_second = thread::spawn(move || drop(second));
        let mut taken = Vec::new();
        while taken.len() < 2 {
            block_on(handoff.ready());
            while let Some(handed) = handoff.take() {
                assert_eq!(handed.lane, 0);
                if handed.id == 1 {
                    assert!(durable.load(Ordering::Relaxed), "checkpoint 1 taken before its write is durable");
                    assert_eq!(handed.outcome, Outcome::Done("files of 1"));
                } else {
                    assert_eq!(handed.outcome, Outcome::Abandoned);
                }
                taken.push(handed.id);
            }
        }
        assert_eq!(taken, [1, 2], "in submission order, each once");
        assert_eq!(handoff.pending_count(), 0);
        assert!(handoff.take().is_none(), "nothing taken twice");
        writer_first.join().unwrap();
        writer_second.join().unwrap();
    });
}

// Two lanes (subtasks) whose writers finish concurrently, one lane with a write already finished
// before the task first looks: each write is taken once, after its writer completed it.
#[test]
fn handoff_takes_every_lane_once_whoever_finishes_first() {
    check("handoff_takes_every_lane_once_whoever_finishes_first", PREEMPTIONS_SMALL, || {
        let handoff: Arc<Handoff<u16, u64, u16>> = Arc::new(Handoff::new(4));
        let early = Handoff::submit(&handoff, 2, 7);
        early.complete(2);
        let writers: Vec<_> = [0_u16, 1]
            .into_iter()
            .map(|lane| {
                let ticket = Handoff::submit(&handoff, lane, 7);
                thread::spawn(move || ticket.complete(lane))
            })
            .collect();
        let mut taken = Vec::new();
        while taken.len() < 3 {
            block_on(handoff.ready());
            while let Some(handed) = handoff.take() {
                assert_eq!(handed.outcome, Outcome::Done(handed.lane), "lane {} got another's result", handed.lane);
                taken.push(handed.lane);
            }
        }
        taken.sort();
        assert_eq!(taken, [0, 1, 2], "each lane once");
        assert_eq!(handoff.pending_count(), 0);
        for writer in writers {
            writer.join().unwrap();
        }
    });
}

// The RocksDB checkpoint of a capture, which the writer thread and the task may both need first.
// The database holds the barrier's state (1); the task settles, then writes the next epoch's
// state (2). The checkpoint runs exactly once, whoever runs it, both sides get its result, and it
// never sees the write from after the barrier.
#[test]
fn settle_runs_once_before_the_task_writes_again() {
    check("settle_runs_once_before_the_task_writes_again", None, || {
        let database = Arc::new(AtomicU64::new(1));
        let runs = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(Settle::new(database.clone()));
        let run = {
            let runs = runs.clone();
            move |database: Arc<AtomicU64>| {
                runs.fetch_add(1, Ordering::Relaxed);
                // Relaxed on purpose: only the settle orders it against the task's write.
                database.load(Ordering::Relaxed)
            }
        };
        let writer = {
            let (pending, run) = (pending.clone(), run.clone());
            thread::spawn(move || pending.settle(run))
        };
        let seen_by_task = pending.settle(run);
        database.store(2, Ordering::Relaxed);
        let seen_by_writer = writer.join().unwrap();
        assert_eq!(seen_by_task, 1, "the checkpoint saw a write from after the barrier");
        assert_eq!(seen_by_writer, seen_by_task, "both sides get the one checkpoint");
        assert_eq!(runs.load(Ordering::Relaxed), 1, "the checkpoint ran once");
        assert!(pending.is_settled());
    });
}

// The notification of completed checkpoints. The coordinator makes checkpoints 1 and 2 durable
// (a relaxed store that only the notification may publish) and announces each, then sends Stop
// (a release store standing for the command channel). Two nodes take completions as they wait
// and, on Stop, take what is there before they stop. Each node takes an increasing sequence
// (nothing twice), only durable checkpoints, and has taken 2 when it stops or finishes.
#[test]
fn completed_reaches_every_node_once_and_only_after_it_is_durable() {
    check("completed_reaches_every_node_once_and_only_after_it_is_durable", PREEMPTIONS_LARGE, || {
        let completed = Arc::new(Completed::new());
        let durable: Arc<[AtomicBool; 3]> = Arc::new(std::array::from_fn(|_| AtomicBool::new(false)));
        let stop = Arc::new(AtomicBool::new(false));
        let coordinator = {
            let (completed, durable, stop) = (completed.clone(), durable.clone(), stop.clone());
            thread::spawn(move || {
                for checkpoint in 1..=2 {
                    durable[checkpoint].store(true, Ordering::Relaxed);
                    completed.publish(checkpoint as u64);
                }
                stop.store(true, Ordering::Release);
            })
        };
        let node = |completed: Arc<Completed>, durable: Arc<[AtomicBool; 3]>, stop: Arc<AtomicBool>| {
            let mut cursor = completed.cursor();
            let mut last = 0;
            loop {
                let stopped = stop.load(Ordering::Acquire);
                if let Some(checkpoint) = cursor.take(&completed) {
                    assert!(checkpoint > last, "checkpoint {checkpoint} after {last}: taken twice or going back");
                    assert!(
                        durable[checkpoint as usize].load(Ordering::Relaxed),
                        "checkpoint {checkpoint} not durable"
                    );
                    last = checkpoint;
                }
                if stopped || last == 2 {
                    assert_eq!(last, 2, "stopped before the completion announced before Stop");
                    return;
                }
                block_on(cursor.wait(&completed));
            }
        };
        let other = {
            let (completed, durable, stop) = (completed.clone(), durable.clone(), stop.clone());
            thread::spawn(move || node(completed, durable, stop))
        };
        node(completed, durable, stop);
        other.join().unwrap();
        coordinator.join().unwrap();
    });
}

// The alignment board. Nodes 1 and 2 raise their group minimum (10 then 30, 20 then 40); node 0
// exchanges and waits for changes until it learns the final minimum, 30. What it learns is never
// above the value of any node that had published before it looked (read afterwards: values only
// rise), is always a value some node published, and its waits always end.
#[test]
fn board_minimum_is_never_above_what_was_published() {
    check("board_minimum_is_never_above_what_was_published", PREEMPTIONS_LARGE, || {
        let board: Arc<MinimumBoard<u8, u64>> = Arc::new(MinimumBoard::new());
        // Per node: `truth` is set before it publishes, `published` after.
        let truth: Arc<[AtomicU64; 3]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let published: Arc<[AtomicU64; 3]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let publishers: Vec<_> = [(1_u16, [10, 30]), (2, [20, 40])]
            .into_iter()
            .map(|(node, values)| {
                let (board, truth, published) = (board.clone(), truth.clone(), published.clone());
                thread::spawn(move || {
                    for value in values {
                        truth[usize::from(node)].store(value, Ordering::Release);
                        drop(board.exchange(node, &[(0, Some(value))]));
                        published[usize::from(node)].store(value, Ordering::Release);
                    }
                })
            })
            .collect();
        loop {
            let before: Vec<u64> = (1..3).map(|n| published[n].load(Ordering::Acquire)).collect();
            let exchanged = board.exchange(0, &[(0, None)]);
            let learned = exchanged.elsewhere[0].1;
            let after: Vec<u64> = (1..3).map(|n| truth[n].load(Ordering::Acquire)).collect();
            let bound = before.iter().zip(&after).filter(|(before, _)| **before > 0).map(|(_, after)| *after).min();
            if let Some(bound) = bound {
                let learned = learned.expect("a node had published before the look");
                assert!(learned <= bound, "learned minimum {learned} above a published value {bound}");
            }
            assert!(learned.is_none_or(|v| [10, 20, 30, 40].contains(&v)), "learned {learned:?}, never published");
            if learned == Some(30) {
                break;
            }
            block_on(exchanged.changed);
        }
        for publisher in publishers {
            publisher.join().unwrap();
        }
    });
}
