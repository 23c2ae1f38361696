//! Who follows which bug on one feed: the hub's index for fan-out.
//!
//! Owned by the hub's thread alone (no lock); it holds connections' slots
//! ([`super::connections`]), never connections, so it must never be the
//! only place a connection is remembered: [`super::Hub`] keeps each
//! connection's own bug set, from which every entry here is removed when
//! the connection leaves, before its slot can be reused.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use super::connections::Slot;
use crate::notification::BugId;

/// Bug → connections' slots, for one feed.
///
/// The map holds an entry for every bug anyone follows, up to twice as
/// many entries as bugs just after it grows, so an entry's size is most of
/// what a subscription costs when every connection follows bugs of its own.
/// Most bugs have a single follower: they sit in `alone`, whose entry (a
/// bug and a slot) takes 8 bytes, where one map for every case needs 16 or
/// more. A bug is in `alone` exactly when it has one follower, in `shared`
/// exactly when it has more.
#[derive(Default)]
pub struct BugIndex {
    alone: HashMap<BugId, Slot>,
    shared: HashMap<BugId, Box<Subscribers>>,
}

impl BugIndex {
    /// `conn` follows `bug` (again: no change).
    pub fn insert(&mut self, bug: BugId, conn: Slot) {
        if let Some(subscribers) = self.shared.get_mut(&bug) {
            subscribers.insert(conn);
            return;
        }
        match self.alone.entry(bug) {
            Entry::Vacant(slot) => {
                slot.insert(conn);
            }
            Entry::Occupied(slot) if *slot.get() == conn => {}
            Entry::Occupied(slot) => {
                let first = slot.remove();
                self.shared
                    .insert(bug, Box::new(Subscribers::Few(vec![first, conn])));
            }
        }
    }

    /// `conn` no longer follows `bug` (if it did).
    pub fn remove(&mut self, bug: BugId, conn: Slot) {
        if let Entry::Occupied(slot) = self.alone.entry(bug) {
            if *slot.get() == conn {
                slot.remove();
            }
            return;
        }
        if let Entry::Occupied(mut slot) = self.shared.entry(bug)
            && let Some(last) = slot.get_mut().remove(conn)
        {
            slot.remove();
            self.alone.insert(bug, last);
        }
    }

    /// Calls `f` with each connection that follows `bug`; past
    /// [`FEW_SUBSCRIBERS`], in ascending slot order.
    pub fn for_each(&self, bug: BugId, mut f: impl FnMut(Slot)) {
        if let Some(conn) = self.alone.get(&bug) {
            f(*conn);
        } else if let Some(subscribers) = self.shared.get(&bug) {
            subscribers.for_each(f);
        }
    }
}

/// The followers of a bug that has two or more, boxed in `shared` so that
/// its entry stays 16 bytes.
enum Subscribers {
    /// Up to [`FEW_SUBSCRIBERS`], in the order they came: searched faster
    /// than a tree.
    Few(Vec<Slot>),
    /// In slot order, which is the order of the hub's table of connections.
    Many(BTreeSet<Slot>),
}

/// Past this many subscribers a bug's list becomes a set: removing a
/// connection stays O(log n) for a bug that thousands follow.
const FEW_SUBSCRIBERS: usize = 16;

impl Subscribers {
    fn insert(&mut self, conn: Slot) {
        match self {
            Subscribers::Few(few) if few.contains(&conn) => {}
            Subscribers::Few(few) if few.len() < FEW_SUBSCRIBERS => few.push(conn),
            Subscribers::Few(few) => {
                let mut many: BTreeSet<Slot> = few.iter().copied().collect();
                many.insert(conn);
                *self = Subscribers::Many(many);
            }
            Subscribers::Many(many) => {
                many.insert(conn);
            }
        }
    }

    /// Removes `conn`; the one follower left, if only one is.
    fn remove(&mut self, conn: Slot) -> Option<Slot> {
        match self {
            Subscribers::Few(few) => {
                few.retain(|c| *c != conn);
                match few.as_slice() {
                    [last] => Some(*last),
                    _ => None,
                }
            }
            Subscribers::Many(many) => {
                many.remove(&conn);
                match many.len() {
                    1 => many.iter().next().copied(),
                    _ => None,
                }
            }
        }
    }

    fn for_each(&self, f: impl FnMut(Slot)) {
        match self {
            Subscribers::Few(few) => few.iter().copied().for_each(f),
            Subscribers::Many(many) => many.iter().copied().for_each(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followers(index: &BugIndex, bug: BugId) -> Vec<Slot> {
        let mut seen = Vec::new();
        index.for_each(bug, |c| seen.push(c));
        seen.sort_unstable();
        seen
    }

    /// Whether `bug` sits where a bug with `n` followers belongs.
    fn placed(index: &BugIndex, bug: BugId, n: usize) -> bool {
        match n {
            0 => !index.alone.contains_key(&bug) && !index.shared.contains_key(&bug),
            1 => index.alone.contains_key(&bug) && !index.shared.contains_key(&bug),
            _ => !index.alone.contains_key(&bug) && index.shared.contains_key(&bug),
        }
    }

    #[test]
    fn each_connection_is_kept_once_through_every_representation() {
        let (bug, other) = (BugId::new(5).expect("bug"), BugId::new(6).expect("bug"));
        let mut index = BugIndex::default();
        index.insert(other, 1000);
        let n = 3 * FEW_SUBSCRIBERS as Slot;
        for conn in (0..n).chain(0..n) {
            index.insert(bug, conn);
            let seen = followers(&index, bug);
            let expected: Vec<Slot> = (0..=conn.max(seen.len() as Slot - 1)).collect();
            assert_eq!(seen, expected);
            assert!(placed(&index, bug, seen.len()));
        }
        assert!(matches!(
            index.shared.get(&bug).map(|s| &**s),
            Some(Subscribers::Many(_))
        ));
        for conn in 0..n {
            index.remove(bug, conn);
            let left = (n - conn - 1) as usize;
            assert_eq!(followers(&index, bug).len(), left);
            assert!(placed(&index, bug, left), "{left} left");
        }
        // Someone else's bug and a connection that never followed: no change.
        index.remove(other, 7);
        assert_eq!(followers(&index, other), vec![1000]);
        assert_eq!(std::mem::size_of::<(BugId, Slot)>(), 8);
        assert_eq!(std::mem::size_of::<(BugId, Box<Subscribers>)>(), 16);
    }

    #[test]
    fn a_list_left_with_one_follower_goes_back_to_alone() {
        let bug = BugId::new(9).expect("bug");
        let mut index = BugIndex::default();
        index.insert(bug, 1);
        index.insert(bug, 2);
        index.insert(bug, 3);
        index.remove(bug, 1);
        assert!(placed(&index, bug, 2));
        index.remove(bug, 3);
        assert!(placed(&index, bug, 1));
        assert_eq!(followers(&index, bug), vec![2]);
        index.insert(bug, 2);
        assert_eq!(followers(&index, bug), vec![2]);
        index.remove(bug, 2);
        assert!(placed(&index, bug, 0));
    }
}
