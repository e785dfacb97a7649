//! The provisioning REST API, black-box: device CRUD with ETags and `If-Match` (PUT is a
//! full replacement, PATCH a JSON merge patch), every documented error status with a
//! detail naming the field, bulk creation with per-item results, cursor pagination over
//! 1,000 devices with label / prefix / online filters, operator keys (viewer vs admin,
//! revocation, the last admin key), stream tokens for live streams, the `fluxgate keys
//! create` CLI against a running gateway, and the OpenAPI 3.1 document against the
//! router's route list.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use common::{
    Operator, Resp, Sse, TestGateway, bounded, fluxgate, now_ms, run, ws_next_json, ws_open,
};
use reqwest::Method;
use serde_json::{Value, json};

const DEVICES: &str = "/api/v1/devices";

fn path(id: &str) -> String {
    format!("{DEVICES}/{id}")
}

/// A write's answer carries the ETag header, equal to the body's `etag`, and the
/// version it names.
#[track_caller]
fn assert_etag(r: &Resp, device: &Value, version: u32) {
    let etag = format!("\"v{version}\"");
    assert_eq!(r.header("etag"), etag, "{}", r.body);
    assert_eq!(device["etag"], etag, "{device}");
}

/// A request with a raw body and content type (for 413/415 and merge patches).
async fn send_raw(
    op: &Operator,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    if_match: Option<&str>,
) -> Resp {
    let mut request = op.request(method, path).body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    if let Some(m) = if_match {
        request = request.header("if-match", m);
    }
    Resp::read(request.send().await.unwrap()).await
}

async fn put(op: &Operator, id: &str, body: Value, if_match: Option<&str>) -> Resp {
    send_raw(
        op,
        Method::PUT,
        &path(id),
        Some("application/json"),
        body.to_string(),
        if_match,
    )
    .await
}

async fn patch(op: &Operator, id: &str, body: Value, if_match: Option<&str>) -> Resp {
    send_raw(
        op,
        Method::PATCH,
        &path(id),
        Some("application/merge-patch+json"),
        body.to_string(),
        if_match,
    )
    .await
}

