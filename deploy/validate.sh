#!/usr/bin/env bash
# Offline checks of deploy/ (no cluster, no Docker daemon): .ci/run's "deploy manifests".
#
#   hadolint             deploy/Dockerfile
#   kubernetes-validate  every manifest, strictly (unknown fields fail), against the oldest
#                        Kubernetes the manifests support and a current one; a warning
#                        (e.g. an unknown or removed API) fails too
#   the scripts          shellcheck
#   the Grafana dashboard parses, and each proxystack_* metric it queries exists in the code
#   the ConfigMaps' TOML parses
#   make-dev-certs.sh    makes certificates that verify
#   test-capture.sh      the iptables capture, end to end in network namespaces (needs root,
#                        iptables and a built sidecar; otherwise it says SKIPPED)
#
# The tools come from PyPI into a virtualenv under the target dir, pinned by
# deploy/requirements-validate.txt; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

# Oldest: the preStop `sleep` action (no shell in the image) is on by default from 1.30.
KUBE_VERSIONS=(1.30.0 1.37.0)
venv=${CARGO_TARGET_DIR:-$PWD/target}/deploy-validate-venv
reqs=deploy/requirements-validate.txt

if ! cmp -s "$reqs" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
    cp "$reqs" "$venv/requirements.txt"
fi
bin=$venv/bin
failed=()

echo "--- hadolint"
"$bin/hadolint" --no-color deploy/Dockerfile || failed+=(hadolint)

manifests=(deploy/k8s/*.yaml deploy/k8s/secrets/*.yaml)
for version in "${KUBE_VERSIONS[@]}"; do
    echo "--- kubernetes-validate $version: ${#manifests[@]} files"
    # --quiet prints warnings and failures only: any output is a finding.
    if ! out=$("$bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1) \
        || [ -n "$out" ]; then
        echo "$out"
        failed+=("kubernetes-validate $version")
    fi
done

echo "--- shellcheck"
"$bin/shellcheck" deploy/*.sh || failed+=(shellcheck)

echo "--- dashboard and configs"
"$bin/python" - <<'PY' || failed+=("dashboard/configs")
import glob, json, re, sys, tomllib, yaml

ok = True
dash = json.load(open("deploy/grafana/proxystack.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
code = "".join(open(f).read() for f in glob.glob("examples/**/*.rs", recursive=True)
               + glob.glob("src/**/*.rs", recursive=True))
for name in sorted({m for e in exprs for m in re.findall(r"\bproxystack_[a-z_]+", e)}):
    if name not in code:
        print(f"dashboard queries {name}, which no code exports")
        ok = False
print(f"dashboard: {len(dash['panels'])} panels, {len(exprs)} queries")
for path in sorted(glob.glob("deploy/k8s/*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith(".toml"):
                    try:
                        tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        print(f"{path}: {key}: {e}")
                        ok = False
sys.exit(0 if ok else 1)
PY

echo "--- make-dev-certs.sh"
certs=$(mktemp -d)
if bash deploy/make-dev-certs.sh "$certs" >/dev/null \
    && openssl verify -CAfile "$certs/root.pem" "$certs"/{sidecar,waypoint,gateway}/cert.pem \
        "$certs/gateway-tls/tls.crt"; then
    :
else
    failed+=(make-dev-certs)
fi
rm -rf "$certs"

echo "--- capture"
bash deploy/test-capture.sh || failed+=(capture)

if [ ${#failed[@]} -gt 0 ]; then
    echo "deploy: FAILED: ${failed[*]}"
    exit 1
fi
echo "deploy: all checks passed"
