//! Column families: one per declared state, named `state:<id>:<name>`, and how a range of state
//! keys (`id | rest`) maps onto them. Pure functions; the backend does the I/O.

use sabot_kernel::state::StateId;

/// RocksDB's column family that every database has; it holds the entries of a backend that
/// declared no states.
pub const DEFAULT_COLUMN: &str = "default";
const STATE_COLUMN_PREFIX: &str = "state:";

/// The column family of state `id` named `name`. The id is part of the name, so a database
/// describes itself: a restore knows every state's id without the declarations.
pub fn column_name(id: StateId, name: &str) -> String {
    format!("{STATE_COLUMN_PREFIX}{}:{name}", id.0)
}

/// What a column family holds: `None` for the default one, the state's id and name otherwise.
/// Refuses names sabot does not give.
pub fn parse_column_name(column: &str) -> Result<Option<(StateId, &str)>, String> {
    if column == DEFAULT_COLUMN {
        return Ok(None);
    }
    let refuse = || format!("column family {column:?} is not a sabot state (state:<id>:<name>)");
    let rest = column.strip_prefix(STATE_COLUMN_PREFIX).ok_or_else(refuse)?;
    let (id, name) = rest.split_once(':').ok_or_else(refuse)?;
    // Only the canonical spelling of the id: "007" would be a second column for state 7.
    let id: u16 = id.parse().map_err(|_| refuse())?;
    if column_name(StateId(id), name) != column || name.is_empty() {
        return Err(refuse());
    }
    Ok(Some((StateId(id), name)))
}

/// Which keys of one column family, whose keys are the state keys `prefix | rest`, fall into a
/// range of state keys.
#[derive(Debug, PartialEq, Eq)]
pub enum ColumnRange<'a> {
    /// The rests from `from`, below `to` (`None`: to the end of the key group).
    Rests { from: &'a [u8], to: Option<&'a [u8]> },
    /// None of this column's keys; later columns (higher prefixes) may have some.
    Skip,
    /// None of this column's keys nor of any later column's.
    Stop,
}

/// The part of the state-key range `[from, to)` (`to`: `None` is unbounded) that lies in the
/// column whose keys all start with `prefix` (empty for the default column, which holds every key).
pub fn column_range<'a>(prefix: &[u8], from: &'a [u8], to: Option<&'a [u8]>) -> ColumnRange<'a> {
    let from_rest: &[u8] = if from <= prefix {
        &[]
    } else if let Some(rest) = from.strip_prefix(prefix) {
        rest
    } else {
        // Above the prefix and not starting with it: above every key of this column.
        return ColumnRange::Skip;
    };
    let to_rest = match to {
        None => None,
        Some(to) => match to.strip_prefix(prefix) {
            // `to == prefix`: every key of this column is at or above it.
            Some([]) => return ColumnRange::Stop,
            Some(rest) => Some(rest),
            None if to <= prefix => return ColumnRange::Stop,
            // Above every key of this column.
            None => None,
        },
    };
    ColumnRange::Rests { from: from_rest, to: to_rest }
}

/// The smallest byte string above every string that starts with `prefix`, if there is one.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: column names round-trip, and names sabot does not give are refused.
    #[test]
    fn column_names() {
        assert_eq!(column_name(StateId(7), "count:x"), "state:7:count:x");
        assert_eq!(parse_column_name("state:7:count:x"), Ok(Some((StateId(7), "count:x"))));
        assert_eq!(parse_column_name("default"), Ok(None));
        for bad in ["state:07:a", "state:7:", "state:x:a", "state:70000:a", "state:7", "other", "state:-1:a"] {
            assert!(parse_column_name(bad).is_err(), "{bad}");
        }
    }

    // Goal: a state-key range maps onto each column exactly: every key of a column is in the
    // range iff its rest is in the column's part. Method: all short keys over a small alphabet,
    // against every range over the same alphabet, for several prefixes.
    #[test]
    fn column_ranges_match_a_brute_force_filter() {
        let alphabet = [0_u8, 1, 255];
        let mut strings: Vec<Vec<u8>> = vec![Vec::new()];
        for length in 1..=3 {
            let mut next = Vec::new();
            for string in strings.iter().filter(|s| s.len() == length - 1) {
                for &byte in &alphabet {
                    next.push([string.as_slice(), &[byte]].concat());
                }
            }
            strings.extend(next);
        }
        for prefix in [&[][..], &[1], &[0, 255], &[255, 255]] {
            for from in &strings {
                for to in strings.iter().map(Some).chain([None]) {
                    let range = column_range(prefix, from, to.map(Vec::as_slice));
                    for rest in &strings {
                        let key = [prefix, rest.as_slice()].concat();
                        let expected = key >= *from && to.is_none_or(|to| key < *to);
                        let found = match range {
                            ColumnRange::Rests { from, to } => {
                                rest.as_slice() >= from && to.is_none_or(|to| rest.as_slice() < to)
                            }
                            ColumnRange::Skip | ColumnRange::Stop => false,
                        };
                        assert_eq!(found, expected, "prefix {prefix:?} from {from:?} to {to:?} key {key:?}");
                        if range == ColumnRange::Stop {
                            // Nothing above the prefix either.
                            let above = prefix_end(prefix).unwrap_or_else(|| vec![255; 8]);
                            assert!(to.is_some_and(|to| *to <= above), "{prefix:?} {to:?}");
                        }
                    }
                }
            }
        }
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
