//! Table and column definitions: parsing, validation and the evolution rules.
//!
//! A [`TableSchema`] is what a client registers (JSON). [`TableSchema::validate`] checks it
//! and resolves it into a [`ResolvedTable`] with its Arrow schema. [`check_evolution`] decides
//! whether a new definition may replace the current one: only adding nullable columns (and
//! changing table options such as sinks) is compatible.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::types::ColumnType;
use crate::SchemaError;

/// Largest schema JSON accepted, over Flight and HTTP alike.
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;

/// Most columns a table may have.
pub const MAX_COLUMNS: usize = 4096;

/// Longest table or column name accepted (PostgreSQL's identifier limit).
pub const MAX_IDENTIFIER_LEN: usize = 63;

/// The role a column plays; informational for now, used by sinks to pick keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Time,
    Tag,
    Field,
    Message,
}

/// The stores a table can be routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Postgres,
    Clickhouse,
    Archive,
}

impl SinkKind {
    /// The name used in schemas and config (`postgres`, `clickhouse`, `archive`).
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Postgres => "postgres",
            SinkKind::Clickhouse => "clickhouse",
            SinkKind::Archive => "archive",
        }
    }
}

/// What to do with columns a batch has but the table does not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraColumns {
    /// Refuse the batch (default).
    #[default]
    Reject,
    /// Drop the unknown columns and keep the rest.
    Drop,
}

/// One column of a registered table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    /// Default true, false for the time column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nullable: Option<bool>,
    /// Value used when a batch lacks this column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// A table definition as registered (the contract's JSON form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSchema {
    pub name: String,
    pub columns: Vec<ColumnDef>,
    /// Default: the first timestamp column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_column: Option<String>,
    /// Where rows go; default depends on the deployment (see the server's routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Vec<SinkKind>>,
    #[serde(default)]
    pub extra_columns: ExtraColumns,
    /// ClickHouse `ORDER BY` expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_by: Option<String>,
    /// ClickHouse `PARTITION BY` expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
    /// ClickHouse `TTL` clause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// PostgreSQL retention (e.g. `30 days`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
}

impl ColumnDef {
    /// A nullable column without default or role.
    pub fn new(name: &str, column_type: ColumnType) -> Self {
        Self {
            name: name.to_string(),
            column_type,
            nullable: None,
            default: None,
            role: None,
        }
    }
}

/// A validated table at a given registry version, with its Arrow schema.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTable {
    pub definition: TableSchema,
    pub version: u64,
    pub time_column: String,
    /// The schema every stored batch of this version has.
    pub arrow_schema: SchemaRef,
}

impl ResolvedTable {
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    /// Column definition by name.
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.definition.columns.iter().find(|c| c.name == name)
    }

    /// Whether a column accepts nulls (time column: false unless said otherwise).
    pub fn is_nullable(&self, column: &ColumnDef) -> bool {
        column.nullable.unwrap_or(column.name != self.time_column)
    }

    /// The stores this table's rows go to when its schema names none (`sinks` unset),
    /// following the seed design: metrics to PostgreSQL, logs and traces to ClickHouse,
    /// everything to the archive. Tables outside the seed count as logs when a column has
    /// the `message` role, as metrics otherwise.
    pub fn default_sinks(&self) -> Vec<SinkKind> {
        let store = match self.name() {
            "metrics" | "metrics_events" => SinkKind::Postgres,
            "logs_events" | "spans" | "span_events" => SinkKind::Clickhouse,
            _ if self
                .definition
                .columns
                .iter()
                .any(|c| c.role == Some(Role::Message)) =>
            {
                SinkKind::Clickhouse
            }
            _ => SinkKind::Postgres,
        };
        vec![store, SinkKind::Archive]
    }

    /// The stores rows of this table go to, given the stores this deployment has.
    ///
    /// Named `sinks` must all be configured (an error names the missing ones, so no
    /// row is silently kept from a store the table asks for); default routing uses
    /// whichever of its stores are configured (the archive always is).
    pub fn routes(&self, configured: &[SinkKind]) -> Result<Vec<SinkKind>, SchemaError> {
        match &self.definition.sinks {
            Some(s) => {
                let missing: Vec<String> = s
                    .iter()
                    .filter(|k| !configured.contains(k))
                    .map(|k| k.name().to_string())
                    .collect();
                if !missing.is_empty() {
                    return Err(SchemaError::Unrouted {
                        table: self.name().to_string(),
                        missing,
                    });
                }
                Ok(s.clone())
            }
            None => Ok(self
                .default_sinks()
                .into_iter()
                .filter(|k| configured.contains(k))
                .collect()),
        }
    }
}

