//! Device provisioning: `/api/v1/devices` CRUD, bulk creation and token rotation.
//!
//! Bodies are read and parsed here (not with axum's `Json`) so that every failure is a
//! problem+json naming the field: 415 for a wrong content type, 413 past the size limit,
//! 400 for malformed JSON or wrong types, 422 for values the registry refuses.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Viewer};
use super::error::ApiError;
use super::extract::{
    DevicePath, IfMatch, device_id, if_match, json_body, page_limit, rfc3339, unknown_parameter,
};
use super::problem::{
    AdminErrors, BadDeviceId, DeviceNotFound, EtagMismatch, JsonBodyErrors, Problem, Unauthorized,
};
use super::state::AppState;
use crate::registry::{DeviceFields, DeviceView, ListFilter, RegistryError};

/// Largest body of a single-device request.
const MAX_BODY: usize = 64 * 1024;
/// Largest body of a bulk request.
const MAX_BULK_BODY: usize = 8 * 1024 * 1024;
/// Most devices in one bulk request.
pub const MAX_BULK: usize = 10_000;
/// A device to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceCreate {
    /// `[A-Za-z0-9_.-]{1,64}`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    id: String,
    /// Display name; defaults to the id. 1 to 128 characters, no control characters.
    #[schema(
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$",
        min_length = 1,
        max_length = 128
    )]
    name: Option<String>,
    /// Labels, e.g. `{"site": "berlin"}`.
    #[serde(default)]
    #[schema(schema_with = labels_schema)]
    labels: BTreeMap<String, String>,
    /// Defaults to true.
    enabled: Option<bool>,
}

impl DeviceCreate {
    fn into_parts(self) -> (String, DeviceFields) {
        let fields = DeviceFields {
            name: self.name.unwrap_or_else(|| self.id.clone()),
            labels: self.labels,
            enabled: self.enabled.unwrap_or(true),
        };
        (self.id, fields)
    }
}

/// Full replacement of a device's mutable fields (`PUT`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceReplace {
    /// Display name: 1 to 128 characters, no control characters.
    #[schema(
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$",
        min_length = 1,
        max_length = 128
    )]
    name: String,
    /// Labels.
    #[schema(schema_with = labels_schema)]
    labels: BTreeMap<String, String>,
    /// Whether the device may connect and send.
    enabled: bool,
}

/// Bulk creation request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreate {
    /// Up to 10,000 devices.
    #[schema(max_items = 10_000, value_type = Vec<BulkDevice>)]
    devices: Vec<DeviceCreate>,
}

/// One device of a bulk request (documentation of [`DeviceCreate`] in a bulk body): its
/// values are checked per item, and an item the registry refuses is reported in
/// `results` with status 422 while the others are created, so the document leaves the
/// values unconstrained here.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BulkDevice {
    /// `[A-Za-z0-9_.-]{1,64}`.
    id: String,
    /// Display name; defaults to the id.
    name: Option<String>,
    /// Labels, e.g. `{"site": "berlin"}`.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Defaults to true.
    enabled: Option<bool>,
}

/// The labels of a request: at most 32, keys `[A-Za-z0-9_.-]{1,64}`, values 1 to 128
/// characters without control characters (what the registry accepts, so that the
/// document does not call valid what the server refuses).
fn labels_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_.-]{1,64}$"));
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(crate::registry::MAX_TEXT))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]*$"));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(key))
        .additional_properties(Some(value))
        .max_properties(Some(crate::registry::MAX_LABELS))
        .build()
}

/// A JSON merge patch (RFC 7396) of a device's mutable fields (documentation only: the
/// handler applies the patch to the current fields and validates the result). A label
/// set to null is removed; `labels: null` removes them all.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct DevicePatch {
    /// Display name: 1 to 128 characters, no control characters.
    #[schema(
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$",
        min_length = 1,
        max_length = 128,
        nullable = false
    )]
    #[serde(default)]
    name: Option<String>,
    /// Labels to set (a string) or remove (null).
    #[schema(schema_with = label_patch_schema)]
    #[serde(default)]
    labels: Option<BTreeMap<String, Option<String>>>,
    /// Whether the device may connect and send.
    #[schema(nullable = false)]
    #[serde(default)]
    enabled: Option<bool>,
}

/// Like [`labels_schema`], with null values (remove that label) and null itself.
fn label_patch_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::SchemaType;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_.-]{1,64}$"));
    let value = ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .min_length(Some(1))
        .max_length(Some(crate::registry::MAX_TEXT))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]*$"));
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .property_names(Some(key))
        .additional_properties(Some(value))
        .build()
}

