//! The write-back cache in front of RocksDB: entries by cache key (`key group | state key`), and
//! the keys of the dirty ones in order, so that scans merge the cache without sorting all of it.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::ops::Bound;

use sabot_kernel::state::FxHasher;
use smallvec::SmallVec;

pub(super) type CacheKey = SmallVec<[u8; 32]>;
pub(super) type CacheValue = SmallVec<[u8; 16]>;

/// A cached entry: the current value (`None`: absent), and what RocksDB must be told.
#[derive(Clone, Debug)]
pub(super) struct Cached {
    pub value: Option<CacheValue>,
    /// The value differs from what RocksDB (under the frozen caches) holds.
    pub dirty: bool,
    /// RocksDB may hold a value for the key (so removing it needs a tombstone).
    pub in_db: bool,
    /// A frozen cache holds the key: a delete must stay in the cache to shadow it, though
    /// RocksDB needs no tombstone unless `in_db`.
    pub shadows: bool,
    /// The key is in the cache's `dirty_keys` (every dirty entry is).
    indexed: bool,
}

impl Cached {
    /// An entry as read from RocksDB or taken over from a frozen cache.
    pub fn loaded(value: Option<CacheValue>, dirty: bool, in_db: bool, shadows: bool) -> Cached {
        Cached { value, dirty, in_db, shadows, indexed: false }
    }

    /// An entry written without being read: RocksDB and a frozen cache may hold the key.
    pub fn unread() -> Cached {
        Cached { value: None, dirty: false, in_db: true, shadows: true, indexed: false }
    }
}

/// Entries by cache key, and the keys of the dirty ones in key order.
///
/// Invariant: an entry is `indexed` exactly when its key is in `dirty_keys`, and every dirty entry
/// is indexed. An indexed entry may have become clean again (a delete of a key RocksDB never held);
/// readers of the index check `dirty`.
#[derive(Debug, Default)]
pub(super) struct Cache {
    entries: HashMap<CacheKey, Cached, BuildHasherDefault<FxHasher>>,
    dirty_keys: BTreeSet<CacheKey>,
}

/// One cached entry, to change: the changes keep the cache's index of dirty keys.
pub(super) struct Slot<'a> {
    key: &'a [u8],
    cached: &'a mut Cached,
    dirty_keys: &'a mut BTreeSet<CacheKey>,
}

impl Slot<'_> {
    pub fn value(&self) -> Option<&[u8]> {
        self.cached.value.as_deref()
    }

    /// Sets the value (`None`: absent). The entry is dirty unless it is absent and nothing below
    /// the cache (RocksDB, a frozen cache) may hold the key.
    pub fn set(&mut self, value: Option<&[u8]>) {
        self.cached.value = value.map(CacheValue::from_slice);
        self.set_dirty_by_value();
    }

    /// Removes the value, returning it.
    pub fn take(&mut self) -> Option<CacheValue> {
        let taken = self.cached.value.take();
        self.set_dirty_by_value();
        taken
    }

    /// Appends to the value (absent: empty) in place.
    pub fn append(&mut self, bytes: &[u8]) {
        self.cached.value.get_or_insert_with(CacheValue::new).extend_from_slice(bytes);
        self.set_dirty_by_value();
    }

    fn set_dirty_by_value(&mut self) {
        let cached = &mut *self.cached;
        cached.dirty = cached.value.is_some() || cached.in_db || cached.shadows;
        if cached.dirty && !cached.indexed {
            self.dirty_keys.insert(CacheKey::from_slice(self.key));
            cached.indexed = true;
        }
    }
}

