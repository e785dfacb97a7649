//! Registry tests: devices, tokens, keys and listing against a real SQLite file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::AuthFailure;
use crate::observe::Metrics;

fn open(dir: &std::path::Path) -> Arc<Registry> {
    Registry::open(dir, Duration::from_secs(60), Arc::new(Metrics::default())).unwrap()
}

fn fields(name: &str) -> DeviceFields {
    DeviceFields {
        name: name.to_owned(),
        labels: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
        enabled: true,
    }
}

#[test]
fn devices_tokens_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let out = reg
        .create_devices(vec![
            ("d1".into(), fields("one")),
            ("d1".into(), fields("dup")),
            ("bad id".into(), fields("x")),
        ])
        .unwrap();
    let (view, token) = out[0].as_ref().unwrap();
    assert_eq!(view.record.version, 1);
    assert!(matches!(out[1], Err(RegistryError::AlreadyExists(_))));
    assert!(matches!(out[2], Err(RegistryError::Invalid { .. })));
    assert_eq!(&*reg.authenticate_token(token).unwrap(), "d1");
    assert!(reg.authenticate_mqtt("d1", "d1", token).is_ok());
    assert_eq!(
        reg.authenticate_mqtt("d1", "d2", token),
        Err(AuthFailure::IdentityMismatch)
    );
    assert_eq!(
        reg.authenticate_mqtt("d1", "d1", "nope"),
        Err(AuthFailure::BadToken)
    );

    let mut rx = reg.revocations();
    let (_, new_token) = reg.rotate_token("d1", Some("\"v1\"")).unwrap();
    assert_eq!(&*rx.try_recv().unwrap(), "d1");
    assert_eq!(reg.authenticate_token(token), Err(AuthFailure::BadToken));
    assert!(reg.authenticate_token(&new_token).is_ok());
    assert!(matches!(
        reg.rotate_token("d1", Some("\"v1\"")),
        Err(RegistryError::VersionMismatch { .. })
    ));
    reg.update(
        "d1",
        |f| {
            Ok(DeviceFields {
                enabled: false,
                ..f.clone()
            })
        },
        None,
    )
    .unwrap();
    assert_eq!(
        reg.authenticate_token(&new_token),
        Err(AuthFailure::Disabled)
    );
    drop(reg);

    // Everything survives a reopen.
    let reg = open(dir.path());
    let d = reg.get("d1").unwrap();
    assert_eq!(d.record.version, 3);
    assert!(!d.record.fields.enabled);
    assert_eq!(
        reg.authenticate_token(&new_token),
        Err(AuthFailure::Disabled)
    );
}

#[test]
fn keys_bootstrap_once_and_last_admin_stays() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let admin = reg.bootstrap_admin_key().unwrap().unwrap();
    assert!(reg.bootstrap_admin_key().unwrap().is_none());
    assert_eq!(reg.authenticate_key(&admin).unwrap().role, Role::Admin);
    let keys = reg.list_keys().unwrap();
    assert!(matches!(
        reg.revoke_key(&keys[0].id),
        Err(RegistryError::LastAdmin)
    ));
    // A key created by another process (the CLI) is found on a cache miss.
    let config = crate::config::Config {
        data_dir: dir.path().to_owned(),
        ..crate::config::Config::default()
    };
    let (_, viewer) = create_key_offline(&config, "cli", Role::Viewer).unwrap();
    assert_eq!(reg.authenticate_key(&viewer).unwrap().role, Role::Viewer);
    assert_eq!(
        reg.authenticate_key("fgk_wrong"),
        Err(AuthFailure::BadToken)
    );
}

#[test]
fn listing_pages_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let items = (0..25)
        .map(|i| {
            let mut f = fields(&format!("n{i}"));
            if i % 2 == 0 {
                f.labels.insert("even".into(), "yes".into());
            }
            (format!("dev-{i:02}"), f)
        })
        .collect();
    reg.create_devices(items).unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = reg.list(&ListFilter::default(), cursor.as_deref(), 10);
        seen.extend(page.into_iter().map(|v| v.record.id));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("dev-{i:02}")).collect();
    assert_eq!(seen, expected);
    let evens = ListFilter {
        labels: vec![("even".into(), "yes".into())],
        ..ListFilter::default()
    };
    assert_eq!(reg.list(&evens, None, 100).0.len(), 13);
    let prefix = ListFilter {
        prefix: Some("dev-1".into()),
        ..ListFilter::default()
    };
    assert_eq!(reg.list(&prefix, None, 100).0.len(), 10);
}

fn open_with(dir: &std::path::Path, metrics: Arc<Metrics>) -> Arc<Registry> {
    Registry::open(dir, Duration::from_secs(60), metrics).unwrap()
}

