//! Line-oriented logging to stderr and, optionally, a log file.
//!
//! One line per event: `2024-05-01T12:00:00.123Z INFO  message key=value ...`.
//! Values that contain spaces, quotes or `=` are quoted, so the lines stay
//! easy to grep and to split. This replaces `tracing` on purpose: the agent
//! runs once per deployment on a target and must stay small.
//!
//! This module must never be handed the plan's token; callers log the
//! deployment id, target id and patch indexes only.

use std::fmt::{self, Display, Write as _};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "INFO ",
            Self::Warn => "WARN ",
            Self::Error => "ERROR",
        }
    }
}

static LOG_FILE: OnceLock<Mutex<Option<File>>> = OnceLock::new();

fn log_file() -> &'static Mutex<Option<File>> {
    LOG_FILE.get_or_init(|| Mutex::new(None))
}

/// Also append every line to `path` from now on.
pub fn open_log_file(path: &Path) -> std::io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    *log_file().lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(file);
    Ok(())
}

/// Stop writing to the log file (it is about to be removed by the cleanup).
pub fn close_log_file() {
    *log_file().lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
}

/// Write one event. Use the [`info!`](crate::info), [`warn!`](crate::warn)
/// and [`error!`](crate::error) macros rather than calling this.
pub fn write_event(level: Level, message: &str, fields: &[(&str, &dyn Display)]) {
    let line = format_line(SystemTime::now(), level, message, fields);
    let mut guard = log_file().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Logging must never take the agent down: write errors are ignored.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(file) = guard.as_mut() {
        let _ = file.write_all(line.as_bytes());
    }
}

fn format_line(now: SystemTime, level: Level, message: &str, fields: &[(&str, &dyn Display)]) -> String {
    let mut line = String::with_capacity(128);
    let _ = write!(line, "{} {} {}", Timestamp(now), level.as_str(), message);
    for (key, value) in fields {
        let value = value.to_string();
        if value.is_empty() || value.contains([' ', '"', '=', '\n', '\r', '\t']) {
            let _ = write!(line, " {key}={value:?}");
        } else {
            let _ = write!(line, " {key}={value}");
        }
    }
    line.push('\n');
    line
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in chrono.
struct Timestamp(SystemTime);

impl Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since_epoch = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = since_epoch.as_secs();
        let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
        let second_of_day = seconds % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60,
            since_epoch.subsec_millis()
        )
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Log an informational event: `info!("message", key = value, ...)`.
#[macro_export]
macro_rules! info {
    ($message:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::write_event(
            $crate::log::Level::Info,
            $message,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

/// Log a warning: `warn!("message", key = value, ...)`.
#[macro_export]
macro_rules! warn {
    ($message:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::write_event(
            $crate::log::Level::Warn,
            $message,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

/// Log an error: `error!("message", key = value, ...)`.
#[macro_export]
macro_rules! error {
    ($message:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::write_event(
            $crate::log::Level::Error,
            $message,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(Timestamp(at).to_string(), "2023-11-14T22:13:20.123Z");
        assert_eq!(Timestamp(UNIX_EPOCH).to_string(), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(Timestamp(leap_day).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn values_with_spaces_are_quoted() {
        let line = format_line(
            UNIX_EPOCH,
            Level::Warn,
            "collector unreachable",
            &[("attempt", &3), ("error", &"connection refused"), ("empty", &"")],
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z WARN  collector unreachable attempt=3 \
             error=\"connection refused\" empty=\"\"\n"
        );
    }
}
