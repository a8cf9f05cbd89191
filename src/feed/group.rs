//! Wake groups: the watchers the feed wakes together when it takes in events
//! (see `WatchRequest::wake_group`).
//!
//! A watcher's waker stays in its group for the watcher's life and is woken
//! on every publish, so a watcher that waits again after an event registers
//! nothing (it changes its entry only when its task's waker changes). This
//! is what 10,000 watchers of one event do 10,000 times.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use slab::Slab;

/// The watchers of one wake group.
#[derive(Debug)]
pub(super) struct Group {
    /// The newest revision the feed has taken in, as published to this group.
    tailed: AtomicU64,
    /// Whether the feed has stopped.
    stopped: AtomicBool,
    wakers: Mutex<Slab<Waker>>,
}

impl Group {
    pub(super) fn new(tailed: u64, stopped: bool) -> Arc<Group> {
        Arc::new(Group {
            tailed: AtomicU64::new(tailed),
            stopped: AtomicBool::new(stopped),
            wakers: Mutex::new(Slab::new()),
        })
    }

    /// Tells the group's watchers that the feed has taken in `tailed`.
    pub(super) fn publish(&self, tailed: u64) {
        self.tailed.store(tailed, Ordering::Release);
        self.wake_all();
    }

    /// Tells the group's watchers that the feed has stopped.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        for (_, waker) in self.wakers.lock().expect("wakers").iter() {
            waker.wake_by_ref();
        }
    }

    /// A new member, not yet registered.
    pub(super) fn join(self: &Arc<Group>) -> Member {
        Member {
            group: self.clone(),
            entry: None,
        }
    }
}

/// A watcher's place in its group.
#[derive(Debug)]
pub(super) struct Member {
    group: Arc<Group>,
    /// Its key among the group's wakers, and the waker registered there.
    entry: Option<(usize, Waker)>,
}

impl Member {
    /// The newest revision published to the group.
    pub(super) fn tailed(&self) -> u64 {
        self.group.tailed.load(Ordering::Acquire)
    }

    pub(super) fn stopped(&self) -> bool {
        self.group.stopped.load(Ordering::Acquire)
    }

    /// Makes `waker` the one the group wakes; whether it was not already
    /// (the caller then checks again what it read before).
    pub(super) fn register(&mut self, waker: &Waker) -> bool {
        if let Some((_, known)) = &self.entry
            && known.will_wake(waker)
        {
            return false;
        }
        let mut wakers = self.group.wakers.lock().expect("wakers");
        match &mut self.entry {
            Some((key, known)) => {
                known.clone_from(waker);
                wakers[*key] = waker.clone();
            }
            None => self.entry = Some((wakers.insert(waker.clone()), waker.clone())),
        }
        true
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some((key, _)) = self.entry.take() {
            self.group.wakers.lock().expect("wakers").remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn woken(count: &Arc<Count>) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_registered_waker_is_woken_by_every_publish_until_its_member_leaves() {
        let group = Group::new(3, false);
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let mut a = group.join();
        let mut b = group.join();
        assert_eq!(a.tailed(), 3);
        group.publish(4);
        assert_eq!(woken(&first), 0, "not registered yet");
        assert!(
            a.register(&Waker::from(first.clone())),
            "a new registration"
        );
        let waker = Waker::from(first.clone());
        assert!(!a.register(&waker), "the same waker again");
        assert!(!a.register(&waker));
        assert!(b.register(&Waker::from(second.clone())));

        group.publish(5);
        group.publish(6);
        assert_eq!((woken(&first), woken(&second)), (2, 2), "woken each time");
        assert_eq!(b.tailed(), 6);

        let other = Arc::new(Count::default());
        assert!(a.register(&Waker::from(other.clone())), "a new waker");
        drop(b);
        group.stop();
        assert!(a.stopped());
        assert_eq!(woken(&first), 2, "replaced");
        assert_eq!(woken(&other), 1);
        assert_eq!(woken(&second), 2, "gone with its member");
        drop(a);
        assert!(group.wakers.lock().unwrap().is_empty());
    }
}
