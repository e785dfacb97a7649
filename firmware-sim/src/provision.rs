//! Provisioning the simulated fleet: every device needs a token before it may connect.
//!
//! Tokens are kept in a JSON file (`--tokens-file`, default `sim-tokens.json`, written
//! with owner-only permissions) so that a second run reuses them. Devices without a
//! saved token are created with `POST /api/v1/devices:bulk` (admin API key, up to 10,000
//! per request); a device that already exists but whose token was lost gets a new one
//! with `POST /api/v1/devices/{id}/token`. Tokens are never printed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::device::{Credentials, Device};
use crate::metrics::http_request;
use crate::nodes::{Node, distinct_http, split_list};

/// Where tokens come from: the admin key to create devices, and the tokens file.
#[derive(Debug, Clone)]
pub struct Provisioning {
    /// Admin API key; needed only when some device has no saved token.
    pub api_key: Option<String>,
    /// The tokens file.
    pub tokens_file: std::path::PathBuf,
    /// Every node answers from one registry (cluster nodes on PostgreSQL): provision
    /// once, on the first node, and present that token everywhere.
    pub shared_registry: bool,
}

/// Most devices per bulk request (the gateway's limit).
const BULK: usize = 10_000;

/// The tokens file: device id -> token, per gateway HTTP address.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Gateway HTTP address -> (device id -> token).
    gateways: BTreeMap<String, BTreeMap<String, String>>,
}

impl TokenFile {
    /// Read the file, or an empty one when it does not exist.
    pub fn load(path: &Path) -> anyhow::Result<TokenFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a firmware-sim tokens file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write the file readable by its owner only (it holds secrets).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            let mut f = options
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

#[derive(Serialize)]
struct BulkRequest<'a> {
    devices: Vec<NewDevice<'a>>,
}

#[derive(Serialize)]
struct NewDevice<'a> {
    id: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
}

#[derive(Deserialize)]
struct BulkResult {
    results: Vec<BulkItem>,
}