/// A device resource.
#[derive(Serialize, ToSchema)]
pub struct DeviceOut {
    /// The id.
    id: String,
    /// Display name.
    name: String,
    /// Labels.
    labels: BTreeMap<String, String>,
    /// Whether the device may connect and send.
    enabled: bool,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339.
    updated_at: String,
    /// RFC 3339; null if never seen.
    last_seen: Option<String>,
    /// Connected now, or seen within `devices.online_timeout`.
    online: bool,
    /// `mqtt`, `ws` or `http`: the transport it last used.
    transport: Option<String>,
    /// The ETag of this version (also sent as the `ETag` header).
    etag: String,
}

impl From<&DeviceView> for DeviceOut {
    fn from(v: &DeviceView) -> Self {
        let r = &v.record;
        DeviceOut {
            id: r.id.clone(),
            name: r.fields.name.clone(),
            labels: r.fields.labels.clone(),
            enabled: r.fields.enabled,
            created_at: rfc3339(r.created_ms),
            updated_at: rfc3339(r.updated_ms),
            last_seen: v.last_seen_ms.map(rfc3339),
            online: v.online,
            transport: v.transport.map(|t| t.as_str().to_owned()),
            etag: r.etag(),
        }
    }
}

/// A created device with its token (shown only in this answer).
#[derive(Serialize, ToSchema)]
pub struct DeviceCreated {
    /// The device.
    device: DeviceOut,
    /// The device token: MQTT password, or `Authorization: Bearer` for WS/HTTP ingest.
    token: String,
}

/// One item of a bulk answer.
#[derive(Serialize, ToSchema)]
pub struct BulkItem {
    /// The id from the request.
    id: String,
    /// 201, or the status this item alone would have got (409, 422).
    status: u16,
    /// The token, for created devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// What was wrong, for refused items.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Bulk answer.
#[derive(Serialize, ToSchema)]
pub struct BulkResult {
    /// Devices created.
    created: usize,
    /// Devices refused.
    failed: usize,
    /// Per item, in request order.
    results: Vec<BulkItem>,
}

/// A page of devices.
#[derive(Serialize, ToSchema)]
pub struct DevicePage {
    /// Devices in id order.
    devices: Vec<DeviceOut>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Query parameters of `GET /devices` (parsed by hand for precise errors; this type
/// documents them).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListParams {
    /// `key=value`; repeat for several (all must match).
    #[param(pattern = "^[^=]*=.*$")]
    label: Option<String>,
    /// `true` or `false`.
    online: Option<bool>,
    /// Only ids starting with this.
    prefix: Option<String>,
    /// From `next_cursor` of the previous page (unpadded base64url).
    #[param(
        pattern = "^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-][AQgw]|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048])?$"
    )]
    cursor: Option<String>,
    /// Page size, 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// Token rotation answer.
#[derive(Serialize, ToSchema)]
pub struct TokenRotated {
    /// The device.
    device: DeviceOut,
    /// The new token; the old one stopped working.
    token: String,
}

fn with_etag(status: StatusCode, view: &DeviceView, body: impl Serialize) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&view.record.etag()) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// Create a device.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = DeviceCreate,
    responses(
        (status = 201, description = "Created. `Location` and `ETag` headers; the token is shown only here.", body = DeviceCreated),
        JsonBodyErrors,
        AdminErrors,
        (status = 409, description = "The id exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn create(
    State(st): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: DeviceCreate = json_body(&headers, body, MAX_BODY, false).await?;
    let item = req.into_parts();
    let mut results = st
        .registry_blocking(move |r| r.create_devices(vec![item]))
        .await?;
    let (view, token) = results
        .pop()
        .ok_or_else(|| ApiError::internal(&"registry returned no result"))?
        .map_err(ApiError::from)?;
    let mut r = with_etag(
        StatusCode::CREATED,
        &view,
        DeviceCreated {
            device: DeviceOut::from(&view),
            token,
        },
    );
    if let Ok(loc) = HeaderValue::from_str(&format!("/api/v1/devices/{}", view.record.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

/// Create up to 10,000 devices; results per item.
#[utoipa::path(post, path = "/api/v1/devices:bulk", tag = "devices", request_body = BulkCreate,
    responses(
        (status = 200, description = "Per-item results (201, 409 or 422 each)", body = BulkResult),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        AdminErrors,
        (status = 413, description = "More than 10,000 devices or body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn bulk(
    State(st): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<BulkResult>, ApiError> {
    let req: BulkCreate = json_body(&headers, body, MAX_BULK_BODY, false).await?;
    if req.devices.len() > MAX_BULK {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "at most {MAX_BULK} devices per request, got {}",
                req.devices.len()
            ),
        ));
    }
    let items: Vec<(String, DeviceFields)> = req
        .devices
        .into_iter()
        .map(DeviceCreate::into_parts)
        .collect();
    let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
    let results = st
        .registry_blocking(move |r| r.create_devices(items))
        .await?;
    let mut created = 0;
    let results: Vec<BulkItem> = ids
        .into_iter()
        .zip(results)
        .map(|(id, r)| match r {
            Ok((_, token)) => {
                created += 1;
                BulkItem {
                    id,
                    status: 201,
                    token: Some(token),
                    error: None,
                }
            }
            Err(e) => BulkItem {
                id,
                status: ApiError::from(RegistryErrorRef(&e)).status().as_u16(),
                token: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    Ok(axum::Json(BulkResult {
        created,
        failed: results.len() - created,
        results,
    }))
}

/// Maps a borrowed registry error to the status it would get alone.
struct RegistryErrorRef<'a>(&'a RegistryError);

impl From<RegistryErrorRef<'_>> for ApiError {
    fn from(e: RegistryErrorRef<'_>) -> Self {
        let status = match e.0 {
            RegistryError::AlreadyExists(_) => StatusCode::CONFLICT,
            RegistryError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, "bulk_item", e.0.to_string())
    }
}

/// List devices with filters and cursor pagination.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(ListParams),
    responses(
        (status = 200, description = "A page of devices in id order", body = DevicePage),
        (status = 400, description = "Bad query parameter", body = Problem, content_type = "application/problem+json"),
        Unauthorized,
    ),
    security(("api_key" = [])))]
pub async fn list(
    State(st): State<AppState>,
    _viewer: Viewer,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<DevicePage>, ApiError> {
    let mut filter = ListFilter::default();
    let mut after = None;
    let mut limit = 100;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "label" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(format!("`label` must be key=value, got `{value}`"))
                })?;
                filter.labels.push((k.to_owned(), v.to_owned()));
            }
            "online" => {
                filter.online = Some(match &*value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "`online` must be true or false, got `{value}`"
                        )));
                    }
                });
            }
            "prefix" => filter.prefix = Some(value.into_owned()),
            "cursor" => {
                // A cursor is only a position among the ids (compared as strings), so
                // any decodable one is a position; bytes that are not UTF-8 cannot
                // match an id and are replaced rather than refused.
                let raw = URL_SAFE_NO_PAD
                    .decode(value.as_bytes())
                    .map_err(|_| ApiError::bad_request("`cursor` is not a cursor from this API"))?;
                after = Some(String::from_utf8_lossy(&raw).into_owned());
            }
            "limit" => {
                limit = page_limit(&value)?;
            }
            other => {
                return Err(unknown_parameter(other));
            }
        }
    }
    let (page, next) = st.registry.list(&filter, after.as_deref(), limit);
    Ok(axum::Json(DevicePage {
        devices: page.iter().map(DeviceOut::from).collect(),
        next_cursor: next.map(|id| URL_SAFE_NO_PAD.encode(id.as_bytes())),
    }))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(DevicePath),
    responses(
        (status = 200, description = "The device; `ETag` header", body = DeviceOut),
        Unauthorized,
        BadDeviceId,
        DeviceNotFound,
    ),
    security(("api_key" = [])))]
