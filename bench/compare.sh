#!/usr/bin/env bash
# Side-by-side performance comparison: proxystack's examples against haproxy, nginx, squid,
# nghttpx, socat and wireguard-go on the same machine, in the same run (issue 9).
#
#   sudo bash bench/compare.sh                       # full run, ~20-25 min, prints a markdown table
#   COMPARE_SECONDS=2 ROUNDS=1 bash bench/compare.sh # quick check of the whole pipeline
#   ONLY=l4,http bash bench/compare.sh               # some groups only
#
# Needs root (network namespaces, apt-get, raising the fd limit) and a Debian-like system.
# What it does:
#  1. installs missing peers with apt-get (iperf3 haproxy nginx-full squid nghttp2-client
#     nghttp2-proxy wrk wireguard-go wireguard-tools socat curl openssl iproute2 python3);
#     on a systemd machine apt may start the packaged nginx/squid services: they stay idle
#     on their own ports and this script never touches them;
#  2. builds our examples and the load client (benches/compare_client.rs) in release;
#  3. for each group of workloads, starts every variant (direct = no proxy; ours; peers),
#     checks each one's port is open (a peer that fails to start is reported as skipped),
#     then runs ROUNDS interleaved rounds of every (workload, variant) for COMPARE_SECONDS;
#     load generators and origin servers run on CPU ENDPOINT_CPU, proxies on PROXY_CPU
#     (taskset), each proxy with one worker thread; the proxy's CPU time (utime + stime of
#     it and its children, from /proc/PID/stat) is sampled around each run;
#  4. prints one markdown table (median, min, max, ratio vs direct, ratio vs the best peer,
#     proxy CPU %) and the peers' configurations.
# Only processes it started are stopped (on exit too), and only namespaces it created are
# deleted. Environment:
#   COMPARE_SECONDS (10)  seconds per measurement     ROUNDS (3)       interleaved rounds
#   MEM_CONNS (10000)     idle connections held       ONLY (all)       groups: l4,http,h2c,tls,connect,hbone,mem
#   ENDPOINT_CPU (0)      PROXY_CPU (1)               COMPARE_PORT_BASE (21000)
#   TLS_KEY (ec)          ec = ECDSA P-256, rsa = RSA 2048 certificates
#   SKIP_INSTALL=1, SKIP_BUILD=1, KEEP_WORK=1 (keep the temp dir with configs and logs)
#   COMPARE_OUT (unset)   also write the table to this file
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
S=${COMPARE_SECONDS:-10}
ROUNDS=${ROUNDS:-3}
MEM_CONNS=${MEM_CONNS:-10000}
ONLY=${ONLY:-l4,http,h2c,tls,connect,hbone,mem}
EP_CPU=${ENDPOINT_CPU:-0}
PX_CPU=${PROXY_CPU:-1}
PORT_BASE=${COMPARE_PORT_BASE:-21000}
TLS_KEY=${TLS_KEY:-ec}

die() { echo "compare.sh: error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

is_uint "$S" && [ "$S" -ge 1 ] && [ "$S" -le 600 ] || die "COMPARE_SECONDS must be 1..600, got '$S'"
is_uint "$ROUNDS" && [ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 20 ] || die "ROUNDS must be 1..20, got '$ROUNDS'"
is_uint "$MEM_CONNS" && [ "$MEM_CONNS" -ge 100 ] && [ "$MEM_CONNS" -le 100000 ] ||
  die "MEM_CONNS must be 100..100000, got '$MEM_CONNS'"
is_uint "$PORT_BASE" && [ "$PORT_BASE" -ge 1024 ] && [ "$PORT_BASE" -le 65000 ] ||
  die "COMPARE_PORT_BASE must be 1024..65000, got '$PORT_BASE'"
is_uint "$EP_CPU" && is_uint "$PX_CPU" && [ "$EP_CPU" != "$PX_CPU" ] ||
  die "ENDPOINT_CPU and PROXY_CPU must be two different CPU numbers"
[ "$(nproc --all)" -gt "$EP_CPU" ] && [ "$(nproc --all)" -gt "$PX_CPU" ] ||
  die "this machine has $(nproc --all) CPUs; ENDPOINT_CPU=$EP_CPU PROXY_CPU=$PX_CPU"
case "$TLS_KEY" in ec | rsa) ;; *) die "TLS_KEY must be ec or rsa, got '$TLS_KEY'" ;; esac
for g in ${ONLY//,/ }; do
  case "$g" in l4 | http | h2c | tls | connect | hbone | mem) ;; *) die "unknown group '$g' in ONLY" ;; esac
done
[ "$(id -u)" = 0 ] || die "run as root (network namespaces, apt-get, fd limits)"
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# Ports, all on loopback (the HBONE group uses its own two namespaces).
P_IPERF=$((PORT_BASE + 1)) P_ORIGIN=$((PORT_BASE + 2)) P_ORIGIN_H2=$((PORT_BASE + 3))

# ---------------------------------------------------------------- state and cleanup
WORK=$(mktemp -d /tmp/proxystack-compare.XXXXXX)
chmod 755 "$WORK" # squid drops to the proxy user and must reach its directory
mkdir -p "$WORK/log"
RESULTS=$WORK/results.tsv # group-independent: workload, variant, kind, round, value, cpu%
META=$WORK/meta.tsv       # workload, title, better (high|low), unit
SKIPS=$WORK/skips.tsv     # workload, variant, kind, reason
: >"$RESULTS" && : >"$META" && : >"$SKIPS"
PIDS=()    # every process we started and have not reaped yet
NETNS=()   # namespaces we created
CLK_TCK=$(getconf CLK_TCK)

stop_pids() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  local keep=() p
  for p in "${PIDS[@]}"; do
    local gone=0
    for pid in "$@"; do [ "$p" = "$pid" ] && gone=1; done
    [ "$gone" = 1 ] || keep+=("$p")
  done
  PIDS=("${keep[@]}")
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ "${#PIDS[@]}" -gt 0 ] && stop_pids "${PIDS[@]}"
  local ns
  for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ "${KEEP_WORK:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg NAME CPU CMD... : runs CMD pinned to CPU in the background, logs to log/NAME.log,
# sets LAST_PID. `taskset`, `env` and `ip netns exec` all exec, so LAST_PID is CMD itself.
start_bg() {
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >"$WORK/log/$name.log" 2>&1 </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

in_ns() { # in_ns NS CMD... (NS empty = the root namespace)
  local ns=$1
  shift
  if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi
}

# wait_port NS PORT PID NAME [proto]: the port is listening within 15 s while PID lives.
wait_port() {
  local ns=$1 port=$2 pid=$3 name=$4 proto=${5:-t}
  for _ in $(seq 150); do
    if ! kill -0 "$pid" 2>/dev/null; then
      WHY="$name exited at start: $(tail -n 3 "$WORK/log/$name.log" 2>/dev/null | tr '\n' ' ' | cut -c1-200)"
      return 1
    fi
    if [ -n "$(in_ns "$ns" ss -Hln"$proto" "( sport = :$port )" 2>/dev/null)" ]; then return 0; fi
    sleep 0.1
  done
  WHY="$name: port $port not open after 15 s"
  return 1
}

port_free() { [ -z "$(ss -Hltn "( sport = :$1 )" 2>/dev/null)" ]; }

# The tree of PID (itself and all descendants).
pid_tree() {
  local pid=$1 kids k
  echo "$pid"
  kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
  for k in $kids; do pid_tree "$k"; done
}

# cpu_ticks PID...: utime+stime+cutime+cstime summed over the trees (children that exited
# were reaped into their parent's cutime/cstime, so nothing is counted twice).
cpu_ticks() {
  local total=0 root pid stat rest
  for root in "$@"; do
    for pid in $(pid_tree "$root"); do
      stat=$(cat /proc/"$pid"/stat 2>/dev/null) || continue
      rest=${stat##*) }
      # shellcheck disable=SC2086
      set -- $rest
      total=$((total + ${12} + ${13} + ${14} + ${15}))
    done
  done
  echo "$total"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }
children_of() { cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' || true; }
now() { date +%s.%N; }

# ---------------------------------------------------------------- results
meta() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$META"; } # key title better unit
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }  # key variant kind round value cpu
skip() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SKIPS"; }

# ---------------------------------------------------------------- measurements
# Each sets M1 (and M2 where there is a second figure) or returns non-zero.
EP() { taskset -c "$EP_CPU" "$@"; }

m_iperf() { # NS HOST PORT -> Gb/s
  local out=$WORK/iperf.json
  in_ns "$1" timeout $((S + 30)) taskset -c "$EP_CPU" iperf3 -c "$2" -p "$3" -t "$S" -J \
    --connect-timeout 5000 >"$out" 2>"$WORK/iperf.err" || { WHY="iperf3 failed: $(head -c 200 "$out")"; return 1; }
  M1=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))' "$out") || return 1
}

