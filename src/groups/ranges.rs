//! A set of offsets kept as disjoint half-open ranges, so a million completed
//! offsets around one that stays pending cost two entries, not a million.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-adjacent half-open ranges of u64, ordered by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive). Ranges never touch or overlap.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Number of stored ranges (the memory the set holds).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &end)| x < end)
    }

    /// Adds one value.
    pub fn insert(&mut self, x: u64) {
        if x < u64::MAX {
            self.insert_range(x..x + 1);
        }
    }

    /// Adds every value of `r`, merging with neighbours.
    pub fn insert_range(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let swallowed: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in swallowed {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// Removes one value.
    pub fn remove(&mut self, x: u64) {
        let Some((&start, &end)) = self.ranges.range(..=x).next_back() else {
            return;
        };
        if x >= end {
            return;
        }
        self.ranges.remove(&start);
        if start < x {
            self.ranges.insert(start, x);
        }
        if x + 1 < end {
            self.ranges.insert(x + 1, end);
        }
    }

    /// Removes every value below `x`.
    pub fn remove_below(&mut self, x: u64) {
        let below: Vec<(u64, u64)> = self.ranges.range(..x).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in below {
            self.ranges.remove(&s);
            if e > x {
                self.ranges.insert(x, e);
            }
        }
    }

    /// Removes every value at or above `x`.
    pub fn remove_from(&mut self, x: u64) {
        let above: Vec<u64> = self.ranges.range(x..).map(|(&s, _)| s).collect();
        for s in above {
            self.ranges.remove(&s);
        }
        if let Some((_, end)) = self.ranges.range_mut(..x).next_back()
            && *end > x
        {
            *end = x;
        }
    }

    /// The values in both `self` and `other`.
    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        let (mut a, mut b) = (self.iter().peekable(), other.iter().peekable());
        while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
            let (start, end) = (x.start.max(y.start), x.end.min(y.end));
            if start < end {
                out.insert_range(start..end);
            }
            if x.end < y.end {
                a.next();
            } else {
                b.next();
            }
        }
        out
    }

    /// The smallest value ≥ `x` that is *not* in the set.
    pub fn first_gap_from(&self, x: u64) -> u64 {
        match self.ranges.range(..=x).next_back() {
            Some((_, &end)) if x < end => end,
            _ => x,
        }
    }

    /// How many values of `r` are in the set.
    pub fn count_in(&self, r: Range<u64>) -> u64 {
        self.iter_in(r).map(|r| r.end - r.start).sum()
    }

    /// The parts of the set within `r`, in order.
    pub fn iter_in(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self
            .ranges
            .range(..=r.start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(r.start);
        self.ranges
            .range(first..r.end.max(first))
            .filter_map(move |(&s, &e)| {
                let (a, b) = (s.max(r.start), e.min(r.end));
                (a < b).then_some(a..b)
            })
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn intersection_keeps_the_common_values(
            a in proptest::collection::vec((0u64..200, 1u64..20), 0..20),
            b in proptest::collection::vec((0u64..200, 1u64..20), 0..20),
        ) {
            let (mut x, mut y) = (RangeSet::new(), RangeSet::new());
            let (mut mx, mut my) = (BTreeSet::new(), BTreeSet::new());
            for (s, n) in a { x.insert_range(s..s + n); mx.extend(s..s + n); }
            for (s, n) in b { y.insert_range(s..s + n); my.extend(s..s + n); }
            let both: BTreeSet<u64> = x.intersection(&y).iter().flatten().collect();
            prop_assert_eq!(both, mx.intersection(&my).copied().collect::<BTreeSet<_>>());
        }

        #[test]
        fn behaves_like_a_set_of_values(
            ops in proptest::collection::vec((0u8..5, 0u64..200, 1u64..20), 0..80),
            probes in proptest::collection::vec(0u64..230, 0..40),
        ) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (op, x, len) in ops {
                match op {
                    0 => { set.insert(x); model.insert(x); }
                    1 => { set.insert_range(x..x + len); model.extend(x..x + len); }
                    2 => { set.remove_below(x); model.retain(|v| *v >= x); }
                    3 => { set.remove(x); model.remove(&x); }
                    _ => { set.remove_from(x); model.retain(|v| *v < x); }
                }
                let ranges: Vec<_> = set.iter().collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "ranges touch: {:?}", ranges);
                }
            }
            for p in probes {
                prop_assert_eq!(set.contains(p), model.contains(&p));
                let gap = (p..).find(|v| !model.contains(v)).expect("finite model");
                prop_assert_eq!(set.first_gap_from(p), gap);
                prop_assert_eq!(set.count_in(p..p + 30), model.range(p..p + 30).count() as u64);
            }
        }
    }

    #[test]
    fn one_hole_in_a_million_costs_two_ranges() {
        let mut set = RangeSet::new();
        for x in 0..1_000_000u64 {
            if x != 17 {
                set.insert(x);
            }
        }
        assert_eq!(set.range_count(), 2);
        assert_eq!(set.first_gap_from(0), 17);
    }
}
