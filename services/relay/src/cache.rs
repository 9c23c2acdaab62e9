//! The disk cache: objects by sha256 in one flat directory
//! (`relay.cache_dir/<sha256>`), bounded by `relay.cache_max_bytes` with
//! least-recently-used eviction.
//!
//! * The index (size, last access, use count) is in memory; at start it is
//!   rebuilt from the directory: leftover temporary files (`.partial-*`,
//!   from a download a crash cut off) are deleted, files named by a sha256
//!   are loaded with their modification time as their last access, and
//!   anything else is left alone and ignored. Cached files are not hashed
//!   at start: a file is only ever renamed into place whole and verified,
//!   and a copy that rotted later is healed by a `Cache-Control: no-cache`
//!   request (the agent sends one after a mismatch).
//! * A file is only read through a [`Lease`], which holds a use count: a
//!   file in use is never evicted.
//! * [`Cache::admit`] makes room before it adds (evicting unused objects,
//!   oldest access first), so the total never exceeds the bound. An object
//!   that cannot fit — larger than the bound, or the cache is full of
//!   objects in use — is served from its temporary file and deleted when
//!   its last reader is done: it is not kept.
//!
//! Downloads in progress and objects served but not kept are outside the
//! bound. One relay owns its directory; two relays must not share one.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::stats::Counters;

/// Names of files being written (deleted at start).
pub(crate) const TEMP_PREFIX: &str = ".partial-";

/// A hex sha256, lower case, 64 characters.
pub fn is_sha256(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    counters: Arc<Counters>,
    index: Mutex<Index>,
    temp_sequence: AtomicU64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    /// The entries by last access, oldest first (access tick → sha256).
    by_access: BTreeMap<u64, String>,
    total_bytes: u64,
    /// Orders accesses (and tells entries of one sha256 apart across a
    /// drop and a new fetch).
    tick: u64,
}

struct Entry {
    size: u64,
    last_access: u64,
    /// Leases held on this entry.
    users: u32,
    /// The tick at which the entry was added: a lease of a dropped entry
    /// releases nothing on a newer one.
    generation: u64,
}

impl Index {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn touch(&mut self, sha256: &str) {
        let tick = self.next_tick();
        if let Some(entry) = self.entries.get_mut(sha256) {
            self.by_access.remove(&entry.last_access);
            entry.last_access = tick;
            self.by_access.insert(tick, sha256.to_owned());
        }
    }

    fn insert(&mut self, sha256: &str, size: u64, users: u32) -> u64 {
        let tick = self.next_tick();
        self.entries.insert(sha256.to_owned(), Entry { size, last_access: tick, users, generation: tick });
        self.by_access.insert(tick, sha256.to_owned());
        self.total_bytes += size;
        tick
    }

    fn remove(&mut self, sha256: &str) -> Option<Entry> {
        let entry = self.entries.remove(sha256)?;
        self.by_access.remove(&entry.last_access);
        self.total_bytes -= entry.size;
        Some(entry)
    }
}

/// A hold on a file to read: while it lives, the file is not evicted (or,
/// for an object not kept, not deleted).
pub(crate) struct Lease {
    cache: Arc<Cache>,
    sha256: String,
    path: PathBuf,
    /// `Some(generation)` for a cached entry; `None` for an object served
    /// from its temporary file and deleted after.
    generation: Option<u64>,
}

impl Lease {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether the object stays in the cache.
    pub fn is_kept(&self) -> bool {
        self.generation.is_some()
    }

    /// Whether the file still hashes to its name (reads it whole; blocking).
    pub fn is_intact(&self) -> std::io::Result<bool> {
        let mut file = std::fs::File::open(&self.path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        Ok(hex::encode(hasher.finalize()) == self.sha256)
    }

    /// Drops the cached entry this lease holds (a copy found corrupt), so
    /// the next request fetches it again. A lease of an entry dropped and
    /// added again since changes nothing.
    pub fn discard(&self) {
        if let Some(generation) = self.generation {
            self.cache.discard(&self.sha256, generation);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.generation {
            Some(generation) => self.cache.release(&self.sha256, generation),
            None => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(error = %error, path = %self.path.display(), "removing an object not kept failed");
                }
            }
        }
    }
}

