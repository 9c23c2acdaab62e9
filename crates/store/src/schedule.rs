//! When a rollout may dispatch: a start time, recurring maintenance windows
//! (days, a local start time, a duration, an IANA time zone; optionally only
//! for targets with given labels) and a deadline.
//!
//! Window arithmetic happens in the window's time zone with `jiff`: a window
//! that starts at 22:00 Europe/Paris starts at 22:00 local time on both sides
//! of a daylight-saving change, and lasts its duration in real time. A local
//! start time that does not exist (the hour skipped in spring) moves forward
//! by the gap (02:30 becomes 03:30); one that occurs twice (autumn) is its
//! first occurrence (jiff's "compatible" disambiguation, as in RFC 5545).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The longest window: a week (a window of a week on any day is always open).
pub const MAX_WINDOW_MINUTES: u32 = 7 * 24 * 60;

/// A day of the week, as written in a rollout file (`mon` … `sun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    fn of(weekday: jiff::civil::Weekday) -> Self {
        use jiff::civil::Weekday::*;
        match weekday {
            Monday => Self::Mon,
            Tuesday => Self::Tue,
            Wednesday => Self::Wed,
            Thursday => Self::Thu,
            Friday => Self::Fri,
            Saturday => Self::Sat,
            Sunday => Self::Sun,
        }
    }
}

/// One recurring maintenance window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// The days on which the window opens (at least one).
    pub days: Vec<Day>,
    /// Local opening time, `HH:MM` (24-hour clock).
    pub start: String,
    /// How long the window stays open, in minutes (1 … a week).
    pub duration_minutes: u32,
    /// IANA time zone name, e.g. `Europe/Paris` (or `UTC`).
    pub time_zone: String,
    /// Only targets with all of these labels use this window; empty: every
    /// target that no labelled window matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What is wrong with a window, named for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("must name at least one day (mon, tue, wed, thu, fri, sat, sun)")]
    NoDays,
    #[error("{0:?} is not a local time; write HH:MM on a 24-hour clock, e.g. 22:00")]
    Start(String),
    #[error("must be between 1 and {MAX_WINDOW_MINUTES} minutes (a week)")]
    Duration,
    #[error("{0:?} is not an IANA time zone name (e.g. Europe/Paris, America/New_York, UTC)")]
    TimeZone(String),
}

impl MaintenanceWindow {
    /// Checks the window; `Ok` means [`is_open`](Self::is_open) and
    /// [`next_opening`](Self::next_opening) can evaluate it.
    pub fn check(&self) -> Result<(), WindowError> {
        if self.days.is_empty() {
            return Err(WindowError::NoDays);
        }
        self.local_start()?;
        if self.duration_minutes == 0 || self.duration_minutes > MAX_WINDOW_MINUTES {
            return Err(WindowError::Duration);
        }
        self.zone()?;
        Ok(())
    }

    fn local_start(&self) -> Result<jiff::civil::Time, WindowError> {
        let bad = || WindowError::Start(self.start.clone());
        let (hours, minutes) = self.start.split_once(':').ok_or_else(bad)?;
        if hours.len() != 2 || minutes.len() != 2 || !(hours.bytes().chain(minutes.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let (hours, minutes): (i8, i8) = (hours.parse().map_err(|_| bad())?, minutes.parse().map_err(|_| bad())?);
        jiff::civil::Time::new(hours, minutes, 0, 0).map_err(|_| bad())
    }

    fn zone(&self) -> Result<jiff::tz::TimeZone, WindowError> {
        jiff::tz::TimeZone::get(&self.time_zone).map_err(|_| WindowError::TimeZone(self.time_zone.clone()))
    }

    /// Whether this window's labels select a target with `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(key, value)| labels.get(key) == Some(value))
    }

    /// The openings of this window that start on the local days from
    /// `first` to `last` days after `at`'s local date (negative: before).
    fn openings(&self, at: DateTime<Utc>, first: i64, last: i64) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let (Ok(zone), Ok(time)) = (self.zone(), self.local_start()) else { return vec![] };
        let Some(now) = to_jiff(at) else { return vec![] };
        let today = now.to_zoned_datetime(zone.clone()).date();
        let mut out = Vec::new();
        for offset in first..=last {
            let Ok(day) = today.checked_add(jiff::Span::new().days(offset)) else { continue };
            if !self.days.contains(&Day::of(day.weekday())) {
                continue;
            }
            let Ok(start) = day.to_datetime(time).to_zoned_datetime(zone.clone()) else { continue };
            let start = start.timestamp();
            let Ok(end) = start.checked_add(jiff::SignedDuration::from_mins(i64::from(self.duration_minutes))) else {
                continue;
            };
            if let (Some(start), Some(end)) = (from_jiff(start), from_jiff(end)) {
                out.push((start, end));
            }
        }
        out
    }