/// The ids of a device page.
fn ids_of(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("not a page: {page}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Walk every page of `GET /devices?{query}&limit={limit}`; returns the ids in order
/// and the page sizes.
async fn walk(op: &Operator, query: &str, limit: usize) -> (Vec<String>, Vec<usize>) {
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{DEVICES}?limit={limit}");
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = op.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.body);
        let page = ids_of(&r.body);
        sizes.push(page.len());
        ids.extend(page);
        match r.body.get("next_cursor") {
            Some(c) => cursor = Some(c.as_str().unwrap().to_owned()),
            None => return (ids, sizes),
        }
        assert!(sizes.len() <= 2_000, "pagination does not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_crud_with_etags_if_match_put_and_merge_patch() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        let before = now_ms();

        // Create: 201, Location, ETag, the resource and a token shown once.
        let r = admin
            .call(
                Method::POST,
                DEVICES,
                Some(json!({"id": "boiler-1", "name": "Boiler", "labels": {"site": "berlin", "floor": "2"}})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.header("location"), "/api/v1/devices/boiler-1");
        assert_eq!(r.header("content-type"), "application/json");
        let created = r.body["device"].clone();
        assert_etag(&r, &created, 1);
        let token = r.body["token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("fgd_") && token.len() == 47, "{token}");
        assert_eq!(r.body.as_object().unwrap().len(), 2, "{}", r.body);
        assert_eq!(created["id"], "boiler-1");
        assert_eq!(created["name"], "Boiler");
        assert_eq!(created["labels"], json!({"site": "berlin", "floor": "2"}));
        assert_eq!(created["enabled"], true);
        assert_eq!(created["online"], false);
        assert_eq!(created["last_seen"], Value::Null);
        assert_eq!(created["transport"], Value::Null);
        assert_eq!(created["created_at"], created["updated_at"]);
        let created_at = humantime::parse_rfc3339(created["created_at"].as_str().unwrap()).unwrap();
        let created_ms = created_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((before..=now_ms()).contains(&created_ms), "{created}");

        // Defaults: name = id, no labels, enabled.
        let r = admin
            .call(Method::POST, DEVICES, Some(json!({"id": "plain"})))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(
            (
                &r.body["device"]["name"],
                &r.body["device"]["labels"],
                &r.body["device"]["enabled"]
            ),
            (&json!("plain"), &json!({}), &json!(true))
        );
        let r = admin
            .call(
                Method::POST,
                DEVICES,
                Some(json!({"id": "off", "enabled": false})),
            )
            .await;
        assert_eq!((r.status, &r.body["device"]["enabled"]), (201, &json!(false)));

        // GET: the same resource, the ETag header.
        let r = admin.get(&path("boiler-1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, created);
        assert_etag(&r, &r.body, 1);

        // PUT replaces every mutable field: the labels not named are gone.
        let replacement = json!({"name": "Boiler 2", "labels": {"room": "7"}, "enabled": true});
        let r = put(admin, "boiler-1", replacement.clone(), Some("\"v1\"")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 2);
        assert_eq!(r.body["name"], "Boiler 2");
        assert_eq!(r.body["labels"], json!({"room": "7"}));
        assert_eq!(r.body["created_at"], created["created_at"]);
        // A stale If-Match: 412, nothing changes.
        let r = put(
            admin,
            "boiler-1",
            json!({"name": "lost update", "labels": {}, "enabled": true}),
            Some("\"v1\""),
        )
        .await;
        r.assert_problem(412, "precondition_failed");
        let r = admin.get(&path("boiler-1")).await;
        assert_etag(&r, &r.body, 2);
        assert_eq!(r.body["name"], "Boiler 2");
        // PUT without If-Match is unconditional; `*` matches any version.
        let r = put(admin, "boiler-1", replacement.clone(), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 3);
        let r = put(admin, "boiler-1", replacement, Some("*")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 4);
        // A list of ETags matches when one of them is current.
        let r = put(
            admin,
            "boiler-1",
            json!({"name": "Boiler", "labels": {"room": "7", "site": "berlin"}, "enabled": true}),
            Some("\"v1\", \"v4\""),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 5);

        // PATCH merges: a null label removes it, others are added or kept, fields not
        // named stay.
        let r = patch(
            admin,
            "boiler-1",
            json!({"labels": {"room": null, "floor": "3"}}),
            Some("\"v5\""),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 6);
        assert_eq!(r.body["labels"], json!({"site": "berlin", "floor": "3"}));
        assert_eq!((&r.body["name"], &r.body["enabled"]), (&json!("Boiler"), &json!(true)));
        // application/json is accepted for PATCH too.
        let r = send_raw(
            admin,
            Method::PATCH,
            &path("boiler-1"),
            Some("application/json"),
            json!({"name": "Renamed"}).to_string(),
            Some("*"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 7);
        assert_eq!(r.body["name"], "Renamed");
        assert_eq!(r.body["labels"], json!({"site": "berlin", "floor": "3"}));
        let r = patch(admin, "boiler-1", json!({"enabled": false}), Some("\"v6\"")).await;
        r.assert_problem(412, "precondition_failed");
        // `labels: null` removes every label.
        let r = patch(admin, "boiler-1", json!({"labels": null}), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body, 8);
        assert_eq!(r.body["labels"], json!({}));
        assert_eq!(r.body["name"], "Renamed");
        let updated_at = r.body["updated_at"].as_str().unwrap().to_owned();
        assert!(
            updated_at.as_str() >= created["updated_at"].as_str().unwrap(),
            "{updated_at}"
        );

        // Rotate the token: a new token, the old one stops working at once.
        let r = send_raw(admin, Method::POST, &path("boiler-1/token"), None, "", Some("\"v7\"")).await;
        r.assert_problem(412, "precondition_failed");
        let r = send_raw(admin, Method::POST, &path("boiler-1/token"), None, "", Some("\"v8\"")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_etag(&r, &r.body["device"], 9);
        let new_token = r.body["token"].as_str().unwrap().to_owned();
        assert!(new_token.starts_with("fgd_") && new_token != token);
        let ts = now_ms() - 1_000;
        let body = json!({"ts": ts, "values": {"v": 1}}).to_string();
        gw.telemetry("boiler-1", Some(&token), &body)
            .await
            .assert_unauthorized();
        let r = gw.telemetry("boiler-1", Some(&new_token), &body).await;
        assert_eq!((r.status, &r.body), (200, &json!({"accepted": 1})));

        // DELETE honours If-Match, then the device is gone (its token too).
        let r = send_raw(admin, Method::DELETE, &path("boiler-1"), None, "", Some("\"v1\"")).await;
        r.assert_problem(412, "precondition_failed");
        let r = send_raw(admin, Method::DELETE, &path("boiler-1"), None, "", Some("\"v9\"")).await;
        assert_eq!((r.status, &r.body), (204, &Value::Null));
        admin.get(&path("boiler-1")).await.assert_problem(404, "not_found");
        gw.telemetry("boiler-1", Some(&new_token), &body)
            .await
            .assert_unauthorized();
        let r = send_raw(admin, Method::DELETE, &path("boiler-1"), None, "", None).await;
        r.assert_problem(404, "not_found");

        // 404 on every device route for an unknown id.
        let ghost = path("ghost");
        admin.get(&ghost).await.assert_problem(404, "not_found");
        put(admin, "ghost", json!({"name": "g", "labels": {}, "enabled": true}), None)
            .await
            .assert_problem(404, "not_found");
        patch(admin, "ghost", json!({"name": "g"}), None)
            .await
            .assert_problem(404, "not_found");
        send_raw(admin, Method::DELETE, &ghost, None, "", None)
            .await
            .assert_problem(404, "not_found");
        send_raw(admin, Method::POST, &path("ghost/token"), None, "", None)
            .await
            .assert_problem(404, "not_found");
        send_raw(admin, Method::DELETE, "/api/v1/keys/nokey", None, "", None)
            .await
            .assert_problem(404, "not_found");

        // Duplicate id: 409, and the original is untouched.
        let r = admin
            .call(Method::POST, DEVICES, Some(json!({"id": "plain", "name": "dup"})))
            .await;
        r.assert_problem(409, "conflict");
        assert!(r.detail().contains("plain"), "{}", r.detail());
        let r = admin.get(&path("plain")).await;
        assert_eq!((&r.body["name"], &r.body["etag"]), (&json!("plain"), &json!("\"v1\"")));

        let (ids, _) = walk(admin, "", 1000).await;
        assert_eq!(ids, ["off", "plain"]);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_names_what_was_wrong() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        admin.provision("exists").await;

        // 400: malformed bodies and wrong types, the detail names the field.
        let create_400 = [
            (
                json!({"id": "x1", "labels": {"site": 1}}),
                "`labels.site`: invalid type",
            ),
            (
                json!({"id": "x1", "enabled": "yes"}),
                "`enabled`: invalid type",
            ),
            (json!({"id": "x1", "name": 5}), "`name`: invalid type"),
            (json!({"id": "x1", "color": "red"}), "`color`"),
            (json!({"name": "no id"}), "`id`"),
            (json!("device"), "invalid JSON body"),
        ];
        for (body, names) in create_400 {
            let r = admin.call(Method::POST, DEVICES, Some(body.clone())).await;
            r.assert_problem(400, "bad_request");
            assert!(
                r.detail().contains(names),
                "{body}: `{}` should name {names}",
                r.detail()
            );
        }
        let r = send_raw(
            admin,
            Method::POST,
            DEVICES,
            Some("application/json"),
            "{\"id\": ",
            None,
        )
        .await;
        r.assert_problem(400, "bad_request");
        assert!(r.detail().contains("EOF while parsing"), "{}", r.detail());
        // PUT needs every field.
        let r = put(admin, "exists", json!({"name": "n", "labels": {}}), None).await;
        r.assert_problem(400, "bad_request");
        assert!(r.detail().contains("`enabled`"), "{}", r.detail());
        let r = put(
            admin,
            "exists",
            json!({"name": "n", "labels": {"a": true}, "enabled": true}),
            None,
        )
        .await;
        r.assert_problem(400, "bad_request");
        assert!(
            r.detail().starts_with("`labels.a`: invalid type"),
            "{}",
            r.detail()
        );
        // PATCH with wrong types or unknown fields is malformed too (not a refused value).
        for (body, names) in [
            (json!({"enabled": "no"}), "`enabled`"),
            (json!({"name": 3}), "`name`"),
            (json!({"labels": {"site": 1}}), "`labels.site`"),
            (json!({"labels": "site=x"}), "`labels`"),
            (json!({"id": "renamed"}), "`id`"),
            (json!(["enabled"]), "object"),
        ] {
            let r = patch(admin, "exists", body.clone(), None).await;
            r.assert_problem(400, "bad_request");
            assert!(
                r.detail().contains(names),
                "{body}: `{}` should name {names}",
                r.detail()
            );
        }
        // Query parameters and path ids.
        for (query, names) in [
            ("limit=0", "`limit`"),
            ("limit=1001", "`limit`"),
            ("limit=ten", "`limit`"),
            ("online=maybe", "`online`"),
            ("label=site", "`label`"),
            ("cursor=%25%25", "`cursor`"),
            ("color=red", "`color`"),
        ] {
            let r = admin.get(&format!("{DEVICES}?{query}")).await;
            r.assert_problem(400, "bad_request");
            assert!(
                r.detail().contains(names),
                "{query}: `{}` should name {names}",
                r.detail()
            );
        }
        admin
            .get(&path("bad%20id"))
            .await
            .assert_problem(400, "bad_request");
        let r = admin
            .call(
                Method::POST,
                "/api/v1/keys",
                Some(json!({"name": "k", "role": "root"})),
            )
            .await;
        r.assert_problem(400, "bad_request");
        assert!(r.detail().contains("`role`"), "{}", r.detail());

        // 401: before the body is even looked at.
        let anonymous = gw
            .http_client
            .post(gw.http_url(DEVICES))
            .header("content-type", "application/json")
            .body("garbage")
            .send()
            .await
            .unwrap();
        Resp::read(anonymous).await.assert_unauthorized();
        for key in ["fgk_not-a-key", "not even a prefix", ""] {
            let r = gw.operator(key).get(DEVICES).await;
            r.assert_unauthorized();
        }
        let basic = gw
            .http_client
            .get(gw.http_url(DEVICES))
            .header("authorization", format!("Basic {}", gw.admin_key))
            .send()
            .await
            .unwrap();
        Resp::read(basic).await.assert_unauthorized();

        // 413: a single-device body over 64 KiB; a bulk of more than 10,000 devices.
        let big = json!({"id": "big", "name": "x".repeat(70 * 1024)}).to_string();
        let r = send_raw(
            admin,
            Method::POST,
            DEVICES,
            Some("application/json"),
            big,
            None,
        )
        .await;
        r.assert_problem(413, "payload_too_large");
        let many: Vec<Value> = (0..10_001)
            .map(|i| json!({"id": format!("b-{i}")}))
            .collect();
        let r = admin
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": many})),
            )
            .await;
        r.assert_problem(413, "payload_too_large");
        assert!(r.detail().contains("10000"), "{}", r.detail());

        // 415: wrong or missing content types.
        let body = json!({"id": "typed"}).to_string();
        for ct in [
            Some("text/plain"),
            Some("application/merge-patch+json"),
            None,
        ] {
            let r = send_raw(admin, Method::POST, DEVICES, ct, body.clone(), None).await;
            r.assert_problem(415, "unsupported_media_type");
        }
        let r = send_raw(
            admin,
            Method::PATCH,
            &path("exists"),
            Some("text/plain"),
            json!({"name": "n"}).to_string(),
            None,
        )
        .await;
        r.assert_problem(415, "unsupported_media_type");
        assert!(
            r.detail().contains("application/merge-patch+json"),
            "{}",
            r.detail()
        );
        let r = send_raw(
            admin,
            Method::PUT,
            &path("exists"),
            Some("application/merge-patch+json"),
            json!({"name": "n", "labels": {}, "enabled": true}).to_string(),
            None,
        )
        .await;
        r.assert_problem(415, "unsupported_media_type");
        let r = send_raw(
            admin,
            Method::POST,
            "/api/v1/keys",
            Some("text/plain"),
            json!({"name": "k", "role": "viewer"}).to_string(),
            None,
        )
        .await;
        r.assert_problem(415, "unsupported_media_type");

        // 422: well-formed, but values the registry refuses; the detail names the field.
        let create_422 = [
            (json!({"id": "bad id"}), "`id`: invalid device id"),
            (json!({"id": "d".repeat(65)}), "`id`: invalid device id"),
            (json!({"id": ""}), "`id`: invalid device id"),
            (
                json!({"id": "x2", "labels": {"bad key": "v"}}),
                "`labels.bad key`",
            ),
            (json!({"id": "x2", "labels": {"k": ""}}), "`labels.k`"),
            (json!({"id": "x2", "name": "n".repeat(129)}), "`name`"),
            (json!({"id": "x2", "name": ""}), "`name`"),
            (json!({"id": "x2", "name": "tab\there"}), "`name`"),
        ];
        for (body, names) in create_422 {
            let r = admin.call(Method::POST, DEVICES, Some(body.clone())).await;
            r.assert_problem(422, "invalid_value");
            assert!(
                r.detail().starts_with(names),
                "{body}: `{}` should start with {names}",
                r.detail()
            );
        }
        let labels: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let r = admin
            .call(
                Method::POST,
                DEVICES,
                Some(json!({"id": "x3", "labels": labels})),
            )
            .await;
        r.assert_problem(422, "invalid_value");
        assert!(r.detail().starts_with("`labels`"), "{}", r.detail());
        // The same rules for PUT and PATCH, and for key names.
        let r = put(
            admin,
            "exists",
            json!({"name": "", "labels": {}, "enabled": true}),
            None,
        )
        .await;
        r.assert_problem(422, "invalid_value");
        assert!(r.detail().starts_with("`name`"), "{}", r.detail());
        let r = patch(admin, "exists", json!({"labels": {"bad key": "v"}}), None).await;
        r.assert_problem(422, "invalid_value");
        assert!(r.detail().starts_with("`labels.bad key`"), "{}", r.detail());
        let r = admin
            .call(
                Method::POST,
                "/api/v1/keys",
                Some(json!({"name": "", "role": "viewer"})),
            )
            .await;
        r.assert_problem(422, "invalid_value");
        assert!(r.detail().starts_with("`name`"), "{}", r.detail());

        // None of the refused requests changed anything.
        let (ids, _) = walk(admin, "", 1000).await;
        assert_eq!(ids, ["exists"]);
        let r = admin.get(&path("exists")).await;
        assert_etag(&r, &r.body, 1);
        let keys = admin.get("/api/v1/keys").await;
        assert_eq!(keys.body.as_array().unwrap().len(), 1, "{}", keys.body);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_creation_reports_each_item() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        admin.provision("old").await;
        let r = admin
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": [
                    {"id": "new-1", "labels": {"site": "a"}},
                    {"id": "old"},
                    {"id": "bad id"},
                    {"id": "new-2", "name": "Second", "enabled": false},
                    {"id": "new-1"},
                    {"id": "new-3", "labels": {"bad key": "x"}},
                ]})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            (&r.body["created"], &r.body["failed"]),
            (&json!(2), &json!(4))
        );
        let results = r.body["results"].as_array().unwrap();
        let summary: Vec<(&str, u64, bool)> = results
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap(),
                    i["status"].as_u64().unwrap(),
                    i.get("token").is_some(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("new-1", 201, true),
                ("old", 409, false),
                ("bad id", 422, false),
                ("new-2", 201, true),
                ("new-1", 409, false),
                ("new-3", 422, false),
            ]
        );
        for item in results {
            let created = item["status"] == 201;
            assert_eq!(item.get("error").is_none(), created, "{item}");
            assert_eq!(item.as_object().unwrap().len(), 3, "{item}");
        }
        assert!(results[2]["error"].as_str().unwrap().starts_with("`id`"));
        assert!(
            results[5]["error"]
                .as_str()
                .unwrap()
                .starts_with("`labels.bad key`")
        );
        // The created devices exist with what was asked; their tokens work.
        let r = admin.get(&path("new-2")).await;
        assert_eq!(
            (&r.body["name"], &r.body["enabled"]),
            (&json!("Second"), &json!(false))
        );
        let r = admin.get(&path("new-1")).await;
        assert_eq!(r.body["labels"], json!({"site": "a"}));
        let token = results[0]["token"].as_str().unwrap();
        let ts = now_ms() - 1_000;
        let body = json!({"ts": ts, "values": {"v": 1}}).to_string();
        let r = gw.telemetry("new-1", Some(token), &body).await;
        assert_eq!((r.status, &r.body), (200, &json!({"accepted": 1})));
        let (ids, _) = walk(admin, "", 1000).await;
        assert_eq!(ids, ["new-1", "new-2", "old"]);

        // An empty bulk is fine; a malformed one is refused whole.
        let r = admin
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": []})),
            )
            .await;
        assert_eq!(r.body, json!({"created": 0, "failed": 0, "results": []}));
        let r = admin
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": [{"id": "fine"}, {"id": "x", "enabled": 1}]})),
            )
            .await;
        r.assert_problem(400, "bad_request");
        assert!(
            r.detail().starts_with("`devices[1].enabled`"),
            "{}",
            r.detail()
        );
        admin
            .get(&path("fine"))
            .await
            .assert_problem(404, "not_found");
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_and_filters_over_a_thousand_devices() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        // Created in a scrambled order with one bulk call; listed in id order.
        let mut order: Vec<usize> = (0..1_000).collect();
        fastrand::Rng::with_seed(7).shuffle(&mut order);
        let devices: Vec<Value> = order
            .iter()
            .map(|&i| {
                let mut labels = serde_json::Map::new();
                labels.insert(
                    "parity".into(),
                    json!(if i % 2 == 0 { "even" } else { "odd" }),
                );
                if i % 5 == 0 {
                    labels.insert("five".into(), json!("yes"));
                }
                json!({"id": format!("fleet-{i:04}"), "labels": labels})
            })
            .collect();
        let r = admin
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": devices})),
            )
            .await;
        assert_eq!(
            (r.status, &r.body["created"]),
            (200, &json!(1_000)),
            "{}",
            r.body["failed"]
        );
        let tokens: BTreeMap<String, String> = r.body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_owned(),
                    i["token"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        admin.provision("other-1").await;
        let fleet: Vec<String> = (0..1_000).map(|i| format!("fleet-{i:04}")).collect();
        let mut everything = fleet.clone();
        everything.push("other-1".to_owned());

        // Pages of 37: no gaps, no duplicates, id order, full pages but the last.
        let (ids, sizes) = walk(admin, "", 37).await;
        assert_eq!(ids, everything);
        assert_eq!(sizes.len(), 1_001usize.div_ceil(37));
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&s| s == 37),
            "{sizes:?}"
        );
        assert_eq!(sizes.last(), Some(&(1_001 % 37)));
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // The default page is 100; 1,000 is the largest.
        let r = admin.get(DEVICES).await;
        assert_eq!(ids_of(&r.body), everything[..100]);
        assert!(r.body["next_cursor"].is_string());
        let r = admin.get(&format!("{DEVICES}?limit=1000")).await;
        assert_eq!(ids_of(&r.body), everything[..1_000]);
        let r = admin
            .get(&format!(
                "{DEVICES}?limit=1000&cursor={}",
                r.body["next_cursor"].as_str().unwrap()
            ))
            .await;
        assert_eq!(ids_of(&r.body), ["other-1"]);
        assert!(r.body.get("next_cursor").is_none(), "{}", r.body);

        // Label filters, repeatable (all must match), paginated the same way.
        let even: Vec<String> = (0..1_000)
            .step_by(2)
            .map(|i| format!("fleet-{i:04}"))
            .collect();
        assert_eq!(walk(admin, "label=parity=even", 37).await.0, even);
        let tens: Vec<String> = (0..1_000)
            .step_by(10)
            .map(|i| format!("fleet-{i:04}"))
            .collect();
        assert_eq!(
            walk(admin, "label=parity=even&label=five=yes", 37).await.0,
            tens
        );
        assert_eq!(
            walk(admin, "label=five=yes&label=parity=even", 1000)
                .await
                .0,
            tens
        );
        assert_eq!(
            walk(admin, "label=parity=none", 37).await.0,
            Vec::<String>::new()
        );
        // Prefix, alone and with a label.
        let hundreds: Vec<String> = (100..200).map(|i| format!("fleet-{i:04}")).collect();
        assert_eq!(walk(admin, "prefix=fleet-01", 37).await.0, hundreds);
        assert_eq!(walk(admin, "prefix=other", 37).await.0, ["other-1"]);
        let odd_hundreds: Vec<String> = (100..200)
            .filter(|i| i % 2 == 1)
            .map(|i| format!("fleet-{i:04}"))
            .collect();
        assert_eq!(
            walk(admin, "prefix=fleet-01&label=parity=odd", 7).await.0,
            odd_hundreds
        );

        // Online: nobody yet; one device connects over MQTT and reads online.
        assert_eq!(
            walk(admin, "online=true", 1000).await.0,
            Vec::<String>::new()
        );
        let mqtt = gw.mqtt_client("fleet-0042", &tokens["fleet-0042"]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (online, _) = walk(admin, "online=true", 1000).await;
            if online == ["fleet-0042"] {
                break;
            }
            assert!(online.is_empty(), "{online:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "fleet-0042 never read online"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let offline: Vec<String> = everything
            .iter()
            .filter(|id| *id != "fleet-0042")
            .cloned()
            .collect();
        assert_eq!(walk(admin, "online=false", 37).await.0, offline);
        assert_eq!(
            walk(admin, "online=true&label=parity=even&prefix=fleet-00", 37)
                .await
                .0,
            ["fleet-0042"]
        );
        assert_eq!(
            walk(admin, "online=true&label=parity=odd", 37).await.0,
            Vec::<String>::new()
        );
        let r = admin.get(&path("fleet-0042")).await;
        assert_eq!(
            (&r.body["online"], &r.body["transport"]),
            (&json!(true), &json!("mqtt"))
        );
        assert!(r.body["last_seen"].is_string(), "{}", r.body);
        mqtt.assert_healthy();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_keys_read_but_never_write_and_keys_can_be_revoked() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        let token = admin.provision("kd-1").await;

        let r = admin
            .call(
                Method::POST,
                "/api/v1/keys",
                Some(json!({"name": "ops", "role": "viewer"})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let secret = r.body["secret"].as_str().unwrap().to_owned();
        assert!(
            secret.starts_with("fgk_") && secret != gw.admin_key,
            "{secret}"
        );
        let key = &r.body["key"];
        assert_eq!(
            (&key["name"], &key["role"]),
            (&json!("ops"), &json!("viewer"))
        );
        assert_eq!(key.as_object().unwrap().len(), 4, "{key}");
        let viewer_id = key["id"].as_str().unwrap().to_owned();
        humantime::parse_rfc3339(key["created_at"].as_str().unwrap()).unwrap();

        // The list shows both keys, never a secret.
        let r = admin.get("/api/v1/keys").await;
        assert_eq!(r.status, 200);
        let listed: Vec<(&str, &str)> = r
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["name"].as_str().unwrap(), k["role"].as_str().unwrap()))
            .collect();
        assert_eq!(listed, [("bootstrap-admin", "admin"), ("ops", "viewer")]);
        assert!(!r.body.to_string().contains("fgk_"), "{}", r.body);
        let admin_id = r.body[0]["id"].as_str().unwrap().to_owned();

        // A viewer reads everything and opens live streams...
        let viewer = gw.operator(&secret);
        let r = viewer.get(DEVICES).await;
        assert_eq!((r.status, ids_of(&r.body)), (200, vec!["kd-1".to_owned()]));
        let r = viewer.get(&path("kd-1")).await;
        assert_eq!(r.status, 200);
        assert_etag(&r, &r.body, 1);
        viewer
            .get(&path("kd-1/latest"))
            .await
            .assert_problem(404, "not_found");
        let r = viewer.get(&path("kd-1/readings?metric=v")).await;
        assert_eq!((r.status, &r.body["points"]), (200, &json!([])));
        let r = viewer.get("/api/v1/openapi.json").await;
        assert_eq!((r.status, &r.body["openapi"]), (200, &json!("3.1.0")));
        let r = viewer
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let mut sse = Sse::connect(&gw.http_url("/api/v1/live/sse"), Some(&secret)).await;
        assert_eq!(sse.next_event().await.unwrap().event, "snapshot");
        let mut live = ws_open(&format!("ws://{}/api/v1/live", gw.http), Some(&secret))
            .await
            .unwrap();
        assert_eq!(ws_next_json(&mut live).await["type"], "snapshot");

        // ...but every write is 403, and changes nothing.
        let writes = [
            (
                Method::POST,
                DEVICES.to_owned(),
                Some(json!({"id": "v-new"})),
            ),
            (
                Method::POST,
                "/api/v1/devices:bulk".to_owned(),
                Some(json!({"devices": [{"id": "v-new"}]})),
            ),
            (
                Method::PUT,
                path("kd-1"),
                Some(json!({"name": "x", "labels": {}, "enabled": false})),
            ),
            (Method::PATCH, path("kd-1"), Some(json!({"enabled": false}))),
            (Method::DELETE, path("kd-1"), None),
            (Method::POST, path("kd-1/token"), None),
            (
                Method::POST,
                "/api/v1/keys".to_owned(),
                Some(json!({"name": "evil", "role": "admin"})),
            ),
            (Method::GET, "/api/v1/keys".to_owned(), None),
            (Method::DELETE, format!("/api/v1/keys/{viewer_id}"), None),
            (Method::DELETE, format!("/api/v1/keys/{admin_id}"), None),
        ];
        for (method, route, body) in &writes {
            let r = viewer.call(method.clone(), route, body.clone()).await;
            r.assert_problem(403, "forbidden");
        }
        let r = admin.get(&path("kd-1")).await;
        assert_etag(&r, &r.body, 1);
        assert_eq!(r.body["enabled"], true);
        admin
            .get(&path("v-new"))
            .await
            .assert_problem(404, "not_found");
        assert_eq!(
            admin
                .get("/api/v1/keys")
                .await
                .body
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let ts = now_ms() - 1_000;
        let r = gw
            .telemetry(
                "kd-1",
                Some(&token),
                &json!({"ts": ts, "values": {"v": 1}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "the token was not rotated: {}", r.body);

        // Revoked: the viewer key stops working at once.
        let r = admin
            .call(Method::DELETE, &format!("/api/v1/keys/{viewer_id}"), None)
            .await;
        assert_eq!((r.status, &r.body), (204, &Value::Null));
        viewer.get(DEVICES).await.assert_unauthorized();
        let r = admin
            .call(Method::DELETE, &format!("/api/v1/keys/{viewer_id}"), None)
            .await;
        r.assert_problem(404, "not_found");

        // The last admin key cannot be revoked; with a second admin it can.
        let r = admin
            .call(Method::DELETE, &format!("/api/v1/keys/{admin_id}"), None)
            .await;
        r.assert_problem(409, "conflict");
        let (second_id, second) = admin.create_key("second-admin", "admin").await;
        let second = gw.operator(&second);
        let r = second
            .call(Method::DELETE, &format!("/api/v1/keys/{admin_id}"), None)
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        admin.get(DEVICES).await.assert_unauthorized();
        let r = second
            .call(Method::DELETE, &format!("/api/v1/keys/{second_id}"), None)
            .await;
        r.assert_problem(409, "conflict");
        let r = second.get("/api/v1/keys").await;
        let names: Vec<&str> = r
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["second-admin"]);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_tokens_open_live_streams_and_nothing_else() {
    bounded(30, async {
        let gw =
            TestGateway::spawn_with(|c| c.http.stream_token_ttl = Duration::from_secs(2)).await;
        let r = gw
            .admin
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.body.as_object().unwrap().len(), 2, "{}", r.body);
        let token = r.body["token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("fgs_"), "{token}");
        let expires = humantime::parse_rfc3339(r.body["expires_at"].as_str().unwrap()).unwrap();
        let left = expires.duration_since(SystemTime::now()).unwrap();
        assert!(
            left <= Duration::from_secs(2) && left > Duration::from_secs(1),
            "{left:?}"
        );

        // Without any header, as `?access_token=`, on both live streams.
        let sse_url = |t: &str| gw.http_url(&format!("/api/v1/live/sse?access_token={t}"));
        let mut sse = Sse::connect(&sse_url(&token), None).await;
        assert_eq!(sse.next_event().await.unwrap().event, "snapshot");
        let live_url = |t: &str| format!("ws://{}/api/v1/live?access_token={t}", gw.http);
        let mut live = ws_open(&live_url(&token), None).await.unwrap();
        assert_eq!(ws_next_json(&mut live).await["type"], "snapshot");
        // Combined with filters.
        let url = gw.http_url(&format!(
            "/api/v1/live/sse?device=a&access_token={token}&metric=t"
        ));
        Sse::connect(&url, None).await;

        // An invalid token, or none: 401.
        for url in [
            sse_url("fgs_invalid"),
            sse_url(""),
            gw.http_url("/api/v1/live/sse"),
        ] {
            let r = Sse::try_connect(&url, None).await.err().unwrap();
            r.assert_unauthorized();
        }
        let (status, body) = ws_open(&live_url("fgs_invalid"), None).await.err().unwrap();
        assert_eq!(
            (status, &body["type"]),
            (401, &json!("urn:fluxgate:problem:unauthorized"))
        );

        // Not an API key: not as a bearer anywhere, not as a query parameter elsewhere.
        let as_key = gw.operator(&token);
        as_key.get(DEVICES).await.assert_unauthorized();
        as_key
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await
            .assert_unauthorized();
        as_key
            .get("/api/v1/openapi.json")
            .await
            .assert_unauthorized();
        let r = Sse::try_connect(&gw.http_url("/api/v1/live/sse"), Some(&token))
            .await
            .err()
            .unwrap();
        r.assert_unauthorized();
        let r = gw
            .http_client
            .get(gw.http_url(&format!("{DEVICES}?access_token={token}")))
            .send()
            .await
            .unwrap();
        Resp::read(r).await.assert_unauthorized();

        // It expires.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Sse::try_connect(&sse_url(&token), None).await {
                Ok(_) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the stream token never expired"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(r) => {
                    r.assert_unauthorized();
                    assert!(SystemTime::now() >= expires, "refused before it expired");
                    break;
                }
            }
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_adds_a_key_that_the_running_gateway_accepts() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        gw.provision("cli-dev").await;
        let dir = gw.data_dir().to_owned();
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
            run(fluxgate()
                .args(["keys", "create", "--role", "viewer", "--name", "cli-viewer"])
                .env("FLUXGATE_DATA_DIR", dir))
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "{stderr}");
        // stdout is the key alone, for scripts.
        let key = stdout.strip_suffix('\n').unwrap();
        assert!(
            key.starts_with("fgk_") && key.len() == 47 && !key.contains('\n'),
            "{stdout:?}"
        );
        assert!(
            stderr.contains("created viewer key `cli-viewer`"),
            "{stderr}"
        );
        assert!(!stderr.contains(key), "{stderr}");

        let viewer = gw.operator(key);
        let r = viewer.get(DEVICES).await;
        assert_eq!(
            (r.status, ids_of(&r.body)),
            (200, vec!["cli-dev".to_owned()])
        );
        viewer
            .call(Method::POST, DEVICES, Some(json!({"id": "nope"})))
            .await
            .assert_problem(403, "forbidden");
        let r = gw.admin.get("/api/v1/keys").await;
        let listed: Vec<(&str, &str)> = r
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["name"].as_str().unwrap(), k["role"].as_str().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [("bootstrap-admin", "admin"), ("cli-viewer", "viewer")]
        );

        // A bad role is refused by the CLI and adds nothing.
        let dir = gw.data_dir().to_owned();
        let (code, stdout, _) = tokio::task::spawn_blocking(move || {
            run(fluxgate()
                .args(["keys", "create", "--role", "root", "--name", "x"])
                .env("FLUXGATE_DATA_DIR", dir))
        })
        .await
        .unwrap();
        assert_eq!((code, stdout.as_str()), (Some(2), ""));
        assert_eq!(
            gw.admin
                .get("/api/v1/keys")
                .await
                .body
                .as_array()
                .unwrap()
                .len(),
            2
        );
        gw.shutdown().await;
    })
    .await;
}

