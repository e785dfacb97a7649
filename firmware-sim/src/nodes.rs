//! Several gateway nodes: `--mqtt a,b,c` (and `--http`, `--https`) list the nodes of a
//! cluster, and the simulator spreads its devices over them.
//!
//! Device `i` starts on node `i mod n` (round-robin), so every node gets the same share
//! of the fleet within one device. When a device's connection fails, it moves on to the
//! next node in the list ([`next`]) before it reconnects: the devices of a node that was
//! killed end up on the survivors, as real devices behind a list of gateway addresses or
//! a load balancer would. A single address is the one-node case of the same rules.
//!
//! The lists of one run have either one entry or the same number of entries `n`: node
//! `k` is the `k`-th entry of each list, and a list of one entry is shared by every node
//! (e.g. one HTTP address in front of a registry all nodes share).

use anyhow::{Context, bail};

/// The addresses of one gateway node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// MQTT listener `HOST:PORT`.
    pub mqtt: String,
    /// HTTP listener `HOST:PORT` (WebSocket ingest, provisioning, `/metrics`).
    pub http: String,
    /// HTTPS listener `HOST:PORT` for wss ingest with `--tls` (`None`: `http`).
    pub https: Option<String>,
}

impl Node {
    /// A short name for reports: the address the devices of `transport` connect to.
    pub fn label(&self, mqtt: bool) -> &str {
        match (mqtt, &self.https) {
            (true, _) => &self.mqtt,
            (false, Some(https)) => https,
            (false, None) => &self.http,
        }
    }
}

/// Splits a comma-separated address list; blanks around entries are ignored.
pub fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The nodes named by the `--mqtt`, `--http` and `--https` lists (see the module docs
/// for how lists of different lengths combine). Every address must be `HOST:PORT`.
pub fn parse_nodes(mqtt: &str, http: &str, https: Option<&str>) -> anyhow::Result<Vec<Node>> {
    let lists = [
        ("--mqtt", split_list(mqtt)),
        ("--http", split_list(http)),
        ("--https", https.map(split_list).unwrap_or_default()),
    ];
    let mut n = 1;
    for (option, list) in &lists {
        if *option != "--https" && list.is_empty() {
            bail!("{option} names no address");
        }
        for addr in list {
            validate_host_port(addr).map_err(|e| e.context(format!("{option} {addr:?}")))?;
        }
        match (list.len(), n) {
            (0 | 1, _) => {}
            (len, 1) => n = len,
            (len, n) if len == n => {}
            (len, n) => bail!(
                "{option} lists {len} addresses but another option lists {n}: give each \
                 option either one address or one per node"
            ),
        }
    }
    let [(_, mqtt), (_, http), (_, https)] = lists;
    let pick = |list: &[String], k: usize| list.get(k % list.len().max(1)).cloned();
    Ok((0..n)
        .map(|k| Node {
            mqtt: pick(&mqtt, k).unwrap_or_default(),
            http: pick(&http, k).unwrap_or_default(),
            https: pick(&https, k),
        })
        .collect())
}

/// The node device `index` starts on: round-robin over `nodes` nodes.
pub fn home(index: u64, nodes: usize) -> usize {
    let nodes = nodes.max(1) as u64;
    // The remainder is below `nodes`, which came from a usize.
    usize::try_from(index % nodes).unwrap_or(0)
}

/// The node a device moves to after a connection failure on `node`.
pub fn next(node: usize, nodes: usize) -> usize {
    (node + 1) % nodes.max(1)
}

/// The distinct HTTP addresses of `nodes`, in node order: where devices are provisioned
/// and where `/metrics` is read.
pub fn distinct_http(nodes: &[Node]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for node in nodes {
        if !seen.contains(&node.http.as_str()) {
            seen.push(&node.http);
        }
    }
    seen
}

/// Checks that `addr` looks like `HOST:PORT` (resolution happens when connecting).
pub fn validate_host_port(addr: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("expected HOST:PORT, got {addr:?}"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in {addr:?}"))?;
    // Bracketed IPv6 literals ("[::1]:1883") are accepted; the brackets are stripped for
    // clients that want a bare host.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        bail!("expected HOST:PORT with a non-zero port, got {addr:?}");
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            validate_host_port("127.0.0.1:1883").expect("v4"),
            ("127.0.0.1", 1883)
        );
        assert_eq!(validate_host_port("[::1]:8080").expect("v6"), ("::1", 8080));
        assert_eq!(
            validate_host_port("gw.local:1").expect("name"),
            ("gw.local", 1)
        );
        assert!(validate_host_port(":1883").is_err());
        assert!(validate_host_port("host:0").is_err());
        assert!(validate_host_port("host:http").is_err());
    }

    #[test]
    fn lists_of_one_or_n_combine_into_nodes() {
        let nodes = parse_nodes("a:1,b:2,c:3", "h:80", None).expect("valid");
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[1].mqtt, "b:2");
        assert!(nodes.iter().all(|n| n.http == "h:80" && n.https.is_none()));
        assert_eq!(distinct_http(&nodes), ["h:80"]);

        let nodes = parse_nodes("a:1, b:2", "h:1,i:2", Some("s:1,t:2")).expect("valid");
        assert_eq!(nodes[1].http, "i:2");
        assert_eq!(nodes[1].https.as_deref(), Some("t:2"));
        assert_eq!(nodes[1].label(false), "t:2");
        assert_eq!(nodes[1].label(true), "b:2");
        assert_eq!(distinct_http(&nodes), ["h:1", "i:2"]);

        let one = parse_nodes("127.0.0.1:1883", "127.0.0.1:8080", None).expect("valid");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].label(false), "127.0.0.1:8080");
    }

    #[test]
    fn mismatched_or_malformed_lists_are_refused() {
        assert!(parse_nodes("a:1,b:2", "h:1,i:2,j:3", None).is_err());
        assert!(parse_nodes("a:1,b:2", "h:1", Some("s:1,t:2,u:3")).is_err());
        assert!(parse_nodes("a:1,nope", "h:1", None).is_err());
        assert!(parse_nodes(" , ", "h:1", None).is_err());
        assert!(parse_nodes("a:1", "", None).is_err());
    }

    #[test]
    fn devices_spread_round_robin_and_fail_over_to_the_next_node() {
        let homes: Vec<usize> = (0..7).map(|i| home(i, 3)).collect();
        assert_eq!(homes, [0, 1, 2, 0, 1, 2, 0]);
        // Every node gets its share within one device.
        for nodes in 1..6 {
            let mut per_node = vec![0u32; nodes];
            for i in 0..101 {
                per_node[home(i, nodes)] += 1;
            }
            let (min, max) = (per_node.iter().min(), per_node.iter().max());
            assert!(
                min.zip(max).is_some_and(|(a, b)| b - a <= 1),
                "{per_node:?}"
            );
        }
        // Moving on visits every other node before coming back.
        let mut node = 1;
        let visited: Vec<usize> = (0..3)
            .map(|_| {
                node = next(node, 3);
                node
            })
            .collect();
        assert_eq!(visited, [2, 0, 1]);
        assert_eq!(next(0, 1), 0);
        assert_eq!(home(5, 0), 0);
    }
}