pub async fn get_one(
    State(st): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    device_id(&id)?;
    let view = match st.registry.get(&id) {
        Some(view) => Some(view),
        None => {
            let id = id.clone();
            st.registry_blocking(move |r| r.find(&id)).await?
        }
    }
    .ok_or_else(|| ApiError::not_found(format!("device `{id}` not found")))?;
    Ok(with_etag(StatusCode::OK, &view, DeviceOut::from(&view)))
}

/// Replace a device's mutable fields.
#[utoipa::path(put, path = "/api/v1/devices/{id}", tag = "devices", request_body = DeviceReplace,
    params(DevicePath, IfMatch),
    responses(
        (status = 200, description = "The changed device", body = DeviceOut),
        JsonBodyErrors,
        AdminErrors,
        DeviceNotFound,
        EtagMismatch,
    ),
    security(("api_key" = [])))]
pub async fn replace(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    device_id(&id)?;
    let req: DeviceReplace = json_body(&headers, body, MAX_BODY, false).await?;
    let fields = DeviceFields {
        name: req.name,
        labels: req.labels,
        enabled: req.enabled,
    };
    let m = if_match(&headers);
    let view = st
        .registry_blocking(move |r| r.update(&id, |_| Ok(fields.clone()), m.as_deref()))
        .await?;
    Ok(with_etag(StatusCode::OK, &view, DeviceOut::from(&view)))
}

