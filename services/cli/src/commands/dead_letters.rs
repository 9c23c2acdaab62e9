//! `dead-letters list|replay`: the messages the broker gave up on, and
//! moving them back to their work queues (`GET /v1/dead-letters`,
//! `POST /v1/dead-letters/replay`).

use serde::Deserialize;

use super::{exit, Failure};
use crate::client::ApiClient;
use crate::output::{self, OutputFormat, Table};

/// One dead letter of `GET /v1/dead-letters` (the fields the table shows).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeadLetterView {
    pub routing_key: String,
    #[serde(default)]
    pub reason: Option<String>,
    pub bytes: u64,
}

#[derive(Debug, Deserialize)]
struct DeadLetterList {
    total: u64,
    dead_letters: Vec<DeadLetterView>,
}

#[derive(Debug, Deserialize)]
struct Replayed {
    replayed: u64,
    left: u64,
}

/// The oldest `limit` dead letters; a table, or the API's JSON document.
pub async fn list(api: &ApiClient, limit: u64, format: OutputFormat) -> Result<u8, Failure> {
    let raw = api.dead_letters(limit).await?;
    if format == OutputFormat::Json {
        println!("{}", output::json(&raw));
        return Ok(exit::OK);
    }
    let page: DeadLetterList = api.view("/v1/dead-letters", &raw)?;
    if page.total == 0 {
        println!("the dead-letter queue is empty");
        return Ok(exit::OK);
    }
    let mut table = Table::new(&["QUEUE", "REASON", "BYTES"]);
    for letter in &page.dead_letters {
        table.push(vec![
            letter.routing_key.clone(),
            letter.reason.clone().unwrap_or_default(),
            letter.bytes.to_string(),
        ]);
    }
    print!("{}", table.render(true, &table.widths()));
    if page.total > page.dead_letters.len() as u64 {
        println!("{} of {} dead letters shown (--limit)", page.dead_letters.len(), page.total);
    }
    Ok(exit::OK)
}

/// Moves up to `limit` dead letters (all, up to the API's maximum, when
/// left out) back to their work queues.
pub async fn replay(api: &ApiClient, limit: Option<u64>, format: OutputFormat) -> Result<u8, Failure> {
    let raw = api.replay_dead_letters(limit).await?;
    if format == OutputFormat::Json {
        println!("{}", output::json(&raw));
        return Ok(exit::OK);
    }
    let replayed: Replayed = api.view("/v1/dead-letters/replay", &raw)?;
    println!("replayed {} dead letters; {} left", replayed.replayed, replayed.left);
    Ok(exit::OK)
}
