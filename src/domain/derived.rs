//! A value handed to many readers, with room for one value derived from it
//! once for all of them.
//!
//! The gRPC edge keeps encodings there: an event going to 10,000 watchers is
//! converted and encoded once, and a room that memory answers GetRoom with is
//! encoded once for every read of it. The holder does not know what the
//! derived value is.

use std::any::Any;
use std::ops::Deref;
use std::sync::OnceLock;

pub struct Derived<T> {
    value: T,
    derived: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl<T> Derived<T> {
    pub fn new(value: T) -> Derived<T> {
        Derived {
            value,
            derived: OnceLock::new(),
        }
    }

    /// The value `derive` makes of this one, made by the first caller and
    /// kept; `None` if a value of another type was derived from it first.
    pub fn derived<D: Any + Send + Sync>(&self, derive: impl FnOnce(&T) -> D) -> Option<&D> {
        self.derived
            .get_or_init(|| Box::new(derive(&self.value)))
            .downcast_ref()
    }
}

impl<T> Deref for Derived<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Derived<T> {
    fn eq(&self, other: &Derived<T>) -> bool {
        self.value == other.value
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Derived<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_once_and_keeps_the_first_type() {
        let shared = Derived::new(21);
        let mut made = 0;
        for _ in 0..3 {
            let doubled = shared.derived(|n| {
                made += 1;
                n * 2
            });
            assert_eq!(doubled, Some(&42));
        }
        assert_eq!(made, 1, "derived once, kept for every later reader");
        assert_eq!(shared.derived(|n| n.to_string()), None, "another type");
        assert_eq!(*shared, 21);
    }
}
