//! OTLP metrics: the `MetricsService` over gRPC and `POST /v1/metrics` over HTTP, into the
//! seed table `metrics` (`time, metric_name, labels, value`), which the PostgreSQL sink
//! splits into `metric_series` and `metrics_points` and the archive keeps as it is.
//! Exemplars go to `metrics_events`, the seed table with a `trace_id` column.
//!
//! # What flows through it
//! Every data point becomes one or more rows, Prometheus style:
//!
//! | OTLP | rows (`metric_name`: `value`, extra labels) |
//! |---|---|
//! | gauge | `<name>`: the value (an int as a double: exact up to 2^53) |
//! | sum | `<name>`: the value; labels `otel.temporality` (`cumulative`/`delta`) and `otel.monotonic` (`true`/`false`) |
//! | histogram | `<name>_bucket` with `le` per bucket (counts made cumulative; the last `le` is `+Inf`), `<name>_sum` (when set), `<name>_count`, `<name>_min`/`<name>_max` (when set); label `otel.temporality` |
//! | exponential histogram | the same series as a histogram: its buckets turned into `<name>_bucket` rows, one per bucket, whose `le` is the bucket's upper bound (`base^(index+1)` with `base = 2^(2^-scale)`; negative buckets first with `le = -base^index`, then the zero bucket with `le` = `zero_threshold`), cumulative, then `le="+Inf"` = count; label `otel.temporality` |
//! | summary | `<name>` with `quantile` per quantile, `<name>_sum`, `<name>_count` |
//!
//! `time` is the point's `time_unix_nano` (the time of receipt when it is 0);
//! `start_time_unix_nano` is not kept. `labels` is a JSON object of strings: the point's
//! attributes as they are (non-string values as JSON), the resource's under `resource.`,
//! the scope's under `scope.` plus `scope.name`/`scope.version` when set, `otel.unit`
//! when the metric has a unit, and the labels of the table above. Where a point
//! attribute has the name of a label Sluice sets, Sluice's wins and the attribute is kept
//! as `attr.<name>`. Names are kept as OTLP spells them (dots and all).
//!
//! Exemplars are `metrics_events` rows: `time` (the exemplar's, or the point's when 0),
//! `app` = `service.name`, `host` = `host.name`, `value`, `trace_id` (hex),
//! `level` = `exemplar`, and `labels` = `{"metric_name": <name>, "span_id": <hex>}` plus
//! the exemplar's filtered attributes.
//!
//! A point flagged `no_recorded_value` carries no value and is not stored. A point that
//! cannot be stored (no value, a time past a signed 64-bit nanosecond count, histogram
//! bounds that do not match its bucket counts, an exponential scale outside the spec's
//! -10..20) is counted in
//! `partial_success.rejected_data_points` with a message; the rest are stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Float64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, metric::Data, number_data_point, AggregationTemporality, Exemplar,
    ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, SummaryDataPoint,
};
use tonic::codec::CompressionEncoding;
use tracing::Instrument;

use super::{
    attribute, batch_of, context_entries, cut, grpc_status, hex, http_export, service_name,
    value_text,
};
use super::{check_expansion, MAX_ERRORS};
use crate::state::AppState;
use crate::write::submit_all;
use sluice_core::error::Result;

/// The seed table OTLP metric points land in.
pub const METRICS_TABLE: &str = "metrics";
/// The seed table exemplars land in.
pub const EXEMPLARS_TABLE: &str = "metrics_events";

/// The gRPC `MetricsService`, gzip accepted and answered, messages up to `max_message`.
pub fn metrics_service(
    state: Arc<AppState>,
    max_message: usize,
) -> MetricsServiceServer<OtlpMetrics> {
    MetricsServiceServer::new(OtlpMetrics { state })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_message)
}

/// The gRPC metrics door.
pub struct OtlpMetrics {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl MetricsService for OtlpMetrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let span = tracing::info_span!("otlp_metrics", protocol = "otlp_grpc");
        export_metrics(&self.state, request.into_inner(), "otlp_grpc")
            .instrument(span)
            .await
            .map(tonic::Response::new)
            .map_err(grpc_status)
    }
}

/// `POST /v1/metrics` (see [`super::http_export`]).
pub async fn http_metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!("otlp_metrics", protocol = "otlp_http");
    http_export(
        state,
        headers,
        body,
        "ExportMetricsServiceRequest",
        |state, r| async move { export_metrics(&state, r, "otlp_http").await },
    )
    .instrument(span)
    .await
}