    /// Whether the window is open at `at` (opening included, closing excluded).
    pub fn is_open(&self, at: DateTime<Utc>) -> bool {
        // A window lasts at most a week, so one open at `at` opened on one
        // of the 8 local days up to today (a day of margin for zones whose
        // offset moves the local date).
        self.openings(at, -8, 0).iter().any(|(start, end)| *start <= at && at < *end)
    }

    /// When the window is open next: `at` itself if it is open now.
    pub fn next_opening(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(at) {
            return Some(at);
        }
        self.openings(at, 0, 8).into_iter().map(|(start, _)| start).filter(|start| *start > at).min()
    }
}

fn to_jiff(at: DateTime<Utc>) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(at.timestamp(), at.timestamp_subsec_nanos() as i32).ok()
}

fn from_jiff(at: jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.as_second(), at.subsec_nanosecond().max(0) as u32)
}

/// A rollout's schedule. The default (no start time, no windows, no
/// deadline) dispatches at once and at any time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Nothing is dispatched before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// Targets not dispatched by this time end as `missed_window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The windows; none: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<MaintenanceWindow>,
    /// The distinct sets of windows targets use (indexes into `windows`);
    /// a target stores the index of its set (`window_group`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Vec<u32>>,
}

/// A target whose labels select no window of a rollout that has windows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no window applies to this target: its labels match no labelled window and the rollout has no window without labels")]
pub struct NoWindow;

impl Schedule {
    /// Whether the schedule restricts anything.
    pub fn is_unrestricted(&self) -> bool {
        self.start_at.is_none() && self.deadline.is_none() && self.windows.is_empty()
    }

    /// The windows a target with `labels` uses: the labelled windows that
    /// select it, or else the windows without labels.
    pub fn windows_for(&self, labels: &BTreeMap<String, String>) -> Result<Vec<u32>, NoWindow> {
        let labelled: Vec<u32> = (0..self.windows.len() as u32)
            .filter(|i| {
                let window = &self.windows[*i as usize];
                !window.labels.is_empty() && window.selects(labels)
            })
            .collect();
        if !labelled.is_empty() {
            return Ok(labelled);
        }
        let general: Vec<u32> =
            (0..self.windows.len() as u32).filter(|i| self.windows[*i as usize].labels.is_empty()).collect();
        if general.is_empty() {
            return Err(NoWindow);
        }
        Ok(general)
    }

    /// The group of a target with `labels` (added to `groups` if new), or
    /// `None` when the rollout has no windows.
    pub fn assign_group(&mut self, labels: &BTreeMap<String, String>) -> Result<Option<u32>, NoWindow> {
        if self.windows.is_empty() {
            return Ok(None);
        }
        let windows = self.windows_for(labels)?;
        if let Some(index) = self.groups.iter().position(|group| *group == windows) {
            return Ok(Some(index as u32));
        }
        self.groups.push(windows);
        Ok(Some(self.groups.len() as u32 - 1))
    }

