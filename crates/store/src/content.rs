//! The content store: installers by sha256, in a directory (a shared volume
//! on Kubernetes). Files are written to a temporary name while hashing and
//! renamed into place only when the hash matches, so a file under its hash
//! is always whole and right.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Where the content with this sha256 lives.
pub fn path_of(root: &Path, sha256: &str) -> PathBuf {
    let prefix = sha256.get(..2).unwrap_or("xx");
    root.join("sha256").join(prefix).join(sha256)
}

/// A hex sha256, lower case, 64 characters.
pub fn is_sha256(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{0:?} is not a sha256 (64 lower-case hex characters)")]
    BadHash(String),
    #[error("content does not match its sha256: expected {expected}, got {actual} ({bytes} bytes received)")]
    Mismatch { expected: String, actual: String, bytes: u64 },
    #[error("content store at {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// Streams `chunks` into the store under `sha256`; refuses content whose hash differs.
pub async fn put<S, E>(root: &Path, sha256: &str, mut chunks: S) -> Result<u64, ContentError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    if !is_sha256(sha256) {
        return Err(ContentError::BadHash(sha256.to_owned()));
    }
    let final_path = path_of(root, sha256);
    let dir = final_path.parent().expect("content paths have a parent").to_owned();
    let io = |path: &Path, e: std::io::Error| ContentError::Io { path: path.to_owned(), reason: e.to_string() };
    tokio::fs::create_dir_all(&dir).await.map_err(|e| io(&dir, e))?;
    let temp = dir.join(format!(".{sha256}.{}.part", uuid::Uuid::new_v4().simple()));
    let mut file = tokio::fs::File::create(&temp).await.map_err(|e| io(&temp, e))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let result: Result<(), ContentError> = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ContentError::Io { path: temp.clone(), reason: format!("upload interrupted: {e}") })?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| io(&temp, e))?;
        }
        file.sync_all().await.map_err(|e| io(&temp, e))?;
        Ok(())
    }
    .await;
    if let Err(error) = result {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(error);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(ContentError::Mismatch { expected: sha256.to_owned(), actual, bytes });
    }
    tokio::fs::rename(&temp, &final_path).await.map_err(|e| io(&final_path, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(data: &'static [u8]) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin {
        futures_util::stream::iter(vec![Ok(bytes::Bytes::from_static(data))])
    }

    #[tokio::test]
    async fn content_is_stored_only_under_its_own_hash() {
        let root = std::env::temp_dir().join(format!("fp-content-{}", uuid::Uuid::new_v4()));
        let hash = hex::encode(Sha256::digest(b"installer"));
        assert_eq!(put(&root, &hash, stream(b"installer")).await.unwrap(), 9);
        assert_eq!(std::fs::read(path_of(&root, &hash)).unwrap(), b"installer");
        let other = hex::encode(Sha256::digest(b"other"));
        let error = put(&root, &other, stream(b"tampered")).await.unwrap_err();
        assert!(matches!(error, ContentError::Mismatch { .. }), "{error}");
        assert!(!path_of(&root, &other).exists());
        assert!(matches!(put(&root, "abc", stream(b"x")).await.unwrap_err(), ContentError::BadHash(_)));
        let _ = std::fs::remove_dir_all(root);
    }
}