/// Stores the request's points and exemplars (those that can be) and says what it could
/// not.
pub async fn export_metrics(
    state: &AppState,
    request: ExportMetricsServiceRequest,
    protocol: &str,
) -> Result<ExportMetricsServiceResponse> {
    let now = super::now_ns();
    let rows = super::off_workers(move || metric_batches(&request, now)).await?;
    let mut batches = cut(METRICS_TABLE, &rows.points);
    batches.extend(cut(EXEMPLARS_TABLE, &rows.exemplars));
    submit_all(state, batches, protocol, |i| format!("batch {}", i + 1)).await?;
    Ok(ExportMetricsServiceResponse {
        partial_success: (rows.rejected > 0 || !rows.errors.is_empty()).then(|| {
            ExportMetricsPartialSuccess {
                rejected_data_points: rows.rejected as i64,
                error_message: rows.errors.join("; "),
            }
        }),
    })
}

/// The `metrics` and `metrics_events` rows of a request, and the points not taken.
pub struct MetricRows {
    pub points: RecordBatch,
    pub exemplars: RecordBatch,
    pub rejected: usize,
    /// The first few reasons (at most [`MAX_ERRORS`]); also warnings when nothing was
    /// rejected (a metric without data).
    pub errors: Vec<String>,
}

/// Rows of the `metrics` table being built.
struct Points {
    time: TimestampNanosecondBuilder,
    name: StringBuilder,
    labels: StringBuilder,
    value: Float64Builder,
}

/// Rows of `metrics_events` (exemplars) being built.
struct Exemplars {
    time: TimestampNanosecondBuilder,
    app: StringBuilder,
    host: StringBuilder,
    labels: StringBuilder,
    value: Float64Builder,
    trace_id: StringBuilder,
    level: StringBuilder,
}

/// What every point of one metric shares.
struct MetricContext<'a> {
    name: &'a str,
    /// Resource, scope, unit, temporality and monotonicity labels.
    labels: Vec<(String, String)>,
    service: &'a str,
    host: &'a str,
}

/// A label set: attributes first, then Sluice's own labels, which win a clash (the
/// attribute moves to `attr.<key>`).
type LabelMap = BTreeMap<String, String>;

/// Keeps an attribute with the name of a label Sluice sets on some of a point's rows
/// (`le`, `quantile`) as `attr.<key>` on all of them.
fn reserve(map: &mut LabelMap, key: &str) {
    if let Some(theirs) = map.remove(key) {
        map.insert(format!("attr.{key}"), theirs);
    }
}

fn insert_ours(map: &mut LabelMap, key: &str, value: String) {
    if let Some(theirs) = map.insert(key.to_string(), value) {
        map.insert(format!("attr.{key}"), theirs);
    }
}

fn json(map: &LabelMap) -> String {
    serde_json::to_string(map).expect("a map of strings is JSON")
}

/// A bound or quantile as Prometheus writes it: `+Inf`, `-Inf`, `NaN`, else the shortest
/// decimal that reads back as the same double.
fn float_label(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

const NO_RECORDED_VALUE: u32 = 1;

impl Points {
    /// One row; fails once the request's rows pass [`MAX_EXPANDED_BYTES`](super::MAX_EXPANDED_BYTES).
    fn row(&mut self, time: i64, name: &str, labels: &str, value: f64) -> Result<()> {
        self.time.append_value(time);
        self.name.append_value(name);
        self.labels.append_value(labels);
        self.value.append_value(value);
        check_expansion(
            self.name.values_slice().len() + self.labels.values_slice().len(),
            "metric data points",
        )
    }
}

/// Counts rejected points and keeps the first reasons.
#[derive(Default)]
struct Rejects {
    count: usize,
    errors: Vec<String>,
}

impl Rejects {
    fn reject(&mut self, why: impl FnOnce() -> String) {
        self.count += 1;
        self.warn(why);
    }
    fn warn(&mut self, why: impl FnOnce() -> String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(why());
        }
    }
}