/// Apply an RFC 7396 JSON merge patch to `{name, labels, enabled}`.
fn merge_patch(
    current: &DeviceFields,
    patch: serde_json::Value,
) -> Result<DeviceFields, RegistryError> {
    let bad = |field: &str, detail: &str| RegistryError::Invalid {
        field: field.to_owned(),
        detail: detail.to_owned(),
    };
    let serde_json::Value::Object(patch) = patch else {
        return Err(bad("(body)", "a merge patch must be a JSON object"));
    };
    let mut out = current.clone();
    for (key, value) in patch {
        match (key.as_str(), value) {
            ("name", serde_json::Value::String(s)) => out.name = s,
            ("name", _) => return Err(bad("name", "must be a string")),
            ("enabled", serde_json::Value::Bool(b)) => out.enabled = b,
            ("enabled", _) => return Err(bad("enabled", "must be true or false")),
            ("labels", serde_json::Value::Null) => out.labels.clear(),
            ("labels", serde_json::Value::Object(labels)) => {
                for (k, v) in labels {
                    match v {
                        serde_json::Value::Null => {
                            // A key that no label can have is a mistake in the patch,
                            // not a no-op (a set is checked with the result, below).
                            if let Err(e) = fluxgate_proto::validate_metric_name(&k) {
                                return Err(bad("labels", &format!("invalid label key: {e}")));
                            }
                            out.labels.remove(&k);
                        }
                        serde_json::Value::String(s) => {
                            out.labels.insert(k, s);
                        }
                        _ => return Err(bad(&format!("labels.{k}"), "must be a string or null")),
                    }
                }
            }
            ("labels", _) => return Err(bad("labels", "must be an object or null")),
            (other, _) => {
                return Err(bad(other, "is not a mutable field (name, labels, enabled)"));
            }
        }
    }
    Ok(out)
}

/// Change some fields with a JSON merge patch.
#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices", request_body(content = DevicePatch, content_type = "application/merge-patch+json", description = "RFC 7396 merge patch of {name, labels, enabled}"),
    params(DevicePath, IfMatch),
    responses(
        (status = 200, description = "The changed device", body = DeviceOut),
        JsonBodyErrors,
        AdminErrors,
        DeviceNotFound,
        EtagMismatch,
    ),
    security(("api_key" = [])))]
pub async fn patch(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    device_id(&id)?;
    let patch: serde_json::Value = json_body(&headers, body, MAX_BODY, true).await?;
    // Wrong types and unknown fields are a malformed body (400), whatever the device
    // holds; only the merged result's values are the registry's to refuse (422).
    let empty = DeviceFields {
        name: String::new(),
        labels: BTreeMap::new(),
        enabled: true,
    };
    merge_patch(&empty, patch.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let m = if_match(&headers);
    let view = st
        .registry_blocking(move |r| {
            r.update(&id, |cur| merge_patch(cur, patch.clone()), m.as_deref())
        })
        .await?;
    Ok(with_etag(StatusCode::OK, &view, DeviceOut::from(&view)))
}

/// Delete a device (its stored telemetry stays). Closes its connections.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices",
    params(DevicePath, IfMatch),
    responses(
        (status = 204, description = "Deleted"),
        AdminErrors,
        BadDeviceId,
        DeviceNotFound,
        EtagMismatch,
    ),
    security(("api_key" = [])))]
pub async fn delete(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    device_id(&id)?;
    let m = if_match(&headers);
    st.registry_blocking(move |r| r.delete(&id, m.as_deref()))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Issue a new token; the old one stops working and open connections close.
#[utoipa::path(post, path = "/api/v1/devices/{id}/token", tag = "devices",
    params(DevicePath, IfMatch),
    responses(
        (status = 200, description = "The new token (shown only here)", body = TokenRotated),
        AdminErrors,
        BadDeviceId,
        DeviceNotFound,
        EtagMismatch,
    ),
    security(("api_key" = [])))]
pub async fn rotate(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    device_id(&id)?;
    let m = if_match(&headers);
    let (view, token) = st
        .registry_blocking(move |r| r.rotate_token(&id, m.as_deref()))
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        &view,
        TokenRotated {
            device: DeviceOut::from(&view),
            token,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let cur = DeviceFields {
            name: "a".into(),
            labels: BTreeMap::from([("x".into(), "1".into()), ("y".into(), "2".into())]),
            enabled: true,
        };
        let out = merge_patch(
            &cur,
            serde_json::json!({"labels": {"x": null, "z": "3"}, "enabled": false}),
        )
        .unwrap();
        assert_eq!(out.name, "a");
        assert!(!out.enabled);
        assert_eq!(
            out.labels,
            BTreeMap::from([("y".into(), "2".into()), ("z".into(), "3".into())])
        );
        assert!(merge_patch(&cur, serde_json::json!({"id": "b"})).is_err());
        assert!(merge_patch(&cur, serde_json::json!({"name": 3})).is_err());
        assert!(merge_patch(&cur, serde_json::json!([1])).is_err());
    }
}
