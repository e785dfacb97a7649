#!/usr/bin/env bash
# Cluster mode on one machine, as a correctness-and-overhead figure: three nats-server
# processes (a JetStream cluster, R3 stream), one PostgreSQL, three release gateways in
# cluster mode, and `firmware-sim bench` spreading its devices over the three nodes;
# then the same load against one single-node gateway, in the same run. Every mode runs
# RUNS times (default 3), alternating, and the medians are printed.
#
# Per run: messages/s until every message was acknowledged (WebSocket acks come after
# JetStream's publish ack in cluster mode, after the store's commit on one node) and
# until every node's store held every reading (each cluster node follows the whole
# stream into its own SQLite); CPU per message of the gateways and of the nats-servers
# (utime + stime from /proc/<pid>/stat before and after the run, until stored); and
# JetStream's share of that CPU. Then a follower catch-up: one node is stopped, a
# backlog is sent through the other two, the node is started again and the time until
# its store holds the backlog gives its follower's store write rate, the per-node
# ceiling of the whole cluster's throughput.
#
# Bounded and self-stopping: every wait has a deadline; everything started here is
# killed on exit (trap), and the temporary directory removed. 127.0.0.1 only.
#
# Usage: scripts/bench-cluster.sh [messages per run] [devices]
#   RUNS=3 TRANSPORT=ws CATCHUP_MESSAGES=100000 MOSQUITTO=1 scripts/bench-cluster.sh 60000 30
# Needs nats-server, postgresql, python3, curl (scripts/test.sh installs them) and, for
# the Mosquitto reference, mosquitto and mosquitto-clients.
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-60000}
devices=${2:-30}
runs=${RUNS:-3}
transport=${TRANSPORT:-ws}
catchup_messages=${CATCHUP_MESSAGES:-$messages}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
bin="$CARGO_TARGET_DIR/release"

for tool in nats-server python3 curl setpriv; do
  command -v "$tool" >/dev/null || { echo "needs $tool (scripts/test.sh installs the engines)" >&2; exit 1; }
done
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pg_bin/postgres" ] || { echo "needs postgresql (apt-get install postgresql)" >&2; exit 1; }
cargo build --release -p fluxgate -p firmware-sim

work=$(mktemp -d /tmp/bench-cluster.XXXXXX)
chmod 755 "$work"
pids=()
pg_pid=
cleanup() {
  set +e
  exec 2>/dev/null  # no job-control noise about the processes killed here
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  if [ -n "$pg_pid" ]; then
    kill -INT "$pg_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pg_pid" 2>/dev/null
  fi
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
hz=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (the name field holds no spaces here).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
sum_ticks() { local t=0; for p in "$@"; do t=$((t + $(ticks "$p"))); done; echo "$t"; }
wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}
metric() { # http, series (exact, with labels) -> value, or 0 when absent or unreachable
  { curl -s --max-time 5 "http://$1/metrics" || true; } | awk -v s="$2" '$1==s{print $2; found=1} END{if(!found) print 0}'
}
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"

# --- NATS: three servers, one JetStream cluster --------------------------------------
nats_urls=(); nats_pids=(); routes=()
declare -a nports rports
for i in 0 1 2; do nports[$i]=$(free_port); rports[$i]=$(free_port); routes+=("nats-route://127.0.0.1:${rports[$i]}"); done
route_list=$(IFS=,; echo "${routes[*]}")
for i in 0 1 2; do
  mkdir -p "$work/nats$i"
  cat >"$work/nats$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:${nports[$i]}
jetstream { store_dir: "$work/nats$i", max_memory_store: 64MB, max_file_store: 8GB }
cluster { name: fluxgate-bench, listen: 127.0.0.1:${rports[$i]}, routes: [$route_list] }
EOF
  nats-server -c "$work/nats$i.conf" -l "$work/nats$i.log" &
  nats_pids+=($!); pids+=($!)
  nats_urls+=("\"nats://127.0.0.1:${nports[$i]}\"")