/// Checks that `name` is a plain identifier: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes.
///
/// Sinks quote identifiers anyway; this keeps names portable across PostgreSQL,
/// ClickHouse and object-store paths.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<(), SchemaError> {
    let bad = |reason: &str| SchemaError::InvalidName {
        what,
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(bad("empty")),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(bad("must start with a letter or '_'"))
        }
        _ => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad("only letters, digits and '_' are allowed"));
    }
    if name.len() > MAX_IDENTIFIER_LEN {
        return Err(bad(&format!("longer than {MAX_IDENTIFIER_LEN} bytes")));
    }
    Ok(())
}

/// Checks a column name: an identifier as [`validate_identifier`] says, or two joined by
/// one `.` (`Events.Timestamp`: a subcolumn of a ClickHouse `Nested` column, which
/// ClickHouse stores as a column of that name), at most 63 bytes in all.
pub fn validate_column_name(name: &str) -> Result<(), SchemaError> {
    match name.split_once('.') {
        None => validate_identifier("column", name),
        Some((outer, inner)) => {
            validate_identifier("column", outer)
                .and_then(|_| validate_identifier("column", inner))
                .map_err(|_| SchemaError::InvalidName {
                    what: "column",
                    name: name.to_string(),
                    reason: "a name with a '.' must be two identifiers (letters, digits and '_', \
                             not starting with a digit) joined by one '.'"
                        .to_string(),
                })?;
            if name.len() > MAX_IDENTIFIER_LEN {
                return Err(SchemaError::InvalidName {
                    what: "column",
                    name: name.to_string(),
                    reason: format!("longer than {MAX_IDENTIFIER_LEN} bytes"),
                });
            }
            Ok(())
        }
    }
}

/// Names a client cannot register: Sluice's own tables and folders. `_` starts the
/// archive's own folders (`_deadletter`, `_sluice`), `sluice_` Sluice's tables in a
/// store; the rest are the seed's PostgreSQL objects that are not registered tables, and
/// the rollup's ClickHouse tables and views (`metrics_<n><s|m|h|d>`, their `_merged`
/// views, `metric_range`). Returns why, for the message.
pub fn reserved_name(name: &str) -> Option<&'static str> {
    const SEED_OBJECTS: &[&str] = &[
        "table_registry",
        "table_registry_versions",
        "schema_migrations",
        "metric_series",
        "metrics_points",
        "metrics_1m",
    ];
    if name.starts_with('_') {
        Some("names starting with '_' are kept for Sluice's own folders in the archive (_deadletter, _sluice)")
    } else if name.to_ascii_lowercase().starts_with("sluice") {
        Some("names starting with 'sluice' are kept for Sluice's own tables")
    } else if SEED_OBJECTS.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        Some("the name of one of Sluice's own tables in PostgreSQL (the seed schema)")
    } else if is_rollup_name(name) {
        Some("the name of one of the rollup's tables or views in ClickHouse (metrics_<interval>, metrics_<interval>_merged, metric_range)")
    } else {
        None
    }
}