m_wrk() { # CONNS URL [wrk args...] -> req/s, p99 ms
  local conns=$1 url=$2 out=$WORK/wrk.out
  shift 2
  EP timeout $((S + 30)) wrk -t1 -c"$conns" -d"${S}s" --timeout 10s --latency "$@" "$url" >"$out" 2>&1 ||
    { WHY="wrk failed: $(tail -n 2 "$out" | tr '\n' ' ')"; return 1; }
  local total non2xx
  total=$(awk '/requests in/ {print $1}' "$out")
  non2xx=$(awk -F: '/Non-2xx/ {gsub(/ /, "", $2); print $2}' "$out")
  [ -n "$total" ] && [ "$total" -gt 0 ] || { WHY="wrk: no requests"; return 1; }
  if [ -n "$non2xx" ] && [ $((non2xx * 100)) -gt "$total" ]; then
    WHY="wrk: $non2xx of $total responses were not 2xx"
    return 1
  fi
  M1=$(awk '/^Requests\/sec:/ {printf "%.1f", $2}' "$out")
  M2=$(awk '$1 == "99%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
         f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1;
         if (f > 0) printf "%.3f", v * f }' "$out")
  [ -n "$M1" ] && [ -n "$M2" ] || { WHY="wrk: unparsable output"; return 1; }
}

m_h2load() { # URL -> req/s
  local out=$WORK/h2load.out
  EP timeout $((S + 30)) h2load -t1 -c16 -m10 -D "$S" "$1" >"$out" 2>&1 ||
    { WHY="h2load failed: $(tail -n 2 "$out" | tr '\n' ' ')"; return 1; }
  local ok bad
  ok=$(awk '/^requests:/ {print $8}' "$out")
  bad=$(awk '/^requests:/ {print $10 + $12}' "$out")
  [ -n "$ok" ] && [ "$ok" -gt 0 ] && [ $((bad * 100)) -le "$ok" ] ||
    { WHY="h2load: $(grep '^requests:' "$out")"; return 1; }
  M1=$(awk '/^finished in/ {gsub(/,/, ""); printf "%.1f", $4}' "$out")
}

m_curl() { # URL [curl args] -> Gb/s (download of a file larger than S seconds' worth)
  local url=$1 out rc=0
  shift
  out=$(EP curl -sS --http1.1 --max-time "$S" -o /dev/null -w '%{speed_download}' "$@" "$url" 2>"$WORK/curl.err") || rc=$?
  # 28 = stopped by --max-time, which is how every run ends.
  [ "$rc" = 0 ] || [ "$rc" = 28 ] || { WHY="curl exit $rc: $(head -c 200 "$WORK/curl.err")"; return 1; }
  M1=$(awk -v b="$out" 'BEGIN { printf "%.3f", b * 8 / 1e9 }')
  awk -v m="$M1" 'BEGIN { exit !(m > 0) }' || { WHY="curl: nothing downloaded"; return 1; }
}

m_rate() { # compare_client rate args... -> ops/s
  local out=$WORK/rate.out
  EP timeout $((S + 30)) "$CLIENT" rate --seconds "$S" "$@" >"$out" 2>&1 ||
    { WHY="compare_client: $(tail -n 2 "$out" | tr '\n' ' ')"; return 1; }
  M1=$(awk '$1 == "rate" {print $2}' "$out")
  [ -n "$M1" ] || { WHY="compare_client: no rate"; return 1; }
}

# Direct baselines that two groups share (same command), measured once per round.
declare -A DIRECT_CACHE=()

