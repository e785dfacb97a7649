//! The registry on PostgreSQL (cluster mode), against a real server started by the test:
//! the same answers as the SQLite registry for the same operations, and two nodes on one
//! database see each other's changes through the change listener, with the revocations
//! a local change raises, within a second.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::engines::Postgres;
use fluxgate::config::Secret;
use fluxgate::observe::Metrics;
use fluxgate::registry::{ChangeListener, DeviceFields, Registry, RegistryError, Role};
use tokio_util::sync::CancellationToken;

fn fields(name: &str, enabled: bool) -> DeviceFields {
    DeviceFields {
        name: name.to_owned(),
        labels: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
        enabled,
    }
}

async fn open_pg(url: &str) -> Arc<Registry> {
    let url = Secret(url.to_owned());
    tokio::task::spawn_blocking(move || {
        Registry::open_postgres(
            &url,
            Duration::from_secs(10),
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
    })
    .await
    .unwrap()
    .unwrap()
}

/// Run a registry call on a blocking thread (the PostgreSQL backend waits there).
async fn on<T: Send + 'static>(
    reg: &Arc<Registry>,
    f: impl FnOnce(&Registry) -> T + Send + 'static,
) -> T {
    let reg = reg.clone();
    tokio::task::spawn_blocking(move || f(&reg)).await.unwrap()
}

/// A readable summary of an operation's outcome, the same for both backends.
fn outcome<T>(r: &Result<T, RegistryError>, ok: impl Fn(&T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => format!("error: {e}"),
    }
}