/// The Arrow batches of `metrics` and `metrics_events` for `request`; `now_ns` is the time
/// of receipt. See the module doc.
pub fn metric_batches(request: &ExportMetricsServiceRequest, now_ns: i64) -> Result<MetricRows> {
    // A first, cheap estimate refuses most over-expanding requests before anything is
    // allocated; the row-by-row check in `Points::row` is exact.
    check_expansion(estimated_bytes(request), "metric data points")?;
    let mut points = Points {
        time: TimestampNanosecondBuilder::new().with_timezone("UTC"),
        name: StringBuilder::new(),
        labels: StringBuilder::new(),
        value: Float64Builder::new(),
    };
    let mut ex = Exemplars {
        time: TimestampNanosecondBuilder::new().with_timezone("UTC"),
        app: StringBuilder::new(),
        host: StringBuilder::new(),
        labels: StringBuilder::new(),
        value: Float64Builder::new(),
        trace_id: StringBuilder::new(),
        level: StringBuilder::new(),
    };
    let mut rejects = Rejects::default();
    for resource_metrics in &request.resource_metrics {
        let resource_attrs: &[KeyValue] = resource_metrics
            .resource
            .as_ref()
            .map_or(&[], |r| &r.attributes);
        let service = service_name(resource_attrs);
        let host = attribute(resource_attrs, "host.name").unwrap_or_default();
        for scope_metrics in &resource_metrics.scope_metrics {
            let scope_labels = context_entries(resource_attrs, scope_metrics.scope.as_ref());
            for metric in &scope_metrics.metrics {
                let mut labels = scope_labels.clone();
                if !metric.unit.is_empty() {
                    labels.push(("otel.unit".into(), metric.unit.clone()));
                }
                let temporality = |t: i32| {
                    let word = match AggregationTemporality::try_from(t) {
                        Ok(AggregationTemporality::Delta) => "delta",
                        Ok(AggregationTemporality::Cumulative) => "cumulative",
                        _ => "unspecified",
                    };
                    ("otel.temporality".to_string(), word.to_string())
                };
                match &metric.data {
                    Some(Data::Sum(s)) => {
                        labels.push(temporality(s.aggregation_temporality));
                        labels.push(("otel.monotonic".into(), s.is_monotonic.to_string()));
                    }
                    Some(Data::Histogram(h)) => labels.push(temporality(h.aggregation_temporality)),
                    Some(Data::ExponentialHistogram(h)) => {
                        labels.push(temporality(h.aggregation_temporality))
                    }
                    _ => {}
                }
                let cx = MetricContext {
                    name: &metric.name,
                    labels,
                    service: &service,
                    host: &host,
                };
                match &metric.data {
                    Some(Data::Gauge(g)) => {
                        for p in &g.data_points {
                            number_point(&cx, p, now_ns, &mut points, &mut ex, &mut rejects)?;
                        }
                    }
                    Some(Data::Sum(s)) => {
                        for p in &s.data_points {
                            number_point(&cx, p, now_ns, &mut points, &mut ex, &mut rejects)?;
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for p in &h.data_points {
                            histogram_point(&cx, p, now_ns, &mut points, &mut ex, &mut rejects)?;
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            exp_histogram_point(
                                &cx,
                                p,
                                now_ns,
                                &mut points,
                                &mut ex,
                                &mut rejects,
                            )?;
                        }
                    }
                    Some(Data::Summary(s)) => {
                        for p in &s.data_points {
                            summary_point(&cx, p, now_ns, &mut points, &mut rejects)?;
                        }
                    }
                    None => rejects.warn(|| {
                        format!(
                            "metric '{}' has no data (no gauge, sum, histogram, exponential histogram or summary): nothing stored for it",
                            metric.name
                        )
                    }),
                }
            }
        }
    }
    let points = batch_of(vec![
        ("time", Arc::new(points.time.finish())),
        ("metric_name", Arc::new(points.name.finish())),
        ("labels", Arc::new(points.labels.finish())),
        ("value", Arc::new(points.value.finish())),
    ])?;
    let exemplars = batch_of(vec![
        ("time", Arc::new(ex.time.finish())),
        ("app", Arc::new(ex.app.finish())),
        ("host", Arc::new(ex.host.finish())),
        ("labels", Arc::new(ex.labels.finish())),
        ("value", Arc::new(ex.value.finish())),
        ("trace_id", Arc::new(ex.trace_id.finish())),
        ("level", Arc::new(ex.level.finish())),
    ])?;
    Ok(MetricRows {
        points,
        exemplars,
        rejected: rejects.count,
        errors: rejects.errors,
    })
}

/// About the text a request's rows will take: for each point, its rows (one per bucket or
/// quantile, plus the aggregates) times its labels (attributes and context) and name.
fn estimated_bytes(request: &ExportMetricsServiceRequest) -> usize {
    let pairs = |attrs: &[KeyValue]| -> usize {
        attrs
            .iter()
            .map(|kv| kv.key.len() + super::any_len(kv.value.as_ref()) + 6)
            .sum()
    };
    let mut total = 0usize;
    for rm in &request.resource_metrics {
        let resource = rm.resource.as_ref().map_or(0, |r| pairs(&r.attributes));
        for sm in &rm.scope_metrics {
            let scope = sm.scope.as_ref().map_or(0, |s| pairs(&s.attributes));
            for m in &sm.metrics {
                let row = |attrs: &[KeyValue]| resource + scope + m.name.len() + 40 + pairs(attrs);
                let points: usize = match &m.data {
                    Some(Data::Gauge(g)) => g.data_points.iter().map(|p| row(&p.attributes)).sum(),
                    Some(Data::Sum(g)) => g.data_points.iter().map(|p| row(&p.attributes)).sum(),
                    Some(Data::Histogram(h)) => h
                        .data_points
                        .iter()
                        .map(|p| (p.bucket_counts.len() + 4) * row(&p.attributes))
                        .sum(),
                    Some(Data::ExponentialHistogram(h)) => h
                        .data_points
                        .iter()
                        .map(|p| {
                            let buckets = p.positive.as_ref().map_or(0, |b| b.bucket_counts.len())
                                + p.negative.as_ref().map_or(0, |b| b.bucket_counts.len());
                            (buckets + 6) * row(&p.attributes)
                        })
                        .sum(),
                    Some(Data::Summary(q)) => q
                        .data_points
                        .iter()
                        .map(|p| (p.quantile_values.len() + 2) * row(&p.attributes))
                        .sum(),
                    None => 0,
                };
                total = total.saturating_add(points);
            }
        }
    }
    total
}

/// The label set of a point: its attributes, then the metric's context labels.
fn point_labels(cx: &MetricContext, attributes: &[KeyValue]) -> LabelMap {
    let mut map: LabelMap = attributes
        .iter()
        .map(|kv| (kv.key.clone(), value_text(kv)))
        .collect();
    for (k, v) in &cx.labels {
        insert_ours(&mut map, k, v.clone());
    }
    map
}

/// The time in nanoseconds to store a point at (receipt time when 0), or `None` when the
/// point is not stored: flagged `no_recorded_value`, or rejected for a time past a signed
/// 64-bit nanosecond count.
fn stored_time(
    cx: &MetricContext,
    flags: u32,
    time: u64,
    now_ns: i64,
    rejects: &mut Rejects,
) -> Option<i64> {
    if flags & NO_RECORDED_VALUE != 0 {
        return None;
    }
    if time == 0 {
        return Some(now_ns);
    }
    let stored = i64::try_from(time).ok();
    if stored.is_none() {
        rejects.reject(|| {
            format!(
                "metric '{}': time_unix_nano {time} is past what a signed 64-bit nanosecond count holds",
                cx.name
            )
        });
    }
    stored
}

fn number_point(
    cx: &MetricContext,
    p: &NumberDataPoint,
    now_ns: i64,
    points: &mut Points,
    ex: &mut Exemplars,
    rejects: &mut Rejects,
) -> Result<()> {
    let Some(time) = stored_time(cx, p.flags, p.time_unix_nano, now_ns, rejects) else {
        return Ok(());
    };
    let value = match p.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => {
            rejects.reject(|| format!("metric '{}': a data point without a value", cx.name));
            return Ok(());
        }
    };
    let labels = point_labels(cx, &p.attributes);
    points.row(time, cx.name, &json(&labels), value)?;
    exemplars(cx, &p.exemplars, time, ex, rejects)?;
    Ok(())
}

