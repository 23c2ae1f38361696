//! The hub's connections, each in a slot of one dense table.
//!
//! The fan-out visits every follower of a bug: found through a hash map of
//! connection ids, each visit was a cache miss at a random address (most of
//! the hub's time in a fan-out to 10,000, in profiles). Here the bug index
//! holds slots, and visits them in ascending order through one array, which
//! the processor reads ahead. Owned by the hub's thread alone (no lock). A
//! slot is reused only after its connection is removed, and the hub removes
//! a connection's index entries in the same step: no slot may be left in
//! the index after that.

use std::collections::HashMap;

use super::ConnId;

/// A connection's place in [`Connections`]; at most `u32::MAX` connections
/// at a time, far above the connection limit.
pub type Slot = u32;

/// Connection id → slot → `T`.
pub struct Connections<T> {
    entries: Vec<Option<T>>,
    /// Slots of removed connections, to be reused first.
    free: Vec<Slot>,
    slots: HashMap<ConnId, Slot>,
}

impl<T> Default for Connections<T> {
    fn default() -> Self {
        Connections {
            entries: Vec::new(),
            free: Vec::new(),
            slots: HashMap::new(),
        }
    }
}

impl<T> Connections<T> {
    /// Adds `conn` (replacing what it had, if it was there already).
    pub fn insert(&mut self, conn: ConnId, value: T) {
        if let Some(entry) = self.get_mut(conn) {
            *entry = value;
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize] = Some(value);
                slot
            }
            None => {
                self.entries.push(Some(value));
                Slot::try_from(self.entries.len() - 1)
                    .expect("fewer than 2^32 connections at a time")
            }
        };
        self.slots.insert(conn, slot);
    }

    /// `conn`'s slot and value.
    pub fn find_mut(&mut self, conn: ConnId) -> Option<(Slot, &mut T)> {
        let slot = *self.slots.get(&conn)?;
        let value = self.entries.get_mut(slot as usize)?.as_mut()?;
        Some((slot, value))
    }

    /// `conn`'s value, if it is here.
    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut T> {
        self.find_mut(conn).map(|(_, value)| value)
    }

    /// The connection in `slot`, if any.
    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut T> {
        self.entries.get_mut(slot as usize)?.as_mut()
    }

    /// Removes `conn`; its slot (free from now on) and value.
    pub fn remove(&mut self, conn: ConnId) -> Option<(Slot, T)> {
        let slot = self.slots.remove(&conn)?;
        let value = self.entries.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        Some((slot, value))
    }

    /// Every connection's value, in slot order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_connections_slot_goes_to_the_next_and_ids_find_their_own() {
        let mut c = Connections::default();
        c.insert(10, "a");
        c.insert(11, "b");
        c.insert(12, "c");
        assert_eq!(c.find_mut(11).map(|(s, v)| (s, *v)), Some((1, "b")));
        assert_eq!(c.remove(11), Some((1, "b")));
        assert_eq!(c.get_mut(11), None);
        assert_eq!(c.at_mut(1), None);
        // The freed slot is reused, under the new connection's own id.
        c.insert(13, "d");
        assert_eq!(c.find_mut(13).map(|(s, v)| (s, *v)), Some((1, "d")));
        assert_eq!(c.at_mut(1).copied(), Some("d"));
        // Inserting an id again replaces its value in its own slot.
        c.insert(10, "e");
        assert_eq!(c.find_mut(10).map(|(s, v)| (s, *v)), Some((0, "e")));
        let mut all: Vec<&str> = c.values().copied().collect();
        all.sort_unstable();
        assert_eq!(all, ["c", "d", "e"]);
        assert_eq!(c.remove(11), None);
    }
}
