//! The board on which the nodes of one process share a minimum per group (the driver's
//! watermark alignment: each node publishes the minimum watermark of each alignment group over
//! its own sources, and learns the minimum over the other nodes).
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): [`MinimumBoard::exchange`]
//! publishes a node's values and reads the others' in one step, so a node never learns a minimum
//! above the true minimum of what the other nodes published before it looked (a source is paused
//! only by drift over a minimum that was real), and never a value no node published; `None`
//! (nothing active) holds nothing back. The [`Notified`] it returns was registered before the
//! look: a node that found nothing new and waits on it wakes for any value another node publishes
//! afterwards.

use std::collections::BTreeMap;

use crate::shim::{lock, Mutex};
use crate::signal::{Notified, Signal};

/// Entries (group, node) on a board, at most: groups and nodes are few and fixed by the plan.
pub const BOARD_ENTRIES_MAX: usize = 1 << 16;

pub struct MinimumBoard<G, V> {
    /// The newest value each node published for each group; `None`: nothing to hold back.
    values: Mutex<BTreeMap<(G, u16), Option<V>>>,
    /// Notified when an exchange changed a value.
    changed: Signal,
}

/// What a node learned in an exchange.
pub struct Exchanged<'a, G, V> {
    /// For each group the node published: the minimum over the other nodes (`None`: none holds
    /// it back).
    pub elsewhere: Vec<(G, Option<V>)>,
    /// Completes at the next change after this exchange looked.
    pub changed: Notified<'a>,
}

impl<G: Ord + Clone, V: Ord + Copy> MinimumBoard<G, V> {
    pub fn new() -> MinimumBoard<G, V> {
        MinimumBoard { values: Mutex::new(BTreeMap::new()), changed: Signal::new() }
    }

    /// Publishes `node`'s value of each group in `mine`, and reads the minimum over the other
    /// nodes of each of them.
    pub fn exchange(&self, node: u16, mine: &[(G, Option<V>)]) -> Exchanged<'_, G, V> {
        let changed = self.changed.notified();
        let mut published = false;
        let elsewhere = {
            let mut values = lock(&self.values);
            for (group, value) in mine {
                published |= values.insert((group.clone(), node), *value) != Some(*value);
            }
            assert!(values.len() <= BOARD_ENTRIES_MAX, "{} entries on an alignment board", values.len());
            let other = |group: &G| {
                let entries = values.range((group.clone(), 0)..=(group.clone(), u16::MAX));
                entries.filter(|((_, n), _)| *n != node).filter_map(|(_, value)| *value).min()
            };
            mine.iter().map(|(group, _)| (group.clone(), other(group))).collect()
        };
        if published {
            self.changed.notify();
        }
        Exchanged { elsewhere, changed }
    }
}

impl<G: Ord + Clone, V: Ord + Copy> MinimumBoard<G, V> {
    /// Per group, in group order, the minimum over every node but `excluded` (`None`: none
    /// holds it back); groups only `excluded` published are left out.
    pub fn minima_except(&self, excluded: u16) -> Vec<(G, Option<V>)> {
        let values = lock(&self.values);
        let mut out: Vec<(G, Option<V>)> = Vec::new();
        for ((group, _), value) in values.iter().filter(|((_, node), _)| *node != excluded) {
            match out.last_mut() {
                Some((last, so_far)) if last == group => *so_far = (*so_far).into_iter().chain(*value).min(),
                _ => out.push((group.clone(), *value)),
            }
        }
        out
    }
}

impl<G: Ord + Clone, V: Ord + Copy> Default for MinimumBoard<G, V> {
    fn default() -> MinimumBoard<G, V> {
        MinimumBoard::new()
    }
}