/// `metrics_<n><s|m|h|d>` (a rollup interval's table), its `_merged` view, or
/// `metric_range`, in any case.
fn is_rollup_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if lower == "metric_range" {
        return true;
    }
    let Some(rest) = lower.strip_prefix("metrics_") else {
        return false;
    };
    let interval = rest.strip_suffix("_merged").unwrap_or(rest);
    match interval.char_indices().last() {
        Some((i, unit)) if "smhd".contains(unit) => {
            !interval[..i].is_empty() && interval[..i].bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    }
}

impl TableSchema {
    /// Parses the JSON form; `name` fills in a missing `"name"` key (the seed's form).
    pub fn from_json(json: &[u8], name: Option<&str>) -> Result<Self, SchemaError> {
        if json.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError::Unreadable {
                reason: format!(
                    "it is {} bytes long, more than the {MAX_SCHEMA_BYTES} accepted",
                    json.len()
                ),
            });
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| SchemaError::Unreadable {
                reason: format!("not valid JSON: {e}"),
            })?;
        if let (Some(obj), Some(n)) = (value.as_object_mut(), name) {
            obj.entry("name")
                .or_insert_with(|| serde_json::Value::String(n.to_string()));
        }
        let table = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string)
            .ok_or_else(|| SchemaError::Unreadable {
                reason: "it has no \"name\" (a string)".into(),
            })?;
        let invalid = |reason: String| SchemaError::Invalid {
            table: table.clone(),
            reason,
        };
        // Column names and types first, so a problem names its column (other shapes are
        // left to serde's messages: unknown or missing fields).
        let no_columns = Vec::new();
        let columns = value
            .get("columns")
            .and_then(|c| c.as_array())
            .unwrap_or(&no_columns);
        if columns.len() > MAX_COLUMNS {
            return Err(invalid(format!(
                "{} columns, more than the {MAX_COLUMNS} accepted",
                columns.len()
            )));
        }
        for (i, c) in columns.iter().enumerate() {
            let column = c
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| invalid(format!("column {} has no \"name\" (a string)", i + 1)))?;
            match c.get("type") {
                Some(serde_json::Value::String(t)) => {
                    ColumnType::parse(t, column)?;
                }
                _ => {
                    return Err(invalid(format!(
                        "column '{column}' has no \"type\" (a string)"
                    )))
                }
            }
        }
        serde_json::from_value(value).map_err(|e| invalid(format!("bad schema: {e}")))
    }

    /// Checks the definition and resolves it at `version`.
    pub fn validate(&self, version: u64) -> Result<ResolvedTable, SchemaError> {
        let invalid = |reason: String| SchemaError::Invalid {
            table: self.name.clone(),
            reason,
        };
        validate_identifier("table", &self.name)?;
        if self.columns.is_empty() {
            return Err(invalid("a table needs at least one column".into()));
        }
        let mut seen = HashSet::new();
        for c in &self.columns {
            validate_column_name(&c.name)?;
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(format!("column '{}' is defined twice", c.name)));
            }
        }
        let time_column = match &self.time_column {
            Some(t) => {
                let col = self
                    .columns
                    .iter()
                    .find(|c| &c.name == t)
                    .ok_or_else(|| invalid(format!("time_column '{t}' is not a column")))?;
                if !col.column_type.is_timestamp() {
                    return Err(invalid(format!(
                        "time_column '{t}' has type {}, it must be a timestamp type",
                        col.column_type
                    )));
                }
                t.clone()
            }
            None => self
                .columns
                .iter()
                .find(|c| c.column_type.is_timestamp())
                .map(|c| c.name.clone())
                .ok_or_else(|| {
                    invalid("no timestamp column: a table needs a time column".into())
                })?,
        };
        let mut resolved = ResolvedTable {
            definition: self.clone(),
            version,
            time_column,
            arrow_schema: Arc::new(Schema::empty()),
        };
        let mut fields = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            let nullable = resolved.is_nullable(c);
            if c.name == resolved.time_column && nullable {
                return Err(invalid(format!(
                    "time column '{}' cannot be nullable",
                    c.name
                )));
            }
            if let Some(d) = &c.default {
                if !default_fits(c.column_type, d) {
                    return Err(invalid(format!(
                        "column '{}': default {d} does not fit type {}",
                        c.name, c.column_type
                    )));
                }
            }
            fields.push(c.column_type.to_field(&c.name, nullable));
        }
        if let Some(sinks) = &self.sinks {
            let unique: HashSet<_> = sinks.iter().collect();
            if unique.len() != sinks.len() {
                return Err(invalid("a sink is listed twice in 'sinks'".into()));
            }
        }
        resolved.arrow_schema = Arc::new(Schema::new(fields));
        Ok(resolved)
    }
}

