//! OTLP/JSON: the spec's JSON form of the three export requests, decoded into the same
//! protobuf structs the binary form gives (so both go through one mapping), and the
//! answers encoded back.
//!
//! # What flows through it
//! A parsed `serde_json::Value` is walked message by message, field by field, by hand:
//! the `opentelemetry-proto` crate's generated serde support is not used because it drops
//! values (int attribute values, metric data). The rules are the OTLP spec's ("JSON
//! Protobuf Encoding") and proto3's JSON mapping:
//! - keys in lowerCamelCase; the proto field names (`snake_case`) are taken too; unknown
//!   keys are ignored; `null` is the field's default;
//! - `traceId`, `spanId`, `parentSpanId` as hex (any case), not base64; other bytes
//!   (`bytesValue`) as base64, standard or URL-safe, padded or not;
//! - 64-bit integers as decimal strings or as JSON numbers; 32-bit ones as numbers or strings;
//! - doubles as numbers, numeric strings, or `"NaN"`, `"Infinity"`, `"-Infinity"`;
//! - enums as numbers or as their names (`SEVERITY_NUMBER_WARN`, `SPAN_KIND_SERVER`,
//!   `STATUS_CODE_ERROR`, `AGGREGATION_TEMPORALITY_DELTA`).
//!
//! A value that breaks these rules fails the whole request with its path, e.g.
//! `resourceLogs[0].scopeLogs[0].logRecords[3].timeUnixNano: "12x" is not an unsigned
//! 64-bit integer`.

use base64::Engine;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    summary_data_point::ValueAtQuantile, AggregationTemporality, Exemplar, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use serde_json::{json, Map, Value};

/// Media type of OTLP/HTTP JSON bodies.
pub const JSON: &str = "application/json";

/// Why a JSON body is not the request it should be: where (a path of keys and indexes,
/// gathered on the way out so that a good request pays nothing for it) and what.
#[derive(Debug)]
pub struct JsonError {
    path: Vec<String>,
    what: String,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut path = String::new();
        for part in self.path.iter().rev() {
            if !path.is_empty() && !part.starts_with('[') {
                path.push('.');
            }
            path.push_str(part);
        }
        if path.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{path}: {}", self.what)
        }
    }
}

type R<T> = std::result::Result<T, JsonError>;

fn fail<T>(what: impl Into<String>) -> R<T> {
    Err(JsonError {
        path: Vec::new(),
        what: what.into(),
    })
}

trait At<T> {
    fn at(self, part: impl FnOnce() -> String) -> R<T>;
}

impl<T> At<T> for R<T> {
    fn at(self, part: impl FnOnce() -> String) -> R<T> {
        self.map_err(|mut e| {
            e.path.push(part());
            e
        })
    }
}

/// A JSON value, shortened for an error message.
fn shown(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 60 {
        let mut cut = 57;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// A JSON object, read field by field.
struct Obj<'a>(&'a Map<String, Value>);

fn obj(v: &Value) -> R<Obj<'_>> {
    match v {
        Value::Object(m) => Ok(Obj(m)),
        other => fail(format!("{} is not an object", shown(other))),
    }
}

impl<'a> Obj<'a> {
    /// The field under its JSON name or its proto name; `None` when absent or null.
    fn get(&self, camel: &str, snake: &str) -> Option<&'a Value> {
        self.0
            .get(camel)
            .or_else(|| self.0.get(snake))
            .filter(|v| !v.is_null())
    }

    fn with<T: Default>(&self, camel: &str, snake: &str, f: impl FnOnce(&Value) -> R<T>) -> R<T> {
        match self.get(camel, snake) {
            Some(v) => f(v).at(|| camel.to_string()),
            None => Ok(T::default()),
        }
    }

    fn opt<T>(&self, camel: &str, snake: &str, f: impl FnOnce(&Value) -> R<T>) -> R<Option<T>> {
        match self.get(camel, snake) {
            Some(v) => f(v).map(Some).at(|| camel.to_string()),
            None => Ok(None),
        }
    }

    fn list<T>(&self, camel: &str, snake: &str, f: impl Fn(&Value) -> R<T>) -> R<Vec<T>> {
        let Some(v) = self.get(camel, snake) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v else {
            return fail(format!("{} is not an array", shown(v))).at(|| camel.to_string());
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| f(item).at(|| format!("[{i}]")))
            .collect::<R<Vec<T>>>()
            .at(|| camel.to_string())
    }

    fn string(&self, camel: &str, snake: &str) -> R<String> {
        self.with(camel, snake, string)
    }
    fn u64(&self, camel: &str, snake: &str) -> R<u64> {
        self.with(camel, snake, uint64)
    }
    fn u32(&self, camel: &str, snake: &str) -> R<u32> {
        self.with(camel, snake, |v| {
            let n = uint64(v)?;
            u32::try_from(n).or_else(|_| fail(format!("{n} is past an unsigned 32-bit integer")))
        })
    }
    fn i32(&self, camel: &str, snake: &str) -> R<i32> {
        self.with(camel, snake, int32)
    }
    fn f64(&self, camel: &str, snake: &str) -> R<f64> {
        self.with(camel, snake, double)
    }
    fn bool(&self, camel: &str, snake: &str) -> R<bool> {
        self.with(camel, snake, boolean)
    }
    fn id(&self, camel: &str, snake: &str) -> R<Vec<u8>> {
        self.with(camel, snake, hex_id)
    }
    fn enumeration(&self, camel: &str, snake: &str, by_name: fn(&str) -> Option<i32>) -> R<i32> {
        self.with(camel, snake, |v| match v {
            Value::String(s) => match by_name(s) {
                Some(n) => Ok(n),
                None => int32(v).or_else(|_| fail(format!("'{s}' is not a value of this enum"))),
            },
            _ => int32(v),
        })
    }
    fn attributes(&self, camel: &str, snake: &str) -> R<Vec<KeyValue>> {
        self.list(camel, snake, key_value)
    }
}