impl Cache {
    pub fn with_capacity(capacity: usize) -> Cache {
        Cache { entries: HashMap::with_capacity_and_hasher(capacity, Default::default()), dirty_keys: BTreeSet::new() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.entries.contains_key(key)
    }

    pub fn get(&self, key: &[u8]) -> Option<&Cached> {
        self.entries.get(key)
    }

    /// Adds the entry of a key the cache does not hold.
    pub fn insert(&mut self, key: &[u8], mut cached: Cached) {
        assert!(!cached.indexed, "a new cache entry is not indexed yet");
        if cached.dirty {
            self.dirty_keys.insert(CacheKey::from_slice(key));
            cached.indexed = true;
        }
        let previous = self.entries.insert(CacheKey::from_slice(key), cached);
        assert!(previous.is_none(), "cache entry {key:?} inserted twice");
    }

    /// The entry of `key`, if cached.
    pub fn slot<'a>(&'a mut self, key: &'a [u8]) -> Option<Slot<'a>> {
        let cached = self.entries.get_mut(key)?;
        Some(Slot { key, cached, dirty_keys: &mut self.dirty_keys })
    }

    /// The entry of `key`, inserting `cached` if there is none.
    pub fn slot_or_insert<'a>(&'a mut self, key: &'a [u8], cached: Cached) -> Slot<'a> {
        assert!(!cached.indexed && !cached.dirty, "a new cache entry starts clean");
        let cached = self.entries.entry(CacheKey::from_slice(key)).or_insert(cached);
        Slot { key, cached, dirty_keys: &mut self.dirty_keys }
    }

    /// The dirty entries, in key order.
    pub fn dirty(&self) -> impl Iterator<Item = (&[u8], &Cached)> {
        self.dirty_in(Bound::Unbounded, Bound::Unbounded)
    }

    /// The dirty entries with keys in `[from, to)` (or `from..` if `to` is unbounded), in key order.
    pub fn dirty_in<'a>(
        &'a self,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a Cached)> + 'a {
        self.dirty_keys.range::<[u8], _>((from, to)).filter_map(|key| {
            let cached = self.entries.get(key.as_slice()).expect("an indexed key is cached");
            cached.dirty.then_some((key.as_slice(), cached))
        })
    }

    /// Keeps only the entries `keep` accepts. Rebuilt rather than `retain`ed: erasing in place
    /// leaves tombstones that every later lookup of an absent key (the common case) would have
    /// to probe past.
    pub fn keep_only(&mut self, keep: impl Fn(&Cached) -> bool, capacity: usize) {
        let old = std::mem::replace(self, Cache::with_capacity(capacity));
        for (key, mut cached) in old.entries.into_iter().filter(|(_, cached)| keep(cached)) {
            cached.indexed = cached.dirty;
            if cached.dirty {
                self.dirty_keys.insert(key.clone());
            }
            self.entries.insert(key, cached);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.dirty_keys.clear();
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Cached)> {
        self.entries.iter().map(|(key, cached)| (key.as_slice(), cached))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the index of dirty keys follows every change, so ordered reads see exactly the dirty
    // entries. Method: a scripted sequence of writes, deletes and a rebuild.
    #[test]
    fn dirty_index_follows_changes() {
        let mut cache = Cache::with_capacity(8);
        cache.insert(b"b", Cached::loaded(Some(CacheValue::from_slice(b"1")), false, true, false));
        cache.slot(b"b").unwrap().set(Some(b"2"));
        // Written without a read: it may shadow RocksDB, so a delete stays dirty.
        cache.slot_or_insert(b"a", Cached::unread()).set(None);
        // Read as absent, then written and deleted: RocksDB needs nothing.
        cache.insert(b"c", Cached::loaded(None, false, false, false));
        cache.slot(b"c").unwrap().append(b"x");
        let dirty: Vec<&[u8]> = cache.dirty().map(|(key, _)| key).collect();
        assert_eq!(dirty, [b"a", b"b", b"c"]);
        assert_eq!(cache.slot(b"c").unwrap().take().as_deref(), Some(&b"x"[..]));
        let dirty: Vec<&[u8]> = cache.dirty().map(|(key, _)| key).collect();
        assert_eq!(dirty, [b"a", b"b"]);
        let from_b: Vec<&[u8]> = cache.dirty_in(Bound::Included(b"b"), Bound::Unbounded).map(|(k, _)| k).collect();
        assert_eq!(from_b, [b"b"]);
        cache.keep_only(|cached| cached.dirty || cached.value.is_some(), 8);
        assert_eq!(cache.len(), 2);
        cache.slot_or_insert(b"c", Cached::unread()).append(b"y");
        let dirty: Vec<&[u8]> = cache.dirty().map(|(key, _)| key).collect();
        assert_eq!(dirty, [b"a", b"b", b"c"]);
    }
}