/// Whether a JSON default fits the column type.
fn default_fits(ty: ColumnType, value: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (ty, value) {
        (_, V::Null) => true,
        (ColumnType::Bool, V::Bool(_)) => true,
        (ColumnType::Int32, V::Number(n)) => n.as_i64().is_some_and(|v| i32::try_from(v).is_ok()),
        (ColumnType::Int64, V::Number(n)) => n.as_i64().is_some(),
        (ColumnType::Float | ColumnType::Double, V::Number(_)) => true,
        (ColumnType::Decimal { .. }, V::Number(_) | V::String(_)) => true,
        (ColumnType::String | ColumnType::Uuid | ColumnType::Date, V::String(_)) => true,
        (ColumnType::Timestamp(_), V::String(_) | V::Number(_)) => true,
        (ColumnType::Jsonb, _) => true,
        (ColumnType::Map, V::Object(o)) => o.values().all(|v| v.is_string()),
        (ColumnType::StringArray, V::Array(a)) => a.iter().all(|v| v.is_string() || v.is_null()),
        (ColumnType::DoubleArray, V::Array(a)) => a.iter().all(|v| v.is_number() || v.is_null()),
        // Lists of timestamps or maps default to the empty list only.
        (ColumnType::TimestampNsArray | ColumnType::MapArray, V::Array(a)) => a.is_empty(),
        _ => false,
    }
}