fn boolean(v: &Value) -> R<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => fail(format!("{} is not true or false", shown(other))),
    }
}

fn string(v: &Value) -> R<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => fail(format!("{} is not a string", shown(other))),
    }
}

/// An integer from a JSON number (integral) or a decimal string, as i128 to check ranges.
fn integer(v: &Value) -> R<i128> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(u as i128)
            } else if let Some(i) = n.as_i64() {
                Ok(i as i128)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 1.9e19 {
                    Ok(f as i128)
                } else {
                    fail(format!("{n} is not an integer"))
                }
            }
        }
        Value::String(s) => s
            .trim()
            .parse::<i128>()
            .or_else(|_| fail(format!("{} is not an integer", shown(v)))),
        other => fail(format!("{} is not an integer", shown(other))),
    }
}

fn uint64(v: &Value) -> R<u64> {
    let n = integer(v)?;
    u64::try_from(n).or_else(|_| fail(format!("{n} is not an unsigned 64-bit integer")))
}

fn int64(v: &Value) -> R<i64> {
    let n = integer(v)?;
    i64::try_from(n).or_else(|_| fail(format!("{n} is past a signed 64-bit integer")))
}

fn int32(v: &Value) -> R<i32> {
    let n = integer(v)?;
    i32::try_from(n).or_else(|_| fail(format!("{n} is past a signed 32-bit integer")))
}

fn double(v: &Value) -> R<f64> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            t => t
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map_or_else(|| fail(format!("{} is not a number", shown(v))), Ok),
        },
        other => fail(format!("{} is not a number", shown(other))),
    }
}

/// A trace or span id: hex digits, two per byte ("" for none).
fn hex_id(v: &Value) -> R<Vec<u8>> {
    let s = match v {
        Value::String(s) => s.as_str(),
        other => return fail(format!("{} is not a hex string", shown(other))),
    };
    let bytes = s.as_bytes();
    if bytes.len() % 2 != 0 {
        return fail(format!("'{s}' is not hex: an odd number of digits"));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    bytes
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .map_or_else(
            || fail(format!("'{}' is not hex", shown(v).trim_matches('"'))),
            Ok,
        )
}

fn base64_bytes(v: &Value) -> R<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = string(v)?;
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(&s).ok())
        .map_or_else(|| fail(format!("{} is not base64", shown(v))), Ok)
}

fn any_value(v: &Value) -> R<AnyValue> {
    let o = obj(v)?;
    use any_value::Value as V;
    let value = if let Some(s) = o.opt("stringValue", "string_value", string)? {
        Some(V::StringValue(s))
    } else if let Some(b) = o.opt("boolValue", "bool_value", boolean)? {
        Some(V::BoolValue(b))
    } else if let Some(i) = o.opt("intValue", "int_value", int64)? {
        Some(V::IntValue(i))
    } else if let Some(d) = o.opt("doubleValue", "double_value", double)? {
        Some(V::DoubleValue(d))
    } else if let Some(a) = o.opt("arrayValue", "array_value", |v| {
        Ok(ArrayValue {
            values: obj(v)?.list("values", "values", any_value)?,
        })
    })? {
        Some(V::ArrayValue(a))
    } else if let Some(l) = o.opt("kvlistValue", "kvlist_value", |v| {
        Ok(KeyValueList {
            values: obj(v)?.attributes("values", "values")?,
        })
    })? {
        Some(V::KvlistValue(l))
    } else {
        o.opt("bytesValue", "bytes_value", base64_bytes)?
            .map(V::BytesValue)
    };
    Ok(AnyValue { value })
}

