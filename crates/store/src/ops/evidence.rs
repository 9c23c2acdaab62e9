//! Evidence reports: what a report about a rollout is made of, read in
//! bulk, and the digests of the reports the API issued.

use super::*;
use crate::entity::evidence_reports;

impl Store {
    /// Every patch row of every target of the rollout, with its target, by
    /// target then patch.
    pub async fn rollout_target_patches(&self, rollout_id: Uuid) -> Result<Vec<(Uuid, TargetPatch)>> {
        target_patches::Entity::find()
            .filter(target_patches::Column::RolloutId.eq(rollout_id))
            .order_by_asc(target_patches::Column::TargetId)
            .order_by_asc(target_patches::Column::PatchIndex)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| Ok((m.target_id, target_patch_from(m)?)))
            .collect()
    }

    /// Records the digest of a report the API issued. Issuing the same
    /// bytes again keeps the first record.
    pub async fn record_evidence(&self, record: &EvidenceRecord) -> Result<()> {
        if record.sha256.len() != 64 || !record.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::Invalid(format!("evidence digest {:?} is not 64 lower-case hex digits", record.sha256)));
        }
        evidence_reports::Entity::insert(evidence_reports::ActiveModel {
            sha256: Set(record.sha256.clone()),
            rollout_id: Set(record.rollout_id),
            format: Set(record.format.clone()),
            bytes: Set(record.bytes as i64),
            created_at: Set(record.created_at),
            created_by: Set(record.created_by.clone()),
        })
        .on_conflict(OnConflict::column(evidence_reports::Column::Sha256).do_nothing().to_owned())
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    /// The record of the report with this digest, if the API issued it.
    pub async fn evidence(&self, sha256: &str) -> Result<Option<EvidenceRecord>> {
        Ok(evidence_reports::Entity::find_by_id(sha256.to_owned()).one(&self.db).await?.map(|m| EvidenceRecord {
            sha256: m.sha256,
            rollout_id: m.rollout_id,
            format: m.format,
            bytes: m.bytes.max(0) as u64,
            created_at: m.created_at,
            created_by: m.created_by,
        }))
    }
}
