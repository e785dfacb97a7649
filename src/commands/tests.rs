//! The dispatcher against a real registry database and a scripted push transport:
//! order, one command in flight per device, losses, `ttl` and `timeout` on tokio's
//! paused clock, the per-device cap, foreign replies, and a restart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{Downlink, DownlinkOutcome};
use crate::registry::DeviceFields;

/// A push transport whose device is reachable when `online` is set; it records every
/// offer and lets the test decide each outcome.
#[derive(Default)]
struct Scripted {
    online: AtomicBool,
    offers: Mutex<VecDeque<(String, serde_json::Value, oneshot::Sender<bool>)>>,
}

impl Downlink for Scripted {
    fn offer(&self, device: &str, payload: Bytes) -> Option<DownlinkOutcome> {
        if !self.online.load(Ordering::SeqCst) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let body = serde_json::from_slice(&payload).unwrap();
        self.offers
            .lock()
            .unwrap()
            .push_back((device.to_owned(), body, tx));
        Some(Box::pin(async move { rx.await.unwrap_or(false) }))
    }
}

impl Scripted {
    fn take(&self) -> Option<(String, serde_json::Value, oneshot::Sender<bool>)> {
        self.offers.lock().unwrap().pop_front()
    }
}

struct Fixture {
    commands: Commands,
    registry: Arc<Registry>,
    link: Arc<Scripted>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn config() -> CommandsConfig {
    CommandsConfig {
        max_queued: 3,
        ..CommandsConfig::default()
    }
}

async fn start(dir: &std::path::Path, link: Arc<Scripted>) -> Fixture {
    let metrics = Arc::new(Metrics::default());
    let d = dir.to_owned();
    let m = metrics.clone();
    let registry =
        tokio::task::spawn_blocking(move || Registry::open(&d, Duration::from_secs(60), m))
            .await
            .unwrap()
            .unwrap();
    let reg = registry.clone();
    tokio::task::spawn_blocking(move || {
        let fields = || DeviceFields {
            name: "d".into(),
            labels: BTreeMap::new(),
            enabled: true,
        };
        // Already there after a restart: that answer is an error per item, ignored.
        let _ = reg.create_devices(vec![("d1".into(), fields()), ("d2".into(), fields())]);
    })
    .await
    .unwrap();
    let (commands, dispatcher) = Commands::new(config(), registry.clone(), metrics);
    let stop = CancellationToken::new();
    let downlinks: Vec<Arc<dyn Downlink>> = vec![link.clone()];
    let task = tokio::spawn(dispatcher.run(downlinks, stop.clone()));
    Fixture {
        commands,
        registry,
        link,
        stop,
        task,
    }
}

fn new(name: &str) -> NewCommand {
    NewCommand {
        name: name.into(),
        params: Some(serde_json::json!({"n": name})),
        timeout: Some(Duration::from_secs(30)),
        ttl: Some(Duration::from_secs(600)),
    }
}

/// Wait (on the paused clock, in small steps) until `f` gives something.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..2000 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

/// The next state change of command `id`.
async fn next_state(
    events: &mut broadcast::Receiver<Arc<Command>>,
    id: &str,
) -> (CommandState, Arc<Command>) {
    loop {
        let c = events.recv().await.unwrap();
        if c.id == id {
            return (c.state, c);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn queued_commands_go_out_in_order_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), Arc::default()).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let c = f.commands.create("d1", new(name)).await.unwrap();
        assert_eq!(c.state, CommandState::Queued, "the device is offline");
        ids.push(c.id);
    }
    // Over the cap: refused, and nothing queued.
    let e = f.commands.create("d1", new("d")).await.unwrap_err();
    assert!(matches!(e, CommandsError::QueueFull { max: 3, .. }), "{e}");
    assert!(f.link.take().is_none());

