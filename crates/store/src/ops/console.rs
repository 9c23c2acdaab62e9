//! Reads for the scheduler's web console: a rollout's targets filtered and
//! paged in SQL (keyset on the ordinal, so the 1,000th page of a rollout of
//! 100,000 targets costs what the first does), its failures grouped by
//! reason, and a target's state changes paged.
//!
//! Read-only: nothing here writes, and every read is bounded by a limit.

use fleetpatch_proto::state::TargetState;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;
use uuid::Uuid;

use crate::entity::{target_transitions, targets};
use crate::model::{Target, Transition};
use crate::{Error, Result, Store};

/// Which of a rollout's targets a page holds; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetFilter {
    pub state: Option<TargetState>,
    /// 0-based wave index.
    pub wave: Option<u32>,
    /// A label that must be set to this value (`site`, `paris`).
    pub label: Option<(String, String)>,
    /// Part of the host name, case-insensitive.
    pub host_contains: Option<String>,
}

/// Longest label key or host search a filter may hold.
const MAX_FILTER_CHARS: usize = 200;

impl TargetFilter {
    /// Parses a `key=value` label filter; the error says what to write.
    pub fn parse_label(raw: &str) -> Result<(String, String)> {
        let (key, value) = raw.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("label filter {raw:?} must be written key=value (for example site=paris)"))
        })?;
        let key = key.trim();
        if key.is_empty()
            || key.chars().count() > MAX_FILTER_CHARS
            || !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        {
            return Err(Error::Invalid(format!(
                "label key {key:?} must be 1 to {MAX_FILTER_CHARS} letters, digits, '.', '_', '-' or '/'"
            )));
        }
        Ok((key.to_owned(), value.trim().to_owned()))
    }
}

/// How many failed or timed-out targets share one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureReason {
    /// The target's recorded error; `None` when none was recorded.
    pub reason: Option<String>,
    pub targets: u64,
}

/// One state change of a target, with its position for the next page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// Increasing; the cursor of the next page is the last entry's.
    pub id: i64,
    pub transition: Transition,
}

/// `LIKE` pattern of "contains `text`", with the wildcards in `text` escaped.
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

impl Store {
    /// A page of a rollout's targets matching `filter`, in dispatch order,
    /// after `after_ordinal`, at most `limit`.
    pub async fn targets_page(
        &self,
        rollout_id: Uuid,
        filter: &TargetFilter,
        after_ordinal: Option<u32>,
        limit: u64,
    ) -> Result<Vec<Target>> {
        use targets::Column;
        let mut query = targets::Entity::find().filter(Column::RolloutId.eq(rollout_id));
        if let Some(state) = filter.state {
            query = query.filter(Column::State.eq(state.as_str()));
        }
        if let Some(wave) = filter.wave {
            query = query.filter(Column::Wave.eq(wave as i32));
        }
        if let Some((key, value)) = &filter.label {
            // The key was checked by `parse_label`: it cannot leave the JSON path.
            let (key, value) = TargetFilter::parse_label(&format!("{key}={value}"))?;
            query = query.filter(match self.backend() {
                DbBackend::Postgres => Expr::cust_with_values(r#""labels" ->> $1 = $2"#, [key, value]),
                _ => Expr::cust_with_values(r#"json_extract("labels", ?) = ?"#, [format!("$.\"{key}\""), value]),
            });
        }
        if let Some(host) = filter.host_contains.as_deref().filter(|h| !h.is_empty()) {
            if host.chars().count() > MAX_FILTER_CHARS {
                return Err(Error::Invalid(format!("a host search may hold at most {MAX_FILTER_CHARS} characters")));
            }
            let pattern = contains_pattern(host);
            query = query.filter(match self.backend() {
                DbBackend::Postgres => Expr::cust_with_values(r#"LOWER("host") LIKE $1 ESCAPE '\'"#, [pattern]),
                _ => Expr::cust_with_values(r#"LOWER("host") LIKE ? ESCAPE '\'"#, [pattern]),
            });
        }
        if let Some(after) = after_ordinal {
            query = query.filter(Column::Ordinal.gt(after as i32));
        }
        query
            .order_by_asc(Column::Ordinal)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(super::target_from)
            .collect()
    }

    /// A rollout's failed and timed-out targets grouped by their error,
    /// most frequent first, at most `limit` reasons.
    pub async fn failure_reasons(&self, rollout_id: Uuid, limit: u64) -> Result<Vec<FailureReason>> {
        use targets::Column;
        let rows: Vec<(Option<String>, i64)> = targets::Entity::find()
            .select_only()
            .column(Column::Error)
            .column_as(Column::Id.count(), "n")
            .filter(Column::RolloutId.eq(rollout_id))
            .filter(Column::State.is_in([TargetState::Failed.as_str(), TargetState::TimedOut.as_str()]))
            .group_by(Column::Error)
            .order_by_desc(Expr::cust("n"))
            .order_by_asc(Column::Error)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(reason, n)| FailureReason { reason, targets: n.max(0) as u64 }).collect())
    }

    /// A page of a target's state changes, oldest first, after the entry
    /// `after_id`, at most `limit`.
    pub async fn transitions_page(
        &self,
        target_id: Uuid,
        after_id: Option<i64>,
        limit: u64,
    ) -> Result<Vec<TimelineEntry>> {
        use target_transitions::Column;
        let mut query = target_transitions::Entity::find().filter(Column::TargetId.eq(target_id));
        if let Some(after) = after_id {
            query = query.filter(Column::Id.gt(after));
        }
        Ok(query
            .order_by_asc(Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| TimelineEntry { id: m.id, transition: super::transition_from(m) })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_searches_escape_the_like_wildcards() {
        assert_eq!(contains_pattern("Web_01"), "%web\\_01%");
        assert_eq!(contains_pattern("100%"), "%100\\%%");
        assert_eq!(contains_pattern("a\\b"), "%a\\\\b%");
    }

    #[test]
    fn label_filters_are_key_equals_value_with_a_plain_key() {
        assert_eq!(TargetFilter::parse_label("site=paris").unwrap(), ("site".into(), "paris".into()));
        assert_eq!(TargetFilter::parse_label("sim.behaviour = slow").unwrap(), ("sim.behaviour".into(), "slow".into()));
        assert!(TargetFilter::parse_label("site").is_err());
        assert!(TargetFilter::parse_label("a\"b=c").is_err());
        assert!(TargetFilter::parse_label("=c").is_err());
    }
}
