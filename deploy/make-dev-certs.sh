#!/usr/bin/env bash
# Makes a throwaway CA and the certificates the manifests mount, for a test cluster:
#
#   deploy/make-dev-certs.sh OUT_DIR [TRUST_DOMAIN] [GATEWAY_HOST]
#
#   OUT_DIR/root.pem, root.key                  the mesh CA (keep root.key off the cluster)
#   OUT_DIR/sidecar/{cert,key,root}.pem         spiffe://TD/ns/proxystack-node/sa/proxystack-sidecar
#   OUT_DIR/waypoint/{cert,key,root}.pem        spiffe://TD/ns/proxystack/sa/proxystack-waypoint
#   OUT_DIR/gateway/{cert,key,root}.pem         spiffe://TD/ns/proxystack/sa/proxystack-gateway
#   OUT_DIR/gateway-tls/tls.{crt,key}           the gateway's public certificate for GATEWAY_HOST
#
# Workload certificates carry one URI SAN (the SPIFFE ID) and both serverAuth and
# clientAuth, because HBONE is mutual TLS. Production certificates come from your CA (or
# the CA client, when it lands); rotate them by updating the Secrets and restarting.
set -euo pipefail

out=${1:?usage: make-dev-certs.sh OUT_DIR [TRUST_DOMAIN] [GATEWAY_HOST]}
td=${2:-cluster.local}
host=${3:-app.example.com}
days=${DAYS:-90}
mkdir -p "$out"
cd "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key root.key
openssl req -x509 -new -key root.key -out root.pem -days "$days" -subj "/O=proxystack dev/CN=$td root" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# issue DIR SAN EKU CERT_NAME KEY_NAME
issue() {
    mkdir -p "$1"
    key "$1/$5"
    openssl req -new -key "$1/$5" -subj "/O=proxystack dev" -out "$1/req.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=$3" "subjectAltName=$2" >"$1/ext.cnf"
    openssl x509 -req -in "$1/req.csr" -CA root.pem -CAkey root.key -CAcreateserial \
        -days "$days" -extfile "$1/ext.cnf" -out "$1/$4" 2>/dev/null
    rm -f "$1/req.csr" "$1/ext.cnf"
}

for pair in sidecar:proxystack-node waypoint:proxystack gateway:proxystack; do
    name=${pair%%:*} ns=${pair##*:}
    issue "$name" "URI:spiffe://$td/ns/$ns/sa/proxystack-$name" serverAuth,clientAuth cert.pem key.pem
    cp root.pem "$name/root.pem"
done
issue gateway-tls "DNS:$host" serverAuth tls.crt tls.key
rm -f root.srl
chmod 600 root.key ./*/key.pem gateway-tls/tls.key
echo "certificates in $PWD (trust domain $td, gateway host $host)"
