//! `audit [--rollout ID]`: the API's audit log (admin), newest first.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{exit, Failure};
use crate::client::ApiClient;
use crate::output::{self, OutputFormat, Table};

/// Entries asked for per request.
const PAGE: u64 = 500;

/// One entry of `GET /v1/audit` (the fields the table shows).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuditEntryView {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub actor_kind: String,
    pub role: String,
    pub method: String,
    pub route: String,
    #[serde(default)]
    pub rollout_id: Option<Uuid>,
    pub source: String,
    pub status: u16,
}

#[derive(Debug, Deserialize)]
struct AuditPage {
    entries: Vec<serde_json::Value>,
    #[serde(default)]
    next_before: Option<i64>,
}

/// Pages through `GET /v1/audit` with `next_before`; a table, or one JSON
/// document `{"entries": [...]}`.
pub async fn list(
    api: &ApiClient,
    rollout: Option<Uuid>,
    limit: Option<u64>,
    format: OutputFormat,
) -> Result<u8, Failure> {
    let mut entries: Vec<serde_json::Value> = Vec::new();
    let mut before = None;
    loop {
        let want = limit.map_or(PAGE, |limit| (limit - entries.len() as u64).min(PAGE));
        if want == 0 {
            break;
        }
        let raw = api.audit_page(rollout, before, want).await?;
        let page: AuditPage = api.view("/v1/audit", &raw)?;
        let empty = page.entries.is_empty();
        entries.extend(page.entries);
        match page.next_before {
            Some(next) if !empty => before = Some(next),
            _ => break,
        }
    }
    match format {
        OutputFormat::Json => println!("{}", output::json(&serde_json::json!({ "entries": entries }))),
        OutputFormat::Table => {
            if entries.is_empty() {
                println!(
                    "the audit log has no entries{}",
                    rollout.map(|r| format!(" for rollout {r}")).unwrap_or_default()
                );
                return Ok(exit::OK);
            }
            let mut table = Table::new(&["WHEN", "WHO", "KIND", "ROLE", "ACTION", "ROLLOUT", "SOURCE", "RESULT"]);
            for raw in &entries {
                let entry: AuditEntryView = api.view("/v1/audit", raw)?;
                table.push(vec![
                    output::time(entry.at),
                    entry.actor,
                    entry.actor_kind,
                    entry.role,
                    format!("{} {}", entry.method, entry.route),
                    entry.rollout_id.map(|r| r.to_string()).unwrap_or_default(),
                    entry.source,
                    entry.status.to_string(),
                ]);
            }
            print!("{}", table.render(true, &table.widths()));
        }
    }
    Ok(exit::OK)
}
