//! `rollout report` (the evidence report, to stdout or a file) and
//! `rollout verify-report` (is this file a report fleetpatch issued?).

use uuid::Uuid;

use crate::client::{ApiClient, ClientError};
use crate::exit::{self, Failure};
use crate::output::{self, OutputFormat};

/// `rollout report`: the evidence report, to stdout or a file; its sha256 on stderr.
pub async fn report(api: &ApiClient, id: Uuid, format: &str, save: Option<&std::path::Path>) -> Result<u8, Failure> {
    use sha2::Digest;
    let text = api.report(id, format).await?;
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    match save {
        Some(path) => {
            std::fs::write(path, &text).map_err(|error| {
                Failure::new(exit::ERROR, format!("cannot write the report to {}: {error}", path.display()))
            })?;
            eprintln!("wrote the {format} report of rollout {id} to {} (sha256 {digest})", path.display());
        }
        None => {
            print!("{text}");
            eprintln!("sha256 {digest}");
        }
    }
    Ok(exit::OK)
}

/// `rollout verify-report FILE`: whether the file is a report this fleetpatch issued, unchanged.
pub async fn verify_report(api: &ApiClient, file: &std::path::Path, format: OutputFormat) -> Result<u8, Failure> {
    use sha2::Digest;
    let bytes = std::fs::read(file)
        .map_err(|error| Failure::new(exit::INVALID, format!("cannot read {}: {error}", file.display())))?;
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    match api.issued_report(&digest).await {
        Ok(record) => {
            if format == OutputFormat::Json {
                println!("{}", output::json(&record));
            } else {
                println!(
                    "{} is the {} report of rollout {} issued {} to {} (sha256 {digest})",
                    file.display(),
                    record["format"].as_str().unwrap_or("?"),
                    record["rollout_id"].as_str().unwrap_or("?"),
                    record["created_at"].as_str().unwrap_or("?"),
                    output::clean(record["created_by"].as_str().unwrap_or("?")),
                );
            }
            Ok(exit::OK)
        }
        Err(ClientError::Refused { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => Err(Failure::new(
            exit::INVALID,
            format!(
                "{} (sha256 {digest}) is not a report this fleetpatch issued: it was changed, or comes from elsewhere",
                file.display()
            ),
        )),
        Err(error) => Err(error.into()),
    }
}
