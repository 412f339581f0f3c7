//! The text a label set is stored under in ClickHouse's `metrics_1m`: the JSON object
//! written the way PostgreSQL prints a `jsonb` value (`metric_series.labels::text`), so the
//! same series has the same `labels` string in both stores and a dashboard variable filled
//! from one matches rows in the other.
//!
//! PostgreSQL's jsonb text: object keys sorted by length, then byte by byte (a later
//! duplicate key wins); `": "` after a key and `", "` between members and array items;
//! strings escaped as JSON requires and nothing more. Label values are strings in
//! practice, for which the text is exactly PostgreSQL's; numbers are written as
//! `serde_json` reads them (`1.50` becomes `1.5`, where PostgreSQL keeps `1.50`).

use serde_json::Value;

/// The canonical text of a `labels` value (`{}` for null), or why it is not JSON.
pub fn canonical(text: Option<&str>) -> Result<String, serde_json::Error> {
    let Some(text) = text else {
        return Ok("{}".into());
    };
    let value: Value = serde_json::from_str(text)?;
    let mut out = String::with_capacity(text.len() + 8);
    write(&value, &mut out);
    Ok(out)
}

fn write(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(b.0)));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_as_postgres_jsonb_does_and_spacing_matches() {
        assert_eq!(
            canonical(Some(r#"{"zz":"1","a":"2","bb":"x\"y","é":"ü"}"#)).unwrap(),
            r#"{"a": "2", "bb": "x\"y", "zz": "1", "é": "ü"}"#
        );
        assert_eq!(canonical(None).unwrap(), "{}");
        assert_eq!(canonical(Some("{}")).unwrap(), "{}");
        assert_eq!(
            canonical(Some(r#"{"k":[1,{"b":true,"a":null}],"k":"last"}"#)).unwrap(),
            r#"{"k": "last"}"#
        );
        assert_eq!(
            canonical(Some(r#"{"k":[1,{"bb":true,"a":null}]}"#)).unwrap(),
            r#"{"k": [1, {"a": null, "bb": true}]}"#
        );
        assert!(canonical(Some("{nope")).is_err());
    }
}