    /// Whether the deadline has passed at `at`.
    pub fn past_deadline(&self, at: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|deadline| at >= deadline)
    }

    /// What may be dispatched at `at`.
    pub fn openness(&self, at: DateTime<Utc>) -> Openness {
        if self.past_deadline(at) || self.start_at.is_some_and(|start| at < start) {
            return Openness::Closed;
        }
        if self.windows.is_empty() {
            return Openness::Any;
        }
        let open: Vec<bool> = self.windows.iter().map(|w| w.is_open(at)).collect();
        Openness::Groups(
            (0..self.groups.len() as u32)
                .filter(|g| self.groups[*g as usize].iter().any(|w| open.get(*w as usize) == Some(&true)))
                .collect(),
        )
    }

    /// The earliest time after `at` at which one of `groups` (all targets
    /// when the rollout has no windows) may be dispatched, or `None` if it
    /// never will before the deadline.
    pub fn next_opening(&self, at: DateTime<Utc>, groups: &[u32]) -> Option<DateTime<Utc>> {
        let from = self.start_at.map_or(at, |start| start.max(at));
        let next = if self.windows.is_empty() {
            Some(from)
        } else {
            groups
                .iter()
                .filter_map(|g| self.groups.get(*g as usize))
                .flatten()
                .filter_map(|w| self.windows.get(*w as usize))
                .filter_map(|w| w.next_opening(from))
                .min()
        };
        next.filter(|next| !self.past_deadline(*next))
    }
}