done
# JetStream answers once a meta leader is elected: ask every server for the stream names
# over the plain NATS protocol until none answers with an error.
js_ready() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.recv(4096)  # INFO
s.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.ready 1\r\nPUB $JS.API.STREAM.NAMES _INBOX.ready 0\r\n\r\nPING\r\n')
buf = b""
while True:  # until the whole reply (MSG header + payload) is in; a timeout fails
    at = buf.find(b"MSG _INBOX.ready")
    if at >= 0 and b"\r\n" in buf[at:]:
        head, rest = buf[at:].split(b"\r\n", 1)
        if len(rest) >= int(head.split()[-1]):
            break
    chunk = s.recv(65536)
    if not chunk:
        sys.exit(1)
    buf += chunk
sys.exit(0 if b"MSG _INBOX.ready" in buf and b'"error"' not in buf else 1)
PY
}
for i in 0 1 2; do wait_for "JetStream on nats-server n$i" 60 js_ready "${nports[$i]}"; done

# --- PostgreSQL ----------------------------------------------------------------------
pg_port=$(free_port)
mkdir -p "$work/pg"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres:postgres "$work/pg"
  as_pg=(setpriv --reuid=postgres --regid=postgres --clear-groups --reset-env)
fi
"${as_pg[@]}" "$pg_bin/initdb" -A trust -U postgres -E UTF8 -D "$work/pg/data" >"$work/initdb.log" 2>&1
"${as_pg[@]}" "$pg_bin/postgres" -D "$work/pg/data" -p "$pg_port" -c listen_addresses=127.0.0.1 \
  -c "unix_socket_directories=$work/pg" -c fsync=off >"$work/pg.log" 2>&1 &
pg_pid=$!
wait_for PostgreSQL 60 "$pg_bin/pg_isready" -h 127.0.0.1 -p "$pg_port"
"$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -qc 'CREATE DATABASE fluxgate' postgres
pg_url="postgres://postgres@127.0.0.1:$pg_port/fluxgate"

# --- the gateways --------------------------------------------------------------------
nats_list=$(IFS=,; echo "${nats_urls[*]}")
declare -a gw_pid gw_http gw_mqtt gw_key gw_conf
# write_config NAME CLUSTER(true|false): a gateway with fixed free ports, so that a
# restarted node keeps its addresses.
write_config() {
  local name=$1 cluster=$2 http mqtt
  http=$(free_port); mqtt=$(free_port)
  mkdir -p "$work/$name"
  cat >"$work/$name.toml" <<EOF
data_dir = "$work/$name"
[http]
listen = "127.0.0.1:$http"
[mqtt]
listen = "127.0.0.1:$mqtt"
[cluster]
enabled = $cluster
node_id = "$name"
nats = [$nats_list]
postgres = "$pg_url"
replicas = 3
stream_max_bytes = 6000000000
EOF
  echo "$http $mqtt"
}
# start_gateway INDEX NAME: runs $work/NAME.toml, waits until it listens.
start_gateway() {
  local i=$1 name=$2
  [ -f "$work/$name.log" ] && mv "$work/$name.log" "$work/$name.log.$(date +%s%N)"
  "$bin/fluxgate" --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  gw_pid[$i]=$!; pids+=($!)
  local end=$(( $(date +%s) + 120 ))
  until grep -q 'listening mqtt=' "$work/$name.log"; do
    if ! kill -0 "${gw_pid[$i]}" 2>/dev/null || [ "$(date +%s)" -ge "$end" ]; then
      echo "gateway $name did not start:" >&2; tail -20 "$work/$name.log" >&2; exit 1
    fi
    sleep 0.2
  done
}
for i in 0 1 2; do
  read -r h m < <(write_config "node$i" true)
  gw_http[$i]="127.0.0.1:$h"; gw_mqtt[$i]="127.0.0.1:$m"
  start_gateway "$i" "node$i"
  gw_key[$i]=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$work/node$i.log" | head -1 || true)