#[derive(Deserialize)]
struct BulkItem {
    id: String,
    status: u16,
    token: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Rotated {
    token: String,
}

/// Give every device its credentials for every node, creating devices or tokens on the
/// gateways as needed, and save the tokens file.
///
/// Each distinct HTTP address of `nodes` is its own registry (single-node gateways, or
/// cluster nodes before they share one), so devices are provisioned on each and carry
/// one token per node. With `--shared-registry` (cluster nodes on one PostgreSQL
/// registry) they are provisioned once, on the first node, and that token is presented
/// to every node: provisioning on a second node of a shared registry would re-key the
/// devices and invalidate the first token.
pub async fn provision(
    nodes: &[Node],
    provisioning: &Provisioning,
    devices: &mut [Device],
) -> anyhow::Result<()> {
    let shared_registry = provisioning.shared_registry;
    let mut registries = distinct_http(nodes);
    if shared_registry {
        registries.truncate(1);
    }
    let keys = provisioning
        .api_key
        .as_deref()
        .map(split_list)
        .unwrap_or_default();
    let mut tokens = BTreeMap::new();
    let mut issued = false;
    for (k, http) in registries.into_iter().enumerate() {
        let key = keys.get(k % keys.len().max(1)).map(String::as_str);
        let (known, new) = tokens_on(http, key, &provisioning.tokens_file, devices).await?;
        issued |= new;
        tokens.insert(http, known);
    }
    if shared_registry && issued && nodes.len() > 1 {
        // The other nodes learn of new devices and tokens through the shared registry's
        // change notifications, within a second (cluster mode's promise); a device that
        // connected to another node before that would be refused and move on, and the
        // spread over the nodes would no longer be round-robin.
        eprintln!("waiting {SHARED_REGISTRY_SETTLE:?} for every node to learn the new tokens");
        tokio::time::sleep(SHARED_REGISTRY_SETTLE).await;
    }
    let per_node: Vec<&BTreeMap<String, String>> = if shared_registry {
        tokens.values().take(1).collect()
    } else {
        nodes
            .iter()
            .filter_map(|n| tokens.get(n.http.as_str()))
            .collect()
    };
    for device in devices.iter_mut() {
        device.credentials = per_node
            .iter()
            .map(|known| {
                let token = known
                    .get(&device.id)
                    .with_context(|| format!("no token for {}", device.id))?;
                Ok(Credentials {
                    username: device.id.clone(),
                    password: token.clone(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(())
}

/// How long the nodes of a shared registry get to learn about devices provisioned on the
/// first one.
const SHARED_REGISTRY_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The tokens of `devices` on the gateway at `http`, creating devices or tokens there as
/// needed and saving the tokens file; and whether any token was issued now.
async fn tokens_on(
    http: &str,
    api_key: Option<&str>,
    tokens_file: &Path,
    devices: &[Device],
) -> anyhow::Result<(BTreeMap<String, String>, bool)> {
    let mut file = TokenFile::load(tokens_file)?;
    let known = file.gateways.entry(http.to_owned()).or_default();
    let missing: Vec<&str> = devices
        .iter()
        .filter(|d| !known.contains_key(&d.id))
        .map(|d| d.id.as_str())
        .collect();
    if !missing.is_empty() {
        let Some(key) = api_key else {
            bail!(
                "{} of {} devices have no token in {}: pass an admin API key with --api-key \
                 (or FLUXGATE_API_KEY) so that firmware-sim can provision them",
                missing.len(),
                devices.len(),
                tokens_file.display()
            );
        };
        eprintln!("provisioning {} devices on {http} ...", missing.len());
        for chunk in missing.chunks(BULK) {
            let body = serde_json::to_vec(&BulkRequest {
                devices: chunk
                    .iter()
                    .map(|id| NewDevice {
                        id,
                        labels: BTreeMap::from([("source", "firmware-sim")]),
                    })
                    .collect(),
            })?;
            let (status, reply) =
                http_request(http, "POST", "/api/v1/devices:bulk", Some(key), Some(&body)).await?;
            if status != 200 {
                bail!(
                    "bulk provisioning failed with HTTP {status}: {}",
                    String::from_utf8_lossy(&reply)
                );
            }
            let result: BulkResult =
                serde_json::from_slice(&reply).context("unexpected bulk provisioning answer")?;
            for item in result.results {
                match (item.status, item.token) {
                    (201, Some(token)) => {
                        known.insert(item.id, token);
                    }
                    // It exists but this file lost its token: issue a new one.
                    (409, _) => {
                        let path = format!("/api/v1/devices/{}/token", item.id);
                        let (status, reply) =
                            http_request(http, "POST", &path, Some(key), None).await?;
                        if status != 200 {
                            bail!(
                                "re-keying {} failed with HTTP {status}: {}",
                                item.id,
                                String::from_utf8_lossy(&reply)
                            );
                        }
                        let rotated: Rotated = serde_json::from_slice(&reply)
                            .context("unexpected token rotation answer")?;
                        known.insert(item.id, rotated.token);
                    }
                    (status, _) => bail!(
                        "provisioning {} failed with status {status}: {}",
                        item.id,
                        item.error.unwrap_or_default()
                    ),
                }
            }
        }
        file.save(tokens_file)?;
        eprintln!("tokens saved to {}", tokens_file.display());
    }
    let issued = !missing.is_empty();
    Ok((file.gateways.get(http).cloned().unwrap_or_default(), issued))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_round_trips_and_is_private() {
        let dir = std::env::temp_dir().join(format!("fgsim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.json");
        let mut f = TokenFile::default();
        f.gateways
            .entry("127.0.0.1:8080".into())
            .or_default()
            .insert("sim-00000".into(), "fgd_x".into());
        f.save(&path).unwrap();
        let back = TokenFile::load(&path).unwrap();
        assert_eq!(back.gateways["127.0.0.1:8080"]["sim-00000"], "fgd_x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            TokenFile::load(&dir.join("absent.json"))
                .unwrap()
                .gateways
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_api_key_missing_tokens_are_an_error() {
        let dir = std::env::temp_dir().join(format!("fgsim-nokey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut devices = crate::device::fleet("sim", 2);
        let p = Provisioning {
            api_key: None,
            tokens_file: dir.join("t.json"),
            shared_registry: false,
        };
        let nodes = crate::nodes::parse_nodes("127.0.0.1:1", "127.0.0.1:9", None).unwrap();
        let err = provision(&nodes, &p, &mut devices).await.unwrap_err();
        assert!(err.to_string().contains("--api-key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