fn key_value(v: &Value) -> R<KeyValue> {
    let o = obj(v)?;
    Ok(KeyValue {
        key: o.string("key", "key")?,
        value: o.opt("value", "value", any_value)?,
    })
}

fn scope(v: &Value) -> R<InstrumentationScope> {
    let o = obj(v)?;
    Ok(InstrumentationScope {
        name: o.string("name", "name")?,
        version: o.string("version", "version")?,
        attributes: o.attributes("attributes", "attributes")?,
        dropped_attributes_count: o.u32("droppedAttributesCount", "dropped_attributes_count")?,
    })
}

fn resource(v: &Value) -> R<Resource> {
    let o = obj(v)?;
    Ok(Resource {
        attributes: o.attributes("attributes", "attributes")?,
        dropped_attributes_count: o.u32("droppedAttributesCount", "dropped_attributes_count")?,
        entity_refs: o.list("entityRefs", "entity_refs", |v| {
            let o = obj(v)?;
            Ok(EntityRef {
                schema_url: o.string("schemaUrl", "schema_url")?,
                r#type: o.string("type", "type")?,
                id_keys: o.list("idKeys", "id_keys", string)?,
                description_keys: o.list("descriptionKeys", "description_keys", string)?,
            })
        })?,
    })
}

/// The top-level object of a request body.
fn top(v: &Value) -> R<Obj<'_>> {
    obj(v).or_else(|_| fail(format!("the body is {}, not a JSON object", shown(v))))
}

/// `ExportLogsServiceRequest` from its JSON form.
pub fn logs_request(v: &Value) -> R<ExportLogsServiceRequest> {
    Ok(ExportLogsServiceRequest {
        resource_logs: top(v)?.list("resourceLogs", "resource_logs", |v| {
            let o = obj(v)?;
            Ok(ResourceLogs {
                resource: o.opt("resource", "resource", resource)?,
                scope_logs: o.list("scopeLogs", "scope_logs", |v| {
                    let o = obj(v)?;
                    Ok(ScopeLogs {
                        scope: o.opt("scope", "scope", scope)?,
                        log_records: o.list("logRecords", "log_records", log_record)?,
                        schema_url: o.string("schemaUrl", "schema_url")?,
                    })
                })?,
                schema_url: o.string("schemaUrl", "schema_url")?,
            })
        })?,
    })
}

fn log_record(v: &Value) -> R<LogRecord> {
    let o = obj(v)?;
    Ok(LogRecord {
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        observed_time_unix_nano: o.u64("observedTimeUnixNano", "observed_time_unix_nano")?,
        severity_number: o.enumeration("severityNumber", "severity_number", |s| {
            SeverityNumber::from_str_name(s).map(|e| e as i32)
        })?,
        severity_text: o.string("severityText", "severity_text")?,
        body: o.opt("body", "body", any_value)?,
        attributes: o.attributes("attributes", "attributes")?,
        dropped_attributes_count: o.u32("droppedAttributesCount", "dropped_attributes_count")?,
        flags: o.u32("flags", "flags")?,
        trace_id: o.id("traceId", "trace_id")?,
        span_id: o.id("spanId", "span_id")?,
        event_name: o.string("eventName", "event_name")?,
    })
}

/// `ExportTraceServiceRequest` from its JSON form.
pub fn trace_request(v: &Value) -> R<ExportTraceServiceRequest> {
    Ok(ExportTraceServiceRequest {
        resource_spans: top(v)?.list("resourceSpans", "resource_spans", |v| {
            let o = obj(v)?;
            Ok(ResourceSpans {
                resource: o.opt("resource", "resource", resource)?,
                scope_spans: o.list("scopeSpans", "scope_spans", |v| {
                    let o = obj(v)?;
                    Ok(ScopeSpans {
                        scope: o.opt("scope", "scope", scope)?,
                        spans: o.list("spans", "spans", span)?,
                        schema_url: o.string("schemaUrl", "schema_url")?,
                    })
                })?,
                schema_url: o.string("schemaUrl", "schema_url")?,
            })
        })?,
    })
}

