//! The one source of "now" for everything that decides by time: deadlines,
//! last-seen times, timeouts (and, later, maintenance windows).
//!
//! [`Clock::system`] reads the system clock; [`ManualClock`] is a clock a
//! test sets and advances, so a test of a 600 s timeout takes no time and
//! asserts exact instants. A [`Clock`] is cheap to clone; the clones of a
//! manual clock share its time.
//!
//! What a clock does not govern: the bus's delays (wait queues, the
//! consumer's hold) run in wall time, since the queue only wakes the checker
//! up and the checker decides with the clock; and `tokio` timeouts that bound
//! how long a service waits for I/O.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where "now" comes from. The default is the system clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<ManualClock>,
}

impl Clock {
    /// The system clock (`Utc::now()`).
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now(),
            Some(manual) => manual.now(),
        }
    }

    /// Whether this clock is a [`ManualClock`] (for logs and assertions).
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Self {
        Self { manual: Some(manual) }
    }
}

/// A clock that stands still until it is told to move: for tests.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self { now: Arc::new(Mutex::new(start)) }
    }

    /// A clock showing the current system time, truncated to whole
    /// milliseconds (what every store keeps), so an instant read from it
    /// compares equal to the same instant read back from a database.
    pub fn starting_now() -> Self {
        let now = Utc::now();
        let millis = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        Self::new(millis)
    }

    pub fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves the clock forward by `by`; returns the new time.
    pub fn advance(&self, by: std::time::Duration) -> DateTime<Utc> {
        let by = chrono::Duration::from_std(by).expect("a test advances the clock by less than 292 years");
        let mut now = self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *now += by;
        *now
    }

    /// Sets the clock to `to` (forward or back).
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = to;
    }

    /// A [`Clock`] that reads this manual clock.
    pub fn clock(&self) -> Clock {
        Clock::from(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_share_it() {
        let manual = ManualClock::starting_now();
        let clock = manual.clock();
        let start = clock.now();
        assert_eq!(start.timestamp_subsec_micros() % 1_000, 0, "whole milliseconds");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now(), start, "a manual clock stands still");
        let later = manual.advance(Duration::from_secs(600));
        assert_eq!(later - start, chrono::Duration::seconds(600));
        assert_eq!(clock.clone().now(), later, "clones share the time");
        manual.set(start);
        assert_eq!(clock.now(), start);
        assert!(clock.is_manual());
    }

    #[test]
    fn the_system_clock_follows_the_system_time() {
        let clock = Clock::default();
        assert!(!clock.is_manual());
        let before = Utc::now();
        let now = clock.now();
        assert!(before <= now && now <= Utc::now());
    }
}
