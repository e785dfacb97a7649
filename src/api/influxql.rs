//! `GET|POST /query`: the InfluxDB 1.x query endpoint, answering the InfluxQL that
//! Grafana's InfluxDB datasource sends from the embedded store (the engine is
//! `crate::influxql`; this file is the HTTP side).
//!
//! Parameters as in InfluxDB: `q` (statements separated by `;`), `db`, `epoch`, from the
//! query string or, for POST, a form body. Credentials: an operator API key as the
//! password (`p`, or HTTP Basic), or `Authorization: Token <key>` / `Bearer <key>`; the
//! user name is ignored. Checking them goes through the same cache, negative cache and
//! per-address failure throttle as every operator request.
//!
//! Errors use InfluxDB's shapes, not problem+json, because InfluxDB clients read those:
//! `{"error": "..."}` with 400 for a query that does not parse (or uses an unsupported
//! part, which the message names), 401/429 for credentials, 503 when every store query
//! slot is busy; a statement that parses but cannot be answered gets `"error"` in its
//! own result, next to the others.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::auth::operator_key;
use super::error::ApiError;
use super::state::AppState;
use crate::influxql::{self, Catalog, Epoch, InfluxqlError, Source, encode};
use crate::observe::Event;

/// The name of the one database `/query` serves (Grafana's datasource `database`).
pub const DATABASE: &str = "fluxgate";

/// Longest accepted query text, in bytes (also the form body limit).
const MAX_QUERY_BYTES: usize = 256 * 1024;

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn fail(status: StatusCode, message: &str) -> Response {
    json(status, &encode::error(message))
}

/// An [`ApiError`] (from authentication) in InfluxDB's error shape, keeping its status
/// and headers (`Retry-After`, `WWW-Authenticate`).
fn influx_error(e: ApiError) -> Response {
    let detail = e.detail().to_owned();
    let (mut parts, _) = e.into_response().into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(encode::error(&detail).to_string()))
}

/// The operator key among the request's credentials: `p`, Basic's password, or the
/// token of `Authorization: Token|Bearer` (InfluxDB's `Token user:password` form too).
fn credential(headers: &HeaderMap, password: Option<&str>) -> Option<String> {
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        return Some(p.to_owned());
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        return Some(password.to_owned()).filter(|p| !p.is_empty());
    }
    if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
        let token = rest.split_once(':').map_or(rest, |(_, p)| p);
        return Some(token.to_owned()).filter(|p| !p.is_empty());
    }
    None
}

/// The InfluxDB 1.x query endpoint.
pub async fn query(State(st): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut params: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let password = params
        .iter()
        .find(|(k, _)| k == "p")
        .map(|(_, v)| v.clone());
    let key = credential(&parts.headers, password.as_deref());
    // Credentials before the body, so an unauthenticated client cannot make us read it.
    let authed = operator_key(
        &parts,
        &st,
        key.as_deref(),
        "an operator API key is required: as the password (`p` or Basic) or `Authorization: Token fgk_…`",
    )
    .await;
    if let Err(e) = authed {
        return influx_error(e);
    }
    if parts.method == Method::POST && is_form {
        let Ok(bytes) = axum::body::to_bytes(body, MAX_QUERY_BYTES).await else {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body exceeds {MAX_QUERY_BYTES} bytes"),
            );
        };
        params.extend(form_urlencoded::parse(&bytes).into_owned());
    }
    let param = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(text) = param("q").filter(|q| !q.trim().is_empty()) else {
        return fail(StatusCode::BAD_REQUEST, "missing required parameter \"q\"");
    };
    if text.len() > MAX_QUERY_BYTES {
        return fail(
            StatusCode::BAD_REQUEST,
            &format!("the query exceeds {MAX_QUERY_BYTES} bytes"),
        );
    }
    let epoch = match param("epoch").filter(|e| !e.is_empty()) {
        None => None,
        Some(e) => match Epoch::parse(e) {
            Some(e) => Some(e),
            None => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid epoch `{e}`: use ns, u, ms, s, m or h"),
                );
            }
        },
    };
    let statements = match influxql::parse(text) {
        Ok(s) => s,
        Err(e) => return fail(StatusCode::BAD_REQUEST, &e.message(text)),
    };
    let db = param("db").filter(|d| !d.is_empty());
    let source = Source {
        store: st.store.clone(),
        labels: {
            let registry = st.registry.clone();
            std::sync::Arc::new(move |d: &str| registry.labels_of(d))
        },
        measurement: st.settings.influxql_measurement.clone(),
        database: DATABASE.to_owned(),
        max_rows: st.settings.max_query_points,
    };
    let now_ns = i64::try_from(crate::model::now_ms())
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000);
    // The schema is read once for all statements, and only when one needs it.
    let needs_data = statements.iter().any(|s| {
        !matches!(
            s,
            influxql::ast::Statement::ShowDatabases
                | influxql::ast::Statement::ShowRetentionPolicies
        )
    });
    let catalog = if needs_data && st.store.is_some() {
        Some(Catalog::load(&source).await)
    } else {
        None
    };
    let mut results = Vec::with_capacity(statements.len());
    for stmt in &statements {
        let data_stmt = !matches!(
            stmt,
            influxql::ast::Statement::ShowDatabases
                | influxql::ast::Statement::ShowRetentionPolicies
        );
        let result = match (&catalog, db) {
            (_, Some(db)) if db != DATABASE && data_stmt => {
                Err(InfluxqlError::Invalid(format!("database not found: {db}")))
            }
            (Some(Err(e)), _) if data_stmt => Err(e.clone()),
            (Some(Ok(c)), _) => influxql::execute(stmt, &source, Some(c), now_ns).await,
            _ => influxql::execute(stmt, &source, None, now_ns).await,
        };
        if matches!(result, Err(InfluxqlError::Busy)) {
            st.metrics.emit(Event::StoreQueryRejected);
            let mut r = fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many store queries are running; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        results.push(result);
    }
    json(StatusCode::OK, &encode::results(&results, epoch, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("header"),
        );
        h
    }

    #[test]
    fn every_credential_form_yields_the_key() {
        let basic = base64::engine::general_purpose::STANDARD.encode("grafana:fgk_x");
        assert_eq!(
            credential(&HeaderMap::new(), Some("fgk_p")).as_deref(),
            Some("fgk_p")
        );
        assert_eq!(
            credential(&headers(&format!("Basic {basic}")), None).as_deref(),
            Some("fgk_x")
        );
        assert_eq!(
            credential(&headers("Token fgk_t"), None).as_deref(),
            Some("fgk_t")
        );
        assert_eq!(
            credential(&headers("Token user:fgk_t"), None).as_deref(),
            Some("fgk_t")
        );
        assert_eq!(
            credential(&headers("bearer fgk_b"), None).as_deref(),
            Some("fgk_b")
        );
        assert_eq!(credential(&headers("Basic !!!"), None), None);
        assert_eq!(credential(&headers("Digest x"), None), None);
        assert_eq!(credential(&HeaderMap::new(), Some("")), None);
    }
}