# run KEY VARIANT KIND ROUND "PIDS" MEASURE ARGS... (RUN_KEY2=KEY2 records M2 under KEY2;
# RUN_CACHE=NAME reuses/stores the result for a shared direct baseline)
RUN_KEY2=""
RUN_CACHE=""
run() {
  local key=$1 variant=$2 kind=$3 round=$4 pids=$5
  shift 5
  if [ "$pids" = SKIP ]; then RUN_KEY2="" RUN_CACHE=""; return 0; fi # did not start: already in skips
  WHY="" M1="" M2=""
  local cache=${RUN_CACHE:+$RUN_CACHE/$round}
  RUN_CACHE=""
  if [ -n "$cache" ] && [ -n "${DIRECT_CACHE[$cache]:-}" ]; then
    record "$key" "$variant" "$kind" "$round" "${DIRECT_CACHE[$cache]}" "-"
    log "  $key / $variant: ${DIRECT_CACHE[$cache]} (same run as above)"
    return 0
  fi
  local c0=0 c1=0 t0 t1 cpu="-"
  # shellcheck disable=SC2086
  [ -n "$pids" ] && c0=$(cpu_ticks $pids)
  t0=$(now)
  if "$@"; then
    t1=$(now)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      c1=$(cpu_ticks $pids)
      cpu=$(awk -v c=$((c1 - c0)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.1f", 100 * c / hz / (t1 - t0) }')
    fi
    record "$key" "$variant" "$kind" "$round" "$M1" "$cpu"
    [ -z "$cache" ] || DIRECT_CACHE[$cache]=$M1
    [ -n "$RUN_KEY2" ] && [ -n "$M2" ] && record "$RUN_KEY2" "$variant" "$kind" "$round" "$M2" "$cpu"
    log "  $key / $variant: $M1${M2:+ (p99 $M2 ms)} cpu $cpu%"
  else
    record "$key" "$variant" "$kind" "$round" "FAIL" "-"
    [ -n "$RUN_KEY2" ] && record "$RUN_KEY2" "$variant" "$kind" "$round" "FAIL" "-"
    log "  $key / $variant: FAILED: $WHY"
    echo "$key / $variant round $round: $WHY" >>"$WORK/failures.txt"
  fi
  RUN_KEY2=""
}

# ---------------------------------------------------------------- peers
# start_nginx NAME CPU NS BODY: one worker process; sets LAST_PID (the master).
start_nginx() {
  local name=$1 cpu=$2 ns=$3 body=$4 dir=$WORK/$1
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
$NGINX_STREAM_MODULE
daemon off;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
user root;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $NOFILE; }
$body
EOF
  if [ -n "$ns" ]; then
    start_bg "$name" "$cpu" ip netns exec "$ns" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
  else
    start_bg "$name" "$cpu" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
  fi
}

# http{} preamble for nginx instances: no access log, temp files in our directory.
nginx_http_common() {
  local dir=$WORK/$1
  cat <<EOF
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy; fastcgi_temp_path $dir/fcgi;
  uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
EOF
}

start_haproxy() { # NAME CPU NS BODY
  local name=$1 cpu=$2 ns=$3 body=$4 dir=$WORK/$1
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn ${MAXCONN:-$HAPROXY_MAXCONN}
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-request 10s
  timeout http-keep-alive 60s
$body
EOF
  if [ -n "$ns" ]; then
    start_bg "$name" "$cpu" ip netns exec "$ns" haproxy -db -f "$dir/haproxy.cfg"
  else
    start_bg "$name" "$cpu" haproxy -db -f "$dir/haproxy.cfg"
  fi
}

ours() { # NAME CPU NS EXAMPLE ARGS...: one tokio worker thread, no per-request logs
  local name=$1 cpu=$2 ns=$3 example=$4
  shift 4
  local cmd=(env TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$BIN/$example" --drain-secs 1 "$@")
  if [ -n "$ns" ]; then start_bg "$name" "$cpu" ip netns exec "$ns" "${cmd[@]}"; else start_bg "$name" "$cpu" "${cmd[@]}"; fi
}

# started NAME NS PORT KEYS...: checks the process LAST_PID listens on PORT; on failure
# marks (KEY, NAME) skipped for each KEY and stops it. Returns non-zero if skipped.
started() {
  local name=$1 ns=$2 port=$3 pid=$LAST_PID
  shift 3
  if wait_port "$ns" "$port" "$pid" "$name"; then return 0; fi
  log "  SKIPPED $name: $WHY"
  local key
  for key in "$@"; do skip "$key" "$name" "" "$WHY"; done
  stop_pids "$pid"
  return 1
}

# ---------------------------------------------------------------- setup
install_peers() {
  local need=() pair
  for pair in iperf3:iperf3 haproxy:haproxy nginx:nginx-full squid:squid h2load:nghttp2-client \
    nghttpx:nghttp2-proxy wrk:wrk wireguard-go:wireguard-go wg:wireguard-tools socat:socat \
    curl:curl openssl:openssl ip:iproute2 ss:iproute2 taskset:util-linux python3:python3; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
      die "apt-get install ${need[*]} failed"
  fi
}

build() {
  cd "$ROOT"
  local json=$WORK/build.json
  log "building examples and the load client (release)"
  cargo build --release --all-features --examples --bench compare_client \
    --message-format=json-render-diagnostics >"$json" || die "cargo build failed"
  BIN=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "tcp_relay" and m.get("executable"):
        print(m["executable"].rsplit("/", 1)[0])' "$json")
  CLIENT=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "compare_client" and m.get("executable"):
        print(m["executable"])' "$json")
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then install_peers; fi
for c in iperf3 haproxy nginx squid h2load nghttpx wrk wireguard-go wg socat curl openssl ip ss taskset python3; do
  command -v "$c" >/dev/null 2>&1 || die "$c not found (unset SKIP_INSTALL to install it)"
done
# Debian builds nginx's stream module as a dynamic module.
NGINX_STREAM_MODULE=""
for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/share/nginx/modules/ngx_stream_module.so; do
  if [ -f "$m" ]; then NGINX_STREAM_MODULE="load_module $m;"; break; fi
done
[ -n "$NGINX_STREAM_MODULE" ] || nginx -V 2>&1 | grep -q -- '--with-stream' || die "nginx has no stream module"

if [ "${SKIP_BUILD:-0}" = 1 ]; then
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
  CLIENT=""
  for f in "${CARGO_TARGET_DIR:-$ROOT/target}"/release/deps/compare_client-*; do
    if [ -x "$f" ] && [ ! -d "$f" ] && { [ -z "$CLIENT" ] || [ "$f" -nt "$CLIENT" ]; }; then CLIENT=$f; fi
  done
else
  build
fi
for b in tcp_relay http_proxy sni_router connect_proxy hbone; do
  [ -x "$BIN/$b" ] || die "example $b not built in $BIN"
done
[ -n "$CLIENT" ] && [ -x "$CLIENT" ] || die "load client (benches/compare_client.rs) not built"

# Enough descriptors for MEM_CONNS connections through a proxy, which holds two per
# connection. Root may raise the hard limit unless the container withholds CAP_SYS_RESOURCE.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
if [ $((2 * MEM_CONNS + 200)) -gt "$NOFILE" ]; then
  MEM_CONNS=$(((NOFILE - 200) / 2))
  log "warning: the fd limit is $NOFILE (cannot raise it); holding $MEM_CONNS connections instead"
fi
# haproxy wants 2 fds per connection plus, with splicing, 2 per pipe (maxconn / 4 pipes).
HAPROXY_MAXCONN=$(((NOFILE - 500) / 3))
[ "$HAPROXY_MAXCONN" -le 100000 ] || HAPROXY_MAXCONN=100000

for p in $(seq $((PORT_BASE + 1)) $((PORT_BASE + 99))); do
  port_free "$p" || die "port $p is in use; set COMPARE_PORT_BASE to a free range of 100 ports"
done

# ---------------------------------------------------------------- certificates and files
make_certs() {
  local d=$WORK/pki
  mkdir -p "$d"
  local keyopt=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  [ "$TLS_KEY" = rsa ] && keyopt=(-newkey rsa:2048)
  openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout "$d/ca.key" \
    -out "$d/ca.pem" -days 2 -subj /CN=proxystack-compare-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -nodes "${keyopt[@]}" -keyout "$d/leaf.key" -out "$d/leaf.csr" -subj /CN=localhost 2>/dev/null
  cat >"$d/leaf.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/bench,DNS:localhost,DNS:bench.local,IP:127.0.0.1
EOF
  openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/leaf.ext" -out "$d/leaf.pem" 2>/dev/null
  # pkcs8 for rustls, and cert+key in one file for haproxy.
  openssl pkcs8 -topk8 -nocrypt -in "$d/leaf.key" -out "$d/leaf.p8" 2>/dev/null
  cat "$d/leaf.pem" "$d/leaf.p8" >"$d/leaf-combined.pem"
  chmod -R a+rX "$d"
}
make_certs
PKI=$WORK/pki

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c $((1024 * 1024)) /dev/urandom >"$WORK/www/1m.bin"
truncate -s 64G "$WORK/www/big.bin" # sparse: read from the page cache of holes, no disk

# ---------------------------------------------------------------- origin servers (CPU EP)
start_origins() {
  start_bg iperf3-origin "$EP_CPU" iperf3 -s -p "$P_IPERF"
  wait_port "" "$P_IPERF" "$LAST_PID" iperf3-origin || die "$WHY"
  start_nginx origin "$EP_CPU" "" "http {
$(nginx_http_common origin)
  sendfile on; tcp_nopush on; tcp_nodelay on;
  open_file_cache max=100; keepalive_timeout 65s;
  server { listen 127.0.0.1:$P_ORIGIN reuseport backlog=4096; root $WORK/www; }
  server { listen 127.0.0.1:$P_ORIGIN_H2 http2 backlog=4096; root $WORK/www; }
}"
  wait_port "" "$P_ORIGIN" "$LAST_PID" origin || die "origin nginx: $WHY"
  wait_port "" "$P_ORIGIN_H2" "$LAST_PID" origin || die "origin nginx: $WHY"
}

# ---------------------------------------------------------------- groups
# Each group starts its variants (recording the started ones in V[name] = pids to sample),
# runs ROUNDS interleaved rounds and stops what it started. A variant that did not start
# has V[name]=SKIP and its rows say so.
declare -A V=()
ORIGIN_PIDS=()

# up NAME NS PORT KEYS...: after starting LAST_PID, check it and set V[NAME].
up() {
  local name=$1 ns=$2 port=$3
  shift 3
  if started "$name" "$ns" "$port" "$@"; then V[$name]=$LAST_PID; else V[$name]=SKIP; fi
}

end_group() {
  local p o keep live=()
  for p in "${PIDS[@]}"; do
    keep=0
    for o in "${ORIGIN_PIDS[@]}"; do [ "$p" = "$o" ] && keep=1; done
    [ "$keep" = 1 ] || live+=("$p")
  done
  [ "${#live[@]}" -eq 0 ] || stop_pids "${live[@]}"
  V=()
}

group_l4() {
  meta tcp "TCP relay, iperf3 1 stream" high "Gb/s"
  meta conns "New TCP connections/s through an L4 relay (wrk -c32, Connection: close, 1 KiB)" high "conn/s"
  local b=$((PORT_BASE + 10))
  ours ours-tcp "$PX_CPU" "" tcp_relay --listen "127.0.0.1:$b" --upstream "127.0.0.1:$P_IPERF"
  up ours-tcp "" "$b" tcp
  ours ours-conns "$PX_CPU" "" tcp_relay --listen "127.0.0.1:$((b + 1))" --upstream "127.0.0.1:$P_ORIGIN"
  up ours-conns "" "$((b + 1))" conns
  start_haproxy haproxy-l4 "$PX_CPU" "" "  mode tcp
  option splice-auto
listen tcp
  bind 127.0.0.1:$((b + 2))
  server iperf 127.0.0.1:$P_IPERF
listen conns
  bind 127.0.0.1:$((b + 3))
  server origin 127.0.0.1:$P_ORIGIN"
  up haproxy-l4 "" "$((b + 2))" tcp conns
  start_nginx nginx-l4 "$PX_CPU" "" "stream {
  server { listen 127.0.0.1:$((b + 4)); proxy_pass 127.0.0.1:$P_IPERF; }
  server { listen 127.0.0.1:$((b + 5)) backlog=4096; proxy_pass 127.0.0.1:$P_ORIGIN; }
}"
  up nginx-l4 "" "$((b + 4))" tcp conns
  start_bg socat-tcp "$PX_CPU" socat "TCP-LISTEN:$((b + 6)),bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$P_IPERF"
  up socat-tcp "" "$((b + 6))" tcp
  start_bg socat-conns "$PX_CPU" socat "TCP-LISTEN:$((b + 7)),bind=127.0.0.1,fork,reuseaddr,backlog=4096" "TCP:127.0.0.1:$P_ORIGIN"
  up socat-conns "" "$((b + 7))" conns

  local r u=/1k.bin h=(-H "Connection: close")
  for r in $(seq "$ROUNDS"); do
    log "l4: round $r/$ROUNDS"
    RUN_CACHE=iperf-lo
    run tcp direct direct "$r" "" m_iperf "" 127.0.0.1 "$P_IPERF"
    run tcp proxystack ours "$r" "${V[ours-tcp]}" m_iperf "" 127.0.0.1 "$b"
    run tcp haproxy peer "$r" "${V[haproxy-l4]}" m_iperf "" 127.0.0.1 "$((b + 2))"
    run tcp nginx peer "$r" "${V[nginx-l4]}" m_iperf "" 127.0.0.1 "$((b + 4))"
    run tcp socat peer "$r" "${V[socat-tcp]}" m_iperf "" 127.0.0.1 "$((b + 6))"
    run conns direct direct "$r" "" m_wrk 32 "http://127.0.0.1:$P_ORIGIN$u" "${h[@]}"
    run conns proxystack ours "$r" "${V[ours-conns]}" m_wrk 32 "http://127.0.0.1:$((b + 1))$u" "${h[@]}"
    run conns haproxy peer "$r" "${V[haproxy-l4]}" m_wrk 32 "http://127.0.0.1:$((b + 3))$u" "${h[@]}"
    run conns nginx peer "$r" "${V[nginx-l4]}" m_wrk 32 "http://127.0.0.1:$((b + 5))$u" "${h[@]}"
    run conns socat peer "$r" "${V[socat-conns]}" m_wrk 32 "http://127.0.0.1:$((b + 7))$u" "${h[@]}"
  done
  end_group
}

group_http() {
  meta h1k "HTTP/1.1 reverse proxy, 1 KiB, wrk -c64" high "req/s"
  meta h1k99 "HTTP/1.1 reverse proxy, 1 KiB, p99 latency" low "ms"
  meta h1m "HTTP/1.1 reverse proxy, 1 MiB, wrk -c64" high "req/s"
  meta h1m99 "HTTP/1.1 reverse proxy, 1 MiB, p99 latency" low "ms"
  local b=$((PORT_BASE + 20)) keys=(h1k h1k99 h1m h1m99)
  ours ours-http "$PX_CPU" "" http_proxy --listen "127.0.0.1:$b" --upstream "127.0.0.1:$P_ORIGIN"
  up ours-http "" "$b" "${keys[@]}"
  start_haproxy haproxy-http "$PX_CPU" "" "  mode http
  option http-keep-alive
  http-reuse safe
listen http
  bind 127.0.0.1:$((b + 1))
  server origin 127.0.0.1:$P_ORIGIN"
  up haproxy-http "" "$((b + 1))" "${keys[@]}"
  start_nginx nginx-http "$PX_CPU" "" "http {
$(nginx_http_common nginx-http)
  upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 64; }
  server {
    listen 127.0.0.1:$((b + 2)) backlog=4096;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
      proxy_max_temp_file_size 0;
    }
  }
}"
  up nginx-http "" "$((b + 2))" "${keys[@]}"
  mkdir -p "$WORK/nghttpx-http" && : >"$WORK/nghttpx-http/empty.conf"
  start_bg nghttpx-http "$PX_CPU" nghttpx -n1 --conf="$WORK/nghttpx-http/empty.conf" \
    --frontend="127.0.0.1,$((b + 3));no-tls" --backend="127.0.0.1,$P_ORIGIN;;proto=http/1.1"
  up nghttpx-http "" "$((b + 3))" "${keys[@]}"

  local r v name proc port kind pids
  for r in $(seq "$ROUNDS"); do
    log "http: round $r/$ROUNDS"
    for v in "direct::$P_ORIGIN:direct" "proxystack:ours-http:$b:ours" "haproxy:haproxy-http:$((b + 1)):peer" \
      "nginx:nginx-http:$((b + 2)):peer" "nghttpx:nghttpx-http:$((b + 3)):peer"; do
      IFS=: read -r name proc port kind <<<"$v"
      pids=""
      [ -z "$proc" ] || pids=${V[$proc]}
      RUN_KEY2=h1k99
      run h1k "$name" "$kind" "$r" "$pids" m_wrk 64 "http://127.0.0.1:$port/1k.bin"
      RUN_KEY2=h1m99
      run h1m "$name" "$kind" "$r" "$pids" m_wrk 64 "http://127.0.0.1:$port/1m.bin"
    done
  done
  end_group
}

