//! Grouping many items by a key with few values, in one pass (a counting sort).
//!
//! A restore groups every block of its plan twice before its first frame can go out: by its
//! hash's first 16 bits
//! ([`ChunkIndex::order_key`](super::chunk_index::ChunkIndex::order_key)), so that the lookups
//! walk the index's arrays in order, and by pack, to read each pack once in order. A comparison
//! sort of 640k blocks took about 50 ms of the wait; grouping them by a small key costs two
//! passes over them.

/// `items` grouped by `key_of` (each below `keys`), in increasing key order, keeping their
/// order within a key. `items` is gone through twice: once to count, once to place.
pub(crate) fn grouped_by<T: Copy>(
    items: impl Iterator<Item = T> + Clone,
    keys: usize,
    key_of: impl Fn(&T) -> usize,
) -> Vec<T> {
    // Where each key's items start in the result, then where the next of them goes.
    let mut next = vec![0usize; keys];
    let mut len = 0;
    for item in items.clone() {
        next[key_of(&item)] += 1;
        len += 1;
    }
    let Some(first) = items.clone().next() else {
        return Vec::new();
    };
    let mut start = 0;
    for slot in &mut next {
        (*slot, start) = (start, start + *slot);
    }
    let mut grouped = vec![first; len];
    for item in items {
        let at = &mut next[key_of(&item)];
        grouped[*at] = item;
        *at += 1;
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_key_in_key_order_keeping_the_order_within_a_key() {
        let items = [(3, 'a'), (0, 'b'), (3, 'c'), (1, 'd'), (0, 'e')];
        let grouped = grouped_by(items.into_iter(), 5, |(key, _)| *key);
        assert_eq!(grouped, [(0, 'b'), (0, 'e'), (1, 'd'), (3, 'a'), (3, 'c')]);
        assert!(grouped_by(std::iter::empty(), 0, |(key, _): &(usize, char)| *key).is_empty());
    }
}