done
read -r h m < <(write_config single false)
gw_http[3]="127.0.0.1:$h"; gw_mqtt[3]="127.0.0.1:$m"
start_gateway 3 single
gw_key[3]=$(grep -o 'fgk_[A-Za-z0-9_-]*' "$work/single.log" | head -1)

# With the registry on PostgreSQL only the first node creates an admin key and the
# others share it; with a registry per node each has its own and devices are
# provisioned on each.
if [ -z "${gw_key[1]}" ] && [ -z "${gw_key[2]}" ]; then
  registry=(--shared-registry --api-key "${gw_key[0]}")
  echo "registry: shared (PostgreSQL), provisioned once"
else
  registry=(--api-key "${gw_key[0]},${gw_key[1]},${gw_key[2]}")
  echo "registry: one per node, provisioned on each"
fi
cluster_http="${gw_http[0]},${gw_http[1]},${gw_http[2]}"
cluster_mqtt="${gw_mqtt[0]},${gw_mqtt[1]},${gw_mqtt[2]}"
stored_series=fluxgate_store_readings_written_total

# wait_stored TARGET HTTP...: until every listed node's store counter reaches TARGET
# (bounded: gives up when nothing moved for 20 s). Prints the seconds it took.
wait_stored() {
  local target=$1; shift
  local start last=-1 still=0 n min
  start=$(now)
  while :; do
    min=
    for h in "$@"; do
      n=$(metric "$h" "$stored_series"); n=${n%.*}
      if [ -z "$min" ] || [ "$n" -lt "$min" ]; then min=$n; fi
    done
    [ "$min" -ge "$target" ] && break
    if [ "$min" = "$last" ]; then still=$((still + 1)); [ "$still" -ge 100 ] && { echo "stalled at $min of $target" >&2; break; }; else still=0; fi
    last=$min
    sleep 0.2
  done
  python3 -c "print($(now) - $start)"
}

# run_bench MODE RUN: one benchmark, one result line in $work/results.
run_bench() {
  local mode=$1 run=$2 http mqtt sim_args=() stored_nodes=() gws=() base_stored target
  if [ "$mode" = cluster ]; then
    http=$cluster_http; mqtt=$cluster_mqtt; sim_args=("${registry[@]}")
    stored_nodes=("${gw_http[0]}" "${gw_http[1]}" "${gw_http[2]}")
    gws=("${gw_pid[0]}" "${gw_pid[1]}" "${gw_pid[2]}")
  else
    http=${gw_http[3]}; mqtt=${gw_mqtt[3]}; sim_args=(--api-key "${gw_key[3]}")
    stored_nodes=("${gw_http[3]}"); gws=("${gw_pid[3]}")
  fi
  base_stored=$(metric "${stored_nodes[0]}" "$stored_series"); base_stored=${base_stored%.*}
  target=$((base_stored + messages * 4))
  local g0 n0 t0 out g1 n1 t1 stored_s
  g0=$(sum_ticks "${gws[@]}"); n0=$(sum_ticks "${nats_pids[@]}"); t0=$(now)
  out=$("$bin/firmware-sim" bench --transport "$transport" --qos 1 --devices "$devices" \
    --messages "$messages" --mqtt "$mqtt" --http "$http" --prefix "b$run" \
    --tokens-file "$work/tokens-$mode.json" --timeout 300s --json "${sim_args[@]}" 2>"$work/sim-$mode-$run.log") || true
  stored_s=$(wait_stored "$target" "${stored_nodes[@]}")
  g1=$(sum_ticks "${gws[@]}"); n1=$(sum_ticks "${nats_pids[@]}"); t1=$(now)
  [ "$mode" = cluster ] || n1=$n0   # the single node uses no NATS
  echo "$out" >"$work/sim-$mode-$run.json"
  python3 - "$mode" "$run" "$out" "$t0" "$t1" "$g0" "$g1" "$n0" "$n1" "$hz" "$messages" "$stored_s" <<'PY' | tee -a "$work/results"
import json, sys
mode, run, out, t0, t1, g0, g1, n0, n1, hz, m, stored_s = sys.argv[1:]
r = json.loads(out) if out.strip() else {}
m = int(m); secs = float(t1) - float(t0)
gw = (int(g1) - int(g0)) / int(hz); nats = (int(n1) - int(n0)) / int(hz)
acked = r.get("acked", 0)
e2e = (r.get("e2e") or {}).get("rate", 0.0)
send = r.get("send_rate", 0.0)
nodes = " ".join(f"{n['acked']}" for n in r.get("nodes", []))
res = {"mode": mode, "run": int(run), "acked": acked, "errors": r.get("errors"),
       "acked_per_s": round(send), "ingested_per_s": round(e2e),
       "stored_everywhere_per_s": round(m / (float(stored_s) + ((r.get("e2e") or {}).get("secs") or 0.0))) if acked else 0,
       "wall_s": round(secs, 2), "gateway_cpu_s": round(gw, 2), "nats_cpu_s": round(nats, 2),
       "cpu_us_per_msg": round((gw + nats) / m * 1e6, 1),
       "jetstream_share": round(nats / (gw + nats), 3) if gw + nats > 0 else 0,
       "acked_per_node": nodes,
       "ack_p50_ms": (r.get("latency_ms") or {}).get("p50")}
print(json.dumps(res))
PY
}