group_h2c() {
  meta h2c "h2c → h2 reverse proxy, 1 KiB, h2load -c16 -m10" high "req/s"
  local b=$((PORT_BASE + 30))
  ours ours-h2c "$PX_CPU" "" http_proxy --listen "127.0.0.1:$b" --upstream "127.0.0.1:$P_ORIGIN_H2" --upstream-h2
  up ours-h2c "" "$b" h2c
  mkdir -p "$WORK/nghttpx-h2c" && : >"$WORK/nghttpx-h2c/empty.conf"
  start_bg nghttpx-h2c "$PX_CPU" nghttpx -n1 --conf="$WORK/nghttpx-h2c/empty.conf" \
    --frontend="127.0.0.1,$((b + 1));no-tls" --backend="127.0.0.1,$P_ORIGIN_H2;;proto=h2"
  up nghttpx-h2c "" "$((b + 1))" h2c
  start_haproxy haproxy-h2c "$PX_CPU" "" "  mode http
frontend h2c
  bind 127.0.0.1:$((b + 2)) proto h2
  default_backend origin
backend origin
  server origin 127.0.0.1:$P_ORIGIN_H2 proto h2"
  up haproxy-h2c "" "$((b + 2))" h2c
  local r
  for r in $(seq "$ROUNDS"); do
    log "h2c: round $r/$ROUNDS"
    run h2c direct direct "$r" "" m_h2load "http://127.0.0.1:$P_ORIGIN_H2/1k.bin"
    run h2c proxystack ours "$r" "${V[ours-h2c]}" m_h2load "http://127.0.0.1:$b/1k.bin"
    run h2c nghttpx peer "$r" "${V[nghttpx-h2c]}" m_h2load "http://127.0.0.1:$((b + 1))/1k.bin"
    run h2c haproxy peer "$r" "${V[haproxy-h2c]}" m_h2load "http://127.0.0.1:$((b + 2))/1k.bin"
  done
  end_group
}

