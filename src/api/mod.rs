//! The HTTP surface: this module only assembles one axum router from the handlers of the
//! REST API, the live streams, WebSocket and HTTP ingest, the dashboard and the
//! operational endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! The pieces every handler shares sit below the handlers, so that handlers elsewhere
//! (`ingest`, `live`, `web`) depend downward on them and nothing imports this file:
//! [`state`] (`AppState`, `ApiSettings`), [`error`] (`ApiError`, RFC 9457
//! problem+json), [`problem`] (the problem schema and reusable OpenAPI responses),
//! [`extract`] (request helpers), [`throttle`] (authentication failures per client
//! address) and [`auth`] (operator and device authentication).

pub mod auth;
pub mod commands;
pub mod devices;
pub mod error;
pub mod extract;
mod history;
pub mod influxql;
pub mod keys;
mod layers;
pub mod openapi;
mod ops;
pub mod problem;
pub mod state;
pub mod throttle;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

pub use error::ApiError;
pub use state::{ApiSettings, AppState};

use crate::{ingest, live};

/// One route of the router: its method and path, and the handler bound to that method.
/// The router is built from [`routes`], and the test of the OpenAPI document compares the
/// document with the same list, so neither can name a route the other lacks.
pub struct Route {
    /// The HTTP method (a WebSocket upgrade is a GET).
    pub method: Method,
    /// The path in axum's (and OpenAPI's) template syntax, e.g. `/api/v1/devices/{id}`.
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

/// A route whose handler answers exactly `method`: the method is named once, so the table
/// cannot list one method and route another.
fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    // Only the methods below are used, and each has a filter; an unknown one would be
    // a programming error caught by every test that builds the router.
    let filter = match method {
        Method::GET => MethodFilter::GET,
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        _ => unreachable!("no route uses {method}"),
    };
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// Every route of the API and the operational endpoints (the dashboard's routes are
/// `web::router`'s).
pub fn routes() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/healthz", ops::healthz),
        route(M::GET, "/readyz", ops::readyz),
        route(M::GET, "/metrics", ops::metrics),
        route(M::GET, "/query", influxql::query),
        route(M::POST, "/query", influxql::query),
        route(M::GET, "/api/v1/openapi.json", openapi::openapi_json),
        route(M::POST, "/api/v1/devices", devices::create),
        route(M::GET, "/api/v1/devices", devices::list),
        route(M::POST, "/api/v1/devices:bulk", devices::bulk),
        route(M::GET, "/api/v1/devices/{id}", devices::get_one),
        route(M::PUT, "/api/v1/devices/{id}", devices::replace),
        route(M::PATCH, "/api/v1/devices/{id}", devices::patch),
        route(M::DELETE, "/api/v1/devices/{id}", devices::delete),
        route(M::POST, "/api/v1/devices/{id}/token", devices::rotate),
        route(M::POST, "/api/v1/devices/{id}/commands", commands::create),
        route(M::GET, "/api/v1/devices/{id}/commands", commands::list),
        route(
            M::GET,
            "/api/v1/devices/{id}/commands/next",
            ingest::commands::next,
        ),
        route(
            M::GET,
            "/api/v1/devices/{id}/commands/{cmd}",
            commands::get_one,
        ),
        route(
            M::DELETE,
            "/api/v1/devices/{id}/commands/{cmd}",
            commands::cancel,
        ),
        route(
            M::POST,
            "/api/v1/devices/{id}/commands/{cmd}/reply",
            ingest::commands::reply,
        ),
        route(M::POST, "/api/v1/keys", keys::create_key),
        route(M::GET, "/api/v1/keys", keys::list_keys),
        route(M::DELETE, "/api/v1/keys/{id}", keys::revoke_key),
        route(M::POST, "/api/v1/stream-tokens", keys::stream_token),
        route(M::GET, "/api/v1/devices/{id}/latest", history::latest),
        route(M::GET, "/api/v1/devices/{id}/readings", history::readings),
        route(
            M::POST,
            "/api/v1/devices/{id}/telemetry",
            ingest::http::telemetry,
        ),
        route(M::GET, "/api/v1/ingest/ws", ingest::ws::upgrade),
        route(M::GET, "/api/v1/live", live::ws::upgrade),
        route(M::GET, "/api/v1/live/sse", live::sse::stream),
    ]
}

/// Build the router, wrapped in the listener's CORS and compression layers.
pub fn router(state: AppState, http: &crate::config::HttpConfig) -> Router {
    // axum merges the method routers of routes that share a path.
    let router = routes()
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler));
    let router = router
        .merge(crate::web::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state);
    layers::apply(router, http)
}