/// Far more unknown keys than the negative cache holds: it stays at its capacity (the
/// oldest are evicted, counted), each unknown key is looked up once, and a repeat of a
/// recent one is answered from the cache.
#[test]
fn unknown_keys_fill_a_bounded_negative_cache() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let reg = open_with(dir.path(), metrics.clone());
    reg.configure_negative_cache(50, Duration::from_secs(60));
    for i in 0..2_000 {
        assert_eq!(
            reg.authenticate_key(&format!("fgk_unknown{i}")),
            Err(AuthFailure::BadToken)
        );
        assert!(crate::sync::lock(&reg.negative).len() <= 50);
    }
    assert_eq!(crate::sync::lock(&reg.negative).len(), 50);
    // The newest is remembered: no second lookup.
    assert_eq!(reg.check_key_cached("fgk_unknown1999"), KeyCheck::Invalid);
    // The oldest was evicted: it would be looked up again.
    assert!(matches!(
        reg.check_key_cached("fgk_unknown0"),
        KeyCheck::Unknown(_)
    ));
    let text = metrics.render();
    for (series, value) in [
        (
            r#"fluxgate_operator_key_misses_total{answer="database_not_found"}"#,
            2_000,
        ),
        (
            r#"fluxgate_operator_key_misses_total{answer="negative_cache"}"#,
            1,
        ),
        (
            r#"fluxgate_auth_table_evictions_total{table="negative_keys"}"#,
            1_950,
        ),
    ] {
        let line = format!("{series} {value}");
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

/// Stream tokens name their key; revoking the key forgets them and cancels the leases
/// of its streams; the per-key lease cap holds and a dropped lease frees its slot.
#[tokio::test]
async fn stream_tokens_and_leases_end_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open_with(dir.path(), Arc::new(Metrics::default()));
    reg.bootstrap_admin_key().unwrap();
    let (key, _) = reg.create_key("viewer", Role::Viewer).unwrap();
    let (token, _) = reg
        .issue_stream_token(&key.id, Duration::from_secs(60))
        .unwrap();
    assert_eq!(reg.check_stream_token(&token).await, Some(key.id.clone()));
    assert_eq!(reg.check_stream_token("fgs_nope").await, None);

    let a = reg.acquire_stream_lease(&key.id, 2).unwrap();
    let b = reg.acquire_stream_lease(&key.id, 2).unwrap();
    assert_eq!(
        reg.acquire_stream_lease(&key.id, 2).err(),
        Some(LeaseError::TooManyStreams { limit: 2 })
    );
    drop(b);
    assert_eq!(reg.streams_of(&key.id), 1);
    let c = reg.acquire_stream_lease(&key.id, 2).unwrap();

    reg.revoke_key(&key.id).unwrap();
    // Both open leases see the revocation; nothing new can be opened.
    tokio::time::timeout(Duration::from_secs(1), a.revoked())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), c.revoked())
        .await
        .unwrap();
    assert_eq!(reg.check_stream_token(&token).await, None);
    assert_eq!(
        reg.acquire_stream_lease(&key.id, 2).err(),
        Some(LeaseError::Revoked)
    );
    drop((a, c));
    assert_eq!(reg.streams_of(&key.id), 0);
    // The revoked key is refused, and now from the negative cache after one lookup.
    assert!(reg.authenticate_key("fgk_whatever").is_err());
}

/// A key can hold only so many unexpired stream tokens.
#[test]
fn stream_tokens_per_key_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open_with(dir.path(), Arc::new(Metrics::default()));
    for _ in 0..MAX_TOKENS_PER_KEY {
        reg.issue_stream_token("k1", Duration::from_secs(60))
            .unwrap();
    }
    assert!(matches!(
        reg.issue_stream_token("k1", Duration::from_secs(60)),
        Err(RegistryError::TooManyStreamTokens { limit }) if limit == MAX_TOKENS_PER_KEY
    ));
    // Another key is not affected; expired tokens do not count.
    reg.issue_stream_token("k2", Duration::from_secs(60))
        .unwrap();
    reg.issue_stream_token("k3", Duration::ZERO).unwrap();
    reg.issue_stream_token("k3", Duration::from_secs(60))
        .unwrap();
}

/// A file from before commands had an owner node (schema version 1) keeps its open
/// commands: migration 2 gives them the empty node, which a single node loads.
#[test]
fn a_version_1_file_keeps_its_open_commands_for_the_single_node() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "CREATE TABLE devices (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL,
                enabled INTEGER NOT NULL, created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL, version INTEGER NOT NULL,
                token_hash BLOB NOT NULL, last_seen_ms INTEGER, transport TEXT) STRICT;
             CREATE TABLE api_keys (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,
                hash BLOB NOT NULL UNIQUE, created_ms INTEGER NOT NULL) STRICT;
             CREATE TABLE commands (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                device TEXT NOT NULL, name TEXT NOT NULL, params TEXT NOT NULL,
                timeout_ms INTEGER NOT NULL, ttl_ms INTEGER NOT NULL, state TEXT NOT NULL,
                created_ms INTEGER NOT NULL, sent_ms INTEGER, delivered_ms INTEGER,
                finished_ms INTEGER, result TEXT, error TEXT) STRICT;
             INSERT INTO commands (id, device, name, params, timeout_ms, ttl_ms, state, created_ms)
                VALUES ('c1', 'd1', 'reboot', '{}', 1000, 2000, 'queued', 5);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let reg = open(dir.path());
    let open_here = reg.commands_open("").unwrap();
    assert_eq!(open_here.len(), 1);
    assert_eq!(
        (open_here[0].id.as_str(), open_here[0].node.as_str()),
        ("c1", "")
    );
    // Another node's id owns none of them.
    assert!(reg.commands_open("a").unwrap().is_empty());
}