group_tls() {
  meta tlsn "TLS 1.3 termination → plaintext origin: new connections/s (full handshake + one 1 KiB request)" high "conn/s"
  meta tlsb "TLS 1.3 termination → plaintext origin: bulk download, curl 1 stream" high "Gb/s"
  local b=$((PORT_BASE + 40)) dir=$WORK/ours-tls
  mkdir -p "$dir"
  printf '%s\n' "listen = [\"127.0.0.1:$b\"]" "[[terminate]]" 'sni = "localhost"' \
    "cert = \"$PKI/leaf.pem\"" "key = \"$PKI/leaf.p8\"" "upstream = \"127.0.0.1:$P_ORIGIN\"" >"$dir/sni_router.toml"
  ours ours-tls "$PX_CPU" "" sni_router --config "$dir/sni_router.toml"
  up ours-tls "" "$b" tlsn tlsb
  start_haproxy haproxy-tls "$PX_CPU" "" "  mode tcp
listen tls
  bind 127.0.0.1:$((b + 1)) ssl crt $PKI/leaf-combined.pem alpn http/1.1
  server origin 127.0.0.1:$P_ORIGIN"
  up haproxy-tls "" "$((b + 1))" tlsn tlsb
  start_nginx nginx-tls "$PX_CPU" "" "stream {
  server {
    listen 127.0.0.1:$((b + 2)) ssl backlog=4096;
    ssl_certificate $PKI/leaf.pem;
    ssl_certificate_key $PKI/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    proxy_pass 127.0.0.1:$P_ORIGIN;
  }
}"
  up nginx-tls "" "$((b + 2))" tlsn tlsb
  local r v name proc port kind
  for r in $(seq "$ROUNDS"); do
    log "tls: round $r/$ROUNDS"
    RUN_CACHE=rate-origin
    run tlsn "direct (plaintext)" direct "$r" "" m_rate --connect "127.0.0.1:$P_ORIGIN" --concurrency 32
    run tlsb "direct (plaintext)" direct "$r" "" m_curl "http://127.0.0.1:$P_ORIGIN/big.bin"
    for v in "proxystack:ours-tls:$b:ours" "haproxy:haproxy-tls:$((b + 1)):peer" "nginx:nginx-tls:$((b + 2)):peer"; do
      IFS=: read -r name proc port kind <<<"$v"
      run tlsn "$name" "$kind" "$r" "${V[$proc]}" m_rate --connect "127.0.0.1:$port" --tls localhost --concurrency 32
      run tlsb "$name" "$kind" "$r" "${V[$proc]}" m_curl "https://localhost:$port/big.bin" -k --resolve "localhost:$port:127.0.0.1"
    done
  done
  end_group
}

group_connect() {
  meta conb "HTTP CONNECT tunnel, iperf3 1 stream (through a CONNECT driver on the endpoints' CPU)" high "Gb/s"
  meta conn "HTTP CONNECT tunnels/s (new connection, CONNECT, one 1 KiB request through it)" high "tunnels/s"
  local b=$((PORT_BASE + 50)) dir=$WORK/squid
  ours ours-connect "$PX_CPU" "" connect_proxy --listen "127.0.0.1:$b" --allow-net 127.0.0.0/8
  up ours-connect "" "$b" conb conn
  mkdir -p "$dir"
  chown proxy "$dir" 2>/dev/null || chmod 777 "$dir"
  printf '%s\n' \
    "http_port 127.0.0.1:$((b + 1))" \
    "visible_hostname proxystack-compare" \
    "acl bench_src src 127.0.0.0/8" \
    "acl bench_dst dst 127.0.0.0/8" \
    "acl bench_ports port $P_IPERF $P_ORIGIN" \
    "acl CONNECT method CONNECT" \
    "http_access allow CONNECT bench_src bench_dst bench_ports" \
    "http_access deny all" \
    "cache deny all" \
    "access_log none" \
    "cache_log $dir/cache.log" \
    "pid_filename $dir/squid.pid" \
    "coredump_dir $dir" \
    "cache_effective_user proxy" \
    "shutdown_lifetime 1 seconds" \
    "max_filedescriptors 65536" >"$dir/squid.conf"
  start_bg squid "$PX_CPU" squid -N -f "$dir/squid.conf"
  up squid "" "$((b + 1))" conb conn
  # Drivers (endpoints' CPU): iperf3 cannot speak CONNECT.
  start_bg drive-ours "$EP_CPU" "$CLIENT" drive --listen "127.0.0.1:$((b + 2))" --proxy "127.0.0.1:$b" --target "127.0.0.1:$P_IPERF"
  up drive-ours "" "$((b + 2))" conb
  start_bg drive-squid "$EP_CPU" "$CLIENT" drive --listen "127.0.0.1:$((b + 3))" --proxy "127.0.0.1:$((b + 1))" --target "127.0.0.1:$P_IPERF"
  up drive-squid "" "$((b + 3))" conb
  start_bg drive-none "$EP_CPU" "$CLIENT" drive --listen "127.0.0.1:$((b + 4))" --target "127.0.0.1:$P_IPERF"
  up drive-none "" "$((b + 4))" conb
  local pours=SKIP psquid=SKIP pnone=SKIP
  if [ "${V[ours-connect]}" != SKIP ] && [ "${V[drive-ours]}" != SKIP ]; then pours=${V[ours-connect]}; fi
  if [ "${V[squid]}" != SKIP ] && [ "${V[drive-squid]}" != SKIP ]; then psquid=${V[squid]}; fi
  if [ "${V[drive-none]}" != SKIP ]; then pnone=""; fi
  local r
  for r in $(seq "$ROUNDS"); do
    log "connect: round $r/$ROUNDS"
    RUN_CACHE=iperf-lo
    run conb direct direct "$r" "" m_iperf "" 127.0.0.1 "$P_IPERF"
    run conb "driver only, no proxy" info "$r" "$pnone" m_iperf "" 127.0.0.1 "$((b + 4))"
    run conb proxystack ours "$r" "$pours" m_iperf "" 127.0.0.1 "$((b + 2))"
    run conb squid peer "$r" "$psquid" m_iperf "" 127.0.0.1 "$((b + 3))"
    RUN_CACHE=rate-origin
    run conn direct direct "$r" "" m_rate --connect "127.0.0.1:$P_ORIGIN" --concurrency 32
    run conn proxystack ours "$r" "${V[ours-connect]}" m_rate --connect "127.0.0.1:$b" --via-connect "127.0.0.1:$P_ORIGIN" --concurrency 32
    run conn squid peer "$r" "${V[squid]}" m_rate --connect "127.0.0.1:$((b + 1))" --via-connect "127.0.0.1:$P_ORIGIN" --concurrency 32
  done
  end_group
}

