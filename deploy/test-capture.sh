#!/usr/bin/env bash
# End-to-end check of deploy/capture.sh with the real sidecar binary, in network
# namespaces made here (nothing leaves them):
#
#   pod1 (10.214.1.2) --veth--> node (10.213.0.1, the sidecar, capture.sh rules) --veth--> remote (10.213.0.2)
#   pod2 (10.214.1.3) --veth-/
#
# The pods' host-side interfaces have no address (as with Calico), which is why capture.sh
# uses DNAT. Checks, each a rule of capture.sh:
#   1. pod1 -> remote:8080 is captured and passed through: remote sees the node's address.
#   2. the node's own HBONE to pod2:15008 loops back to the sidecar's inbound (OUTPUT rule).
#   3. remote -> pod2:15008 reaches the sidecar's inbound (PREROUTING rule).
#   (2 and 3 see the node identity in the TLS handshake. Whole tunnels to a pod are not
#   checked: the sidecar example cannot deliver them in this shape yet, see README.)
#   4. with the sidecar stopped, pod1 -> remote:8080 is refused, not let through.
#
#   deploy/test-capture.sh [SIDECAR_BINARY]  (default: $SIDECAR_BIN, else the debug build
#                                            under $CARGO_TARGET_DIR or target/)
# Needs root, ip, iptables, openssl, python3; prints SKIPPED and exits 0 without them.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-${SIDECAR_BIN:-${CARGO_TARGET_DIR:-target}/debug/examples/sidecar}}
skip() { echo "SKIPPED capture test: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, iptables)"
for tool in ip iptables openssl python3; do
    command -v "$tool" >/dev/null || skip "$tool not installed"
done
[ -x "$bin" ] || skip "no sidecar binary at $bin (build it: cargo build --all-features --example sidecar)"

tag=ps$$
node=$tag-node pod1=$tag-pod1 pod2=$tag-pod2 remote=$tag-remote
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$node" "$pod1" "$pod2" "$remote"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# Runs a command in a namespace, in the foreground (background ones call `ip netns exec`
# directly, so that $! is the process itself: ip execs the command).
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# A machine that cannot build this topology (no veth, no netns) skips, like the tests do.
set -E
trap 'skip "cannot set up the namespaces (line $LINENO)"' ERR
for ns in "$node" "$pod1" "$pod2" "$remote"; do
    ip netns add "$ns"
    inns "$ns" ip link set lo up
done
inns "$node" sysctl -qw net.ipv4.ip_forward=1

# node <-> remote: one shared subnet. Remote routes the pod range via the node, so an
# uncaptured connection would work and show the pod's own address.
ip link add uplink netns "$node" type veth peer name uplink netns "$remote"
inns "$node" ip addr add 10.213.0.1/24 dev uplink
inns "$remote" ip addr add 10.213.0.2/24 dev uplink
inns "$node" ip link set uplink up
inns "$remote" ip link set uplink up
inns "$remote" ip route add 10.214.0.0/16 via 10.213.0.1
# A node has a default route; proxy ARP answers the pods' gateway address only with one.
inns "$node" ip route add default via 10.213.0.2

# node <-> pods: /32 routes over address-less host interfaces with proxy ARP (Calico's way).
pod_link() {
    local ns=$1 ip=$2 host_if=$3
    ip link add "$host_if" netns "$node" type veth peer name eth0 netns "$ns"
    inns "$node" ip link set "$host_if" up
    inns "$node" sysctl -qw "net.ipv4.conf.$host_if.proxy_arp=1"
    inns "$node" ip route add "$ip/32" dev "$host_if" scope link
    inns "$ns" ip addr add "$ip/32" dev eth0
    inns "$ns" ip link set eth0 up
    inns "$ns" ip route add 169.254.1.1 dev eth0 scope link
    inns "$ns" ip route add default via 169.254.1.1 dev eth0
}
pod_link "$pod1" 10.214.1.2 vethpod1
pod_link "$pod2" 10.214.1.3 vethpod2

trap - ERR
inns "$node" env NODE_IP=10.213.0.1 POD_CIDR=10.214.0.0/16 POD_IFACE=veth+ \
    sh deploy/capture.sh install >/dev/null

# A server that answers each connection with one line and closes; bounded lifetime.
serve() {
    local ns=$1 addr=$2 port=$3 reply=$4
    ip netns exec "$ns" timeout 60 python3 -c '
import socket, sys
addr, port, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(16)
while True:
    c, peer = s.accept()
    c.sendall((reply.replace("PEER", peer[0]) + "\n").encode()); c.close()
' "$addr" "$port" "$reply" &
    pids+=($!)
}
serve "$remote" 10.213.0.2 8080 "peer=PEER"

# Reads one line from addr:port within 5 s, or prints the error.
fetch() {
    inns "$1" timeout 10 python3 -c '
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.makefile().readline().strip())
except OSError as e:
    print("error:", type(e).__name__, e.errno or "")
' "$2" "$3"
}

bash deploy/make-dev-certs.sh "$work/certs" >/dev/null
id=spiffe://cluster.local/ns/proxystack-node/sa/proxystack-sidecar
cat >"$work/sidecar.toml" <<TOML
[identity]
cert = "$work/certs/sidecar/cert.pem"
key = "$work/certs/sidecar/key.pem"
roots = "$work/certs/sidecar/root.pem"
[outbound]
listen = "10.213.0.1:15001"
[inbound]
listen = "10.213.0.1:15008"
app_ip = "127.0.0.1"
allow = ["$id"]
TOML
RUST_LOG=${RUST_LOG:-debug} ip netns exec "$node" "$bin" --config "$work/sidecar.toml" --admin 127.0.0.1:15020 --drain-secs 1 \
    >"$work/sidecar.out" 2>"$work/sidecar.err" &
sidecar=$!
pids+=("$sidecar")
for _ in $(seq 50); do
    [ "$(grep -c '^listening on' "$work/sidecar.out" || true)" -ge 3 ] && break
    sleep 0.2
done

# The URI SAN of the certificate presented at pod2:15008, dialled from namespace $1.
tls_san() {
    inns "$1" timeout 10 openssl s_client -connect 10.214.1.3:15008 -alpn h2 </dev/null 2>/dev/null \
        | openssl x509 -noout -ext subjectAltName 2>/dev/null | grep -o 'URI:[^ ,]*' || true
}

failures=0
check() {
    local what=$1 got=$2 want=$3
    if [ "$got" = "$want" ]; then
        echo "ok: $what"
    else
        echo "FAILED: $what: got '$got', want '$want'"
        failures=$((failures + 1))
    fi
}
check "outbound captured, passed through from the node" "$(fetch "$pod1" 10.213.0.2 8080)" "peer=10.213.0.1"
check "node's HBONE to a pod here loops back to the sidecar" "$(tls_san "$node")" "URI:$id"
check "HBONE from another node to a pod here reaches the sidecar" "$(tls_san "$remote")" "URI:$id"
kill "$sidecar"
wait "$sidecar" 2>/dev/null || true
check "sidecar down: captured traffic refused" "$(fetch "$pod1" 10.213.0.2 8080)" "error: ConnectionRefusedError 111"

if [ "$failures" -gt 0 ]; then
    echo "--- sidecar stderr"; cat "$work/sidecar.err"
    echo "--- rules"; inns "$node" sh deploy/capture.sh show
fi
echo "$((4 - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
