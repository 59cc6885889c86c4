#!/usr/bin/env python3
"""Side-by-side performance comparison: proxystack's examples against haproxy, nginx, squid,
nghttpx, socat and wireguard-go on the same machine, in the same run (issue 9).

    sudo python3 bench/compare/compare.py                      # full run (~20-25 min)
    sudo python3 bench/compare/compare.py --seconds 2 --rounds 1   # quick check of everything
    sudo python3 bench/compare/compare.py --only l4,http       # some groups only
    python3 bench/compare/compare.py --dry-run                 # what would run; starts nothing

Load generators and origin servers run on --endpoint-cpu, proxies on --proxy-cpu (taskset),
each proxy with one worker thread; `rounds` interleaved rounds of every (workload, variant);
the table shows medians and the proxy's CPU usage. A peer that is not installed is a
"skipped" row (--install installs the missing ones with apt-get). Every load run, start-up
and wait is bounded in time; only processes and namespaces this run created are stopped or
deleted, on exit too. Python 3 standard library only; the modules beside this file:
report.py (aggregation, table), measure.py (load tools and their output), runner.py
(processes, CPU, memory), peers.py (peer configurations), groups.py (the workloads).
"""

import argparse
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from groups import GROUPS, RUN, Context, start_origins  # noqa: E402
from measure import Load  # noqa: E402
from peers import NOTES  # noqa: E402
from report import Results, table  # noqa: E402
from runner import Runner, listening  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("tcp_relay", "http_proxy", "sni_router", "connect_proxy", "hbone")
# Command → Debian package, for --install and the dry run.
TOOLS = {"iperf3": "iperf3", "haproxy": "haproxy", "nginx": "nginx-full", "squid": "squid", "h2load": "nghttp2-client",
         "nghttpx": "nghttp2-proxy", "wrk": "wrk", "wireguard-go": "wireguard-go", "wg": "wireguard-tools",
         "socat": "socat", "curl": "curl", "openssl": "openssl", "ip": "iproute2", "ss": "iproute2",
         "taskset": "util-linux"}


def env_int(name, default):
    return int(os.environ.get(name, default))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bounded = lambda lo, hi: lambda s: _bounded(s, lo, hi)
    p.add_argument("--seconds", type=bounded(1, 600), default=env_int("COMPARE_SECONDS", 10), help="seconds per measurement (10)")
    p.add_argument("--rounds", type=bounded(1, 20), default=env_int("ROUNDS", 3), help="interleaved rounds (3)")
    p.add_argument("--mem-conns", type=bounded(100, 100000), default=env_int("MEM_CONNS", 10000), help="idle connections held (10000)")
    p.add_argument("--only", default=os.environ.get("ONLY", ",".join(GROUPS)), help="groups: " + ",".join(GROUPS))
    p.add_argument("--endpoint-cpu", type=int, default=env_int("ENDPOINT_CPU", 0), help="CPU of load and origins (0)")
    p.add_argument("--proxy-cpu", type=int, default=env_int("PROXY_CPU", 1), help="CPU of the proxies (1)")
    p.add_argument("--port-base", type=bounded(1024, 65000), default=env_int("COMPARE_PORT_BASE", 21000), help="100 free loopback ports from here (21000)")
    p.add_argument("--tls-key", choices=("ec", "rsa"), default=os.environ.get("TLS_KEY", "ec"), help="ECDSA P-256 or RSA 2048 certificates")
    flag = lambda name: os.environ.get(name) == "1"
    p.add_argument("--install", action="store_true", default=flag("INSTALL"), help="apt-get install the missing peers and load tools")
    p.add_argument("--skip-build", action="store_true", default=flag("SKIP_BUILD"), help="use the release binaries already in the target dir")
    p.add_argument("--keep-work", action="store_true", default=flag("KEEP_WORK"), help="keep the temp dir with configs and logs")
    p.add_argument("--out", default=os.environ.get("COMPARE_OUT"), help="also write the table to this file")
    p.add_argument("--dry-run", action="store_true", help="check the settings, say what would run, start nothing")
    a = p.parse_args(argv)
    a.groups = [g for g in a.only.split(",") if g]
    for g in a.groups:
        if g not in GROUPS:
            p.error(f"unknown group {g!r} (groups: {', '.join(GROUPS)})")
    cpus = os.cpu_count() or 1
    if a.endpoint_cpu == a.proxy_cpu or not (0 <= a.endpoint_cpu < cpus and 0 <= a.proxy_cpu < cpus):
        p.error(f"--endpoint-cpu and --proxy-cpu must be two different CPUs of 0..{cpus - 1}")
    return a


def _bounded(s, lo, hi):
    v = int(s)
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"must be {lo}..{hi}, got {v}")
    return v


def plan(args):
    """What --dry-run prints: the settings and which tools are there."""
    have = {t: shutil.which(t) is not None for t in TOOLS}
    lines = [f"groups: {', '.join(args.groups)}; {args.rounds} round(s) of {args.seconds} s; "
             f"endpoints on CPU {args.endpoint_cpu}, proxies on CPU {args.proxy_cpu}; ports {args.port_base + 1}..{args.port_base + 99}",
             "installed: " + " ".join(t for t, ok in have.items() if ok),
             "missing (their rows are skipped; --install adds them): " + (" ".join(t for t, ok in have.items() if not ok) or "none")]
    return "\n".join(lines)


def install_missing():
    need = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if need:
        print("installing: " + " ".join(need), flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        # One by one: a package the distribution lacks skips its peer, not the run.
        for pkg in need:
            if subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, timeout=600,
                              stdout=subprocess.DEVNULL).returncode != 0:
                print(f"warning: could not install {pkg}", flush=True)