# toml_identity: the [identity] section every hbone config shares.
toml_identity() {
  printf '%s\n' "[identity]" "cert = \"$PKI/leaf.pem\"" "key = \"$PKI/leaf.p8\"" "roots = \"$PKI/ca.pem\""
}

group_hbone() {
  meta hbone "Encrypted tunnel between two network namespaces (veth), iperf3 1 stream" high "Gb/s"
  local b=$((PORT_BASE + 60)) A=pscmpa$$ B=pscmpb$$ VA=pca$$ VB=pcb$$ dir=$WORK/hbone ns
  mkdir -p "$dir"
  ip netns add "$A" && NETNS+=("$A")
  ip netns add "$B" && NETNS+=("$B")
  ip link add "$VA" type veth peer name "$VB"
  ip link set "$VA" netns "$A"
  ip link set "$VB" netns "$B"
  in_ns "$A" ip addr add 10.201.0.1/24 dev "$VA"
  in_ns "$B" ip addr add 10.201.0.2/24 dev "$VB"
  for ns in "$A" "$B"; do in_ns "$ns" ip link set lo up; done
  in_ns "$A" ip link set "$VA" up
  in_ns "$B" ip link set "$VB" up

  start_bg iperf3-nsb "$EP_CPU" ip netns exec "$B" iperf3 -s -p "$P_IPERF"
  local iperf_b=$LAST_PID
  ORIGIN_PIDS+=("$iperf_b") # not a proxy: stopped with the namespaces below
  if ! wait_port "$B" "$P_IPERF" "$iperf_b" iperf3-nsb; then
    skip hbone all "" "$WHY"
    stop_pids "$iperf_b"
    return 0
  fi

  # proxystack: examples/hbone, client side in A, server side in B, mTLS with SPIFFE certs.
  { toml_identity; printf '%s\n' "[server]" 'listen = "10.201.0.2:15008"' 'app_ip = "127.0.0.1"'; } >"$dir/server.toml"
  { toml_identity; printf '%s\n' "[client]" "listen = \"127.0.0.1:$b\"" 'peer = "10.201.0.2:15008"' \
    "authority = \"10.201.0.2:$P_IPERF\"" 'identity = "spiffe://cluster.local/ns/bench/sa/bench"'; } >"$dir/client.toml"
  local hb=SKIP
  ours hbone-server "$PX_CPU" "$B" hbone --config "$dir/server.toml"
  up hbone-server "$B" 15008 hbone
  ours hbone-client "$PX_CPU" "$A" hbone --config "$dir/client.toml"
  up hbone-client "$A" "$b" hbone
  if [ "${V[hbone-server]}" != SKIP ] && [ "${V[hbone-client]}" != SKIP ]; then
    hb="${V[hbone-server]} ${V[hbone-client]}"
  fi

  # wireguard-go, one per namespace, GOMAXPROCS=1 (one worker thread like every proxy here).
  local wg=SKIP wga wgb ok=0
  (
    umask 077
    wg genkey >"$dir/a.key" && wg pubkey <"$dir/a.key" >"$dir/a.pub"
    wg genkey >"$dir/b.key" && wg pubkey <"$dir/b.key" >"$dir/b.pub"
  )
  start_bg wg-a "$PX_CPU" env GOMAXPROCS=1 LOG_LEVEL=error ip netns exec "$A" wireguard-go -f wgA
  wga=$LAST_PID
  start_bg wg-b "$PX_CPU" env GOMAXPROCS=1 LOG_LEVEL=error ip netns exec "$B" wireguard-go -f wgB
  wgb=$LAST_PID
  for _ in $(seq 100); do
    if in_ns "$A" ip link show wgA >/dev/null 2>&1 && in_ns "$B" ip link show wgB >/dev/null 2>&1; then
      ok=1
      break
    fi
    if ! kill -0 "$wga" 2>/dev/null || ! kill -0 "$wgb" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if [ "$ok" = 1 ] &&
    in_ns "$A" wg set wgA private-key "$dir/a.key" listen-port 51820 peer "$(cat "$dir/b.pub")" \
      allowed-ips 10.202.0.2/32 endpoint 10.201.0.2:51820 &&
    in_ns "$B" wg set wgB private-key "$dir/b.key" listen-port 51820 peer "$(cat "$dir/a.pub")" \
      allowed-ips 10.202.0.1/32 endpoint 10.201.0.1:51820 &&
    in_ns "$A" ip addr add 10.202.0.1/24 dev wgA && in_ns "$A" ip link set wgA mtu 1420 up &&
    in_ns "$B" ip addr add 10.202.0.2/24 dev wgB && in_ns "$B" ip link set wgB mtu 1420 up; then
    wg="$wga $wgb"
  else
    skip hbone wireguard-go "" "did not come up: $(tail -n 2 "$WORK/log/wg-a.log" | tr '\n' ' ')"
    stop_pids "$wga" "$wgb"
  fi

  # nginx: stream proxy_ssl (mTLS, TLS 1.3, verified) in A → stream ssl in B → iperf3.
  start_nginx nginx-tun-b "$PX_CPU" "$B" "stream {
  server {
    listen 10.201.0.2:$((b + 2)) ssl;
    ssl_certificate $PKI/leaf.pem;
    ssl_certificate_key $PKI/leaf.key;
    ssl_client_certificate $PKI/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:$P_IPERF;
  }
}"
  up nginx-tun-b "$B" "$((b + 2))" hbone
  start_nginx nginx-tun-a "$PX_CPU" "$A" "stream {
  server {
    listen 127.0.0.1:$((b + 1));
    proxy_pass 10.201.0.2:$((b + 2));
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate $PKI/leaf.pem;
    proxy_ssl_certificate_key $PKI/leaf.key;
    proxy_ssl_trusted_certificate $PKI/ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_name bench.local;
    proxy_ssl_session_reuse on;
  }
}"
  up nginx-tun-a "$A" "$((b + 1))" hbone
  local ng=SKIP
  if [ "${V[nginx-tun-a]}" != SKIP ] && [ "${V[nginx-tun-b]}" != SKIP ]; then
    ng="${V[nginx-tun-a]} ${V[nginx-tun-b]}"
  fi

  local r
  for r in $(seq "$ROUNDS"); do
    log "hbone: round $r/$ROUNDS"
    run hbone "direct (veth, no encryption)" direct "$r" "" m_iperf "$A" 10.201.0.2 "$P_IPERF"
    run hbone "proxystack HBONE (client + server side)" ours "$r" "$hb" m_iperf "$A" 127.0.0.1 "$b"
    run hbone "wireguard-go (both ends)" peer "$r" "$wg" m_iperf "$A" 10.202.0.2 "$P_IPERF"
    run hbone "nginx TLS tunnel (stream proxy_ssl → ssl)" peer "$r" "$ng" m_iperf "$A" 127.0.0.1 "$((b + 1))"
  done
  end_group
  stop_pids "$iperf_b"
  for ns in "$A" "$B"; do ip netns del "$ns" 2>/dev/null || true; done
}