/// Which targets may be dispatched now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Openness {
    /// Any target (no windows; started; before the deadline).
    Any,
    /// Targets of these window groups.
    Groups(Vec<u32>),
    /// None: before `start_at` or past the deadline.
    Closed,
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<String> = self.days.iter().map(|d| format!("{d:?}").to_lowercase()).collect();
        write!(f, "{} {} for {} min, {}", days.join(","), self.start, self.duration_minutes, self.time_zone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&Utc)
    }

    fn saturday_night_paris() -> MaintenanceWindow {
        MaintenanceWindow {
            days: vec![Day::Sat],
            start: "22:00".into(),
            duration_minutes: 6 * 60,
            time_zone: "Europe/Paris".into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_window_opens_at_its_local_time_and_closes_after_its_duration() {
        let window = saturday_night_paris();
        window.check().unwrap();
        // 2026-12-05 is a Saturday; Paris is UTC+1 in winter.
        assert!(!window.is_open(at("2026-12-05T20:59:59Z")));
        assert!(window.is_open(at("2026-12-05T21:00:00Z")));
        assert!(window.is_open(at("2026-12-06T02:59:59Z")), "past midnight, still Saturday's window");
        assert!(!window.is_open(at("2026-12-06T03:00:00Z")));
        assert_eq!(window.next_opening(at("2026-12-03T12:00:00Z")), Some(at("2026-12-05T21:00:00Z")));
        assert_eq!(window.next_opening(at("2026-12-06T03:00:00Z")), Some(at("2026-12-12T21:00:00Z")));
        assert_eq!(window.next_opening(at("2026-12-05T22:00:00Z")), Some(at("2026-12-05T22:00:00Z")), "open now");
    }

    #[test]
    fn a_window_keeps_its_local_time_across_daylight_saving_changes() {
        let window = saturday_night_paris();
        // Summer: UTC+2.
        assert_eq!(window.next_opening(at("2026-07-01T00:00:00Z")), Some(at("2026-07-04T20:00:00Z")));
        // Paris moves to summer time on Sunday 2026-03-29 at 02:00: Saturday's
        // window opened at 21:00 UTC and lasts 6 real hours.
        assert!(window.is_open(at("2026-03-29T02:59:00Z")));
        assert!(!window.is_open(at("2026-03-29T03:00:00Z")));
        // A window at 02:30 on that Sunday, inside the skipped hour, moves
        // forward by the gap: 03:30 CEST = 01:30 UTC.
        let gap = MaintenanceWindow { days: vec![Day::Sun], start: "02:30".into(), ..saturday_night_paris() };
        assert_eq!(gap.next_opening(at("2026-03-28T12:00:00Z")), Some(at("2026-03-29T01:30:00Z")));
    }

    #[test]
    fn bad_windows_are_named() {
        let mut window = saturday_night_paris();
        window.days.clear();
        assert_eq!(window.check(), Err(WindowError::NoDays));
        for start in ["24:00", "7:00", "22:60", "22h00", "", "+1:00"] {
            let window = MaintenanceWindow { start: start.into(), ..saturday_night_paris() };
            assert_eq!(window.check(), Err(WindowError::Start(start.into())), "{start}");
        }
        for minutes in [0, MAX_WINDOW_MINUTES + 1] {
            let window = MaintenanceWindow { duration_minutes: minutes, ..saturday_night_paris() };
            assert_eq!(window.check(), Err(WindowError::Duration));
        }
        let window = MaintenanceWindow { time_zone: "Europe/Atlantis".into(), ..saturday_night_paris() };
        assert!(window.check().unwrap_err().to_string().contains("\"Europe/Atlantis\" is not an IANA time zone"));
        let week = MaintenanceWindow { duration_minutes: MAX_WINDOW_MINUTES, ..saturday_night_paris() };
        assert!(week.is_open(at("2026-12-03T12:00:00Z")), "a week-long window never closes");
    }

    #[test]
    fn targets_use_the_windows_their_labels_select_or_else_the_general_ones() {
        let paris =
            MaintenanceWindow { labels: BTreeMap::from([("site".into(), "paris".into())]), ..saturday_night_paris() };
        let general = MaintenanceWindow { days: vec![Day::Sun], time_zone: "UTC".into(), ..saturday_night_paris() };
        let mut schedule = Schedule { windows: vec![paris.clone(), general], ..Schedule::default() };
        let in_paris = BTreeMap::from([("site".into(), "paris".into())]);
        let in_lyon = BTreeMap::from([("site".into(), "lyon".into())]);
        assert_eq!(schedule.assign_group(&in_paris), Ok(Some(0)));
        assert_eq!(schedule.assign_group(&in_lyon), Ok(Some(1)));
        assert_eq!(schedule.assign_group(&BTreeMap::new()), Ok(Some(1)), "groups are shared");
        assert_eq!(schedule.groups, vec![vec![0], vec![1]]);
        // Saturday 22:30 Paris: only the Paris group is open.
        assert_eq!(schedule.openness(at("2026-12-05T21:30:00Z")), Openness::Groups(vec![0]));
        assert_eq!(schedule.next_opening(at("2026-12-05T12:00:00Z"), &[1]), Some(at("2026-12-06T22:00:00Z")));
        let only_labelled = Schedule { windows: vec![paris], ..Schedule::default() };
        assert_eq!(only_labelled.windows_for(&in_lyon), Err(NoWindow));
    }

    #[test]
    fn start_time_and_deadline_close_everything_outside_them() {
        let schedule = Schedule {
            start_at: Some(at("2026-12-05T00:00:00Z")),
            deadline: Some(at("2026-12-07T00:00:00Z")),
            ..Schedule::default()
        };
        assert_eq!(schedule.openness(at("2026-12-04T23:59:59Z")), Openness::Closed);
        assert_eq!(schedule.openness(at("2026-12-05T00:00:00Z")), Openness::Any);
        assert_eq!(schedule.openness(at("2026-12-07T00:00:00Z")), Openness::Closed);
        assert_eq!(schedule.next_opening(at("2026-12-01T00:00:00Z"), &[]), Some(at("2026-12-05T00:00:00Z")));
        assert_eq!(schedule.next_opening(at("2026-12-08T00:00:00Z"), &[]), None, "past the deadline");
        assert!(Schedule::default().is_unrestricted());
    }
}
