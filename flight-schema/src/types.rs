//! Column type names of the contract and their Arrow types.
//!
//! | name | Arrow |
//! |---|---|
//! | `bool` | Boolean |
//! | `int32`, `int64` | Int32, Int64 |
//! | `float`, `double` | Float32, Float64 |
//! | `string` | Utf8 |
//! | `timestamp`, `timestamp_ms`, `timestamp_ns` | Timestamp(µs / ms / ns, "UTC") |
//! | `date` | Date32 |
//! | `uuid` | FixedSizeBinary(16), extension `arrow.uuid` |
//! | `decimal(p,s)` | Decimal128(p, s) |
//! | `jsonb` | Utf8 holding JSON text, extension `arrow.json` |
//! | `map` | Map(Utf8 → Utf8) |
//! | `string[]`, `double[]` | List(Utf8), List(Float64) |

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};

use crate::SchemaError;

/// Field metadata key of Arrow's canonical extension types.
pub const EXTENSION_NAME_KEY: &str = "ARROW:extension:name";
/// Canonical extension name for JSON text columns (`jsonb`).
pub const JSON_EXTENSION: &str = "arrow.json";
/// Canonical extension name for UUID columns.
pub const UUID_EXTENSION: &str = "arrow.uuid";

/// One column type of the registered-schema contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Bool,
    Int32,
    Int64,
    Float,
    Double,
    String,
    /// A UTC timestamp in the given unit (`timestamp` is microseconds).
    Timestamp(TimeUnit),
    Date,
    Uuid,
    Decimal {
        precision: u8,
        scale: i8,
    },
    Jsonb,
    /// String to string map.
    Map,
    StringArray,
    DoubleArray,
    /// A list of nanosecond UTC timestamps (ClickHouse `Array(DateTime64(9))`, the
    /// `Events.Timestamp` of a Nested column).
    TimestampNsArray,
    /// A list of string-to-string maps (ClickHouse `Array(Map(String, String))`).
    MapArray,
}

impl ColumnType {
    /// Parses a contract type name; `column` is only used for the error message.
    pub fn parse(name: &str, column: &str) -> Result<Self, SchemaError> {
        let unknown = || SchemaError::UnknownType {
            column: column.to_string(),
            type_name: name.to_string(),
        };
        let norm = name.trim().to_ascii_lowercase();
        Ok(match norm.as_str() {
            "bool" | "boolean" => Self::Bool,
            "int32" | "int" | "integer" => Self::Int32,
            "int64" | "bigint" => Self::Int64,
            "float" | "float32" | "real" => Self::Float,
            "double" | "float64" => Self::Double,
            "string" | "text" => Self::String,
            "timestamp" | "timestamptz" | "timestamp_us" => Self::Timestamp(TimeUnit::Microsecond),
            "timestamp_ms" => Self::Timestamp(TimeUnit::Millisecond),
            "timestamp_ns" => Self::Timestamp(TimeUnit::Nanosecond),
            "date" => Self::Date,
            "uuid" => Self::Uuid,
            "jsonb" | "json" => Self::Jsonb,
            "map" => Self::Map,
            "string[]" | "text[]" => Self::StringArray,
            "double[]" | "float8[]" => Self::DoubleArray,
            "timestamp_ns[]" => Self::TimestampNsArray,
            "map[]" => Self::MapArray,
            s if s.starts_with("decimal(") && s.ends_with(')') => {
                let inner = &s["decimal(".len()..s.len() - 1];
                let mut parts = inner.split(',').map(str::trim);
                let p: u8 = parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(unknown)?;
                let sc: i8 = parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(unknown)?;
                if parts.next().is_some() || p == 0 || p > 38 || sc < 0 || sc as u8 > p {
                    return Err(SchemaError::Invalid {
                        table: String::new(),
                        reason: format!(
                            "column '{column}': decimal({p},{sc}) needs 1 <= precision <= 38 and 0 <= scale <= precision"
                        ),
                    });
                }
                Self::Decimal {
                    precision: p,
                    scale: sc,
                }
            }
            _ => return Err(unknown()),
        })
    }