fn span(v: &Value) -> R<Span> {
    let o = obj(v)?;
    Ok(Span {
        trace_id: o.id("traceId", "trace_id")?,
        span_id: o.id("spanId", "span_id")?,
        trace_state: o.string("traceState", "trace_state")?,
        parent_span_id: o.id("parentSpanId", "parent_span_id")?,
        flags: o.u32("flags", "flags")?,
        name: o.string("name", "name")?,
        kind: o.enumeration("kind", "kind", |s| {
            SpanKind::from_str_name(s).map(|e| e as i32)
        })?,
        start_time_unix_nano: o.u64("startTimeUnixNano", "start_time_unix_nano")?,
        end_time_unix_nano: o.u64("endTimeUnixNano", "end_time_unix_nano")?,
        attributes: o.attributes("attributes", "attributes")?,
        dropped_attributes_count: o.u32("droppedAttributesCount", "dropped_attributes_count")?,
        events: o.list("events", "events", |v| {
            let o = obj(v)?;
            Ok(Event {
                time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
                name: o.string("name", "name")?,
                attributes: o.attributes("attributes", "attributes")?,
                dropped_attributes_count: o
                    .u32("droppedAttributesCount", "dropped_attributes_count")?,
            })
        })?,
        dropped_events_count: o.u32("droppedEventsCount", "dropped_events_count")?,
        links: o.list("links", "links", |v| {
            let o = obj(v)?;
            Ok(Link {
                trace_id: o.id("traceId", "trace_id")?,
                span_id: o.id("spanId", "span_id")?,
                trace_state: o.string("traceState", "trace_state")?,
                attributes: o.attributes("attributes", "attributes")?,
                dropped_attributes_count: o
                    .u32("droppedAttributesCount", "dropped_attributes_count")?,
                flags: o.u32("flags", "flags")?,
            })
        })?,
        dropped_links_count: o.u32("droppedLinksCount", "dropped_links_count")?,
        status: o.opt("status", "status", |v| {
            let o = obj(v)?;
            Ok(Status {
                message: o.string("message", "message")?,
                code: o.enumeration("code", "code", |s| {
                    StatusCode::from_str_name(s).map(|e| e as i32)
                })?,
            })
        })?,
    })
}

/// `ExportMetricsServiceRequest` from its JSON form.
pub fn metrics_request(v: &Value) -> R<ExportMetricsServiceRequest> {
    Ok(ExportMetricsServiceRequest {
        resource_metrics: top(v)?.list("resourceMetrics", "resource_metrics", |v| {
            let o = obj(v)?;
            Ok(ResourceMetrics {
                resource: o.opt("resource", "resource", resource)?,
                scope_metrics: o.list("scopeMetrics", "scope_metrics", |v| {
                    let o = obj(v)?;
                    Ok(ScopeMetrics {
                        scope: o.opt("scope", "scope", scope)?,
                        metrics: o.list("metrics", "metrics", metric)?,
                        schema_url: o.string("schemaUrl", "schema_url")?,
                    })
                })?,
                schema_url: o.string("schemaUrl", "schema_url")?,
            })
        })?,
    })
}

fn temporality(o: &Obj) -> R<i32> {
    o.enumeration("aggregationTemporality", "aggregation_temporality", |s| {
        AggregationTemporality::from_str_name(s).map(|e| e as i32)
    })
}

fn metric(v: &Value) -> R<Metric> {
    let o = obj(v)?;
    let data = if let Some(d) = o.opt("gauge", "gauge", |v| {
        Ok(Gauge {
            data_points: obj(v)?.list("dataPoints", "data_points", number_point)?,
        })
    })? {
        Some(Data::Gauge(d))
    } else if let Some(d) = o.opt("sum", "sum", |v| {
        let o = obj(v)?;
        Ok(Sum {
            data_points: o.list("dataPoints", "data_points", number_point)?,
            aggregation_temporality: temporality(&o)?,
            is_monotonic: o.bool("isMonotonic", "is_monotonic")?,
        })
    })? {
        Some(Data::Sum(d))
    } else if let Some(d) = o.opt("histogram", "histogram", |v| {
        let o = obj(v)?;
        Ok(Histogram {
            data_points: o.list("dataPoints", "data_points", histogram_point)?,
            aggregation_temporality: temporality(&o)?,
        })
    })? {
        Some(Data::Histogram(d))
    } else if let Some(d) = o.opt("exponentialHistogram", "exponential_histogram", |v| {
        let o = obj(v)?;
        Ok(ExponentialHistogram {
            data_points: o.list("dataPoints", "data_points", exp_histogram_point)?,
            aggregation_temporality: temporality(&o)?,
        })
    })? {
        Some(Data::ExponentialHistogram(d))
    } else {
        o.opt("summary", "summary", |v| {
            Ok(Summary {
                data_points: obj(v)?.list("dataPoints", "data_points", summary_point)?,
            })
        })?
        .map(Data::Summary)
    };
    Ok(Metric {
        name: o.string("name", "name")?,
        description: o.string("description", "description")?,
        unit: o.string("unit", "unit")?,
        metadata: o.attributes("metadata", "metadata")?,
        data,
    })
}

