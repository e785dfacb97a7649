//! `GET /api/v1/devices/{id}/latest` and `GET /api/v1/devices/{id}/readings`: history
//! from the embedded store.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::auth::Viewer;
use super::error::ApiError;
use super::extract::{DevicePath, device_id, unknown_parameter};
use super::problem::{BadDeviceId, Problem, Unauthorized};
use super::state::AppState;
use crate::model::JsonValue;
use crate::observe::Event;
use crate::store::{Agg, LatestValue, RangeQuery, SeriesPoint, StoreError, StoreReader};

fn store(st: &AppState) -> Result<&StoreReader, ApiError> {
    st.store
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("the embedded store is disabled (store.enabled)"))
}

/// Answer a failed store query: busy slots are a 503 the client may retry (and are
/// counted), a spent decode budget is the query's fault, anything else is internal.
fn query_failed(st: &AppState, e: StoreError) -> ApiError {
    match e {
        StoreError::Busy => {
            st.metrics.emit(Event::StoreQueryRejected);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_busy",
                "too many history queries are running; retry shortly",
            )
            .with_header(header::RETRY_AFTER, "1")
        }
        StoreError::DecodeBudget { max } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_points",
            format!(
                "one step of this query holds more than {max} stored points \
                 (store.max_decode_points); use a smaller `step`"
            ),
        ),
        e => ApiError::internal(&e),
    }
}

/// The `latest` answer.
pub struct Latest {
    device: String,
    values: Vec<LatestValue>,
}

impl Serialize for Latest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Metrics<'a>(&'a [LatestValue]);
        impl Serialize for Metrics<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for v in self.0 {
                    m.serialize_entry(
                        &v.metric,
                        &serde_json::json!({"ts": v.ts_ms, "value": JsonValue(&v.value)}),
                    )?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("device", &self.device)?;
        m.serialize_entry("metrics", &Metrics(&self.values))?;
        m.end()
    }
}

/// The latest value of every metric of a device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/latest", tag = "telemetry",
    params(DevicePath),
    responses(
        (status = 200, description = "`{\"device\": id, \"metrics\": {name: {\"ts\": ms, \"value\": v}}}`", body = serde_json::Value),
        BadDeviceId,
        Unauthorized,
        (status = 404, description = "Nothing stored for this device", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many store queries at once (`store_busy`, with `Retry-After`) or the store is disabled", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn latest(
    State(st): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Json<Latest>, ApiError> {
    device_id(&id)?;
    let values = store(&st)?
        .latest(id.clone())
        .await
        .map_err(|e| query_failed(&st, e))?;
    if values.is_empty() {
        return Err(ApiError::not_found(format!(
            "no readings stored for device `{id}`"
        )));
    }
    Ok(Json(Latest { device: id, values }))
}

/// The `readings` answer.
pub struct Readings {
    device: String,
    metric: String,
    step_ms: Option<i64>,
    agg: Option<&'static str>,
    points: Vec<SeriesPoint>,
    next_from: Option<i64>,
}

impl Serialize for Readings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Points<'a>(&'a [SeriesPoint]);
        impl Serialize for Points<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(
                    self.0
                        .iter()
                        .map(|p| serde_json::json!({"ts": p.ts_ms, "value": JsonValue(&p.value)})),
                )
            }
        }
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("device", &self.device)?;
        m.serialize_entry("metric", &self.metric)?;
        if let (Some(step), Some(agg)) = (self.step_ms, self.agg) {
            m.serialize_entry("step_ms", &step)?;
            m.serialize_entry("agg", agg)?;
        }
        m.serialize_entry("points", &Points(&self.points))?;
        m.serialize_entry("truncated", &self.next_from.is_some())?;
        if let Some(next) = self.next_from {
            m.serialize_entry("next_from", &next)?;
        }
        m.end()
    }
}