/// Appends the `<name>_bucket` rows of cumulative `counts` under `bounds` (one more count
/// than bounds; the last is `+Inf`).
fn bucket_rows(
    cx: &MetricContext,
    labels: &LabelMap,
    time: i64,
    bounds: impl Iterator<Item = f64>,
    counts: impl Iterator<Item = u64>,
    points: &mut Points,
) -> Result<()> {
    let name = format!("{}_bucket", cx.name);
    let mut total = 0u64;
    let mut bounds = bounds;
    for count in counts {
        total = total.saturating_add(count);
        let le = bounds.next().unwrap_or(f64::INFINITY);
        let mut labels = labels.clone();
        insert_ours(&mut labels, "le", float_label(le));
        points.row(time, &name, &json(&labels), total as f64)?;
    }
    Ok(())
}

/// `_sum`, `_count`, `_min`, `_max` rows (those that are set).
fn aggregate_rows(
    cx: &MetricContext,
    labels: &str,
    time: i64,
    parts: [(&str, Option<f64>); 4],
    points: &mut Points,
) -> Result<()> {
    for (suffix, value) in parts {
        if let Some(v) = value {
            points.row(time, &format!("{}_{suffix}", cx.name), labels, v)?;
        }
    }
    Ok(())
}

fn histogram_point(
    cx: &MetricContext,
    p: &HistogramDataPoint,
    now_ns: i64,
    points: &mut Points,
    ex: &mut Exemplars,
    rejects: &mut Rejects,
) -> Result<()> {
    let Some(time) = stored_time(cx, p.flags, p.time_unix_nano, now_ns, rejects) else {
        return Ok(());
    };
    if !p.bucket_counts.is_empty() && p.bucket_counts.len() != p.explicit_bounds.len() + 1 {
        rejects.reject(|| {
            format!(
                "metric '{}': a histogram point with {} bucket counts for {} explicit bounds (needs one more count than bounds)",
                cx.name,
                p.bucket_counts.len(),
                p.explicit_bounds.len()
            )
        });
        return Ok(());
    }
    let h = HistogramRows {
        attributes: &p.attributes,
        bounds: p.explicit_bounds.clone(),
        counts: p.bucket_counts.clone(),
        sum: p.sum,
        count: p.count,
        min: p.min,
        max: p.max,
        exemplars: &p.exemplars,
    };
    histogram_rows(cx, time, h, points, ex, rejects)
}