impl Cache {
    /// Opens the cache in `dir` (created if missing): deletes leftover
    /// temporary files, loads the objects there, and evicts down to
    /// `max_bytes` if they are more. Blocking.
    pub fn open(dir: &Path, max_bytes: u64, counters: Arc<Counters>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        let mut removed_temp = 0usize;
        for item in std::fs::read_dir(dir)? {
            let item = item?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TEMP_PREFIX) {
                match std::fs::remove_file(item.path()) {
                    Ok(()) => removed_temp += 1,
                    Err(error) => {
                        tracing::warn!(error = %error, file = name, "removing a leftover temporary file failed")
                    }
                }
                continue;
            }
            let metadata = item.metadata()?;
            if !is_sha256(name) || !metadata.is_file() {
                continue;
            }
            let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, name.to_owned(), metadata.len()));
        }
        found.sort();
        let mut index = Index::default();
        for (_, sha256, size) in &found {
            index.insert(sha256, *size, 0);
        }
        let cache = Self {
            dir: dir.to_owned(),
            max_bytes,
            counters,
            index: Mutex::new(index),
            temp_sequence: AtomicU64::new(0),
        };
        let mut index = cache.lock();
        let evicted = cache.evict_unused(&mut index, 0);
        cache.publish_size(&index);
        tracing::info!(
            dir = %dir.display(),
            objects = index.entries.len(),
            bytes = index.total_bytes,
            max_bytes,
            evicted,
            removed_temp,
            "relay cache opened"
        );
        drop(index);
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// A fresh temporary file name for a download of `sha256`.
    pub fn temp_path(&self, sha256: &str) -> PathBuf {
        let sequence = self.temp_sequence.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{TEMP_PREFIX}{sha256}-{}-{sequence}", std::process::id()))
    }

    fn publish_size(&self, index: &Index) {
        self.counters.cache_size(index.total_bytes, index.entries.len() as u64);
    }

    /// A lease on the cached copy of `sha256`, which becomes the most
    /// recently used; `None` when there is none.
    pub fn lease(self: &Arc<Self>, sha256: &str) -> Option<Lease> {
        let mut index = self.lock();
        let entry = index.entries.get_mut(sha256)?;
        entry.users += 1;
        let generation = entry.generation;
        index.touch(sha256);
        Some(Lease {
            cache: self.clone(),
            sha256: sha256.to_owned(),
            path: self.path_of(sha256),
            generation: Some(generation),
        })
    }

    fn release(&self, sha256: &str, generation: u64) {
        let mut index = self.lock();
        if let Some(entry) = index.entries.get_mut(sha256) {
            if entry.generation == generation {
                entry.users = entry.users.saturating_sub(1);
            }
        }
    }

    fn discard(&self, sha256: &str, generation: u64) {
        let mut index = self.lock();
        if index.entries.get(sha256).is_none_or(|entry| entry.generation != generation) {
            return;
        }
        index.remove(sha256);
        // Readers of the file keep their open handle; new ones miss.
        let path = self.path_of(sha256);
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(error = %error, path = %path.display(), "removing a corrupt cached copy failed");
        }
        self.publish_size(&index);
    }

    /// Evicts unused entries, oldest access first, until `incoming` more
    /// bytes fit under the bound; evicts nothing when they cannot fit
    /// (too large, or too much in use). Returns how many were evicted, or
    /// `None` when there is no room.
    fn make_room(&self, index: &mut Index, incoming: u64) -> Option<usize> {
        if incoming > self.max_bytes {
            return None;
        }
        let unused: u64 = index.entries.values().filter(|entry| entry.users == 0).map(|entry| entry.size).sum();
        if index.total_bytes - unused + incoming > self.max_bytes {
            return None;
        }
        Some(self.evict_unused(index, incoming))
    }

    /// Evicts unused entries, oldest access first, while more than
    /// `max_bytes - incoming` are cached (as many as it can).
    fn evict_unused(&self, index: &mut Index, incoming: u64) -> usize {
        let limit = self.max_bytes.saturating_sub(incoming);
        let mut victims = Vec::new();
        let mut total = index.total_bytes;
        for sha256 in index.by_access.values() {
            if total <= limit {
                break;
            }
            let entry = &index.entries[sha256];
            if entry.users == 0 {
                total -= entry.size;
                victims.push(sha256.clone());
            }
        }
        for sha256 in &victims {
            index.remove(sha256);
            // Under the index lock: a new copy of this sha256 cannot be
            // renamed into place before the old one is gone.
            let path = self.path_of(sha256);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(error = %error, path = %path.display(), "removing an evicted object failed");
            }
            self.counters.eviction();
            tracing::debug!(sha256 = %sha256, "evicted");
        }
        victims.len()
    }

    /// Adds a verified download (`temp`, `size` bytes, already hashed to
    /// `sha256`) and leases it: renamed into place when it fits after
    /// evicting, else served from `temp` and deleted after (not kept).
    /// Blocking.
    pub fn admit(self: &Arc<Self>, sha256: &str, temp: PathBuf, size: u64) -> std::io::Result<Lease> {
        let mut index = self.lock();
        if index.entries.contains_key(sha256) {
            drop(index);
            // Another fetch was admitted first: keep that copy.
            let _ = std::fs::remove_file(&temp);
            if let Some(lease) = self.lease(sha256) {
                return Ok(lease);
            }
            return Err(std::io::Error::other("the cached copy was dropped while being admitted again"));
        }
        if self.make_room(&mut index, size).is_none() {
            tracing::warn!(
                sha256,
                size,
                cached_bytes = index.total_bytes,
                max_bytes = self.max_bytes,
                "object served but not kept: it does not fit in relay.cache_max_bytes beside the objects in use"
            );
            return Ok(Lease { cache: self.clone(), sha256: sha256.to_owned(), path: temp, generation: None });
        }
        let path = self.path_of(sha256);
        if let Err(error) = std::fs::rename(&temp, &path) {
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
        let generation = index.insert(sha256, size, 1);
        self.publish_size(&index);
        Ok(Lease { cache: self.clone(), sha256: sha256.to_owned(), path, generation: Some(generation) })
    }

    /// Whether a file can be created in the directory (the readiness check).
    pub async fn is_writable(dir: PathBuf) -> bool {
        let probe = dir.join(format!("{TEMP_PREFIX}readyz-{}", std::process::id()));
        let written = tokio::fs::write(&probe, b"ok").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// Writes `data` to a temporary file of `cache` and admits it.
    fn add(cache: &Arc<Cache>, data: &[u8]) -> Lease {
        let sha256 = sha(data);
        let temp = cache.temp_path(&sha256);
        std::fs::write(&temp, data).unwrap();
        cache.admit(&sha256, temp, data.len() as u64).unwrap()
    }

    fn open(dir: &Path, max_bytes: u64) -> (Arc<Cache>, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        (Arc::new(Cache::open(dir, max_bytes, counters.clone()).unwrap()), counters)
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn the_least_recently_used_unused_object_goes_first_and_the_total_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, counters) = open(dir.path(), 300);
        let (a, b, c, d) = ([1u8; 100], [2u8; 100], [3u8; 100], [4u8; 100]);
        drop(add(&cache, &a));
        drop(add(&cache, &b));
        drop(add(&cache, &c));
        drop(cache.lease(&sha(&a)).expect("a is cached")); // b is now the oldest access
        drop(add(&cache, &d));
        assert!(cache.lease(&sha(&b)).is_none(), "b was evicted");
        for kept in [&a, &c, &d] {
            assert!(cache.lease(&sha(kept)).is_some());
        }
        assert_eq!(counters.snapshot().evictions, 1);
        assert_eq!((counters.snapshot().cache_bytes, counters.snapshot().cache_objects), (300, 3));
        assert!(!dir.path().join(sha(&b)).exists());
        assert_eq!(files(dir.path()).len(), 3);
    }

    #[test]
    fn objects_in_use_are_never_evicted_and_what_cannot_fit_is_served_but_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, counters) = open(dir.path(), 200);
        let a = add(&cache, &[1u8; 100]);
        let b = add(&cache, &[2u8; 100]);
        // Both in use: a third object cannot fit, and is not kept.
        let c = add(&cache, &[3u8; 100]);
        assert!(!c.is_kept() && c.path().exists());
        assert_eq!(std::fs::read(c.path()).unwrap(), [3u8; 100]);
        let c_path = c.path().to_owned();
        drop(c);
        assert!(!c_path.exists(), "an object not kept is deleted after its last reader");
        assert_eq!(counters.snapshot().evictions, 0);
        assert!(a.path().exists() && b.path().exists());
        // Larger than the bound: never kept, nothing evicted for it.
        drop((a, b));
        let large = add(&cache, &[9u8; 201]);
        assert!(!large.is_kept());
        assert_eq!(counters.snapshot().evictions, 0);
        assert_eq!(counters.snapshot().cache_bytes, 200);
        drop(large);
        // Now unused: the next one evicts the oldest.
        let d = add(&cache, &[4u8; 100]);
        assert!(d.is_kept());
        assert_eq!(counters.snapshot().evictions, 1);
        assert!(cache.lease(&sha(&[1u8; 100])).is_none(), "a (oldest) went");
        assert_eq!(std::fs::metadata(d.path()).unwrap().len(), 100);
    }

    #[test]
    fn a_lease_of_a_dropped_entry_releases_nothing_on_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = open(dir.path(), 200);
        let data = [7u8; 100];
        let old = add(&cache, &data);
        old.discard();
        assert!(cache.lease(&sha(&data)).is_none(), "dropped");
        let new = add(&cache, &data);
        drop(old);
        // The new entry is still in use by `new`: it must not be evicted.
        drop(add(&cache, &[8u8; 100]));
        let third = add(&cache, &[9u8; 100]);
        assert!(new.path().exists() && cache.lease(&sha(&data)).is_some(), "the new entry was kept");
        drop(third);
    }

    #[test]
    fn opening_removes_temporary_files_ignores_strangers_and_keeps_the_access_order() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = ([1u8; 100], [2u8; 100]);
        std::fs::write(dir.path().join(sha(&newer)), newer).unwrap();
        std::fs::write(dir.path().join(sha(&older)), older).unwrap();
        let an_hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(sha(&older)))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}{}-1-0", sha(&older))), b"half").unwrap();
        std::fs::write(dir.path().join("README"), b"not an object").unwrap();
        std::fs::write(dir.path().join(sha(&older).to_uppercase()), b"not a name").unwrap();
        let (cache, counters) = open(dir.path(), 200);
        assert_eq!((counters.snapshot().cache_bytes, counters.snapshot().cache_objects), (200, 2));
        assert!(!files(dir.path()).iter().any(|name| name.starts_with(TEMP_PREFIX)), "temporary file removed");
        assert!(dir.path().join("README").exists(), "other files are left alone");
        drop(add(&cache, &[3u8; 100]));
        assert!(cache.lease(&sha(&older)).is_none(), "the older modification time is evicted first");
        assert!(cache.lease(&sha(&newer)).is_some());
        // A lower bound than what is on disk: evicted down at start.
        drop(cache);
        let (_, counters) = open(dir.path(), 100);
        assert_eq!(counters.snapshot().cache_objects, 1);
        assert_eq!(counters.snapshot().evictions, 1);
    }

    #[test]
    fn only_lower_case_hex_of_64_characters_is_a_sha256() {
        assert!(is_sha256(&"a".repeat(64)));
        assert!(is_sha256(&sha(b"x")));
        assert!(!is_sha256(&"A".repeat(64)));
        assert!(!is_sha256(&"a".repeat(63)));
        assert!(!is_sha256(&"g".repeat(64)));
        assert!(!is_sha256(&format!("../{}", "a".repeat(61))));
    }
}
