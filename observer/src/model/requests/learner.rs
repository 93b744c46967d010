//! Learning a constant distance from samples that each offer candidates (where a request's
//! RPC clients sit in its service future).

use std::collections::HashMap;

/// Lone samples a distance needs, and how far ahead of the next one, before it is trusted.
pub(super) const MIN_VOTES: u32 = 8;

/// Learns a constant distance from samples that each offer one or more candidates: the true
/// distance is among every sample's candidates, the others come and go with what else happens
/// to be in flight.
#[derive(Debug, Default, Clone)]
pub struct Learner {
    pub(super) votes: HashMap<i64, u32>,
    pub(super) samples: u32,
    pub(super) known: Option<i64>,
}

impl Learner {
    pub fn known(&self) -> Option<i64> {
        self.known
    }

    /// One sample's candidates (duplicates count once). Once `MIN_VOTES` samples are in, the
    /// distance found in nearly all of them (7 in 8: a request whose start was missed offers
    /// none of the right ones) is learnt; if several are, the one found most often, then the
    /// nearest, since neighbouring allocations of one size repeat the true distance shifted
    /// by that size.
    pub fn vote(&mut self, candidates: &[i64]) -> Option<i64> {
        if self.known.is_some() || candidates.is_empty() {
            return self.known;
        }
        let mut seen: Vec<i64> = candidates.to_vec();
        seen.sort_unstable();
        seen.dedup();
        self.samples += 1;
        for d in seen {
            *self.votes.entry(d).or_default() += 1;
        }
        if self.samples >= MIN_VOTES {
            let need = self.samples - self.samples / 8;
            self.known = self
                .votes
                .iter()
                .filter(|(_, n)| **n >= need)
                .min_by_key(|(d, n)| (std::cmp::Reverse(**n), d.unsigned_abs(), **d))
                .map(|(d, _)| *d);
            if self.known.is_some() || self.samples >= 8 * MIN_VOTES {
                // Learnt, or nothing consistent in a long run (the layout changed under us,
                // or the start of many requests was missed): start over.
                self.votes.clear();
                self.samples = 0;
            }
        }
        self.known
    }
}