    /// The canonical contract name of this type.
    pub fn name(&self) -> String {
        match self {
            Self::Bool => "bool".into(),
            Self::Int32 => "int32".into(),
            Self::Int64 => "int64".into(),
            Self::Float => "float".into(),
            Self::Double => "double".into(),
            Self::String => "string".into(),
            Self::Timestamp(TimeUnit::Millisecond) => "timestamp_ms".into(),
            Self::Timestamp(TimeUnit::Nanosecond) => "timestamp_ns".into(),
            Self::Timestamp(_) => "timestamp".into(),
            Self::Date => "date".into(),
            Self::Uuid => "uuid".into(),
            Self::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            Self::Jsonb => "jsonb".into(),
            Self::Map => "map".into(),
            Self::StringArray => "string[]".into(),
            Self::DoubleArray => "double[]".into(),
            Self::TimestampNsArray => "timestamp_ns[]".into(),
            Self::MapArray => "map[]".into(),
        }
    }

    /// Whether this is one of the timestamp types.
    pub fn is_timestamp(&self) -> bool {
        matches!(self, Self::Timestamp(_))
    }

    /// The Arrow data type that batches of this column carry once reshaped.
    pub fn to_arrow(&self) -> DataType {
        match self {
            Self::Bool => DataType::Boolean,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float => DataType::Float32,
            Self::Double => DataType::Float64,
            Self::String | Self::Jsonb => DataType::Utf8,
            Self::Timestamp(unit) => DataType::Timestamp(*unit, Some(Arc::from("UTC"))),
            Self::Date => DataType::Date32,
            Self::Uuid => DataType::FixedSizeBinary(16),
            Self::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            Self::Map => map_type(),
            Self::StringArray => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            Self::DoubleArray => {
                DataType::List(Arc::new(Field::new("item", DataType::Float64, true)))
            }
            Self::TimestampNsArray => DataType::List(Arc::new(Field::new(
                "item",
                Self::Timestamp(TimeUnit::Nanosecond).to_arrow(),
                true,
            ))),
            Self::MapArray => DataType::List(Arc::new(Field::new("item", map_type(), true))),
        }
    }

    /// The Arrow field for a column of this type, with extension metadata where the
    /// contract type is richer than its storage type (`jsonb`, `uuid`).
    pub fn to_field(&self, name: &str, nullable: bool) -> Field {
        let field = Field::new(name, self.to_arrow(), nullable);
        match self {
            Self::Jsonb => field.with_metadata(HashMap::from([(
                EXTENSION_NAME_KEY.to_string(),
                JSON_EXTENSION.to_string(),
            )])),
            Self::Uuid => field.with_metadata(HashMap::from([(
                EXTENSION_NAME_KEY.to_string(),
                UUID_EXTENSION.to_string(),
            )])),
            _ => field,
        }
    }
}

/// The Arrow type of the contract's `map`: `Map<entries: Struct<key: Utf8, value: Utf8?>>`.
pub fn map_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(Fields::from(vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ])),
            false,
        )),
        false,
    )
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for ColumnType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for ColumnType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ColumnType::parse(&s, "?").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_contract_name_and_round_trips() {
        for name in [
            "bool",
            "int32",
            "int64",
            "float",
            "double",
            "string",
            "timestamp",
            "timestamp_ms",
            "timestamp_ns",
            "date",
            "uuid",
            "decimal(12,3)",
            "jsonb",
            "map",
            "string[]",
            "double[]",
            "timestamp_ns[]",
            "map[]",
        ] {
            let t = ColumnType::parse(name, "c").unwrap();
            assert_eq!(t.name(), name);
        }
        assert_eq!(
            ColumnType::parse("Decimal( 10 , 2 )", "c").unwrap(),
            ColumnType::Decimal {
                precision: 10,
                scale: 2
            }
        );
    }

    #[test]
    fn refuses_unknown_and_bad_decimal() {
        let e = ColumnType::parse("varchar", "host").unwrap_err();
        assert!(
            e.to_string()
                .contains("column 'host': unknown type 'varchar'"),
            "{e}"
        );
        assert!(ColumnType::parse("decimal(40,2)", "x").is_err());
        assert!(ColumnType::parse("decimal(4,5)", "x").is_err());
    }

    #[test]
    fn arrow_mapping() {
        assert_eq!(
            ColumnType::Timestamp(TimeUnit::Microsecond).to_arrow(),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let f = ColumnType::Jsonb.to_field("labels", true);
        assert_eq!(f.data_type(), &DataType::Utf8);
        assert_eq!(
            f.metadata().get(EXTENSION_NAME_KEY).unwrap(),
            JSON_EXTENSION
        );
    }
}