fn number_point(v: &Value) -> R<NumberDataPoint> {
    let o = obj(v)?;
    use number_data_point::Value as V;
    let value = match o.opt("asDouble", "as_double", double)? {
        Some(d) => Some(V::AsDouble(d)),
        None => o.opt("asInt", "as_int", int64)?.map(V::AsInt),
    };
    Ok(NumberDataPoint {
        attributes: o.attributes("attributes", "attributes")?,
        start_time_unix_nano: o.u64("startTimeUnixNano", "start_time_unix_nano")?,
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        exemplars: o.list("exemplars", "exemplars", exemplar)?,
        flags: o.u32("flags", "flags")?,
        value,
    })
}

fn exemplar(v: &Value) -> R<Exemplar> {
    let o = obj(v)?;
    use exemplar::Value as V;
    let value = match o.opt("asDouble", "as_double", double)? {
        Some(d) => Some(V::AsDouble(d)),
        None => o.opt("asInt", "as_int", int64)?.map(V::AsInt),
    };
    Ok(Exemplar {
        filtered_attributes: o.attributes("filteredAttributes", "filtered_attributes")?,
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        span_id: o.id("spanId", "span_id")?,
        trace_id: o.id("traceId", "trace_id")?,
        value,
    })
}

fn histogram_point(v: &Value) -> R<HistogramDataPoint> {
    let o = obj(v)?;
    Ok(HistogramDataPoint {
        attributes: o.attributes("attributes", "attributes")?,
        start_time_unix_nano: o.u64("startTimeUnixNano", "start_time_unix_nano")?,
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        count: o.u64("count", "count")?,
        sum: o.opt("sum", "sum", double)?,
        bucket_counts: o.list("bucketCounts", "bucket_counts", uint64)?,
        explicit_bounds: o.list("explicitBounds", "explicit_bounds", double)?,
        exemplars: o.list("exemplars", "exemplars", exemplar)?,
        flags: o.u32("flags", "flags")?,
        min: o.opt("min", "min", double)?,
        max: o.opt("max", "max", double)?,
    })
}

fn buckets(v: &Value) -> R<Buckets> {
    let o = obj(v)?;
    Ok(Buckets {
        offset: o.i32("offset", "offset")?,
        bucket_counts: o.list("bucketCounts", "bucket_counts", uint64)?,
    })
}

fn exp_histogram_point(v: &Value) -> R<ExponentialHistogramDataPoint> {
    let o = obj(v)?;
    Ok(ExponentialHistogramDataPoint {
        attributes: o.attributes("attributes", "attributes")?,
        start_time_unix_nano: o.u64("startTimeUnixNano", "start_time_unix_nano")?,
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        count: o.u64("count", "count")?,
        sum: o.opt("sum", "sum", double)?,
        scale: o.i32("scale", "scale")?,
        zero_count: o.u64("zeroCount", "zero_count")?,
        positive: o.opt("positive", "positive", buckets)?,
        negative: o.opt("negative", "negative", buckets)?,
        flags: o.u32("flags", "flags")?,
        exemplars: o.list("exemplars", "exemplars", exemplar)?,
        min: o.opt("min", "min", double)?,
        max: o.opt("max", "max", double)?,
        zero_threshold: o.f64("zeroThreshold", "zero_threshold")?,
    })
}

fn summary_point(v: &Value) -> R<SummaryDataPoint> {
    let o = obj(v)?;
    Ok(SummaryDataPoint {
        attributes: o.attributes("attributes", "attributes")?,
        start_time_unix_nano: o.u64("startTimeUnixNano", "start_time_unix_nano")?,
        time_unix_nano: o.u64("timeUnixNano", "time_unix_nano")?,
        count: o.u64("count", "count")?,
        sum: o.f64("sum", "sum")?,
        quantile_values: o.list("quantileValues", "quantile_values", |v| {
            let o = obj(v)?;
            Ok(ValueAtQuantile {
                quantile: o.f64("quantile", "quantile")?,
                value: o.f64("value", "value")?,
            })
        })?,
        flags: o.u32("flags", "flags")?,
    })
}

/// A request body in OTLP/JSON, decoded to the protobuf struct.
pub trait FromOtlpJson: Sized {
    fn from_otlp_json(v: &Value) -> R<Self>;
}

