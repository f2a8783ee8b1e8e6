//! Newtypes for every id and position, with units in their names.

use std::fmt;

/// Size of one journal block. Writes are journalled, hashed and deduplicated in whole blocks.
pub const BLOCK_SIZE_BYTES: u64 = 4096;
/// [`BLOCK_SIZE_BYTES`] as a `usize`, for buffers.
pub const BLOCK_SIZE: usize = BLOCK_SIZE_BYTES as usize;

/// Position of a record in its consistency group's journal. Strictly increasing, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

/// A spool numbers its records from 1; the group's journal numbers them from where the spool
/// joined it: journal seq = spool seq + base. The base is a two's-complement offset, negative
/// for a successor spool whose records outnumber the journal's (see
/// [`crate::spool::Succession`]); journal seqs stay below 2^63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqBase(pub u64);

impl SeqBase {
    pub const ZERO: SeqBase = SeqBase(0);

    /// The base that puts spool seq `spool` at journal seq `journal`.
    pub fn placing(spool: Seq, journal: Seq) -> SeqBase {
        SeqBase(journal.0.wrapping_sub(spool.0))
    }

    fn offset(self) -> i128 {
        i128::from(self.0 as i64)
    }

    /// The journal seq of spool seq `spool`; `None` outside the journal's range.
    pub fn journal_seq(self, spool: u64) -> Option<Seq> {
        let journal = i128::from(spool) + self.offset();
        u64::try_from(journal)
            .ok()
            .filter(|&j| j < 1 << 63)
            .map(Seq)
    }

    /// The spool seq of journal seq `journal` (0 for a journal seq before the spool joined).
    pub fn spool_seq(self, journal: Seq) -> u64 {
        u64::try_from((i128::from(journal.0) - self.offset()).max(0)).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// Generation of a consistency group's authority. Exactly one site accepts an agent's writes
/// for a group at a given epoch; a failover or a failback raises it, and a site that meets a
/// higher epoch than its own stops accepting the group's writes (it is *fenced*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of every group before its first failover.
    pub const FIRST: Epoch = Epoch(1);
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch (UTC), as stamped by an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimeNs(pub i64);

impl TimeNs {
    pub fn now() -> TimeNs {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        TimeNs(since_epoch.as_nanos().min(i64::MAX as u128) as i64)
    }

    /// Milliseconds from `self` to `later`, never negative.
    pub fn ms_until(self, later: TimeNs) -> u64 {
        (later.0.saturating_sub(self.0).max(0) / 1_000_000) as u64
    }
}

/// Index of a [`BLOCK_SIZE_BYTES`] block inside a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockNo(pub u64);

impl BlockNo {
    pub fn offset_bytes(self) -> u64 {
        self.0 * BLOCK_SIZE_BYTES
    }
}

/// A blake3-256 content hash naming one block's bytes (a chunk).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

/// Hash maps see the first 8 bytes only: they are already uniformly random, and the map's own
/// keyed hasher still mixes them, so no one can aim writes at a bucket. A restore looks up every
/// block of its plan (600k for 2.4 GiB) before the first frame goes out, and the chunk index
/// answers every have-query of ingest. Equality still compares all 32 bytes.
impl std::hash::Hash for ChunkHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<ChunkHash> {
        <[u8; 32]>::try_from(bytes).ok().map(ChunkHash)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Error for a name that is not a valid volume, group or checkpoint name.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -, not starting with '.'")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
}

fn validate_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// Name of a protected volume; also its NBD export name and its file name in restores.
    VolumeName,
    "volume"
);
name_type!(
    /// Name of a consistency group: volumes sharing one journal order.
    GroupName,
    "group"
);
name_type!(
    /// Name of a site (a collector and what it protects), as given by `--site`.
    SiteName,
    "site"
);
name_type!(
    /// Name of a checkpoint: a named point in a group's journal.
    CheckpointName,
    "checkpoint"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(VolumeName::new("data-1.img").is_ok());
        assert!(VolumeName::new("").is_err());
        assert!(VolumeName::new("../etc").is_err());
        assert!(VolumeName::new("a/b").is_err());
        assert!(GroupName::new("x".repeat(65)).is_err());
    }

    #[test]
    fn ms_until_never_negative() {
        assert_eq!(TimeNs(5_000_000).ms_until(TimeNs(1)), 0);
        assert_eq!(TimeNs(0).ms_until(TimeNs(3_000_000)), 3);
    }
}