/// Decides whether `new` may replace `old` as the next version of a table.
///
/// Compatible: the same columns with the same types and nullability (order may change),
/// new columns that are nullable or have a default, and changed table options other than
/// the time column. Everything else is refused with the reason.
pub fn check_evolution(old: &ResolvedTable, new: &ResolvedTable) -> Result<(), SchemaError> {
    let incompatible = |reason: String| SchemaError::Incompatible {
        table: new.name().to_string(),
        reason,
    };
    if old.time_column != new.time_column {
        return Err(incompatible(format!(
            "time column changes from '{}' to '{}'",
            old.time_column, new.time_column
        )));
    }
    for oc in &old.definition.columns {
        let Some(nc) = new.column(&oc.name) else {
            return Err(incompatible(format!(
                "column '{}' is removed; columns can only be added",
                oc.name
            )));
        };
        if oc.column_type != nc.column_type {
            return Err(incompatible(format!(
                "column '{}' changes type from {} to {}",
                oc.name, oc.column_type, nc.column_type
            )));
        }
        let (on, nn) = (old.is_nullable(oc), new.is_nullable(nc));
        if on != nn {
            return Err(incompatible(format!(
                "column '{}' changes from {} to {}",
                oc.name,
                if on { "nullable" } else { "not null" },
                if nn { "nullable" } else { "not null" }
            )));
        }
    }
    for nc in &new.definition.columns {
        if old.column(&nc.name).is_none() && !new.is_nullable(nc) && nc.default.is_none() {
            return Err(incompatible(format!(
                "new column '{}' is not nullable and has no default; added columns must be nullable",
                nc.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> TableSchema {
        TableSchema::from_json(
            br#"{"columns": [{"name": "time", "type": "timestamp"},
                             {"name": "value", "type": "double"},
                             {"name": "labels", "type": "jsonb"}]}"#,
            Some("cpu"),
        )
        .unwrap()
    }

    #[test]
    fn the_rollups_names_are_reserved_and_only_those() {
        for name in [
            "metrics_1m",
            "metrics_1h",
            "metrics_15S",
            "metrics_7d_merged",
            "metric_range",
        ] {
            assert!(reserved_name(name).is_some(), "{name}");
        }
        for name in [
            "metrics",
            "metrics_h",
            "metrics_1x",
            "metrics_events",
            "metrics_1m_raw",
            "metric_ranges",
            "my_metrics_1m",
        ] {
            assert!(reserved_name(name).is_none(), "{name}");
        }
    }

    #[test]
    fn seed_form_is_accepted_with_name_beside_it() {
        let t = cpu().validate(1).unwrap();
        assert_eq!(t.name(), "cpu");
        assert_eq!(t.time_column, "time");
        assert!(!t.arrow_schema.field(0).is_nullable());
        assert!(t.arrow_schema.field(1).is_nullable());
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = TableSchema::from_json(
            br#"{"name":"x","columns":[{"name":"v","type":"double"}]}"#,
            None,
        )
        .unwrap()
        .validate(1)
        .unwrap_err();
        assert!(e.to_string().contains("needs a time column"), "{e}");
        let e = TableSchema::from_json(br#"{"name":"x; drop","columns":[]}"#, None)
            .unwrap()
            .validate(1)
            .unwrap_err();
        assert!(
            e.to_string().contains("invalid table name 'x; drop'"),
            "{e}"
        );
        let e = TableSchema::from_json(br#"{"name":"x","columns":[{"name":"t","type":"timestamp"},{"name":"t","type":"int32"}]}"#, None)
            .unwrap()
            .validate(1)
            .unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
        let e = TableSchema::from_json(br#"{"name":"x","columns":[{"name":"t","type":"timestamp"},{"name":"n","type":"int32","default":"a"}]}"#, None)
            .unwrap()
            .validate(1)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("default \"a\" does not fit type int32"),
            "{e}"
        );
        let e = TableSchema::from_json(br#"{"name":"x","colums":[]}"#, None).unwrap_err();
        assert!(e.to_string().contains("unknown field `colums`"), "{e}");
    }

    #[test]
    fn column_names_may_name_a_nested_subcolumn_and_nothing_odder() {
        for ok in ["Events.Timestamp", "a.b", "_x._y1"] {
            validate_column_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["a..b", ".a", "a.", "a.b.c", "a.1b", "1a.b", "a .b", "a.b;"] {
            let e = validate_column_name(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
        }
        let long = format!("{}.{}", "a".repeat(40), "b".repeat(30));
        assert!(validate_column_name(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than 63 bytes"));
        // Table names stay plain identifiers.
        let e = TableSchema::from_json(
            br#"{"name":"a.b","columns":[{"name":"t","type":"timestamp"}]}"#,
            None,
        )
        .unwrap()
        .validate(1)
        .unwrap_err();
        assert!(e.to_string().contains("invalid table name 'a.b'"), "{e}");
    }

    #[test]
    fn evolution_rules() {
        let v1 = cpu().validate(1).unwrap();
        let mut add = cpu();
        add.columns.push(ColumnDef::new("host", ColumnType::String));
        check_evolution(&v1, &add.validate(2).unwrap()).unwrap();

        let mut add_nn = cpu();
        let mut c = ColumnDef::new("host", ColumnType::String);
        c.nullable = Some(false);
        add_nn.columns.push(c);
        let e = check_evolution(&v1, &add_nn.validate(2).unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("new column 'host' is not nullable"),
            "{e}"
        );

        let mut retype = cpu();
        retype.columns[1].column_type = ColumnType::Float;
        let e = check_evolution(&v1, &retype.validate(2).unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("column 'value' changes type from double to float"),
            "{e}"
        );

        let mut drop = cpu();
        drop.columns.pop();
        let e = check_evolution(&v1, &drop.validate(2).unwrap()).unwrap_err();
        assert!(e.to_string().contains("column 'labels' is removed"), "{e}");
    }
}
