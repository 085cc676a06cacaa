//! Batch plans: which instances restart together.

use serde::{Deserialize, Serialize};

/// How many instances a batch holds: a count, or a percentage of the instances (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

impl BatchSize {
    /// Parses `3` or `"25%"`.
    pub fn parse(text: &str) -> Option<BatchSize> {
        match text.strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .map(BatchSize::Percent),
            None => text
                .trim()
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .map(BatchSize::Count),
        }
    }

    /// Instances per batch for a service of `total` instances.
    pub fn per_batch(self, total: usize) -> usize {
        let n = match self {
            BatchSize::Count(n) => n as usize,
            BatchSize::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.clamp(1, total.max(1))
    }
}

/// Splits `instances` (in the order given) into batches.
pub fn batches(instances: &[u32], size: BatchSize) -> Vec<Vec<u32>> {
    let per = size.per_batch(instances.len());
    instances.chunks(per).map(<[u32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let all = [0, 1, 2, 3, 4];
        let cases: &[(BatchSize, &[&[u32]])] = &[
            (BatchSize::Count(1), &[&[0], &[1], &[2], &[3], &[4]]),
            (BatchSize::Count(2), &[&[0, 1], &[2, 3], &[4]]),
            (BatchSize::Count(9), &[&[0, 1, 2, 3, 4]]),
            (BatchSize::Percent(25), &[&[0, 1], &[2, 3], &[4]]),
            (BatchSize::Percent(1), &[&[0], &[1], &[2], &[3], &[4]]),
            (BatchSize::Percent(100), &[&[0, 1, 2, 3, 4]]),
        ];
        for (size, want) in cases {
            let got = batches(&all, *size);
            let want: Vec<Vec<u32>> = want.iter().map(|b| b.to_vec()).collect();
            assert_eq!(got, want, "{size:?}");
        }
        assert!(batches(&[], BatchSize::Count(1)).is_empty());
    }

    #[test]
    fn parsing() {
        assert_eq!(BatchSize::parse("2"), Some(BatchSize::Count(2)));
        assert_eq!(BatchSize::parse("25%"), Some(BatchSize::Percent(25)));
        for bad in ["0", "0%", "101%", "x", "-1"] {
            assert_eq!(BatchSize::parse(bad), None, "{bad}");
        }
    }
}
