//! The primitives' contracts in a normal build, on real threads: the same properties the loom
//! models check exhaustively (`tests/loom.rs`), here on larger inputs and one schedule each.
#![cfg(not(loom))]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;

use sabot_sync::board::MinimumBoard;
use sabot_sync::channel::{self, Closed, TryRecvError, TrySendError};
use sabot_sync::completed::Completed;
use sabot_sync::credits::{BeyondWindow, ReceiveCredits, SendCredits};
use sabot_sync::handoff::{Handoff, Outcome};
use sabot_sync::settle::Settle;
use sabot_sync::signal::Signal;

/// Wakes a parked thread.
struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` on this thread, parking while it is pending.
fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        thread::park();
    }
}

/// Polls `future` once.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    std::pin::Pin::new(future).poll(&mut Context::from_waker(&waker))
}

// Goal: the channel delivers everything once, FIFO per sender, never above capacity, under
// contention. Method: four threads send 2,000 numbered elements each into a channel of 4.
#[test]
fn channel_delivers_everything_in_sender_order() {
    let (sender, mut receiver) = channel::bounded::<(usize, u32)>(4);
    let senders: Vec<_> = (0..4)
        .map(|id| {
            let sender = sender.clone();
            thread::spawn(move || {
                for index in 0..2_000 {
                    block_on(sender.send((id, index))).expect("the receiver is open");
                }
            })
        })
        .collect();
    drop(sender);
    let mut next = [0_u32; 4];
    while let Some((id, index)) = block_on(receiver.recv()) {
        assert!(receiver.len() <= 4, "{} queued", receiver.len());
        assert_eq!(index, next[id], "sender {id} out of order");
        next[id] += 1;
    }
    assert_eq!(next, [2_000; 4]);
    for sender in senders {
        sender.join().unwrap();
    }
}

// Goal: a full channel refuses, a closed one fails, and `writable` reports both. Method: steps.
#[test]
fn channel_refuses_when_full_and_fails_when_closed() {
    let (sender, mut receiver) = channel::bounded::<u8>(1);
    assert_eq!(receiver.try_recv(), Err(TryRecvError::Empty));
    sender.try_send(1).unwrap();
    assert_eq!(sender.try_send(2), Err(TrySendError::Full(2)));
    let mut writable = Box::pin(sender.writable());
    assert!(poll_once(&mut writable).is_pending(), "a full channel is not writable");
    assert_eq!(receiver.try_recv(), Ok(1));
    assert_eq!(poll_once(&mut writable), Poll::Ready(Ok(())));
    let mut writable = Box::pin({
        sender.try_send(3).unwrap();
        sender.writable()
    });
    assert!(poll_once(&mut writable).is_pending());
    drop(receiver);
    assert_eq!(poll_once(&mut writable), Poll::Ready(Err(Closed)));
    assert_eq!(sender.try_send(4), Err(TrySendError::Closed(4)));
}

// Goal: a dropped `Notified` leaves the signal's list; a notify completes one made before it.
#[test]
fn signal_forgets_dropped_waiters() {
    let signal = Signal::new();
    let mut waiting = Box::pin(signal.notified());
    assert!(poll_once(&mut waiting).is_pending());
    assert_eq!(signal.waiter_count(), 1);
    drop(waiting);
    assert_eq!(signal.waiter_count(), 0);
    let mut made_before = Box::pin(signal.notified());
    signal.notify();
    assert_eq!(poll_once(&mut made_before), Poll::Ready(()));
    let mut made_after = Box::pin(signal.notified());
    assert!(poll_once(&mut made_after).is_pending(), "a notify before it was made does not count");
}

// Goal: writes of one subtask are taken in submission order whatever order the writers finish
// in, each once, an abandoned one as abandoned. Method: 64 writes on two lanes, finished in
// reverse order by threads, one of them dropped.
#[test]
fn handoff_takes_in_submission_order_per_lane() {
    let handoff: Arc<Handoff<u8, u32, u32>> = Arc::new(Handoff::new(64));
    let tickets: Vec<_> = (0..64).map(|id| (id, Handoff::submit(&handoff, (id % 2) as u8, id))).collect();
    let writers: Vec<_> = tickets
        .into_iter()
        .rev()
        .map(|(id, ticket)| {
            thread::spawn(move || match id {
                13 => drop(ticket),
                _ => ticket.complete(id * 10),
            })
        })
        .collect();
    let mut next = [0_u32, 1];
    let mut taken = 0;
    while taken < 64 {
        block_on(handoff.ready());
        while let Some(handed) = handoff.take() {
            let lane = usize::from(handed.lane);
            assert_eq!(handed.id, next[lane], "lane {lane} out of order");
            let expected = if handed.id == 13 { Outcome::Abandoned } else { Outcome::Done(handed.id * 10) };
            assert_eq!(handed.outcome, expected);
            next[lane] += 2;
            taken += 1;
        }
    }
    assert_eq!(handoff.pending_count(), 0);
    for writer in writers {
        writer.join().unwrap();
    }
}

// Goal: a cursor takes only the newest completion, once; an older publish changes nothing.
#[test]
fn completed_subsumes_earlier_checkpoints() {
    let completed = Completed::new();
    let mut cursor = completed.cursor();
    assert_eq!(cursor.take(&completed), None);
    completed.publish(3);
    completed.publish(5);
    completed.publish(4);
    assert_eq!(cursor.take(&completed), Some(5));
    assert_eq!(cursor.take(&completed), None);
    let mut waiting = Box::pin(cursor.wait(&completed));
    assert!(poll_once(&mut waiting).is_pending());
    completed.publish(6);
    assert_eq!(poll_once(&mut waiting), Poll::Ready(()));
    drop(waiting);
    assert_eq!(cursor.take(&completed), Some(6));
}

// Goal: the board's minimum is over the other nodes, per group, and `None` holds nothing back.
#[test]
fn board_minimum_over_other_nodes() {
    let board: MinimumBoard<&str, i64> = MinimumBoard::new();
    let exchanged = board.exchange(0, &[("g", Some(5)), ("h", Some(1))]);
    assert_eq!(exchanged.elsewhere, [("g", None), ("h", None)]);
    drop(board.exchange(1, &[("g", Some(7))]));
    drop(board.exchange(2, &[("g", None)]));
    assert_eq!(board.exchange(1, &[("g", Some(7))]).elsewhere, [("g", Some(5))]);
    assert_eq!(board.exchange(0, &[("g", Some(9)), ("h", Some(1))]).elsewhere, [("g", Some(7)), ("h", None)]);
}

// Goal: settled work runs once and every caller gets its result. Method: eight threads settle.
#[test]
fn settle_runs_once_for_many_callers() {
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let settle = Arc::new(Settle::new(7_u32));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (settle, runs) = (settle.clone(), runs.clone());
            thread::spawn(move || {
                settle.settle(|work| {
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    work * 2
                })
            })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.join().unwrap(), 14);
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(settle.is_settled());
}

// Goal: credits stop a sender at the window, a grant or a loss ends its wait, and a peer that
// sends or grants beyond the window is refused. Method: steps.
#[test]
fn credits_bound_the_window() {
    let send: SendCredits<u8, u16> = SendCredits::new(2, [0]);
    assert!(send.try_take(&0) && send.try_take(&0));
    assert!(!send.try_take(&0), "a third credit of a window of two");
    let mut writable = Box::pin(send.writable(&0, &1));
    assert!(poll_once(&mut writable).is_pending());
    send.grant(&0, 1).unwrap();
    assert_eq!(poll_once(&mut writable), Poll::Ready(Ok(())));
    drop(writable);
    assert_eq!(send.grant(&0, 2), Err(BeyondWindow { window: 2 }));
    let mut writable = Box::pin(send.writable(&0, &1));
    assert!(send.try_take(&0));
    send.lose(1, "gone".into());
    assert_eq!(poll_once(&mut writable), Poll::Ready(Err("gone".to_string())));
    let receive: ReceiveCredits<u8> = ReceiveCredits::new(2, [0]);
    assert!(receive.receive(&0).is_ok() && receive.receive(&0).is_ok());
    assert_eq!(receive.receive(&0), Err(BeyondWindow { window: 2 }));
    receive.grant(&0, 2);
    assert!(receive.receive(&0).is_ok());
}

// Goal: a process's minima over its own nodes leave out the node that stands for the other
// processes, and a group only that node published; a node's exchange counts it like any node.
#[test]
fn board_minima_except_a_node() {
    let board: MinimumBoard<&str, u64> = MinimumBoard::new();
    drop(board.exchange(0, &[("a", Some(30)), ("b", None)]));
    drop(board.exchange(1, &[("a", Some(20))]));
    drop(board.exchange(u16::MAX, &[("a", Some(5)), ("c", Some(1))]));
    assert_eq!(board.minima_except(u16::MAX), vec![("a", Some(20)), ("b", None)]);
    assert_eq!(board.minima_except(1), vec![("a", Some(5)), ("b", None), ("c", Some(1))]);
    assert_eq!(board.exchange(0, &[("a", Some(30))]).elsewhere, vec![("a", Some(5))]);
}