# mem_hold PORT SINK_PORT: holds MEM_CONNS connections through PORT, whose far ends a sink
# process accepts on SINK_PORT (two processes: each needs one fd per connection); sets HOLD_PIDS.
mem_hold() {
  start_bg sink "$EP_CPU" "$CLIENT" sink --listen "127.0.0.1:$2" --seconds 600
  local sink=$LAST_PID
  HOLD_PIDS=$sink
  wait_port "" "$2" "$sink" sink || return 1
  start_bg hold "$EP_CPU" "$CLIENT" hold --connect "127.0.0.1:$1" -n "$MEM_CONNS" --seconds 600
  HOLD_PIDS="$sink $LAST_PID"
  for _ in $(seq 1800); do
    if grep -q '^held ' "$WORK/log/hold.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$LAST_PID" 2>/dev/null; then
      WHY="hold: $(tail -n 2 "$WORK/log/hold.log" | tr '\n' ' ')"
      return 1
    fi
    sleep 0.1
  done
  WHY="hold: not done after 180 s"
  return 1
}

# mem_measure KEY PORT BACKEND_PORT (VARIANT KIND RSS_PID)...: RSS growth per held connection.
mem_measure() {
  local key=$1 port=$2 backend=$3
  shift 3
  local args=("$@") i before=() after per
  sleep 0.5
  for ((i = 0; i < ${#args[@]}; i += 3)); do before+=("$(rss_kib "${args[i + 2]}")"); done
  if mem_hold "$port" "$backend"; then
    sleep 1
    for ((i = 0; i < ${#args[@]}; i += 3)); do
      after=$(rss_kib "${args[i + 2]}")
      per=$(awk -v a="$after" -v b="${before[i / 3]}" -v n="$MEM_CONNS" 'BEGIN { printf "%.2f", (a - b) / n }')
      record "$key" "${args[i]}" "${args[i + 1]}" 1 "$per" "-"
      log "  $key / ${args[i]}: $per KiB per connection (RSS ${before[i / 3]} → $after KiB)"
    done
  else
    for ((i = 0; i < ${#args[@]}; i += 3)); do
      record "$key" "${args[i]}" "${args[i + 1]}" 1 FAIL "-"
      echo "$key / ${args[i]}: $WHY" >>"$WORK/failures.txt"
    done
    log "  $key: FAILED: $WHY"
  fi
  # shellcheck disable=SC2086
  stop_pids $HOLD_PIDS
  sleep 1
}

group_mem() {
  meta memtcp "Memory: RSS per idle relayed TCP connection, $MEM_CONNS held (1 byte each way first)" low "KiB"
  meta memtun "Memory: RSS per idle tunnel, $MEM_CONNS held, per side" low "KiB"
  local b=$((PORT_BASE + 70)) bk=$((PORT_BASE + 79)) dir=$WORK/mem
  mkdir -p "$dir"
  log "memory: $MEM_CONNS idle connections per variant"
  ours mem-ours "$PX_CPU" "" tcp_relay --listen "127.0.0.1:$b" --upstream "127.0.0.1:$bk"
  up mem-ours "" "$b" memtcp
  if [ "${V[mem-ours]}" != SKIP ]; then mem_measure memtcp "$b" "$bk" proxystack ours "${V[mem-ours]}"; fi
  end_group
  MAXCONN=$((MEM_CONNS + 50)) start_haproxy mem-haproxy "$PX_CPU" "" "  mode tcp
listen relay
  bind 127.0.0.1:$((b + 1))
  server backend 127.0.0.1:$bk"
  up mem-haproxy "" "$((b + 1))" memtcp
  if [ "${V[mem-haproxy]}" != SKIP ]; then mem_measure memtcp "$((b + 1))" "$bk" haproxy peer "${V[mem-haproxy]}"; fi
  end_group
  start_nginx mem-nginx "$PX_CPU" "" "stream { server { listen 127.0.0.1:$((b + 2)) backlog=4096; proxy_pass 127.0.0.1:$bk; } }"
  up mem-nginx "" "$((b + 2))" memtcp
  if [ "${V[mem-nginx]}" != SKIP ]; then
    mem_measure memtcp "$((b + 2))" "$bk" nginx peer "$(children_of "${V[mem-nginx]}" | head -n 1)"
  fi
  end_group
  skip memtcp socat "" "not measured: socat forks one process per connection"

  # Tunnels on loopback: HBONE client side → server side; nginx stream proxy_ssl → ssl.
  { toml_identity; printf '%s\n' "[server]" "listen = \"127.0.0.1:$((b + 4))\"" 'app_ip = "127.0.0.1"'; } >"$dir/server.toml"
  { toml_identity; printf '%s\n' "[client]" "listen = \"127.0.0.1:$((b + 3))\"" "peer = \"127.0.0.1:$((b + 4))\"" \
    "authority = \"127.0.0.1:$bk\"" 'identity = "spiffe://cluster.local/ns/bench/sa/bench"'; } >"$dir/client.toml"
  ours mem-hbs "$PX_CPU" "" hbone --config "$dir/server.toml"
  up mem-hbs "" "$((b + 4))" memtun
  ours mem-hbc "$PX_CPU" "" hbone --config "$dir/client.toml"
  up mem-hbc "" "$((b + 3))" memtun
  if [ "${V[mem-hbs]}" != SKIP ] && [ "${V[mem-hbc]}" != SKIP ]; then
    mem_measure memtun "$((b + 3))" "$bk" "proxystack HBONE client side" ours "${V[mem-hbc]}" \
      "proxystack HBONE server side" ours "${V[mem-hbs]}"
  fi
  end_group
  start_nginx mem-ngs "$PX_CPU" "" "stream { server {
    listen 127.0.0.1:$((b + 6)) ssl backlog=4096;
    ssl_certificate $PKI/leaf.pem; ssl_certificate_key $PKI/leaf.key;
    ssl_client_certificate $PKI/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:$bk; } }"
  up mem-ngs "" "$((b + 6))" memtun
  start_nginx mem-ngc "$PX_CPU" "" "stream { server {
    listen 127.0.0.1:$((b + 5)) backlog=4096; proxy_pass 127.0.0.1:$((b + 6));
    proxy_ssl on; proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate $PKI/leaf.pem; proxy_ssl_certificate_key $PKI/leaf.key;
    proxy_ssl_trusted_certificate $PKI/ca.pem; proxy_ssl_verify on; proxy_ssl_name bench.local;
    proxy_ssl_session_reuse on; } }"
  up mem-ngc "" "$((b + 5))" memtun
  if [ "${V[mem-ngs]}" != SKIP ] && [ "${V[mem-ngc]}" != SKIP ]; then
    mem_measure memtun "$((b + 5))" "$bk" "nginx TLS tunnel client side" peer "$(children_of "${V[mem-ngc]}" | head -n 1)" \
      "nginx TLS tunnel server side" peer "$(children_of "${V[mem-ngs]}" | head -n 1)"
  fi
  end_group
}

# ---------------------------------------------------------------- run
START=$(date +%s)
start_origins
ORIGIN_PIDS=("${PIDS[@]}")
if want l4; then group_l4; fi
if want http; then group_http; fi
if want h2c; then group_h2c; fi
if want tls; then group_tls; fi
if want connect; then group_connect; fi
if want hbone; then group_hbone; fi
if want mem; then group_mem; fi
ELAPSED=$(($(date +%s) - START))

# ---------------------------------------------------------------- the table
versions() {
  printf 'haproxy %s, nginx %s, squid %s, nghttpx %s, socat %s, wireguard-go %s; load: wrk %s, h2load, iperf3 %s, curl %s' \
    "$(haproxy -v | awk 'NR == 1 {print $3}')" "$(nginx -v 2>&1 | sed 's|.*/||')" \
    "$(squid -v | awk 'NR == 1 {print $4}')" "$(nghttpx --version | sed 's|.*/||')" \
    "$(socat -V | awk '/socat version/ {print $3; exit}')" "$(wireguard-go --version 2>/dev/null | awk 'NR == 1 {print $2}')" \
    "$(wrk -v 2>&1 | awk 'NR == 1 {print $2}')" "$(iperf3 -v | awk 'NR == 1 {print $2}')" "$(curl -V | awk 'NR == 1 {print $2}')"
}

summarize() {
  python3 - "$META" "$RESULTS" "$SKIPS" <<'PY'
import sys, statistics
meta = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
skips = [l.rstrip("\n").split("\t") for l in open(sys.argv[3]) if l.strip()]
RATES = ("req/s", "conn/s", "tunnels/s")

def fmt(v, unit):
    if unit in RATES:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"

print("| Workload | Variant | Median | Min | Max | × direct | × best peer | Proxy CPU % |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
cpu_notes = []
for key, title, better, unit in meta:
    order, data, kinds, cpus, fails = [], {}, {}, {}, {}
    for k, variant, kind, rnd, value, cpu in rows:
        if k != key:
            continue
        if variant not in data:
            order.append(variant)
            data[variant], kinds[variant], cpus[variant], fails[variant] = [], kind, [], 0
        if value == "FAIL":
            fails[variant] += 1
            continue
        data[variant].append(float(value))
        if cpu != "-":
            cpus[variant].append(float(cpu))
    med = {v: statistics.median(d) for v, d in data.items() if d}
    direct = next((med[v] for v in order if kinds[v] == "direct" and v in med), None)
    peers = [med[v] for v in order if kinds[v] == "peer" and v in med]
    best = (max(peers) if better == "high" else min(peers)) if peers else None
    label = f"{title} ({unit}{', lower is better' if better == 'low' else ''})"
    first = True
    for v in order:
        name = f"**{v}**" if kinds[v] == "ours" else v
        m = med.get(v)
        cpu = f"{statistics.median(cpus[v]):.0f}" if cpus[v] else "–"
        if m is None:
            cells = [f"failed ({fails[v]} runs)", "", "", "", "", cpu]
        else:
            rd = f"{m / direct:.2f}×" if direct and kinds[v] != "direct" else "–"
            rp = f"{m / best:.2f}×" if best and kinds[v] != "direct" else "–"
            cells = [fmt(m, unit), fmt(min(data[v]), unit), fmt(max(data[v]), unit), rd, rp, cpu]
            if fails[v]:
                cells[0] += f" ({fails[v]} of {fails[v] + len(data[v])} runs failed)"
            if unit in RATES and cpus[v] and m > 0 and kinds[v] not in ("direct", "info"):
                cpu_notes.append(f"{v} {statistics.median(cpus[v]) / 100 * 1e6 / m:.1f} µs ({key})")
        print(f"| {label if first else ''} | {name} | " + " | ".join(cells) + " |")
        first = False
    for k, variant, kind, why in skips:
        if k == key:
            print(f"| {label if first else ''} | {variant} | skipped: {why.replace('|', '/')} | | | | | |")
            first = False
if cpu_notes:
    print()
    print("Proxy CPU time per request / connection / tunnel (CPU % × 10⁴ ÷ rate): " + "; ".join(cpu_notes) + ".")
PY
}

TABLE=$WORK/table.md
{
  echo "### proxystack vs peers — $(date -u +%Y-%m-%d), $(nproc --all) × $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
  echo
  echo "COMPARE_SECONDS=$S, ROUNDS=$ROUNDS (interleaved), MEM_CONNS=$MEM_CONNS, TLS_KEY=$TLS_KEY; load generators and origins on CPU $EP_CPU, proxies on CPU $PX_CPU, one worker thread each; the run took ${ELAPSED} s; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Versions: $(versions); proxystack $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
  summarize
  echo
  echo "Configurations (all on loopback unless noted, access logs off, one worker thread or process):"
  echo
  echo "* **proxystack**: the release examples with \`TOKIO_WORKER_THREADS=1 RUST_LOG=warn\`: \`tcp_relay\` (splice(2)), \`http_proxy --upstream\` (\`--upstream-h2\` for h2c → h2), \`sni_router\` (terminate SNI \`localhost\`, relay the plaintext), \`connect_proxy --allow-net 127.0.0.0/8\`, \`hbone\` (client side in namespace A, server side in B; SPIFFE mTLS + HTTP/2 CONNECT)."
  echo "* **haproxy**: \`nbthread 1\`, \`maxconn\` from the fd limit; L4 \`mode tcp\` + \`option splice-auto\`; HTTP \`mode http\`, keep-alive, \`http-reuse safe\`; h2c → h2 \`bind … proto h2\` / \`server … proto h2\`; TLS \`bind … ssl crt … alpn http/1.1\` in \`mode tcp\`."
  echo "* **nginx**: \`worker_processes 1\`; L4 \`stream { proxy_pass }\`; HTTP \`proxy_pass\` to an \`upstream\` with \`keepalive 64\`, \`proxy_http_version 1.1\`, \`proxy_buffers 8 64k\`, \`proxy_max_temp_file_size 0\`; TLS \`stream\` \`listen … ssl\`, \`ssl_session_cache shared:SSL:10m\`; tunnel \`stream\` \`proxy_ssl on\` (TLS 1.3, client certificate, server verified) → \`stream\` \`ssl_verify_client on\`."
  echo "* **nghttpx**: \`-n1\`, \`--frontend='…;no-tls'\`, \`--backend='…;;proto=http/1.1'\` or \`proto=h2\`."
  echo "* **squid**: one process (\`-N\`), \`cache deny all\`, \`access_log none\`, CONNECT allowed between 127.0.0.0/8 addresses on the bench ports."
  echo "* **socat**: \`TCP-LISTEN:…,fork,reuseaddr TCP:…\` (a process per connection, default 8 KiB buffer)."
  echo "* **wireguard-go**: one per namespace, \`GOMAXPROCS=1\`, MTU 1420, over the same veth pair (MTU 1500) as the HBONE and nginx tunnels."
  echo "* Certificates: $([ "$TLS_KEY" = ec ] && echo 'ECDSA P-256' || echo 'RSA 2048') leaf (SAN localhost, bench.local, spiffe://cluster.local/ns/bench/sa/bench) from a throw-away CA."
  echo "* Origins (CPU $EP_CPU): \`iperf3 -s\`; nginx serving 1 KiB, 1 MiB and a sparse 64 GiB file (sendfile, keep-alive) over HTTP/1.1 and prior-knowledge h2c."
  echo "* Load (CPU $EP_CPU): \`iperf3 -t $S\` (1 stream); \`wrk -t1\` (-c64 keep-alive, or -c32 with \`Connection: close\`); \`h2load -t1 -c16 -m10\`; \`curl --http1.1\` for the bulk TLS row (cut at $S s; rate = bytes ÷ time); \`benches/compare_client.rs\` (rustls, TLS 1.3 only, no resumption, 32 concurrent connections) for handshakes/s and tunnels/s, as the CONNECT driver for iperf3 (splice(2); what it costs shows in \"driver only\") and to hold idle connections (1 byte each way) for the memory rows (VmRSS of the proxy, or nginx worker, before and after)."
  echo "* Proxy CPU % = CPU time of the proxy's processes (both ends for the namespace tunnels) ÷ wall time; 100 = the whole proxy core."
  if [ -s "$WORK/failures.txt" ]; then
    echo
    echo "Failures:"
    echo
    sed 's/^/* /' "$WORK/failures.txt"
  fi
} >"$TABLE"
cat "$TABLE"
if [ -n "${COMPARE_OUT:-}" ]; then cp "$TABLE" "$COMPARE_OUT"; fi
