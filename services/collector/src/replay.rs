//! The (target, nonce) pairs a collector has seen within the clock window,
//! so a replayed report is refused.

use super::*;

/// The (target, nonce) pairs seen within the clock window.
pub(crate) struct ReplayCache {
    seen: HashSet<(Uuid, [u8; 16])>,
    /// In insertion order with the time (ms) each pair may be forgotten.
    expiries: VecDeque<(i64, Uuid, [u8; 16])>,
    capacity: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplayVerdict {
    Fresh,
    Replayed,
    Full,
}

impl ReplayCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { seen: HashSet::new(), expiries: VecDeque::new(), capacity }
    }

    /// Records (target, nonce); `forget_at_ms` is when its timestamp leaves
    /// the clock window, after which a replay is refused as stale anyway.
    pub(crate) fn check_and_insert(
        &mut self,
        target: Uuid,
        nonce: [u8; 16],
        forget_at_ms: i64,
        now_ms: i64,
    ) -> ReplayVerdict {
        while let Some(&(expiry, id, old)) = self.expiries.front() {
            if expiry >= now_ms {
                break;
            }
            self.expiries.pop_front();
            self.seen.remove(&(id, old));
        }
        if self.seen.contains(&(target, nonce)) {
            return ReplayVerdict::Replayed;
        }
        if self.seen.len() >= self.capacity {
            return ReplayVerdict::Full;
        }
        self.seen.insert((target, nonce));
        self.expiries.push_back((forget_at_ms, target, nonce));
        ReplayVerdict::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_cache_refuses_a_nonce_twice_forgets_after_the_window_and_is_bounded() {
        let mut cache = ReplayCache::new(2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(cache.check_and_insert(a, [1; 16], 1_000, 0), ReplayVerdict::Fresh);
        assert_eq!(cache.check_and_insert(a, [1; 16], 1_000, 10), ReplayVerdict::Replayed);
        assert_eq!(cache.check_and_insert(b, [1; 16], 1_000, 10), ReplayVerdict::Fresh, "per target");
        assert_eq!(cache.check_and_insert(b, [2; 16], 1_000, 20), ReplayVerdict::Full);
        // Past the window the pairs are forgotten (a replay is stale by then).
        assert_eq!(cache.check_and_insert(b, [2; 16], 3_000, 1_001), ReplayVerdict::Fresh);
        assert_eq!(cache.seen.len(), 1);
    }
}
