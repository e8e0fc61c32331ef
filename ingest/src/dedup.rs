//! The dedup index: which `(tenant, id)` keys were accepted, with what content.
//!
//! Backed by fjall (an LSM tree). Each entry maps `tenant \0 id` to the event's content hash
//! and event time. The index is derived state: the durable log is the truth, so index writes do
//! not wait for an fsync. Each write batch also stores the log position it covers, atomically
//! with the keys; after a crash the index is brought up to date by replaying the log from that
//! position ([`DedupIndex::applied`]). The log keeps that much because the index registers as a
//! log consumer whose checkpoint only advances on [`DedupIndex::persist`].
//!
//! Keys are kept for a horizon (default 400 days, the accepted history): an entry whose event
//! time is past the horizon can never match again, because such an event is rejected by
//! validation before it reaches the index, so [`DedupIndex::expire`] may drop it.

use std::path::Path;

use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::error::{Error, Result};
use crate::log::Lsn;

const APPLIED_KEY: &[u8] = b"applied_lsn";
/// Where the format version of the entries is kept.
const FORMAT_KEY: &[u8] = b"format_version";
/// The entries' format: a key is `tenant NUL id`, a value the content hash (16 bytes, big
/// endian) then the event time (8 bytes, big endian), the hash as [`Event::content_hash`]
/// defines it.
///
/// [`Event::content_hash`]: meterd_schemas::Event::content_hash
const FORMAT_VERSION: u32 = 1;

/// The block cache of the index.
///
/// Almost every lookup is a miss (a new event), and a miss is answered by the Bloom filters of
/// the tables whose key range covers the key. With fjall's default 32 MiB cache, the filters of
/// tens of millions of keys (about 10 bits a key) do not fit, so each new key read and
/// checksummed a filter block from disk, and ingest slowed tenfold as history grew. Keyspaces
/// created by this version pin every filter and index block in memory (about 80 MB for 50
/// million keys); an index created before keeps fjall's defaults, stored with it, and relies
/// on this cache, which holds the filters of about 80 million keys.
const CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// What the index says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Content hash of the accepted event.
    pub hash: u128,
    /// Event time (µs since the epoch) of the accepted event.
    pub time_us: i64,
}

impl Seen {
    fn encode(self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..16].copy_from_slice(&self.hash.to_be_bytes());
        v[16..].copy_from_slice(&self.time_us.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let hash = u128::from_be_bytes(v.get(..16)?.try_into().ok()?);
        let time_us = i64::from_be_bytes(v.get(16..24)?.try_into().ok()?);
        Some(Self { hash, time_us })
    }
}

/// The index key of `(tenant, id)`. Tenants cannot contain NUL, so the first NUL splits the key
/// unambiguously.
pub fn index_key(tenant: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + id.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The persistent dedup index.
pub struct DedupIndex {
    db: Database,
    keys: Keyspace,
    meta: Keyspace,
}

impl std::fmt::Debug for DedupIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupIndex").finish_non_exhaustive()
    }
}