fn exp_histogram_point(
    cx: &MetricContext,
    p: &ExponentialHistogramDataPoint,
    now_ns: i64,
    points: &mut Points,
    ex: &mut Exemplars,
    rejects: &mut Rejects,
) -> Result<()> {
    let Some(time) = stored_time(cx, p.flags, p.time_unix_nano, now_ns, rejects) else {
        return Ok(());
    };
    if !(-10..=20).contains(&p.scale) {
        rejects.reject(|| {
            format!(
                "metric '{}': an exponential histogram point with scale {} (the spec allows -10 to 20)",
                cx.name, p.scale
            )
        });
        return Ok(());
    }
    // The bound `base^index` with `base = 2^(2^-scale)`, as `2^(index * 2^-scale)`.
    let step = 2f64.powi(-p.scale);
    let bound = |index: i64| 2f64.powf(index as f64 * step);
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    if let Some(neg) = &p.negative {
        // Bucket `offset + k` holds [-base^(i+1), -base^i): the most negative first.
        for (k, c) in neg.bucket_counts.iter().enumerate().rev() {
            bounds.push(-bound(neg.offset as i64 + k as i64));
            counts.push(*c);
        }
    }
    bounds.push(p.zero_threshold);
    counts.push(p.zero_count);
    if let Some(pos) = &p.positive {
        for (k, c) in pos.bucket_counts.iter().enumerate() {
            bounds.push(bound(pos.offset as i64 + k as i64 + 1));
            counts.push(*c);
        }
    }
    let listed: u64 = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
    // The +Inf bucket holds the whole count (more than the buckets when some overflowed).
    counts.push(p.count.saturating_sub(listed));
    let h = HistogramRows {
        attributes: &p.attributes,
        bounds,
        counts,
        sum: p.sum,
        count: p.count,
        min: p.min,
        max: p.max,
        exemplars: &p.exemplars,
    };
    histogram_rows(cx, time, h, points, ex, rejects)
}

/// A histogram point, explicit or exponential, with its buckets as upper bounds and counts.
struct HistogramRows<'a> {
    attributes: &'a [KeyValue],
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: Option<f64>,
    count: u64,
    min: Option<f64>,
    max: Option<f64>,
    exemplars: &'a [Exemplar],
}