    f.link.online.store(true, Ordering::SeqCst);
    f.commands.reachable("d1");
    let mut events = f.commands.subscribe();
    for (i, id) in ids.iter().enumerate() {
        let (device, body, ack) = eventually("an offer", || f.link.take()).await;
        assert_eq!(device, "d1");
        assert_eq!(body["id"], id.as_str(), "command {i} out of order");
        assert_eq!(body["params"]["n"], ["a", "b", "c"][i]);
        // One at a time: the next waits for this one's PUBACK.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            f.link.take().is_none(),
            "a second command before the PUBACK"
        );
        ack.send(true).unwrap();
        loop {
            let (state, _) = next_state(&mut events, id).await;
            if state == CommandState::Delivered {
                break;
            }
        }
    }
    f.commands
        .reply("d1", &ids[0], Reply::Ok(serde_json::json!({"done": true})))
        .await
        .unwrap();
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_command_goes_again_and_replies_finish_it() {
    let dir = tempfile::tempdir().unwrap();
    let link: Arc<Scripted> = Arc::default();
    link.online.store(true, Ordering::SeqCst);
    let f = start(dir.path(), link).await;
    let mut events = f.commands.subscribe();
    let c = f.commands.create("d1", new("reboot")).await.unwrap();
    assert_eq!(c.state, CommandState::Sent);
    let (_, _, ack) = eventually("an offer", || f.link.take()).await;
    // The connection ended before the PUBACK: queued again, then offered again by the
    // retry tick.
    ack.send(false).unwrap();
    let (_, body, ack) = eventually("a second offer", || f.link.take()).await;
    assert_eq!(body["id"], c.id.as_str());
    ack.send(true).unwrap();
    let mut seen = Vec::new();
    loop {
        let (state, _) = next_state(&mut events, &c.id).await;
        seen.push(state);
        if state == CommandState::Delivered {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            CommandState::Queued,
            CommandState::Sent,
            CommandState::Queued,
            CommandState::Sent,
            CommandState::Delivered
        ]
    );
    // Another device cannot answer it; its own device can, once.
    assert_eq!(
        f.commands
            .reply("d2", &c.id, Reply::Ok(serde_json::Value::Null))
            .await,
        Err(ReplyRefused::Unknown)
    );
    f.commands
        .reply("d1", &c.id, Reply::Err("busy".into()))
        .await
        .unwrap();
    let (state, done) = next_state(&mut events, &c.id).await;
    assert_eq!(state, CommandState::Failed);
    assert_eq!(done.error.as_deref(), Some("busy"));
    assert_eq!(
        f.commands
            .reply("d1", &c.id, Reply::Ok(serde_json::Value::Null))
            .await,
        Err(ReplyRefused::Unknown),
        "a repeated reply"
    );
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_queued_commands_and_timeout_fails_sent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), Arc::default()).await;
    let mut events = f.commands.subscribe();
    let queued = f
        .commands
        .create(
            "d1",
            NewCommand {
                ttl: Some(Duration::from_secs(60)),
                ..new("a")
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(59)).await;
    while let Ok(c) = events.try_recv() {
        assert_eq!(c.state, CommandState::Queued, "before its ttl");
    }
    let (state, c) = next_state(&mut events, &queued.id).await;
    assert_eq!(state, CommandState::Expired);
    assert_eq!(c.error.as_deref(), Some("ttl"));

    f.link.online.store(true, Ordering::SeqCst);
    let sent = f
        .commands
        .create(
            "d2",
            NewCommand {
                timeout: Some(Duration::from_secs(5)),
                ..new("b")
            },
        )
        .await
        .unwrap();
    assert_eq!(sent.state, CommandState::Sent);
    let (_, _, ack) = eventually("an offer", || f.link.take()).await;
    ack.send(true).unwrap();
    loop {
        let (state, _) = next_state(&mut events, &sent.id).await;
        if state == CommandState::Delivered {
            break;
        }
        assert!(!state.is_final(), "{state:?}");
    }
    let (state, c) = next_state(&mut events, &sent.id).await;
    assert_eq!(state, CommandState::Failed);
    assert_eq!(c.error.as_deref(), Some("timeout"));
    assert!(c.finished_ms >= c.delivered_ms);
    // Cancel: only a queued one.
    f.link.online.store(false, Ordering::SeqCst);
    let q = f.commands.create("d1", new("c")).await.unwrap();
    let cancelled = f.commands.cancel("d1", &q.id).await.unwrap();
    assert_eq!(cancelled.state, CommandState::Cancelled);
    let e = f.commands.cancel("d1", &q.id).await.unwrap_err();
    assert!(
        matches!(
            e,
            CommandsError::Conflict {
                state: CommandState::Cancelled,
                ..
            }
        ),
        "{e}"
    );
    let e = f.commands.cancel("d2", &q.id).await.unwrap_err();
    assert!(
        matches!(e, CommandsError::NotFound(_)),
        "another device's: {e}"
    );
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test]
async fn a_queued_command_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), Arc::default()).await;
    let c = f.commands.create("d1", new("after-restart")).await.unwrap();
    f.stop.cancel();
    f.task.await.unwrap();

    let link: Arc<Scripted> = Arc::default();
    link.online.store(true, Ordering::SeqCst);
    let f = start(dir.path(), link).await;
    f.commands.reachable("d1");
    let (device, body, ack) = eventually("the queued command", || f.link.take()).await;
    assert_eq!(
        (device.as_str(), &body["id"]),
        ("d1", &serde_json::json!(c.id))
    );
    assert_eq!(body["name"], "after-restart");
    ack.send(true).unwrap();
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test]
async fn invalid_commands_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), Arc::default()).await;
    let field = |e: CommandsError| match e {
        CommandsError::Invalid { field, .. } => field,
        e => panic!("{e}"),
    };
    let e = f.commands.create("d1", new("bad name")).await.unwrap_err();
    assert_eq!(field(e), "name");
    let mut n = new("a");
    n.params = Some(serde_json::json!([1]));
    assert_eq!(
        field(f.commands.create("d1", n).await.unwrap_err()),
        "params"
    );
    let mut n = new("a");
    n.timeout = Some(Duration::ZERO);
    assert_eq!(
        field(f.commands.create("d1", n).await.unwrap_err()),
        "timeout"
    );
    let mut n = new("a");
    n.ttl = Some(Duration::from_secs(30 * 24 * 3600));
    assert_eq!(field(f.commands.create("d1", n).await.unwrap_err()), "ttl");
    let e = f.commands.create("nobody", new("a")).await.unwrap_err();
    assert!(matches!(e, CommandsError::DeviceNotFound(_)), "{e}");
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test]
async fn a_deleted_devices_commands_never_reach_a_new_device_of_that_id() {
    let dir = tempfile::tempdir().unwrap();
    let link: Arc<Scripted> = Arc::default();
    let f = start(dir.path(), link).await;
    let old = f
        .commands
        .create("d1", new("for-the-old-one"))
        .await
        .unwrap();
    let reg = f.registry.clone();
    tokio::task::spawn_blocking(move || {
        reg.delete("d1", None).unwrap();
        let fields = DeviceFields {
            name: "d".into(),
            labels: BTreeMap::new(),
            enabled: true,
        };
        reg.create_devices(vec![("d1".into(), fields)]).unwrap();
    })
    .await
    .unwrap();
    // The dispatcher looks at deletions before requests, so it has forgotten the old
    // command when this one arrives.
    let fresh = f
        .commands
        .create("d1", new("for-the-new-one"))
        .await
        .unwrap();
    f.link.online.store(true, Ordering::SeqCst);
    f.commands.reachable("d1");
    let (_, body, ack) = eventually("an offer", || f.link.take()).await;
    assert_eq!(body["id"], fresh.id.as_str(), "not {}", old.id);
    ack.send(true).unwrap();
    f.stop.cancel();
    f.task.await.unwrap();
}
