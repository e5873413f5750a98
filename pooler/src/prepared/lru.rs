//! The statements prepared on one server connection, bounded by
//! `max_prepared_statements` with the least recently used closed first.

use std::collections::HashMap;
use std::sync::Arc;

/// Names of statements prepared on one server connection, least recently used first out.
#[derive(Debug, Default)]
pub struct PreparedLru {
    map: HashMap<Arc<str>, u64>,
    tick: u64,
}

impl PreparedLru {
    /// Whether `name` is prepared; marks it used.
    pub fn touch(&mut self, name: &Arc<str>) -> bool {
        self.tick += 1;
        match self.map.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `name`; returns the least recently used name to close when over `cap`.
    pub fn insert(&mut self, name: Arc<str>, cap: usize) -> Option<Arc<str>> {
        self.tick += 1;
        self.map.insert(name.clone(), self.tick);
        if self.map.len() <= cap {
            return None;
        }
        let victim = self
            .map
            .iter()
            .filter(|(n, _)| **n != name)
            .min_by_key(|(_, t)| **t)?
            .0
            .clone();
        self.map.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, name: &str) {
        self.map.remove(name);
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut l = PreparedLru::default();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(l.insert(a.clone(), 2), None);
        assert_eq!(l.insert(b.clone(), 2), None);
        assert!(l.touch(&a));
        assert_eq!(l.insert(c.clone(), 2), Some(b.clone()));
        assert!(!l.touch(&b));
        assert_eq!(l.len(), 2);
    }
}