impl DedupIndex {
    /// Opens or creates the index in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder(dir).cache_size(CACHE_BYTES).open()?;
        let keys = db.keyspace("keys", || {
            KeyspaceCreateOptions::default()
                // Whole filters and indexes, pinned: a partitioned one loads its partitions
                // through the cache, one disk read and checksum at a time.
                .filter_block_partitioning_policy(PinningPolicy::all(false))
                .index_block_partitioning_policy(PinningPolicy::all(false))
                .filter_block_pinning_policy(PinningPolicy::all(true))
                .index_block_pinning_policy(PinningPolicy::all(true))
        })?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        // An index from before the format was recorded is of version 1: the same entries.
        let version = match meta.get(FORMAT_KEY)? {
            Some(v) => {
                u32::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::IndexEntry {
                    key: "format_version".into(),
                })?)
            }
            None => {
                meta.insert(FORMAT_KEY, FORMAT_VERSION.to_be_bytes())?;
                FORMAT_VERSION
            }
        };
        if version > FORMAT_VERSION {
            return Err(Error::StateVersion {
                path: dir.to_owned(),
                version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Self { db, keys, meta })
    }

    /// The log position up to which this index has applied accepted events.
    pub fn applied(&self) -> Result<Lsn> {
        Ok(match self.meta.get(APPLIED_KEY)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::IndexEntry {
                    key: "applied_lsn".into(),
                })?)
            }
            None => 0,
        })
    }

    /// Looks up a key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Seen>> {
        match self.keys.get(key)? {
            None => Ok(None),
            Some(v) => Seen::decode(&v).map(Some).ok_or_else(|| Error::IndexEntry {
                key: String::from_utf8_lossy(key).into_owned(),
            }),
        }
    }

    /// Records newly accepted keys and the log position they bring the index up to, atomically.
    pub fn insert_batch<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a [u8], Seen)>,
        applied: Lsn,
    ) -> Result<()> {
        let mut batch = self.db.batch();
        for (key, seen) in entries {
            batch.insert(&self.keys, key, seen.encode());
        }
        batch.insert(&self.meta, APPLIED_KEY, applied.to_be_bytes());
        batch.commit()?;
        Ok(())
    }

    /// Makes everything inserted so far survive a machine crash; returns the position it covers.
    pub fn persist(&self) -> Result<Lsn> {
        let applied = self.applied()?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(applied)
    }

    /// Rewrites the whole index into its last level, as years of gradual growth would leave it.
    /// For tools and benchmarks that load many keys at once; meterd itself leaves compaction to
    /// fjall's background workers.
    pub fn compact(&self) -> Result<()> {
        self.keys.major_compact()?;
        Ok(())
    }

    /// Drops entries whose event time is before `cutoff_us`. Returns how many.
    pub fn expire(&self, cutoff_us: i64) -> Result<u64> {
        let mut doomed = Vec::new();
        let mut removed = 0u64;
        for guard in self.keys.iter() {
            let (k, v) = guard.into_inner()?;
            match Seen::decode(&v) {
                Some(seen) if seen.time_us < cutoff_us => doomed.push(k),
                Some(_) => {}
                None => {
                    return Err(Error::IndexEntry {
                        key: String::from_utf8_lossy(&k).into_owned(),
                    });
                }
            }
            if doomed.len() >= 10_000 {
                removed += doomed.len() as u64;
                self.remove_all(&mut doomed)?;
            }
        }
        removed += doomed.len() as u64;
        self.remove_all(&mut doomed)?;
        Ok(removed)
    }

    fn remove_all(&self, keys: &mut Vec<fjall::UserKey>) -> Result<()> {
        let mut batch = self.db.batch();
        for k in keys.drain(..) {
            batch.remove(&self.keys, k);
        }
        batch.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let idx = DedupIndex::open(dir.path()).expect("open");
            assert_eq!(
                idx.meta.get(FORMAT_KEY).expect("get").as_deref(),
                Some(&FORMAT_VERSION.to_be_bytes()[..])
            );
            idx.meta
                .insert(FORMAT_KEY, (FORMAT_VERSION + 1).to_be_bytes())
                .expect("insert");
            idx.db.persist(PersistMode::SyncAll).expect("persist");
        }
        let message = DedupIndex::open(dir.path()).expect_err("newer").to_string();
        assert!(message.contains("version 2"), "{message}");
    }

    #[test]
    fn keys_survive_reopen_with_their_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let idx = DedupIndex::open(dir.path()).expect("open");
            assert_eq!(idx.applied().expect("applied"), 0);
            let k = index_key("acme", "e1");
            idx.insert_batch(
                [(
                    k.as_slice(),
                    Seen {
                        hash: 7,
                        time_us: 5,
                    },
                )],
                100,
            )
            .expect("insert");
            idx.persist().expect("persist");
        }
        let idx = DedupIndex::open(dir.path()).expect("reopen");
        assert_eq!(idx.applied().expect("applied"), 100);
        assert_eq!(
            idx.get(&index_key("acme", "e1")).expect("get"),
            Some(Seen {
                hash: 7,
                time_us: 5
            })
        );
        assert_eq!(idx.get(&index_key("acme", "e2")).expect("get"), None);
        // Tenant and id boundaries do not blur.
        assert_eq!(idx.get(&index_key("acm", "ee1")).expect("get"), None);
    }

    #[test]
    fn expire_drops_only_old_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = DedupIndex::open(dir.path()).expect("open");
        let old = index_key("t", "old");
        let new = index_key("t", "new");
        idx.insert_batch(
            [
                (
                    old.as_slice(),
                    Seen {
                        hash: 1,
                        time_us: 10,
                    },
                ),
                (
                    new.as_slice(),
                    Seen {
                        hash: 2,
                        time_us: 1000,
                    },
                ),
            ],
            1,
        )
        .expect("insert");
        assert_eq!(idx.expire(500).expect("expire"), 1);
        assert_eq!(idx.get(&old).expect("get"), None);
        assert!(idx.get(&new).expect("get").is_some());
    }
}
