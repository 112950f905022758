//! The bounded channel between nodes of one process: many senders, one receiver, FIFO, at most
//! `capacity` elements queued. A full channel refuses `try_send`, which is the driver's
//! backpressure: the sending node holds the element, its outbox fills, and the kernel pauses its
//! sources.
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): an element sent is received
//! exactly once, in the order of its sender's sends; the queue never holds more than `capacity`;
//! a receiver waiting in [`Receiver::recv`] wakes for every send, a sender waiting in
//! [`Sender::writable`] for every receive and for the receiver's drop; once every sender is
//! dropped the receiver gets what is queued, then `None`; once the receiver is dropped every send
//! fails (the node that consumed the channel stopped: a failure, never silent loss).

use std::collections::VecDeque;
use std::future::Future;

use crate::shim::{lock, Arc, Mutex};
use crate::signal::Signal;

/// A channel of `capacity` (at least one) elements.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "a channel of capacity 0");
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::with_capacity(capacity), sender_count: 1, receiver_open: true }),
        readable: Signal::new(),
        writable: Signal::new(),
        capacity,
    });
    (Sender { shared: shared.clone() }, Receiver { shared })
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Notified after every send, and when the last sender goes.
    readable: Signal,
    /// Notified after every receive, and when the receiver goes.
    writable: Signal,
    capacity: usize,
}

impl<T> Shared<T> {
    /// Takes the oldest element (the receiver's side).
    fn pop(&self) -> Result<T, TryRecvError> {
        let item = {
            let mut state = lock(&self.state);
            match state.items.pop_front() {
                Some(item) => item,
                None if state.sender_count == 0 => return Err(TryRecvError::Disconnected),
                None => return Err(TryRecvError::Empty),
            }
        };
        self.writable.notify();
        Ok(item)
    }
}

struct State<T> {
    items: VecDeque<T>,
    sender_count: usize,
    receiver_open: bool,
}

/// Why `try_send` gave the element back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// `capacity` elements are queued: wait for [`Sender::writable`] and try again.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// Why `try_recv` returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    Empty,
    /// Nothing is queued and every sender is gone.
    Disconnected,
}

/// The receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A sending end; clones send into the same channel.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving end.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item`, or gives it back when the channel is full or closed.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut state = lock(&self.shared.state);
            if !state.receiver_open {
                return Err(TrySendError::Closed(item));
            }
            if state.items.len() >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
            assert!(
                state.items.len() <= self.shared.capacity,
                "channel holds {} of capacity {}",
                state.items.len(),
                self.shared.capacity
            );
        }
        self.shared.readable.notify();
        Ok(())
    }

    /// Completes once the channel has room or is closed (`Err`). Another sender may take the room
    /// first: callers retry `try_send`. It owns what it needs, so it may outlive the sender.
    pub fn writable(&self) -> impl Future<Output = Result<(), Closed>> + Send + 'static
    where
        T: Send + 'static,
    {
        let shared = self.shared.clone();
        async move {
            loop {
                // Registered before looking, so that a receive between the look and the wait wakes it.
                let notified = shared.writable.notified();
                {
                    let state = lock(&shared.state);
                    if !state.receiver_open {
                        return Err(Closed);
                    }
                    if state.items.len() < shared.capacity {
                        return Ok(());
                    }
                }
                notified.await;
            }
        }
    }

    /// Sends `item`, waiting for room; gives it back when the receiver is gone.
    pub async fn send(&self, mut item: T) -> Result<(), T>
    where
        T: Send + 'static,
    {
        loop {
            item = match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(item)) => return Err(item),
                Err(TrySendError::Full(item)) => item,
            };
            if self.writable().await.is_err() {
                return Err(item);
            }
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        lock(&self.shared.state).sender_count += 1;
        Sender { shared: self.shared.clone() }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut state = lock(&self.shared.state);
            assert!(state.sender_count > 0, "a sender dropped twice");
            state.sender_count -= 1;
            state.sender_count == 0
        };
        if last {
            self.shared.readable.notify();
        }
    }
}

impl<T> Receiver<T> {
    /// The next element, if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.shared.pop()
    }

    /// Waits for the next element; `None` once every sender is gone and nothing is queued.
    /// Cancel-safe: an element leaves the channel only when this returns it.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            // Registered before looking, so that a send between the look and the wait wakes it.
            let notified = self.shared.readable.notified();
            match self.shared.pop() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }

    /// Elements queued now.
    pub fn len(&self) -> usize {
        lock(&self.shared.state).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = lock(&self.shared.state);
            state.receiver_open = false;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: an element's drop may do anything.
        drop(items);
        self.shared.writable.notify();
    }
}