/// The `_bucket` rows (cumulative, by `le`), `_sum`, `_count`, `_min`, `_max` and the
/// exemplars of one histogram point.
fn histogram_rows(
    cx: &MetricContext,
    time: i64,
    h: HistogramRows,
    points: &mut Points,
    ex: &mut Exemplars,
    rejects: &mut Rejects,
) -> Result<()> {
    let mut labels = point_labels(cx, h.attributes);
    reserve(&mut labels, "le");
    bucket_rows(
        cx,
        &labels,
        time,
        h.bounds.into_iter(),
        h.counts.into_iter(),
        points,
    )?;
    aggregate_rows(
        cx,
        &json(&labels),
        time,
        [
            ("sum", h.sum),
            ("count", Some(h.count as f64)),
            ("min", h.min),
            ("max", h.max),
        ],
        points,
    )?;
    exemplars(cx, h.exemplars, time, ex, rejects)
}

fn summary_point(
    cx: &MetricContext,
    p: &SummaryDataPoint,
    now_ns: i64,
    points: &mut Points,
    rejects: &mut Rejects,
) -> Result<()> {
    let Some(time) = stored_time(cx, p.flags, p.time_unix_nano, now_ns, rejects) else {
        return Ok(());
    };
    let mut labels = point_labels(cx, &p.attributes);
    reserve(&mut labels, "quantile");
    for q in &p.quantile_values {
        let mut labels = labels.clone();
        insert_ours(&mut labels, "quantile", float_label(q.quantile));
        points.row(time, cx.name, &json(&labels), q.value)?;
    }
    aggregate_rows(
        cx,
        &json(&labels),
        time,
        [
            ("sum", Some(p.sum)),
            ("count", Some(p.count as f64)),
            ("min", None),
            ("max", None),
        ],
        points,
    )
}

