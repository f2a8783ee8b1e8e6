//! Epochs and roles: which site may accept a consistency group's writes, and where two sites'
//! journals of a group part ways.
//!
//! Every group has an [`Epoch`] and a [`GroupRole`] at each site. At most one site is
//! [`GroupRole::Primary`] for a group at a given epoch: only there does an agent's journal
//! stream get accepted. A failover makes the site that runs it primary at a new, higher epoch;
//! a site that meets a higher epoch than its own (its peer refuses its replication, or the peer
//! replicates to it at that epoch) stops accepting the group's writes. Because epochs only
//! grow and each is created by one failover at one site, two sites can never both accept a
//! group's writes at the same epoch: no split brain.
//!
//! The [`History`] says, for every seq, in which epoch the record was written. Two sites hold
//! the same record at seq `s` exactly when their histories give `s` the same epoch, so the
//! longest common prefix of two journals is found from the two histories alone
//! ([`History::common_prefix`]), without comparing records. A site that joins a newer timeline
//! keeps that prefix and sets the rest of its journal aside as its *abandoned* tail, from which
//! a failback computes the blocks to roll back.

use crate::record::Record;
use crate::types::{Epoch, Seq};

/// What a site does with a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRole {
    /// Accepts the group's agent stream, and replicates the group to its peer.
    Primary,
    /// Receives the group from the primary site by replication; refuses agents.
    Replica,
    /// Was primary, then learned that another site holds the group at epoch `by`: refuses
    /// agents and stops replicating until that site replicates the new timeline back.
    Fenced { by: Epoch },
}

impl GroupRole {
    pub fn name(&self) -> &'static str {
        match self {
            GroupRole::Primary => "primary",
            GroupRole::Replica => "replica",
            GroupRole::Fenced { .. } => "fenced",
        }
    }

    pub(crate) fn code(&self) -> (u8, u64) {
        match self {
            GroupRole::Primary => (1, 0),
            GroupRole::Replica => (2, 0),
            GroupRole::Fenced { by } => (3, by.0),
        }
    }

    pub(crate) fn from_code(code: u8, by: u64) -> Option<GroupRole> {
        match code {
            1 => Some(GroupRole::Primary),
            2 => Some(GroupRole::Replica),
            3 => Some(GroupRole::Fenced { by: Epoch(by) }),
            _ => None,
        }
    }
}

impl std::fmt::Display for GroupRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupRole::Fenced { by } => write!(f, "fenced by {by}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where an epoch's records start: records with seq > `after` (up to the next epoch's start)
/// were written in `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: Epoch,
    pub after: Seq,
}

/// The epochs of a group's journal, oldest first; the first starts after seq 0, epochs and
/// start seqs never decrease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History(pub Vec<EpochStart>);

impl Default for History {
    fn default() -> History {
        History(vec![EpochStart {
            epoch: Epoch::FIRST,
            after: Seq::ZERO,
        }])
    }
}

impl History {
    /// Checks the shape: not empty, first starting after seq 0, epochs strictly and start
    /// seqs weakly increasing.
    pub fn validate(&self) -> Result<(), String> {
        let Some(first) = self.0.first() else {
            return Err("an epoch history needs at least one epoch".into());
        };
        if first.after != Seq::ZERO {
            return Err(format!(
                "the first epoch must start at seq 1, not after {}",
                first.after
            ));
        }
        for pair in self.0.windows(2) {
            if pair[1].epoch <= pair[0].epoch || pair[1].after < pair[0].after {
                return Err(format!(
                    "epoch history goes backwards: {} after {} follows {} after {}",
                    pair[1].epoch, pair[1].after, pair[0].epoch, pair[0].after
                ));
            }
        }
        Ok(())
    }

    /// The newest epoch.
    pub fn current(&self) -> Epoch {
        self.0.last().map_or(Epoch::FIRST, |e| e.epoch)
    }

    /// The epoch in which the record at `seq` was written.
    pub fn epoch_of(&self, seq: Seq) -> Epoch {
        self.0
            .iter()
            .rev()
            .find(|e| e.after < seq)
            .map_or(Epoch::FIRST, |e| e.epoch)
    }

    /// The newest seq up to which two journals with these histories hold the same records
    /// (`None`: they never part ways). Assumes each epoch was written at one site only, which
    /// fencing guarantees.
    pub fn common_prefix(&self, other: &History) -> Option<Seq> {
        let mut starts: Vec<Seq> = self.0.iter().chain(&other.0).map(|e| e.after).collect();
        starts.sort();
        starts.dedup();
        starts
            .into_iter()
            .find(|&after| self.epoch_of(after.next()) != other.epoch_of(after.next()))
    }

    /// This history with a new epoch starting after `after`.
    pub fn with(&self, epoch: Epoch, after: Seq) -> History {
        let mut next = self.0.clone();
        next.retain(|e| e.after <= after);
        next.push(EpochStart { epoch, after });
        History(next)
    }
}

/// The records a site set aside when it joined a newer timeline: its journal was the common
/// prefix up to `fork` followed by `tail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Abandoned {
    pub fork: Seq,
    pub tail: Vec<Record>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(entries: &[(u64, u64)]) -> History {
        History(
            entries
                .iter()
                .map(|&(epoch, after)| EpochStart {
                    epoch: Epoch(epoch),
                    after: Seq(after),
                })
                .collect(),
        )
    }

    #[test]
    fn common_prefix_is_where_epochs_differ() {
        let a = h(&[(1, 0)]);
        let b = h(&[(1, 0), (2, 50)]);
        assert_eq!(a.common_prefix(&a), None);
        assert_eq!(a.common_prefix(&b), Some(Seq(50)));
        assert_eq!(b.common_prefix(&a), Some(Seq(50)));
        // Failback: A took over again at epoch 3 after 80.
        let c = h(&[(1, 0), (2, 50), (3, 80)]);
        assert_eq!(b.common_prefix(&c), Some(Seq(80)));
        // A site that never saw epoch 2 parts ways with it at 50.
        assert_eq!(a.common_prefix(&c), Some(Seq(50)));
        assert_eq!(b.epoch_of(Seq(50)), Epoch(1));
        assert_eq!(b.epoch_of(Seq(51)), Epoch(2));
    }

    #[test]
    fn histories_are_validated() {
        assert!(h(&[(1, 0)]).validate().is_ok());
        assert!(h(&[]).validate().is_err());
        assert!(h(&[(1, 3)]).validate().is_err());
        assert!(h(&[(1, 0), (1, 5)]).validate().is_err());
        assert!(h(&[(1, 0), (2, 5), (3, 4)]).validate().is_err());
        assert_eq!(
            h(&[(1, 0), (2, 9)]).with(Epoch(3), Seq(5)),
            h(&[(1, 0), (3, 5)])
        );
    }
}
