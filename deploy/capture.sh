#!/bin/sh
# proxystack-capture: the node-level traffic capture for the sidecar DaemonSet.
#
#   proxystack-capture install   # (default) add or refresh the rules; idempotent
#   proxystack-capture remove    # take them out again
#   proxystack-capture show      # print the rules
#
# Runs in the host network namespace (hostNetwork: true) as root with NET_ADMIN and
# NET_RAW. IPv4 only. Environment:
#   NODE_IP        this node's IP, where the sidecar listens (downward API status.hostIP)
#   POD_CIDR       the cluster's pod range, e.g. 10.244.0.0/16
#   POD_IFACE      the host side of pod interfaces, iptables wildcard (default veth+;
#                  Calico cali+, Cilium lxc+, flannel/bridge cni0)
#   OUTBOUND_PORT  the sidecar's outbound listener (default 15001)
#   HBONE_PORT     the sidecar's inbound HBONE listener (default 15008)
#   IPTABLES       iptables-nft or iptables-legacy (default: the one kube-proxy uses)
#
# Rules (nat table; in chains of our own, jumped to first):
#   PREROUTING, from a local pod (-i POD_IFACE), TCP, not to a node-local address
#       -> DNAT NODE_IP:OUTBOUND_PORT   (apps' outbound; the sidecar reads the original
#                                        destination with SO_ORIGINAL_DST)
#   PREROUTING, not from a local pod, TCP to POD_CIDR port HBONE_PORT
#       -> DNAT NODE_IP:HBONE_PORT      (HBONE from other nodes for a pod here)
#   OUTPUT, to a local pod (-o POD_IFACE), TCP port HBONE_PORT
#       -> DNAT NODE_IP:HBONE_PORT      (our own HBONE to a pod on this node: loops back
#                                        to our inbound listener)
# DNAT rather than REDIRECT: REDIRECT rewrites to the incoming interface's address, and
# the host side of a pod interface often has none (Calico), which drops the packet.
# Both leave the original destination in conntrack, where SO_ORIGINAL_DST reads it.
#
# The rules stay when the sidecar stops: captured connections are then refused (fail
# closed) instead of bypassing the mesh. `remove` is the only way to uncapture a node.
set -eu

ACTION=${1:-install}
POD_IFACE=${POD_IFACE:-veth+}
OUTBOUND_PORT=${OUTBOUND_PORT:-15001}
HBONE_PORT=${HBONE_PORT:-15008}
PRE=PROXYSTACK_PREROUTING
OUT=PROXYSTACK_OUTPUT

fail() {
    echo "proxystack-capture: $*" >&2
    exit 1
}

# The same backend as kube-proxy: rules in the other one would be evaluated in an order
# we do not control. Whichever holds more rules is the one in use (as kube-proxy's own
# iptables-wrapper decides).
pick_iptables() {
    if [ -n "${IPTABLES:-}" ]; then
        return
    fi
    legacy=$({ iptables-legacy-save 2>/dev/null || true; } | grep -c '^-' || true)
    nft=$({ iptables-nft-save 2>/dev/null || true; } | grep -c '^-' || true)
    if [ "${legacy:-0}" -gt "${nft:-0}" ]; then
        IPTABLES=iptables-legacy
    else
        IPTABLES=iptables-nft
    fi
}

ipt() {
    "$IPTABLES" -w 5 -t nat "$@"
}

# Inputs end up in iptables arguments: refuse anything that is not plainly what we expect.
check_inputs() {
    echo "$NODE_IP" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}$' \
        || fail "NODE_IP must be an IPv4 address, got '$NODE_IP'"
    echo "$POD_CIDR" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$' \
        || fail "POD_CIDR must be an IPv4 CIDR, got '$POD_CIDR'"
    echo "$POD_IFACE" | grep -Eq '^[A-Za-z0-9_.-]{1,15}\+?$' \
        || fail "POD_IFACE must be an interface name or prefix+, got '$POD_IFACE'"
    for port in "$OUTBOUND_PORT" "$HBONE_PORT"; do
        echo "$port" | grep -Eq '^[0-9]{1,5}$' || fail "bad port '$port'"
    done
}

# Fills both chains in one atomic commit (a declared chain is flushed and refilled), so a
# re-install never leaves a moment without capture; then makes sure they are jumped to.
install() {
    : "${NODE_IP:?NODE_IP is required}" "${POD_CIDR:?POD_CIDR is required}"
    check_inputs
    "${IPTABLES}-restore" -w 5 --noflush <<RULES
*nat
:$PRE - [0:0]
:$OUT - [0:0]
-A $PRE -i $POD_IFACE -p tcp -m addrtype --dst-type LOCAL -j RETURN
-A $PRE -i $POD_IFACE -p tcp -j DNAT --to-destination $NODE_IP:$OUTBOUND_PORT
-A $PRE ! -i $POD_IFACE -p tcp -d $POD_CIDR --dport $HBONE_PORT -j DNAT --to-destination $NODE_IP:$HBONE_PORT
-A $OUT -o $POD_IFACE -p tcp --dport $HBONE_PORT -j DNAT --to-destination $NODE_IP:$HBONE_PORT
COMMIT
RULES
    ipt -C PREROUTING -j "$PRE" 2>/dev/null || ipt -I PREROUTING 1 -j "$PRE"
    ipt -C OUTPUT -j "$OUT" 2>/dev/null || ipt -I OUTPUT 1 -j "$OUT"
    echo "proxystack-capture: installed with $IPTABLES (node $NODE_IP, pods $POD_CIDR on $POD_IFACE)"
}

# remove_chain BUILTIN CHAIN: drops the jumps to CHAIN (bounded: install adds one, a few
# would mean manual installs), then CHAIN itself.
remove_chain() {
    for _ in 1 2 3 4 5 6 7 8; do
        ipt -D "$1" -j "$2" 2>/dev/null || break
    done
    if ipt -L "$2" -n >/dev/null 2>&1; then
        ipt -F "$2"
        ipt -X "$2"
    fi
}

remove() {
    remove_chain PREROUTING "$PRE"
    remove_chain OUTPUT "$OUT"
    echo "proxystack-capture: removed ($IPTABLES)"
}

show() {
    "${IPTABLES}-save" -t nat | grep -E "PROXYSTACK|^\*|^COMMIT" || true
}

pick_iptables
case "$ACTION" in
    install) install ;;
    remove) remove ;;
    show) show ;;
    *) fail "unknown action '$ACTION' (install, remove, show)" ;;
esac
