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
    let (_, viewer) = create_key_offline(dir.path(), "cli", Role::Viewer).unwrap();
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
