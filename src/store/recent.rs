//! The documents this process wrote lately, by key and with their hash, so
//! that a batch which needs a stored document (an update's patch, a delete's
//! `previous`) can take it from memory instead of having PostgreSQL detoast
//! it, print it as text and send it.
//!
//! A remembered document is used only when the row the batch reads carries
//! the same hash: the canonical hash names the canonical text, so the text
//! here is then the stored document's, whoever wrote the row last. Anything
//! that writes behind this process's back (another daemon, `scramjet ingest`,
//! SQL) changes the hash, and the batch reads the row as before. That is why
//! a document may be remembered before its transaction commits: if the
//! transaction rolls back, the row keeps its old hash and the entry is never
//! used.
//!
//! Bounded by the bytes of the texts held (`pipeline.document_cache_bytes`);
//! past the bound, the documents written longest ago go first.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use super::batch::Key;

/// A remembered document: its canonical hash and canonical text.
#[derive(Debug)]
pub(crate) struct Remembered {
    /// The canonical hash of `canonical`.
    pub hash: String,
    /// The canonical text, as written to `resources`.
    pub canonical: String,
}

/// The documents written lately; shared by every batch of the process.
#[derive(Debug)]
pub(crate) struct RecentDocuments {
    /// Most bytes of canonical text held (0 holds nothing).
    capacity: usize,
    inner: Mutex<Inner>,
    hits: prometheus::IntCounter,
    misses: prometheus::IntCounter,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each key's entry, and the number it was written under.
    entries: HashMap<Key, (Arc<Remembered>, u64)>,
    /// Keys in the order written, with the number each was written under
    /// then: an older number is an entry since replaced or removed.
    order: VecDeque<(Key, u64)>,
    /// Bytes of canonical text held.
    bytes: usize,
    /// The next entry's number.
    next: u64,
}

impl RecentDocuments {
    /// Holds up to `capacity` bytes of canonical text; counts what it saves
    /// in `hits` and what it cannot in `misses`.
    pub(crate) fn new(
        capacity: usize,
        hits: prometheus::IntCounter,
        misses: prometheus::IntCounter,
    ) -> RecentDocuments {
        RecentDocuments {
            capacity,
            inner: Mutex::default(),
            hits,
            misses,
        }
    }

    /// What is remembered for each of `keys` (`None` where nothing is).
    pub(crate) fn lookup(&self, keys: &[Key]) -> Vec<Option<Arc<Remembered>>> {
        if self.capacity == 0 {
            return vec![None; keys.len()];
        }
        let inner = self.inner.lock().expect("never poisoned");
        keys.iter()
            .map(|k| inner.entries.get(k).map(|(r, _)| r.clone()))
            .collect()
    }

    /// Counts a stored document taken from memory (`hit`) or read from
    /// the table.
    pub(crate) fn count(&self, hit: bool) {
        if hit {
            self.hits.inc();
        } else {
            self.misses.inc();
        }
    }

    /// Remembers `canonical` (with its `hash`) as the document of `key`,
    /// in place of any earlier one; forgets the oldest past the bound.
    pub(crate) fn remember(&self, key: Key, hash: String, canonical: String) {
        if canonical.len() > self.capacity {
            self.forget(&key);
            return;
        }
        let mut inner = self.inner.lock().expect("never poisoned");
        let n = inner.next;
        inner.next += 1;
        inner.bytes += canonical.len();
        let entry = Arc::new(Remembered { hash, canonical });
        if let Some((old, _)) = inner.entries.insert(key.clone(), (entry, n)) {
            inner.bytes -= old.canonical.len();
        }
        inner.order.push_back((key, n));
        while inner.bytes > self.capacity {
            let Some((oldest, at)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&oldest).is_some_and(|(_, m)| *m == at) {
                let (gone, _) = inner.entries.remove(&oldest).expect("just found");
                inner.bytes -= gone.canonical.len();
            }
        }
        // Replaced entries leave stale places in `order`: drop them once
        // they outnumber the live ones, so `order` stays bounded too.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, at)| entries.get(k).is_some_and(|(_, m)| m == at));
        }
    }

    /// Forgets the document of `key` (deleted, or too large to keep).
    pub(crate) fn forget(&self, key: &Key) {
        let mut inner = self.inner.lock().expect("never poisoned");
        if let Some((gone, _)) = inner.entries.remove(key) {
            inner.bytes -= gone.canonical.len();
        }
    }

    /// Bytes of canonical text held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().expect("never poisoned").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> RecentDocuments {
        let c = || prometheus::IntCounter::new("c", "c").expect("valid");
        RecentDocuments::new(capacity, c(), c())
    }

    fn key(id: &str) -> Key {
        ("t".to_owned(), id.to_owned())
    }

    fn hash_of(r: &Option<Arc<Remembered>>) -> Option<&str> {
        r.as_ref().map(|r| r.hash.as_str())
    }

    #[test]
    fn the_latest_document_of_a_key_is_the_one_remembered() {
        let c = cache(100);
        c.remember(key("a"), "h1".into(), "{\"v\":1}".into());
        c.remember(key("a"), "h2".into(), "{\"v\":22}".into());
        let found = c.lookup(&[key("a"), key("b")]);
        assert_eq!(hash_of(&found[0]), Some("h2"));
        assert_eq!(found[0].as_ref().unwrap().canonical, "{\"v\":22}");
        assert!(found[1].is_none());
        assert_eq!(c.bytes(), 8, "the replaced text no longer counts");
        c.forget(&key("a"));
        assert!(c.lookup(&[key("a")])[0].is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn past_the_bound_the_documents_written_longest_ago_go_first() {
        let c = cache(30);
        for id in ["a", "b", "c"] {
            c.remember(key(id), id.into(), "0123456789".into());
        }
        // Rewriting "a" makes it the newest: "b" is now the oldest.
        c.remember(key("a"), "a2".into(), "0123456789".into());
        c.remember(key("d"), "d".into(), "0123456789".into());
        let found = c.lookup(&[key("a"), key("b"), key("c"), key("d")]);
        let hashes: Vec<Option<&str>> = found.iter().map(hash_of).collect();
        assert_eq!(hashes, [Some("a2"), None, Some("c"), Some("d")]);
        assert!(c.bytes() <= 30, "{} bytes held", c.bytes());
    }

    #[test]
    fn a_document_larger_than_the_bound_is_not_kept_and_displaces_its_older_one() {
        let c = cache(10);
        c.remember(key("a"), "h1".into(), "0123".into());
        c.remember(key("a"), "h2".into(), "0123456789abc".into());
        assert!(c.lookup(&[key("a")])[0].is_none());
        assert_eq!(c.bytes(), 0);
        let none = cache(0);
        none.remember(key("a"), "h".into(), "{}".into());
        assert!(none.lookup(&[key("a")])[0].is_none());
    }

    #[test]
    fn rewriting_one_key_over_and_over_keeps_the_order_bounded() {
        let c = cache(1000);
        for i in 0..10_000 {
            c.remember(key("a"), format!("h{i}"), "{}".into());
        }
        let inner = c.inner.lock().unwrap();
        assert!(inner.order.len() <= 2 * inner.entries.len() + 65);
        assert_eq!(inner.bytes, 2);
    }
}