impl FromOtlpJson for ExportLogsServiceRequest {
    fn from_otlp_json(v: &Value) -> R<Self> {
        logs_request(v)
    }
}
impl FromOtlpJson for ExportTraceServiceRequest {
    fn from_otlp_json(v: &Value) -> R<Self> {
        trace_request(v)
    }
}
impl FromOtlpJson for ExportMetricsServiceRequest {
    fn from_otlp_json(v: &Value) -> R<Self> {
        metrics_request(v)
    }
}

/// An answer in OTLP/JSON: `{}`, or `{"partialSuccess": {"rejected…": "n", "errorMessage": …}}`
/// (the count as a string, as the JSON mapping writes 64-bit integers).
pub trait ToOtlpJson {
    fn to_otlp_json(&self) -> Value;
}

fn partial(key: &str, rejected: i64, message: &str) -> Value {
    json!({"partialSuccess": {(key): rejected.to_string(), "errorMessage": message}})
}

impl ToOtlpJson for ExportLogsServiceResponse {
    fn to_otlp_json(&self) -> Value {
        self.partial_success.as_ref().map_or(json!({}), |p| {
            partial(
                "rejectedLogRecords",
                p.rejected_log_records,
                &p.error_message,
            )
        })
    }
}
impl ToOtlpJson for ExportTraceServiceResponse {
    fn to_otlp_json(&self) -> Value {
        self.partial_success.as_ref().map_or(json!({}), |p| {
            partial("rejectedSpans", p.rejected_spans, &p.error_message)
        })
    }
}
impl ToOtlpJson for ExportMetricsServiceResponse {
    fn to_otlp_json(&self) -> Value {
        self.partial_success.as_ref().map_or(json!({}), |p| {
            partial(
                "rejectedDataPoints",
                p.rejected_data_points,
                &p.error_message,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    //! The example bodies under `testdata/` were written for these tests from the OTLP
    //! spec's JSON encoding rules; each is decoded and compared with the struct the same
    //! request has in protobuf, every field.
    use super::*;

    use super::super::test_values::{kv, s};

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }
    fn unhex(s: &str) -> Vec<u8> {
        hex_id(&Value::String(s.into())).unwrap()
    }

    #[test]
    fn the_logs_example_decodes_field_by_field() {
        let got = logs_request(&parse(include_str!("testdata/logs.json"))).unwrap();
        use any_value::Value as V;
        let first = LogRecord {
            time_unix_nano: 1_796_119_200_123_456_789,
            observed_time_unix_nano: 1_796_119_200_123_456_999,
            severity_number: 17,
            severity_text: "ERROR".into(),
            body: Some(AnyValue {
                value: Some(s("card declined")),
            }),
            attributes: vec![
                kv("amount", V::DoubleValue(12.5)),
                kv("attempt", V::IntValue(3)),
                kv("big", V::IntValue(9_007_199_254_740_993)),
                kv("retry", V::BoolValue(false)),
                kv("raw", V::BytesValue(vec![0x00, 0xff, 0x10])),
                kv(
                    "tags",
                    V::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(s("a")),
                            },
                            AnyValue {
                                value: Some(V::IntValue(2)),
                            },
                        ],
                    }),
                ),
                // NaN != NaN: compared apart below.
                kv(
                    "ctx",
                    V::KvlistValue(KeyValueList {
                        values: vec![kv("k", V::DoubleValue(0.0))],
                    }),
                ),
                KeyValue {
                    key: "nothing".into(),
                    value: Some(AnyValue { value: None }),
                },
            ],
            dropped_attributes_count: 2,
            flags: 1,
            trace_id: vec![
                0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f,
                0xc6, 0x0c,
            ],
            span_id: vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74],
            event_name: "payment.failed".into(),
        };
        let second = LogRecord {
            observed_time_unix_nano: 1_796_119_201_000_000_000,
            severity_number: SeverityNumber::Warn as i32,
            body: Some(AnyValue {
                value: Some(V::KvlistValue(KeyValueList {
                    values: vec![kv("msg", s("slow")), kv("ms", V::IntValue(1500))],
                })),
            }),
            ..Default::default()
        };
        let mut got = got;
        let records = &mut got.resource_logs[0].scope_logs[0].log_records;
        // Take the NaN out to compare it on its own.
        let Some(V::KvlistValue(ctx)) = records[0].attributes[6]
            .value
            .as_mut()
            .and_then(|v| v.value.as_mut())
        else {
            panic!("ctx is not a kvlist")
        };
        let Some(V::DoubleValue(nan)) = ctx.values[0].value.as_mut().and_then(|v| v.value.as_mut())
        else {
            panic!("ctx.k is not a double")
        };
        assert!(nan.is_nan());
        *nan = 0.0;
        let expected = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", s("checkout")),
                        kv("host.name", s("node-7")),
                    ],
                    dropped_attributes_count: 1,
                    entity_refs: vec![],
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "checkout.logger".into(),
                        version: "2.0.1".into(),
                        attributes: vec![kv("team", s("payments"))],
                        dropped_attributes_count: 0,
                    }),
                    log_records: vec![first, second],
                    schema_url: String::new(),
                }],
                schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
            }],
        };
        assert_eq!(got, expected);
    }

    #[test]
    fn the_trace_example_decodes_field_by_field() {
        let got = trace_request(&parse(include_str!("testdata/trace.json"))).unwrap();
        let trace = unhex("0af7651916cd43dd8448eb211c80319c");
        let expected = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("frontend"))],
                    dropped_attributes_count: 0,
                    entity_refs: vec![EntityRef {
                        schema_url: String::new(),
                        r#type: "service".into(),
                        id_keys: vec!["service.name".into()],
                        description_keys: vec![],
                    }],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "http.server".into(),
                        ..Default::default()
                    }),
                    spans: vec![
                        Span {
                            trace_id: trace.clone(),
                            span_id: unhex("b7ad6b7169203331"),
                            trace_state: "vendor=1".into(),
                            parent_span_id: unhex("00f067aa0ba902b7"),
                            flags: 257,
                            name: "GET /cart".into(),
                            kind: SpanKind::Server as i32,
                            start_time_unix_nano: 1_796_119_200_000_000_000,
                            end_time_unix_nano: 1_796_119_200_250_000_000,
                            attributes: vec![kv(
                                "http.response.status_code",
                                any_value::Value::IntValue(500),
                            )],
                            dropped_attributes_count: 0,
                            events: vec![Event {
                                time_unix_nano: 1_796_119_200_100_000_000,
                                name: "exception".into(),
                                attributes: vec![kv("exception.message", s("boom"))],
                                dropped_attributes_count: 0,
                            }],
                            dropped_events_count: 3,
                            links: vec![Link {
                                trace_id: unhex("4bf92f3577b34da6a3ce929d0e0e4736"),
                                span_id: unhex("00f067aa0ba902b7"),
                                trace_state: String::new(),
                                attributes: vec![kv("link.kind", s("retry"))],
                                dropped_attributes_count: 0,
                                flags: 1,
                            }],
                            dropped_links_count: 0,
                            status: Some(Status {
                                message: "upstream 500".into(),
                                code: StatusCode::Error as i32,
                            }),
                        },
                        Span {
                            trace_id: trace,
                            span_id: unhex("c7ad6b7169203331"),
                            name: "db".into(),
                            kind: SpanKind::Client as i32,
                            start_time_unix_nano: 1_796_119_200_010_000_000,
                            end_time_unix_nano: 1_796_119_200_020_000_000,
                            status: Some(Status {
                                message: String::new(),
                                code: StatusCode::Ok as i32,
                            }),
                            ..Default::default()
                        },
                    ],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(got, expected);
    }

    #[test]
    fn the_metrics_example_decodes_field_by_field() {
        let got = metrics_request(&parse(include_str!("testdata/metrics.json"))).unwrap();
        use number_data_point::Value as N;
        const T: u64 = 1_796_119_200_000_000_000;
        let metric = |name: &str, unit: &str, data: Data| Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(data),
            ..Default::default()
        };
        let metrics = vec![
            Metric {
                description: "items waiting".into(),
                ..metric(
                    "queue.depth",
                    "{item}",
                    Data::Gauge(Gauge {
                        data_points: vec![
                            NumberDataPoint {
                                time_unix_nano: T,
                                value: Some(N::AsInt(42)),
                                attributes: vec![kv("queue", s("q1"))],
                                ..Default::default()
                            },
                            NumberDataPoint {
                                time_unix_nano: T,
                                value: Some(N::AsDouble(f64::NEG_INFINITY)),
                                ..Default::default()
                            },
                        ],
                    }),
                )
            },
            metric(
                "requests",
                "",
                Data::Sum(Sum {
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                    data_points: vec![NumberDataPoint {
                        start_time_unix_nano: 1_796_119_100_000_000_000,
                        time_unix_nano: T,
                        value: Some(N::AsInt(9_007_199_254_740_993)),
                        exemplars: vec![Exemplar {
                            filtered_attributes: vec![kv("user", s("u1"))],
                            time_unix_nano: 1_796_119_199_000_000_000,
                            span_id: unhex("b7ad6b7169203331"),
                            trace_id: unhex("0af7651916cd43dd8448eb211c80319c"),
                            value: Some(exemplar::Value::AsDouble(0.25)),
                        }],
                        ..Default::default()
                    }],
                }),
            ),
            metric(
                "latency",
                "s",
                Data::Histogram(Histogram {
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    data_points: vec![HistogramDataPoint {
                        time_unix_nano: T,
                        count: 6,
                        sum: Some(3.5),
                        bucket_counts: vec![1, 2, 3],
                        explicit_bounds: vec![0.5, 1.0],
                        min: Some(0.1),
                        max: Some(2.0),
                        ..Default::default()
                    }],
                }),
            ),
            metric(
                "size",
                "",
                Data::ExponentialHistogram(ExponentialHistogram {
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    data_points: vec![ExponentialHistogramDataPoint {
                        time_unix_nano: T,
                        count: 7,
                        sum: Some(1.0),
                        scale: -1,
                        zero_count: 1,
                        zero_threshold: 0.001,
                        positive: Some(Buckets {
                            offset: -2,
                            bucket_counts: vec![1, 2],
                        }),
                        negative: Some(Buckets {
                            offset: 1,
                            bucket_counts: vec![3],
                        }),
                        ..Default::default()
                    }],
                }),
            ),
            metric(
                "rpc.duration",
                "",
                Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        time_unix_nano: T,
                        count: 10,
                        sum: 20.0,
                        quantile_values: vec![
                            ValueAtQuantile {
                                quantile: 0.5,
                                value: 1.5,
                            },
                            ValueAtQuantile {
                                quantile: 0.99,
                                value: 9.0,
                            },
                        ],
                        ..Default::default()
                    }],
                }),
            ),
        ];
        let expected = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("cart"))],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "cart.meter".into(),
                        version: "1".into(),
                        ..Default::default()
                    }),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(got, expected);
    }

    /// What a bad body is answered with: the path to the value and what is wrong with it.
    #[test]
    fn bad_values_are_named_with_their_path() {
        let cases = [
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{},{"timeUnixNano":"12x"}]}]}]}"#,
                r#"resourceLogs[0].scopeLogs[0].logRecords[1].timeUnixNano: "12x" is not an integer"#,
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"zz"}]}]}]}"#,
                "resourceLogs[0].scopeLogs[0].logRecords[0].traceId: 'zz' is not hex",
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"spanId":"abc"}]}]}]}"#,
                "logRecords[0].spanId: 'abc' is not hex: an odd number of digits",
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"severityNumber":"LOUD"}]}]}]}"#,
                "logRecords[0].severityNumber: 'LOUD' is not a value of this enum",
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":"-1"}]}]}]}"#,
                "timeUnixNano: -1 is not an unsigned 64-bit integer",
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[{"key":"a","value":{"intValue":"99999999999999999999"}}]}]}]}]}"#,
                "attributes[0].value.intValue: 99999999999999999999 is past a signed 64-bit integer",
            ),
            (
                r#"{"resourceLogs":{"scopeLogs":[]}}"#,
                r#"resourceLogs: {"scopeLogs":[]} is not an array"#,
            ),
            (r#"[1]"#, "the body is [1], not a JSON object"),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[{"key":"a","value":{"bytesValue":"!!"}}]}]}]}]}"#,
                r#"value.bytesValue: "!!" is not base64"#,
            ),
            (
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"flags":4294967296}]}]}]}"#,
                "flags: 4294967296 is past an unsigned 32-bit integer",
            ),
        ];
        for (body, expected) in cases {
            let err = logs_request(&parse(body)).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{body}: got '{err}', want '{expected}'"
            );
        }
        let err = metrics_request(&parse(
            r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"x","gauge":{"dataPoints":[{"asDouble":"fast"}]}}]}]}]}"#,
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            r#"resourceMetrics[0].scopeMetrics[0].metrics[0].gauge.dataPoints[0].asDouble: "fast" is not a number"#
        );
    }

    #[test]
    fn json_and_protobuf_give_the_same_rows() {
        // The same logs request sent both ways lands as the same Arrow rows.
        use prost::Message;
        let from_json = logs_request(&parse(include_str!("testdata/logs.json"))).unwrap();
        let from_proto = ExportLogsServiceRequest::decode(&from_json.encode_to_vec()[..]).unwrap();
        let a = super::super::logs_batch(&from_json, 1).unwrap().batch;
        let b = super::super::logs_batch(&from_proto, 1).unwrap().batch;
        assert_eq!(a, b);
        assert_eq!(a.num_rows(), 2);
    }

    #[test]
    fn answers_write_counts_as_strings() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;
        let ok = ExportLogsServiceResponse {
            partial_success: None,
        };
        assert_eq!(ok.to_otlp_json(), json!({}));
        let partial = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: 2,
                error_message: "why".into(),
            }),
        };
        assert_eq!(
            partial.to_otlp_json(),
            json!({"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "why"}})
        );
    }
}