/// The point's exemplars as `metrics_events` rows. An exemplar whose own time does not fit
/// takes the point's; one without a value is not stored and said so in the answer.
fn exemplars(
    cx: &MetricContext,
    list: &[Exemplar],
    point_time: i64,
    ex: &mut Exemplars,
    rejects: &mut Rejects,
) -> Result<()> {
    for e in list {
        let value = match e.value {
            Some(exemplar::Value::AsDouble(d)) => d,
            Some(exemplar::Value::AsInt(i)) => i as f64,
            None => {
                rejects.warn(|| {
                    format!(
                        "metric '{}': an exemplar without a value is not stored",
                        cx.name
                    )
                });
                continue;
            }
        };
        let time = match e.time_unix_nano {
            0 => point_time,
            t => i64::try_from(t).unwrap_or(point_time),
        };
        let mut labels: LabelMap = e
            .filtered_attributes
            .iter()
            .map(|kv| (kv.key.clone(), value_text(kv)))
            .collect();
        insert_ours(&mut labels, "metric_name", cx.name.to_string());
        insert_ours(&mut labels, "span_id", hex(&e.span_id));
        ex.time.append_value(time);
        ex.app.append_value(cx.service);
        ex.host.append_value(cx.host);
        ex.labels.append_value(json(&labels));
        ex.value.append_value(value);
        ex.trace_id.append_value(hex(&e.trace_id));
        ex.level.append_value("exemplar");
        check_expansion(
            ex.labels.values_slice().len()
                + ex.app.values_slice().len()
                + ex.host.values_slice().len(),
            "exemplars",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
    use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
    use opentelemetry_proto::tonic::metrics::v1::{
        ExponentialHistogram, Gauge, Histogram, Metric, ResourceMetrics, ScopeMetrics, Sum, Summary,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    const T: u64 = 1_796_119_200_000_000_000;

    use super::super::test_values::kvs as kv;

    fn metric(name: &str, unit: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn number(value: number_data_point::Value, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            time_unix_nano: T,
            value: Some(value),
            attributes: attrs,
            ..Default::default()
        }
    }

    pub fn request() -> ExportMetricsServiceRequest {
        use number_data_point::Value as V;
        let exemplar = Exemplar {
            time_unix_nano: T - 5,
            value: Some(exemplar::Value::AsDouble(0.7)),
            trace_id: vec![0x11; 16],
            span_id: vec![0x22; 8],
            filtered_attributes: vec![kv("user", "u1")],
        };
        let metrics = vec![
            metric(
                "temp",
                "Cel",
                Data::Gauge(Gauge {
                    data_points: vec![number(V::AsInt(21), vec![kv("room", "a")])],
                }),
            ),
            metric(
                "requests",
                "",
                Data::Sum(Sum {
                    data_points: vec![
                        number(V::AsDouble(5.5), vec![]),
                        NumberDataPoint {
                            flags: NO_RECORDED_VALUE,
                            ..Default::default()
                        },
                        NumberDataPoint {
                            time_unix_nano: T,
                            ..Default::default()
                        },
                    ],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    is_monotonic: true,
                }),
            ),
            metric(
                "latency",
                "s",
                Data::Histogram(Histogram {
                    data_points: vec![
                        HistogramDataPoint {
                            time_unix_nano: T,
                            count: 6,
                            sum: Some(3.5),
                            bucket_counts: vec![1, 2, 3],
                            explicit_bounds: vec![0.5, 1.0],
                            min: Some(0.1),
                            attributes: vec![kv("le", "theirs")],
                            exemplars: vec![exemplar],
                            ..Default::default()
                        },
                        HistogramDataPoint {
                            time_unix_nano: T,
                            bucket_counts: vec![1, 2],
                            explicit_bounds: vec![0.5, 1.0],
                            ..Default::default()
                        },
                    ],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
            ),
            metric(
                "size",
                "",
                Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        time_unix_nano: T,
                        count: 7,
                        sum: Some(1.0),
                        scale: 0,
                        zero_count: 1,
                        positive: Some(Buckets {
                            offset: 0,
                            bucket_counts: vec![1, 2],
                        }),
                        negative: Some(Buckets {
                            offset: 1,
                            bucket_counts: vec![3],
                        }),
                        ..Default::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                }),
            ),
            metric(
                "rpc",
                "",
                Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        time_unix_nano: 0,
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
            Metric {
                name: "empty".into(),
                ..Default::default()
            },
        ];
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "api"), kv("host.name", "h1")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "meter".into(),
                        ..Default::default()
                    }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// (name, labels without the resource/scope ones, value, time) of every row.
    fn rows(b: &RecordBatch) -> Vec<(String, serde_json::Value, f64, i64)> {
        let time = b
            .column(0)
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        (0..b.num_rows())
            .map(|i| {
                let mut labels: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(b.column(2).as_string::<i32>().value(i)).unwrap();
                assert_eq!(labels.remove("resource.service.name").unwrap(), "api");
                assert_eq!(labels.remove("resource.host.name").unwrap(), "h1");
                assert_eq!(labels.remove("scope.name").unwrap(), "meter");
                (
                    b.column(1).as_string::<i32>().value(i).to_string(),
                    serde_json::Value::Object(labels),
                    b.column(3)
                        .as_primitive::<arrow::datatypes::Float64Type>()
                        .value(i),
                    time.value(i),
                )
            })
            .collect()
    }

    #[test]
    fn every_metric_kind_maps_to_prometheus_style_rows() {
        use serde_json::json;
        let out = metric_batches(&request(), 42).unwrap();
        assert_eq!(out.rejected, 2, "{:?}", out.errors);
        assert!(out.errors[0].contains("'requests': a data point without a value"));
        assert!(out.errors[1].contains("2 bucket counts for 2 explicit bounds"));
        assert!(out.errors[2].contains("'empty' has no data"));
        let t = T as i64;
        let cum = json!({"otel.temporality": "cumulative", "otel.unit": "s"});
        let with = |extra: serde_json::Value| {
            let mut m = cum.as_object().unwrap().clone();
            m.insert("attr.le".into(), json!("theirs"));
            m.extend(extra.as_object().unwrap().clone());
            serde_json::Value::Object(m)
        };
        let exp = json!({"otel.temporality": "delta"});
        let exp_le = |le: &str| {
            let mut m = exp.as_object().unwrap().clone();
            m.insert("le".into(), json!(le));
            serde_json::Value::Object(m)
        };
        let expected = vec![
            ("temp", json!({"room": "a", "otel.unit": "Cel"}), 21.0, t),
            (
                "requests",
                json!({"otel.temporality": "delta", "otel.monotonic": "true"}),
                5.5,
                t,
            ),
            ("latency_bucket", with(json!({"le": "0.5"})), 1.0, t),
            ("latency_bucket", with(json!({"le": "1"})), 3.0, t),
            ("latency_bucket", with(json!({"le": "+Inf"})), 6.0, t),
            ("latency_sum", with(json!({})), 3.5, t),
            ("latency_count", with(json!({})), 6.0, t),
            ("latency_min", with(json!({})), 0.1, t),
            ("size_bucket", exp_le("-2"), 3.0, t),
            ("size_bucket", exp_le("0"), 4.0, t),
            ("size_bucket", exp_le("2"), 5.0, t),
            ("size_bucket", exp_le("4"), 7.0, t),
            ("size_bucket", exp_le("+Inf"), 7.0, t),
            ("size_sum", exp.clone(), 1.0, t),
            ("size_count", exp.clone(), 7.0, t),
            ("rpc", json!({"quantile": "0.5"}), 1.5, 42),
            ("rpc", json!({"quantile": "0.99"}), 9.0, 42),
            ("rpc_sum", json!({}), 20.0, 42),
            ("rpc_count", json!({}), 10.0, 42),
        ];
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(n, l, v, t)| (n.to_string(), l, v, t))
            .collect();
        assert_eq!(rows(&out.points), expected);

        let e = &out.exemplars;
        assert_eq!(e.num_rows(), 1);
        let text = |c: &str| e.column_by_name(c).unwrap().as_string::<i32>().value(0);
        assert_eq!(text("app"), "api");
        assert_eq!(text("host"), "h1");
        assert_eq!(text("trace_id"), "11".repeat(16));
        assert_eq!(text("level"), "exemplar");
        let labels: serde_json::Value = serde_json::from_str(text("labels")).unwrap();
        assert_eq!(
            labels,
            json!({"metric_name": "latency", "span_id": "22".repeat(8), "user": "u1"})
        );
        // Both fit their seed tables.
        for (table, batch) in [(METRICS_TABLE, &out.points), (EXEMPLARS_TABLE, e)] {
            let t = flight_schema::seeds::seed_tables()
                .into_iter()
                .find(|t| t.name == table)
                .unwrap()
                .validate(1)
                .unwrap();
            let b = sluice_sql::reshape::reshape(&t, batch).unwrap();
            assert_eq!(b.num_rows(), batch.num_rows());
        }
    }

    #[test]
    fn a_point_with_millions_of_buckets_is_refused_not_expanded() {
        // 3 million empty buckets are 3 MB on the wire and would be 3 million rows.
        let point = ExponentialHistogramDataPoint {
            time_unix_nano: T,
            positive: Some(Buckets {
                offset: 0,
                bucket_counts: vec![0; 3_000_000],
            }),
            attributes: vec![kv("padding", &"p".repeat(100))],
            ..Default::default()
        };
        let mut req = request();
        req.resource_metrics[0].scope_metrics[0].metrics = vec![metric(
            "wide",
            "",
            Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![point],
                aggregation_temporality: 1,
            }),
        )];
        let e = metric_batches(&req, 1).err().expect("refused");
        assert!(e.to_string().contains("more than 256 MiB"), "{e}");
    }

    #[test]
    fn an_exponential_scale_out_of_the_spec_is_rejected_not_computed() {
        let mut req = request();
        let point = |scale| ExponentialHistogramDataPoint {
            time_unix_nano: T,
            count: 1,
            scale,
            zero_count: 1,
            ..Default::default()
        };
        req.resource_metrics[0].scope_metrics[0].metrics = vec![metric(
            "odd",
            "",
            Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![point(i32::MIN), point(21), point(-10)],
                aggregation_temporality: 1,
            }),
        )];
        let out = metric_batches(&req, 1).unwrap();
        assert_eq!(out.rejected, 2, "{:?}", out.errors);
        assert!(
            out.errors[0].contains("scale -2147483648"),
            "{:?}",
            out.errors
        );
        // The one in range: zero bucket, +Inf, _count.
        assert_eq!(out.points.num_rows(), 3);
    }

    #[test]
    fn float_labels_read_like_prometheus() {
        assert_eq!(float_label(1.0), "1");
        assert_eq!(float_label(0.25), "0.25");
        assert_eq!(float_label(f64::INFINITY), "+Inf");
        assert_eq!(float_label(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float_label(f64::NAN), "NaN");
        assert_eq!(float_label(1e-9), "0.000000001");
    }
}
