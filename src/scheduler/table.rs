//! The scheduler's connections, each under a small integer [`Key`].
//!
//! The loop's own structures (the due queue, the jobs in flight, the
//! parking) name a connection by its key: a slot number and the slot's
//! generation, copied and compared as one word, so a loop step indexes a
//! vector instead of hashing and comparing a 36-character id. The id is
//! looked up once, where a request names it (`rotate`, a reload, the
//! start's listing, a health answer).
//!
//! A removed connection's slot is reused with the next generation, so a key
//! kept past the removal (a due-queue entry, a job's result) finds nothing,
//! never the connection that took the slot.

use std::collections::HashMap;

use crate::connection::Connection;

/// A connection's place in the [`Table`]: valid until it is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    slot: u32,
    generation: u32,
}

/// One slot: its current generation, and the connection while there is one.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    /// Boxed: a `Connection` is about 1 KB, and a discovery start adds
    /// 10,000 page by page, so each growth of the vector would move all of
    /// them.
    connection: Option<Box<Connection>>,
}

/// The connections, by key and by id.
#[derive(Debug, Default)]
pub(super) struct Table {
    slots: Vec<Slot>,
    /// Slots without a connection, reused first.
    free: Vec<u32>,
    by_id: HashMap<String, Key>,
}

impl Table {
    /// Adds `connection` (whose id is not in the table yet) and answers its
    /// key. One with the same id replaces the one before, whose key then
    /// finds nothing.
    pub(super) fn insert(&mut self, connection: Box<Connection>) -> Key {
        let id = connection.config().id.clone();
        if let Some(old) = self.by_id.get(&id).copied() {
            self.remove(old);
        }
        let key = match self.free.pop() {
            Some(slot) => {
                let entry = &mut self.slots[slot as usize];
                entry.connection = Some(connection);
                Key {
                    slot,
                    generation: entry.generation,
                }
            }
            None => {
                // More than 4 billion connections would need more than a
                // terabyte of memory first.
                let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(Slot {
                    generation: 0,
                    connection: Some(connection),
                });
                Key {
                    slot,
                    generation: 0,
                }
            }
        };
        self.by_id.insert(id, key);
        key
    }

    /// The key of the connection `id`, if there is one.
    pub(super) fn key(&self, id: &str) -> Option<Key> {
        self.by_id.get(id).copied()
    }

    pub(super) fn contains_id(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub(super) fn get(&self, key: Key) -> Option<&Connection> {
        let slot = self.slots.get(key.slot as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.connection.as_deref()
    }

    pub(super) fn get_mut(&mut self, key: Key) -> Option<&mut Connection> {
        let slot = self.slots.get_mut(key.slot as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.connection.as_deref_mut()
    }

    /// Takes the connection out; its key finds nothing from now on.
    pub(super) fn remove(&mut self, key: Key) -> Option<Box<Connection>> {
        let slot = self.slots.get_mut(key.slot as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let connection = slot.connection.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.slot);
        self.by_id.remove(&connection.config().id);
        Some(connection)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every connection with its key, in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Key, &Connection)> {
        self.slots.iter().enumerate().filter_map(|(slot, entry)| {
            let connection = entry.connection.as_deref()?;
            let key = Key {
                slot: u32::try_from(slot).ok()?,
                generation: entry.generation,
            };
            Some((key, connection))
        })
    }

    /// Every connection, in slot order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Connection> {
        self.slots
            .iter()
            .filter_map(|entry| entry.connection.as_deref())
    }

    /// Every connection, in slot order, to change.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Connection> {
        self.slots
            .iter_mut()
            .filter_map(|entry| entry.connection.as_deref_mut())
    }

    /// Every key, in slot order.
    pub(super) fn keys(&self) -> Vec<Key> {
        self.iter().map(|(key, _)| key).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::ConnectionConfig;
    use crate::remote::sts::StsRequest;

    fn connection(id: &str) -> Box<Connection> {
        let config = Arc::new(ConnectionConfig {
            id: id.to_owned(),
            ..ConnectionConfig::default()
        });
        let sts = Arc::new(StsRequest {
            role_arn: None,
            external_id: None,
            session_name: id.to_owned(),
            session_policy: None,
            policy_arns: Vec::new(),
            duration: std::time::Duration::from_secs(3600),
            attribution: Ok(crate::config::ExpandedAttribution::default()),
        });
        Box::new(Connection::new(
            config,
            sts,
            std::time::SystemTime::UNIX_EPOCH,
        ))
    }

    fn id_of(table: &Table, key: Key) -> Option<&str> {
        table.get(key).map(|c| c.config().id.as_str())
    }

    #[test]
    fn a_removed_connections_key_finds_nothing_even_when_its_slot_is_reused() {
        let mut table = Table::default();
        let a = table.insert(connection("a"));
        let b = table.insert(connection("b"));
        assert_eq!(id_of(&table, a), Some("a"));
        assert_eq!(table.key("b"), Some(b));
        assert_eq!(
            table.remove(a).map(|c| c.config().id.clone()).as_deref(),
            Some("a")
        );
        assert_eq!(id_of(&table, a), None);
        assert!(table.remove(a).is_none(), "removed once");
        assert!(!table.contains_id("a"));
        let c = table.insert(connection("c"));
        assert_ne!(c, a, "the slot is reused under a new generation");
        assert_eq!(
            id_of(&table, a),
            None,
            "the old key does not find the new connection"
        );
        assert!(table.get_mut(a).is_none());
        assert_eq!(id_of(&table, c), Some("c"));
        assert_eq!(table.len(), 2);
        let ids: Vec<&str> = table.values().map(|c| c.config().id.as_str()).collect();
        assert_eq!(ids, ["c", "b"], "slot order");
        assert_eq!(table.keys(), [c, b]);
    }

    #[test]
    fn a_second_connection_of_one_id_replaces_the_first() {
        let mut table = Table::default();
        let first = table.insert(connection("a"));
        let second = table.insert(connection("a"));
        assert_eq!(table.len(), 1);
        assert_eq!(id_of(&table, first), None);
        assert_eq!(table.key("a"), Some(second));
        assert_eq!(id_of(&table, second), Some("a"));
    }
}