/// Every route of `api::router` under `/api/v1`, as (method, OpenAPI path), from the
/// table the router is built from (`api::routes`): the document must list exactly these.
/// (`/healthz`, `/readyz`, `/metrics` and the dashboard's `/` and `/assets/{name}` are
/// outside the API and its document.)
fn api_routes() -> Vec<(String, String)> {
    let routes: Vec<(String, String)> = fluxgate::api::routes()
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/"))
        .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
        .collect();
    // The table is the router's whole API: a sanity floor, so an empty table fails.
    assert!(routes.len() >= 19, "{routes:?}");
    routes
}

const WEBSOCKET_ROUTES: [&str; 2] = ["/api/v1/ingest/ws", "/api/v1/live"];

/// Every `$ref` string anywhere in `v`, with its JSON pointer location.
fn refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == "$ref"
                    && let Some(r) = child.as_str()
                {
                    out.push((at.clone(), r));
                }
                refs(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                refs(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_exactly_the_router() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let anonymous = gw
            .http_client
            .get(gw.http_url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap();
        Resp::read(anonymous).await.assert_unauthorized();
        let (_, viewer_key) = gw.admin.create_key("docs", "viewer").await;
        let r = gw.operator(&viewer_key).get("/api/v1/openapi.json").await;
        assert_eq!(
            (r.status, r.header("content-type")),
            (200, "application/json")
        );
        let doc = r.body;
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

        // It parses as an OpenAPI 3.1 document (typed model, version check), and every
        // operation's parameters, request body and responses resolve.
        let spec = oas3::from_json(doc.to_string()).unwrap();
        spec.validate_version().unwrap();
        for (p, method, op) in spec.operations() {
            op.parameters(&spec)
                .unwrap_or_else(|e| panic!("{method} {p}: {e}"));
            op.request_body(&spec)
                .unwrap_or_else(|e| panic!("{method} {p}: {e}"));
            assert_eq!(
                op.responses(&spec).len(),
                op.responses.as_ref().map_or(0, BTreeMap::len),
                "{method} {p}: a response did not resolve"
            );
        }

        // Every internal `$ref` resolves into `components`.
        let mut all = Vec::new();
        refs(&doc, String::new(), &mut all);
        assert!(
            !all.is_empty(),
            "no $ref at all: the schemas are not shared"
        );
        for (at, r) in all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{at}: external $ref {r}"));
            assert!(
                pointer.starts_with("/components/"),
                "{at}: $ref {r} outside components"
            );
            assert!(
                doc.pointer(pointer).is_some(),
                "{at}: $ref {r} does not resolve"
            );
        }

        // Exactly the router's routes, with their methods.
        let methods = [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ];
        let mut documented = BTreeSet::new();
        for (p, item) in doc["paths"].as_object().unwrap() {
            for (m, op) in item.as_object().unwrap() {
                if !methods.contains(&m.as_str()) {
                    assert_eq!(m, "parameters", "{p}: unexpected key {m}");
                    continue;
                }
                documented.insert((m.to_uppercase(), p.clone()));
                // Every operation: an id, responses (each with a description), and a
                // security requirement naming a declared scheme; authenticated ones
                // document their 401.
                let responses = op["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{m} {p}: no responses"));
                assert!(!responses.is_empty(), "{m} {p}: no responses");
                for (status, resp) in responses {
                    assert!(
                        resp["description"].is_string(),
                        "{m} {p} {status}: no description"
                    );
                }
                assert!(op["operationId"].is_string(), "{m} {p}: no operationId");
                let security = op["security"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{m} {p}: no security"));
                assert!(!security.is_empty(), "{m} {p}");
                for requirement in security {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(
                            doc["components"]["securitySchemes"][scheme].is_object(),
                            "{m} {p}: undeclared security scheme {scheme}"
                        );
                    }
                }
                assert!(
                    responses.contains_key("401"),
                    "{m} {p}: the 401 is not documented"
                );
                // Path parameters are declared, required, and in the path.
                let params: Vec<&Value> = op["parameters"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let in_path: BTreeSet<&str> = params
                    .iter()
                    .filter(|x| x["in"] == "path")
                    .map(|x| x["name"].as_str().unwrap())
                    .collect();
                let templated: BTreeSet<&str> = p
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                    .collect();
                assert_eq!(in_path, templated, "{m} {p}: path parameters");
                for x in params.iter().filter(|x| x["in"] == "path") {
                    assert_eq!(x["required"], true, "{m} {p}: {x}");
                }
            }
        }
        let routes = api_routes();
        let expected: BTreeSet<(String, String)> = routes.iter().cloned().collect();
        assert_eq!(documented, expected);
        let ids: BTreeSet<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        assert_eq!(
            ids.len(),
            routes.len(),
            "operationIds are not unique: {ids:?}"
        );

        // The list is the router's: each route exists with that method (without
        // credentials it answers 401, never 404/405), and the other methods on the same
        // paths are 405.
        let concrete = |p: &str| p.replace("{id}", "probe-dev");
        for (m, p) in &routes {
            let p = p.as_str();
            if WEBSOCKET_ROUTES.contains(&p) {
                let (status, body) = ws_open(&format!("ws://{}{p}", gw.http), None)
                    .await
                    .err()
                    .unwrap();
                assert_eq!(
                    (status, &body["type"]),
                    (401, &json!("urn:fluxgate:problem:unauthorized")),
                    "{m} {p}"
                );
                continue;
            }
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            let r = gw
                .http_client
                .request(method, gw.http_url(&concrete(p)))
                .send()
                .await
                .unwrap();
            Resp::read(r).await.assert_unauthorized();
        }
        let paths: BTreeSet<&str> = routes.iter().map(|(_, p)| p.as_str()).collect();
        for p in paths {
            for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                if expected.contains(&(m.to_owned(), p.to_owned())) {
                    continue;
                }
                let method = Method::from_bytes(m.as_bytes()).unwrap();
                let r = gw
                    .http_client
                    .request(method, gw.http_url(&concrete(p)))
                    .send()
                    .await
                    .unwrap();
                Resp::read(r)
                    .await
                    .assert_problem(405, "method_not_allowed");
            }
        }
        gw.shutdown().await;
    })
    .await;
}