def build(skip):
    """Release builds of our examples and the load client; (examples dir, client path)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not skip:
        print("building the examples and the load client (release)", flush=True)
        cmd = ["cargo", "build", "--release", "--all-features", "--bench", "compare_client"]
        for e in EXAMPLES:
            cmd += ["--example", e]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=3600)
    bins = target / "release" / "examples"
    clients = [f for f in (target / "release" / "deps").glob("compare_client-*") if f.is_file() and os.access(f, os.X_OK)]
    if not clients:
        sys.exit("compare: the load client (benches/compare_client.rs) is not built")
    for e in EXAMPLES:
        if not (bins / e).is_file():
            sys.exit(f"compare: example {e} not built in {bins}")
    return bins, max(clients, key=lambda f: f.stat().st_mtime)


def make_files(work, tls_key):
    """A throw-away CA and leaf (SAN localhost, bench.local, a SPIFFE ID) and the origin's files."""
    d = work / "pki"
    d.mkdir()
    ssl = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True, timeout=60)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if tls_key == "ec" else ["-newkey", "rsa:2048"]
    ssl("req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", d / "ca.key",
        "-out", d / "ca.pem", "-days", "2", "-subj", "/CN=proxystack-compare-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl("req", "-nodes", *key, "-keyout", d / "leaf.key", "-out", d / "leaf.csr", "-subj", "/CN=localhost")
    (d / "leaf.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://cluster.local/ns/bench/sa/bench,"
                                "DNS:localhost,DNS:bench.local,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", d / "leaf.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", d / "leaf.ext", "-out", d / "leaf.pem")
    ssl("pkcs8", "-topk8", "-nocrypt", "-in", d / "leaf.key", "-out", d / "leaf.p8")  # for rustls
    (d / "leaf-combined.pem").write_bytes((d / "leaf.pem").read_bytes() + (d / "leaf.p8").read_bytes())  # haproxy
    for f in d.iterdir():
        f.chmod(0o644)
    www = work / "www"
    www.mkdir()
    (www / "1k.bin").write_bytes(os.urandom(1024))
    (www / "1m.bin").write_bytes(os.urandom(1024 * 1024))
    with open(www / "big.bin", "wb") as f:
        f.truncate(64 << 30)  # sparse: served from the page cache of holes, no disk
    return d


def raise_fd_limit(args):
    """Enough descriptors for mem_conns connections through a proxy (two fds each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1048576, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            break
        except (ValueError, OSError):
            continue
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if 2 * args.mem_conns + 200 > nofile:
        args.mem_conns = (nofile - 200) // 2
        print(f"warning: the fd limit is {nofile}; holding {args.mem_conns} connections instead", flush=True)
    return nofile


def nginx_stream_module():
    """Debian builds nginx's stream module as a dynamic module."""
    for m in ("/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"):
        if Path(m).is_file():
            return f"load_module {m};"
    return ""


def versions():
    def first(cmd, word):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).split("\n")[0].split()[word].rsplit("/", 1)[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "not installed"
    return ", ".join([f"haproxy {first(['haproxy', '-v'], 2)}", f"nginx {first(['nginx', '-v'], 2)}",
                      f"squid {first(['squid', '-v'], 3)}", f"nghttpx {first(['nghttpx', '--version'], 1)}",
                      f"wrk {first(['wrk', '-v'], 1)}", f"iperf3 {first(['iperf3', '-v'], 1)}", f"curl {first(['curl', '-V'], 1)}"])


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print(plan(args))
        return 0
    if os.geteuid() != 0:
        sys.exit("compare: run as root (network namespaces, squid's user, fd limits); --dry-run needs no root")
    if args.install:
        install_missing()
    for tool in ("taskset", "ss", "ip", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"compare: {tool} not found (--install adds it)")
    busy = [p for p in range(args.port_base + 1, args.port_base + 100) if listening(p)]
    if busy:
        sys.exit(f"compare: port {busy[0]} is in use; pick --port-base with 100 free ports after it")
    bins, client = build(args.skip_build)
    nofile = raise_fd_limit(args)

    work = Path(tempfile.mkdtemp(prefix="proxystack-compare."))
    work.chmod(0o755)  # squid drops to the proxy user and must reach its directory
    runner, results = Runner(work), Results()
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    try:
        pki = make_files(work, args.tls_key)
        ctx = Context(args, runner, Load(args.endpoint_cpu, args.seconds, client, work), results, work, bins, pki)
        ctx.nofile, ctx.nginx_stream_module = nofile, nginx_stream_module()
        ctx.haproxy_maxconn = min((nofile - 500) // 3, 100000)  # 2 fds a connection + splice pipes
        ctx.origins = start_origins(ctx)
        for g in args.groups:
            RUN[g](ctx)
    finally:
        runner.stop_all()
        if args.keep_work:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start

    cpu_model = next((l.split(": ", 1)[1] for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.machine())
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = [f"### proxystack vs peers — {datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} × {cpu_model}, Linux {platform.release()}",
           "",
           f"seconds={args.seconds}, rounds={args.rounds} (interleaved), mem_conns={args.mem_conns}, tls_key={args.tls_key}; "
           f"load generators and origins on CPU {args.endpoint_cpu}, proxies on CPU {args.proxy_cpu}, one worker thread each; "
           f"the run took {elapsed:.0f} s; load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}.",
           f"Versions: {versions()}; proxystack {rev or '?'}.", "", table(results), "", NOTES]
    if results.failures:
        doc += ["", "Failures:", ""] + [f"* {f}" for f in results.failures]
    text = "\n".join(doc) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