/// The same script of operations, with the answers written down.
async fn script(reg: Arc<Registry>) -> Vec<String> {
    let mut log = Vec::new();
    let created = on(&reg, |r| {
        r.create_devices(vec![
            ("d1".into(), fields("one", true)),
            ("d1".into(), fields("dup", true)),
            ("bad id".into(), fields("x", true)),
            ("d2".into(), fields("two", true)),
        ])
    })
    .await
    .unwrap();
    for c in &created {
        log.push(outcome(c, |(v, t)| {
            format!(
                "created {} {} token:{}",
                v.record.id,
                v.record.etag(),
                t.len()
            )
        }));
    }
    let again = on(&reg, |r| {
        r.create_devices(vec![("d1".into(), fields("x", true))])
    })
    .await
    .unwrap();
    log.push(outcome(&again[0], |_| "created again".into()));
    let upd = on(&reg, |r| {
        r.update(
            "d1",
            |f| {
                Ok(DeviceFields {
                    name: "renamed".into(),
                    ..f.clone()
                })
            },
            Some("\"v1\""),
        )
    })
    .await;
    log.push(outcome(&upd, |v| {
        format!("updated {} {}", v.record.fields.name, v.record.etag())
    }));
    let stale = on(&reg, |r| r.update("d1", |f| Ok(f.clone()), Some("\"v1\""))).await;
    log.push(outcome(&stale, |_| "stale update went through".into()));
    let bad = on(&reg, |r| {
        r.update(
            "d1",
            |f| {
                Ok(DeviceFields {
                    name: String::new(),
                    ..f.clone()
                })
            },
            None,
        )
    })
    .await;
    log.push(outcome(&bad, |_| "empty name accepted".into()));
    let rot = on(&reg, |r| r.rotate_token("d1", None)).await;
    log.push(outcome(&rot, |(v, _)| {
        format!("rotated {}", v.record.etag())
    }));
    let del = on(&reg, |r| r.delete("d2", Some("\"v9\""))).await;
    log.push(outcome(&del, |()| "deleted with a wrong etag".into()));
    let del = on(&reg, |r| r.delete("d2", Some("\"v1\""))).await;
    log.push(outcome(&del, |()| "deleted d2".into()));
    let del = on(&reg, |r| r.delete("d2", None)).await;
    log.push(outcome(&del, |()| "deleted d2 twice".into()));
    let (page, next) = reg.list(&Default::default(), None, 10);
    log.push(format!(
        "list {:?} next {next:?}",
        page.iter().map(|v| v.record.id.clone()).collect::<Vec<_>>()
    ));

    let first = on(&reg, |r| r.bootstrap_admin_key()).await.unwrap();
    log.push(format!("bootstrap key: {}", first.is_some()));
    let second = on(&reg, |r| r.bootstrap_admin_key()).await.unwrap();
    log.push(format!("bootstrap again: {}", second.is_some()));
    let (viewer, _) = on(&reg, |r| r.create_key("ops", Role::Viewer))
        .await
        .unwrap();
    let keys = on(&reg, |r| r.list_keys()).await.unwrap();
    // By creation time, then id: keys made in the same millisecond come in id order,
    // which is random; compare them by name.
    let mut named: Vec<_> = keys.iter().map(|k| (k.name.clone(), k.role)).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    log.push(format!("keys {named:?}"));
    let admin = keys
        .iter()
        .find(|k| k.role == Role::Admin)
        .unwrap()
        .id
        .clone();
    let last = on(&reg, move |r| r.revoke_key(&admin)).await;
    log.push(outcome(&last, |()| "revoked the last admin".into()));
    let v = viewer.id.clone();
    let revoked = on(&reg, move |r| r.revoke_key(&v)).await;
    log.push(outcome(&revoked, |()| "revoked the viewer".into()));
    let gone = on(&reg, |r| r.revoke_key("nope")).await;
    log.push(outcome(&gone, |()| "revoked an unknown key".into()));
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answers_as_sqlite_does() {
    let pg = Postgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let sqlite = tokio::task::spawn_blocking(move || {
        Registry::open(&d, Duration::from_secs(60), Arc::new(Metrics::default()))
    })
    .await
    .unwrap()
    .unwrap();
    let postgres = open_pg(&pg.url()).await;
    let a = script(sqlite).await;
    let b = script(postgres).await;
    assert_eq!(a, b);
    // The script did exercise both outcomes of each check.
    for expected in [
        "created d1 \"v1\" token:",
        "error: device `d1` already exists",
        "updated renamed \"v2\"",
        "error: the device changed (current ETag \"v2\")",
        "rotated \"v3\"",
        "deleted d2",
        "error: device `d2` not found",
        "bootstrap key: true",
        "bootstrap again: false",
        "error: cannot revoke the last admin key",
        "revoked the viewer",
    ] {
        assert!(
            a.iter().any(|l| l.starts_with(expected)),
            "{expected} in {a:#?}"
        );
    }

    // Reopening finds the schema at its version and the data in place.
    let again = open_pg(&pg.url()).await;
    assert_eq!(again.get("d1").unwrap().record.fields.name, "renamed");
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM fluxgate_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // 1: the schema; 2: the owner node of each command (cluster mode).
    assert_eq!(versions, [1, 2]);
}

/// Two nodes' registries on one database, each with its change listener.
async fn two_nodes(url: &str) -> (Arc<Registry>, Arc<Registry>, CancellationToken) {
    let a = open_pg(url).await;
    let b = open_pg(url).await;
    let stop = CancellationToken::new();
    for reg in [&a, &b] {
        let listener = ChangeListener {
            registry: reg.clone(),
            url: Secret(url.to_owned()),
            connect_timeout: Duration::from_secs(10),
        };
        tokio::spawn(listener.run(stop.clone()));
    }
    (a, b, stop)
}

/// Wait (at most `within`) until `check` holds; returns how long it took.
async fn within(what: &str, within: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_node_reaches_the_other_within_a_second() {
    let pg = Postgres::start().await;
    let (a, b, stop) = two_nodes(&pg.url()).await;
    // Let both listeners subscribe (they resync when they do, so nothing is lost).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Duration::from_secs(1);

    let created = on(&a, |r| {
        r.create_devices(vec![("d1".into(), fields("one", true))])
    })
    .await
    .unwrap();
    let token = created[0].as_ref().unwrap().1.clone();
    let t = within("b knows d1", second, || {
        b.authenticate_token(&token).is_ok()
    })
    .await;
    eprintln!("creation seen by the other node after {t:?}");

    // Disabling on a is a revocation on b, where the device may be connected.
    let mut revoked_b = b.revocations();
    on(&a, |r| {
        r.update(
            "d1",
            |f| {
                Ok(DeviceFields {
                    enabled: false,
                    ..f.clone()
                })
            },
            None,
        )
    })
    .await
    .unwrap();
    let t = Instant::now();
    let id = tokio::time::timeout(second, revoked_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*id, "d1");
    eprintln!(
        "disable raised a revocation on the other node after {:?}",
        t.elapsed()
    );
    assert!(b.authenticate_token(&token).is_err());

    // A stale ETag on b is refused with the current one, as on one node.
    let stale = on(&b, |r| r.update("d1", |f| Ok(f.clone()), Some("\"v1\""))).await;
    assert!(
        matches!(&stale, Err(RegistryError::VersionMismatch { current }) if current == "\"v2\""),
        "{stale:?}"
    );
    // b writes on top of a's version even if its cache had not caught up yet.
    let view = on(&b, |r| {
        r.update(
            "d1",
            |f| {
                Ok(DeviceFields {
                    enabled: true,
                    ..f.clone()
                })
            },
            Some("\"v2\""),
        )
    })
    .await
    .unwrap();
    assert_eq!(view.record.etag(), "\"v3\"");
    within("a sees v3", second, || {
        a.get("d1").is_some_and(|v| v.record.version == 3)
    })
    .await;

    // Re-keying and deleting on b are revocations on a.
    let mut revoked_a = a.revocations();
    let (_, new_token) = on(&b, |r| r.rotate_token("d1", None)).await.unwrap();
    let id = tokio::time::timeout(second, revoked_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*id, "d1");
    assert!(a.authenticate_token(&token).is_err());
    within("a takes the new token", second, || {
        a.authenticate_token(&new_token).is_ok()
    })
    .await;
    on(&b, |r| r.delete("d1", None)).await.unwrap();
    let id = tokio::time::timeout(second, revoked_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*id, "d1");
    within("a forgets d1", second, || a.get("d1").is_none()).await;

    // Keys: made on a, usable on b (found on first use); stream tokens too; a key revoked
    // on b stops working on a, with its stream tokens.
    let admin = on(&a, |r| r.bootstrap_admin_key()).await.unwrap().unwrap();
    let (viewer, secret) = on(&a, |r| r.create_key("ops", Role::Viewer)).await.unwrap();
    let s = secret.clone();
    assert_eq!(
        on(&b, move |r| r.authenticate_key(&s)).await.unwrap().id,
        viewer.id
    );
    let vid = viewer.id.clone();
    let (stream_token, _) = on(&a, move |r| {
        r.issue_stream_token(&vid, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(
        b.check_stream_token(&stream_token).await,
        Some(viewer.id.clone())
    );
    let vid = viewer.id.clone();
    on(&b, move |r| r.revoke_key(&vid)).await.unwrap();
    let s = secret.clone();
    within("a refuses the revoked key", second, || {
        a.check_key_cached(&s) != fluxgate::registry::KeyCheck::Valid(viewer.clone())
    })
    .await;
    assert!(on(&a, move |r| r.authenticate_key(&secret)).await.is_err());
    assert_eq!(a.check_stream_token(&stream_token).await, None);
    assert!(on(&a, move |r| r.authenticate_key(&admin)).await.is_ok());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_key_survives_two_nodes_revoking_at_once() {
    let pg = Postgres::start().await;
    let url = pg.create_database("admins").await;
    let (a, b, stop) = two_nodes(&url).await;
    on(&a, |r| r.bootstrap_admin_key()).await.unwrap().unwrap();
    on(&a, |r| r.create_key("second", Role::Admin))
        .await
        .unwrap();
    let keys = on(&a, |r| r.list_keys()).await.unwrap();
    let (k1, k2) = (keys[0].id.clone(), keys[1].id.clone());
    let (ra, rb) = tokio::join!(
        on(&a, move |r| r.revoke_key(&k1)),
        on(&b, move |r| r.revoke_key(&k2))
    );
    let refused = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(RegistryError::LastAdmin)))
        .count();
    assert_eq!(refused, 1, "{ra:?} {rb:?}");
    assert_eq!(on(&a, |r| r.list_keys()).await.unwrap().len(), 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_cli_writes_the_shared_registry_in_cluster_mode() {
    let pg = Postgres::start().await;
    let url = pg.create_database("cli").await;
    let node = open_pg(&url).await;
    let mut config = fluxgate::Config::default();
    config.cluster.enabled = true;
    config.cluster.postgres = Secret(url.clone());
    // The CLI runs without a gateway (and without a runtime of its own caller's).
    let (key, secret) = std::thread::spawn(move || {
        fluxgate::registry::create_key_offline(&config, "from-cli", Role::Viewer)
    })
    .join()
    .unwrap()
    .unwrap();
    // A running node finds it on first use.
    let found = on(&node, move |r| r.authenticate_key(&secret))
        .await
        .unwrap();
    assert_eq!(found.id, key.id);
    assert_eq!(found.role, Role::Viewer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_new_on_another_node_is_found_when_it_connects() {
    let pg = Postgres::start().await;
    let url = pg.create_database("newdev").await;
    // No listeners: b hears of nothing, as in the moment before a notification arrives.
    let a = open_pg(&url).await;
    let b = open_pg(&url).await;
    let created = on(&a, |r| {
        r.create_devices(vec![("d1".into(), fields("one", true))])
    })
    .await
    .unwrap();
    let token = created[0].as_ref().unwrap().1.clone();
    assert!(b.authenticate_token(&token).is_err());
    assert!(b.authenticate_mqtt("d1", "d1", &token).is_err());

    // b loads the device and the check passes on the second try.
    assert!(b.refresh_for_auth("d1", &token).await);
    assert_eq!(&*b.authenticate_token(&token).unwrap(), "d1");
    assert!(b.authenticate_mqtt("d1", "d1", &token).is_ok());
    // A device that exists nowhere changes nothing; a wrong token for a device b knows
    // up to date changes nothing either (the second check refuses it as before).
    assert!(!b.refresh_for_auth("nope", "fgd_wrong").await);
    assert!(!b.refresh_for_auth("d1", "fgd_wrong").await);
    assert!(b.authenticate_mqtt("d1", "d1", "fgd_wrong").is_err());

    // One node never looks: its file is the whole truth.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let single = tokio::task::spawn_blocking(move || {
        Registry::open(&d, Duration::from_secs(60), Arc::new(Metrics::default()))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!single.refresh_for_auth("d1", &token).await);
}