echo "load: $messages messages over $devices $transport devices per run, $runs runs per mode"
for run in $(seq "$runs"); do
  run_bench cluster "$run"
  run_bench single "$run"
done

# --- follower catch-up: node 2 down, a backlog through nodes 0 and 1, node 2 back ------
catchup=
if [ "$catchup_messages" -gt 0 ]; then
  kill -TERM "${gw_pid[2]}"
  for _ in $(seq 300); do kill -0 "${gw_pid[2]}" 2>/dev/null || break; sleep 0.1; done
  before=$(metric "${gw_http[0]}" "$stored_series"); before=${before%.*}
  if [ ${#registry[@]} -eq 2 ] && [ "${registry[0]}" = --shared-registry ]; then
    two=("${registry[@]}")
  else
    two=(--api-key "${gw_key[0]},${gw_key[1]}")
  fi
  "$bin/firmware-sim" bench --transport "$transport" --qos 1 --devices "$devices" \
    --messages "$catchup_messages" --mqtt "${gw_mqtt[0]},${gw_mqtt[1]}" \
    --http "${gw_http[0]},${gw_http[1]}" --prefix backlog --tokens-file "$work/tokens-backlog.json" \
    --timeout 300s --json "${two[@]}" >"$work/sim-backlog.json" 2>"$work/sim-backlog.log" || true
  wait_stored $((before + catchup_messages * 4)) "${gw_http[0]}" >/dev/null
  # Node 2 held everything before the backlog (it was stopped after the runs drained);
  # its counter starts at 0 with the process, so it must count the backlog. Sampled
  # every 0.1 s: the rate between 10 % and 90 % of the backlog is the follower's store
  # write rate without the node's start-up.
  want=$((catchup_messages * 4))
  c0=$(now)
  start_gateway 2 node2
  : >"$work/catchup.samples"
  end=$(( $(date +%s) + 600 ))
  while :; do
    n=$(metric "${gw_http[2]}" "$stored_series"); n=${n%.*}
    echo "$(now) $n" >>"$work/catchup.samples"
    [ "$n" -ge "$want" ] && break
    [ "$(date +%s)" -lt "$end" ] || { echo "catch-up did not finish" >&2; break; }
    sleep 0.1
  done
  cpu=$(ticks "${gw_pid[2]}")
  catchup=$(python3 - "$work/catchup.samples" "$c0" "$want" "$cpu" "$hz" <<'PY'
import sys
samples = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
c0, want, cpu, hz = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t10 = next((t, n) for t, n in samples if n >= want * 0.1)
t90 = next((t, n) for t, n in samples if n >= want * 0.9)
done = samples[-1][0]
mid = (t90[1] - t10[1]) / (t90[0] - t10[0]) if t90[0] > t10[0] else float("nan")
print(f"follower catch-up: {want // 4} messages ({want} readings) into the restarted node: "
      f"{done - c0:.2f} s from its start ({want / (done - c0):.0f} readings/s), "
      f"{mid:.0f} readings/s = {mid / 4:.0f} msg/s between 10 % and 90 % of the backlog; "
      f"its CPU since start {cpu / hz:.1f} s = {cpu / hz / want * 1e6:.1f} us per reading")
PY
)
  echo "$catchup"
fi

# --- Mosquitto reference (optional) -----------------------------------------------------
if [ "${MOSQUITTO:-1}" = 1 ] && command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null; then
  mport=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$mport" >"$work/mosquitto.conf"
  mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
  mpid=$!; pids+=("$mpid")
  python3 - "$messages" >"$work/feed" <<'PY'
import sys
n = int(sys.argv[1]); t0 = 1_795_000_000_000
for i in range(n):
    sys.stdout.write('{"ts":%d,"values":{"temp":%.2f,"humidity":%.2f,"pressure":%.1f,"battery":%.3f}}\n'
                     % (t0 + i, 20 + (i % 10) * 0.37, 45.5 + i % 7, 1013.2 - i % 5, 3.9 - (i % 3) * 0.01))
PY
  wait_for mosquitto 10 mosquitto_sub -p "$mport" -t probe -W 1 -C 1 -E
  mosquitto_sub -p "$mport" -t bench/feed -C "$messages" -W 60 >"$work/received" &
  sub=$!
  sleep 0.5
  m0=$(ticks "$mpid"); s=$(now)
  mosquitto_pub -p "$mport" -t bench/feed -q 0 -l <"$work/feed"
  wait "$sub" || true
  e=$(now); m1=$(ticks "$mpid")
  got=$(wc -l <"$work/received")
  # QoS 0 as in scripts/bench-compare.sh: mosquitto_pub -l with QoS 1 waits on its small
  # in-flight window and measures the client, not the broker.
  echo "mosquitto reference (one connection, QoS 0 publish -> broker -> one subscriber, no storage, no acks): $got of $messages in $(python3 -c "print(round($e - $s, 2))") s = $(python3 -c "print(round($got / ($e - $s)))") msg/s, broker CPU $(python3 -c "print(round(($m1 - $m0) / $hz / $messages * 1e6, 1))") us/msg"
fi

# --- medians ------------------------------------------------------------------------------
python3 - "$work/results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = ["acked_per_s", "ingested_per_s", "stored_everywhere_per_s", "cpu_us_per_msg", "gateway_cpu_s", "nats_cpu_s", "jetstream_share", "ack_p50_ms"]
med = {}
for mode in ("cluster", "single"):
    rs = [r for r in rows if r["mode"] == mode]
    med[mode] = {k: statistics.median([r[k] or 0 for r in rs]) for k in keys}
    print(f"median of {len(rs)} {mode:7}: " + ", ".join(f"{k}={med[mode][k]}" for k in keys))
c, s = med["cluster"], med["single"]
if s["acked_per_s"] and s["cpu_us_per_msg"]:
    print(f"cluster/single: acked msg/s x{c['acked_per_s'] / s['acked_per_s']:.2f}, "
          f"stored-everywhere msg/s x{c['stored_everywhere_per_s'] / max(s['stored_everywhere_per_s'], 1):.2f}, "
          f"CPU per message x{c['cpu_us_per_msg'] / s['cpu_us_per_msg']:.2f}")
PY
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