/// Parse a time: integer milliseconds since the epoch, or RFC 3339.
fn parse_time(field: &str, raw: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(raw).map_err(|_| {
        ApiError::bad_request(format!(
            "`{field}` must be milliseconds since the epoch or an RFC 3339 time, got `{raw}`"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| ApiError::bad_request(format!("`{field}` is before 1970")))?
        .as_millis();
    i64::try_from(ms).map_err(|_| ApiError::bad_request(format!("`{field}` is out of range")))
}

/// Points of one metric: `?metric=temp&from=…&to=…[&step=1m&agg=avg][&limit=N]`.
///
/// An answer is `truncated` when the range holds more than `limit` points (or buckets),
/// or more than `store.max_decode_points` stored points had to be read; `next_from` then
/// says where the rest starts: repeat the query with `from=next_from` (same `to`) until
/// `truncated` is false to get every point exactly once.
#[utoipa::path(get, path = "/api/v1/devices/{id}/readings", tag = "telemetry",
    params(
        ("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9_.-]{1,64}$"),
        ("metric" = String, Query, description = "Metric name", pattern = "^[A-Za-z0-9_.-]{1,64}$"),
        ("from" = Option<String>, Query, description = "Inclusive start: ms since the epoch or RFC 3339; default one hour ago"),
        ("to" = Option<String>, Query, description = "Exclusive end: ms or RFC 3339; default now"),
        ("step" = Option<String>, Query, description = "Bucket width, e.g. `1m`"),
        ("agg" = Option<String>, Query, description = "min, max, avg (default with step) or last", pattern = "^(min|max|avg|last)$"),
        ("limit" = Option<usize>, Query, description = "Most points (default and maximum `store.max_query_points`)"),
    ),
    responses(
        (status = 200, description = "`{\"device\", \"metric\", \"step_ms\"?, \"agg\"?, \"points\": [{\"ts\", \"value\"}], \"truncated\": bool, \"next_from\"?: ms}`: when `truncated`, the same query with `from=next_from` returns the rest", body = serde_json::Value),
        (status = 400, description = "Bad query parameter", body = Problem, content_type = "application/problem+json"),
        Unauthorized,
        (status = 422, description = "One step holds more points than one query may decode (`too_many_points`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many store queries at once (`store_busy`, with `Retry-After`) or the store is disabled", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn readings(
    State(st): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Readings>, ApiError> {
    device_id(&id)?;
    let max = st.settings.max_query_points;
    let mut metric = None;
    let now = crate::model::now_ms() as i64;
    let (mut from_ms, mut to_ms) = (now - 3_600_000, now + 1);
    let (mut step, mut agg, mut limit) = (None, None, max);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "metric" => {
                fluxgate_proto::validate_metric_name(&value)
                    .map_err(|e| ApiError::bad_request(format!("invalid `metric`: {e}")))?;
                metric = Some(value.into_owned());
            }
            "from" => from_ms = parse_time("from", &value)?,
            "to" => to_ms = parse_time("to", &value)?,
            "step" => {
                let d = humantime::parse_duration(&value).map_err(|_| {
                    ApiError::bad_request(format!(
                        "`step` must be a duration like `1m` or `500ms`, got `{value}`"
                    ))
                })?;
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if ms < 1 {
                    return Err(ApiError::bad_request("`step` must be at least 1ms"));
                }
                step = Some(ms);
            }
            "agg" => {
                agg = Some(Agg::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`agg` must be one of min, max, avg, last; got `{value}`"
                    ))
                })?);
            }
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("`limit` must be 1..={max}, got `{value}`"))
                    })?;
            }
            other => {
                return Err(unknown_parameter(other));
            }
        }
    }
    let metric = metric.ok_or_else(|| ApiError::bad_request("`metric` is required"))?;
    if from_ms >= to_ms {
        return Err(ApiError::bad_request("`from` must be before `to`"));
    }
    if agg.is_some() && step.is_none() {
        return Err(ApiError::bad_request("`agg` needs `step`"));
    }
    let step = step.map(|s| (s, agg.unwrap_or(Agg::Avg)));
    let page = store(&st)?
        .range(RangeQuery {
            device: id.clone(),
            metric: metric.clone(),
            from_ms,
            to_ms,
            step,
            limit,
        })
        .await
        .map_err(|e| query_failed(&st, e))?;
    Ok(Json(Readings {
        device: id,
        metric,
        step_ms: step.map(|(s, _)| s),
        agg: step.map(|(_, a)| match a {
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Avg => "avg",
            Agg::Last => "last",
        }),
        points: page.points,
        next_from: page.next_from,
    }))
}
