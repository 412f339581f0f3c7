//! What the stores' migration runners (`postgres::migrate`, `clickhouse::migrate`) share:
//! how a run is reported (`sluice migrate` prints it, the start logs it).

use std::fmt;

/// Writes `applied 0001_a, 0002_b (<path>)`, or `up to date (<path>)` when the run applied
/// nothing; `path` says which variant of the migrations the database is on.
pub fn write_report(f: &mut fmt::Formatter<'_>, applied: &[String], path: &str) -> fmt::Result {
    if applied.is_empty() {
        write!(f, "up to date ({path})")
    } else {
        write!(f, "applied {} ({path})", applied.join(", "))
    }
}
