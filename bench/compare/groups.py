"""The workloads, in seven groups. Each group starts its variants (ours and the peers),
runs `rounds` interleaved rounds of every (workload, variant) and stops what it started.

A variant whose program is not installed, or that does not come up, becomes a "skipped" row
with the reason; a load generator that is missing skips its workloads the same way.
"""

import os
import shutil
import subprocess
import time

from measure import MeasureError
from peers import (hbone_toml, start_haproxy, start_nghttpx, start_nginx, start_ours,
                   start_socat, start_squid, nginx_http_common)
from runner import StartError, first_child, rss_kib

GROUPS = ("l4", "http", "h2c", "tls", "connect", "hbone", "mem")


class Context:
    """What every group uses: the runner, the load generators, the results and the settings."""

    def __init__(self, args, runner, load, results, work, bin_dir, pki):
        self.args, self.runner, self.load, self.results = args, runner, load, results
        self.work, self.bin, self.pki = work, bin_dir, pki
        self.ep, self.px, self.base = args.endpoint_cpu, args.proxy_cpu, args.port_base
        self.p_iperf, self.p_origin, self.p_origin_h2 = self.base + 1, self.base + 2, self.base + 3
        self.nofile = 65536
        self.haproxy_maxconn = 20000
        self.nginx_stream_module = ""
        self.shared = {}  # (baseline name, round) → value: direct runs that two groups share
        self.blocked = {}  # workload key → why none of its rows can run
        self.origin_error = None  # why the origins did not start, if they did not
        self.origins = []  # their pids: kept running between groups
        self.iperf_error = None  # why the iperf3 server did not start, if it did not

    # ------------------------------------------------------------------ variants
    def up(self, name, keys, start, port, ns=None, needs=()):
        """Starts one variant with start() and waits for its port. Returns [its pid], or None
        (and records a skipped row for each of `keys`) when it is not installed or failed."""
        missing = [n for n in needs if not shutil.which(n)]
        if missing:
            return self._skip(keys, name, f"{', '.join(missing)} not installed")
        pid = None
        try:
            pid = start()
            self.runner.wait_port(pid, port, ns)
            return [pid]
        except (StartError, OSError, subprocess.SubprocessError) as e:
            if pid is not None:
                self.runner.stop(pid)
            return self._skip(keys, name, str(e))

    def _skip(self, keys, name, why):
        print(f"  SKIPPED {name}: {why}", flush=True)
        for k in keys:
            self.results.skip(k, name, why)
        return None

    def needs(self, keys, tools=(), origin=False):
        """Blocks `keys` when a load generator is missing or the origins did not start."""
        why = next((f"{t} not installed" for t in tools if not shutil.which(t)), None)
        if "iperf3" in tools and self.iperf_error:
            why = why or self.iperf_error
        if origin and self.origin_error:
            why = why or self.origin_error
        for k in keys:
            if why:
                self.blocked[k] = why
                self.results.skip(k, "all variants", why)
        return why is None

    def run(self, key, variant, kind, rnd, pids, measure, key2=None, shared=None):
        """One measurement. `pids` None: the variant did not start (already a skipped row);
        [] = no proxy (direct). `key2` records a second figure (p99); `shared` names a direct
        baseline measured once per round for every group that uses it."""
        if pids is None or key in self.blocked:
            return
        if shared and (shared, rnd) in self.shared:
            self.results.record(key, variant, kind, rnd, self.shared[(shared, rnd)])
            return
        try:
            (v1, v2), cpu = self.runner.sample(pids, measure)
        except (MeasureError, OSError, subprocess.SubprocessError) as e:
            for k in (key, key2):
                if k:
                    self.results.record(k, variant, kind, rnd, None)
            self.results.failures.append(f"{key} / {variant} round {rnd}: {e}")
            print(f"  {key} / {variant}: FAILED: {e}", flush=True)
            return
        self.results.record(key, variant, kind, rnd, v1, cpu)
        if key2 and v2 is not None:
            self.results.record(key2, variant, kind, rnd, v2, cpu)
        if shared:
            self.shared[(shared, rnd)] = v1
        extra = f" (p99 {v2:.3f} ms)" if v2 is not None else ""
        print(f"  {key} / {variant}: {v1:.3f}{extra} cpu {cpu:.0f}%" if cpu is not None
              else f"  {key} / {variant}: {v1:.3f}{extra}", flush=True)

    def rounds(self, group):
        for r in range(1, self.args.rounds + 1):
            print(f"{group}: round {r}/{self.args.rounds}", flush=True)
            yield r

    def end_group(self, keep=()):
        self.runner.stop(*[p for p in self.runner.procs if p not in keep])


def start_origins(ctx):
    """iperf3 and nginx (HTTP/1.1 and h2c) on the endpoints' CPU, for the whole run."""
    keep = []
    if shutil.which("iperf3"):
        pid = ctx.runner.start("iperf3-origin", ["iperf3", "-s", "-p", ctx.p_iperf], ctx.ep)
        try:
            ctx.runner.wait_port(pid, ctx.p_iperf)
            keep.append(pid)
        except StartError as e:
            ctx.iperf_error = f"origin iperf3: {e}"
            ctx.runner.stop(pid)
    if not shutil.which("nginx"):
        ctx.origin_error = "the origin needs nginx, not installed"
        return keep
    www = ctx.work / "www"
    pid = start_nginx(ctx, "origin", ctx.ep, f"""http {{
{nginx_http_common(ctx, "origin")}
  sendfile on; tcp_nopush on; tcp_nodelay on;
  open_file_cache max=100; keepalive_timeout 65s;
  server {{ listen 127.0.0.1:{ctx.p_origin} reuseport backlog=4096; root {www}; }}
  server {{ listen 127.0.0.1:{ctx.p_origin_h2} http2 backlog=4096; root {www}; }}
}}""")
    try:
        ctx.runner.wait_port(pid, ctx.p_origin)
        ctx.runner.wait_port(pid, ctx.p_origin_h2)
        keep.append(pid)
    except StartError as e:
        ctx.origin_error = f"origin nginx: {e}"
        ctx.runner.stop(pid)
    return keep


def group_l4(ctx):
    w = ctx.results.workload
    w("tcp", "TCP relay, iperf3 1 stream", "high", "Gb/s")
    w("conns", "New TCP connections/s through an L4 relay (wrk -c32, Connection: close, 1 KiB)", "high", "conn/s")
    ctx.needs(["tcp"], ["iperf3"])
    ctx.needs(["conns"], ["wrk"], origin=True)
    b, px, it, org = ctx.base + 10, ctx.px, f"127.0.0.1:{ctx.p_iperf}", f"127.0.0.1:{ctx.p_origin}"
    ours_tcp = ctx.up("proxystack", ["tcp"], lambda: start_ours(ctx, "ours-tcp", px, "tcp_relay", "--listen", f"127.0.0.1:{b}", "--upstream", it), b)
    ours_conns = ctx.up("proxystack", ["conns"], lambda: start_ours(ctx, "ours-conns", px, "tcp_relay", "--listen", f"127.0.0.1:{b + 1}", "--upstream", org), b + 1)
    haproxy = ctx.up("haproxy", ["tcp", "conns"], lambda: start_haproxy(ctx, "haproxy-l4", px, f"""  mode tcp
  option splice-auto
listen tcp
  bind 127.0.0.1:{b + 2}
  server iperf {it}
listen conns
  bind 127.0.0.1:{b + 3}
  server origin {org}"""), b + 2, needs=["haproxy"])
    nginx = ctx.up("nginx", ["tcp", "conns"], lambda: start_nginx(ctx, "nginx-l4", px, f"""stream {{
  server {{ listen 127.0.0.1:{b + 4}; proxy_pass {it}; }}
  server {{ listen 127.0.0.1:{b + 5} backlog=4096; proxy_pass {org}; }}
}}"""), b + 4, needs=["nginx"])
    socat_tcp = ctx.up("socat", ["tcp"], lambda: start_socat(ctx, "socat-tcp", px, b + 6, it), b + 6, needs=["socat"])
    socat_conns = ctx.up("socat", ["conns"], lambda: start_socat(ctx, "socat-conns", px, b + 7, org), b + 7, needs=["socat"])
    L, close = ctx.load, "Connection: close"
    for r in ctx.rounds("l4"):
        for name, kind, pids, port in [("direct", "direct", [], ctx.p_iperf), ("proxystack", "ours", ours_tcp, b),
                                       ("haproxy", "peer", haproxy, b + 2), ("nginx", "peer", nginx, b + 4),
                                       ("socat", "peer", socat_tcp, b + 6)]:
            ctx.run("tcp", name, kind, r, pids, lambda p=port: L.iperf3("127.0.0.1", p),
                    shared="iperf-lo" if kind == "direct" else None)
        for name, kind, pids, port in [("direct", "direct", [], ctx.p_origin), ("proxystack", "ours", ours_conns, b + 1),
                                       ("haproxy", "peer", haproxy, b + 3), ("nginx", "peer", nginx, b + 5),
                                       ("socat", "peer", socat_conns, b + 7)]:
            ctx.run("conns", name, kind, r, pids,
                    lambda p=port: (L.wrk(32, f"http://127.0.0.1:{p}/1k.bin", close)[0], None))
    ctx.end_group(ctx.origins)


def group_http(ctx):
    w = ctx.results.workload
    w("h1k", "HTTP/1.1 reverse proxy, 1 KiB, wrk -c64", "high", "req/s")
    w("h1k99", "HTTP/1.1 reverse proxy, 1 KiB, p99 latency", "low", "ms")
    w("h1m", "HTTP/1.1 reverse proxy, 1 MiB, wrk -c64", "high", "req/s")
    w("h1m99", "HTTP/1.1 reverse proxy, 1 MiB, p99 latency", "low", "ms")
    keys = ["h1k", "h1k99", "h1m", "h1m99"]
    if not ctx.needs(keys, ["wrk"], origin=True):
        return
    b, px, org = ctx.base + 20, ctx.px, f"127.0.0.1:{ctx.p_origin}"
    variants = [
        ("direct", "direct", [], ctx.p_origin),
        ("proxystack", "ours", ctx.up("proxystack", keys, lambda: start_ours(
            ctx, "ours-http", px, "http_proxy", "--listen", f"127.0.0.1:{b}", "--upstream", org), b), b),
        ("haproxy", "peer", ctx.up("haproxy", keys, lambda: start_haproxy(ctx, "haproxy-http", px, f"""  mode http
  option http-keep-alive
  http-reuse safe
listen http
  bind 127.0.0.1:{b + 1}
  server origin {org}"""), b + 1, needs=["haproxy"]), b + 1),
        ("nginx", "peer", ctx.up("nginx", keys, lambda: start_nginx(ctx, "nginx-http", px, f"""http {{
{nginx_http_common(ctx, "nginx-http")}
  upstream origin {{ server {org}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{b + 2} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
      proxy_max_temp_file_size 0;
    }}
  }}
}}"""), b + 2, needs=["nginx"]), b + 2),
        ("nghttpx", "peer", ctx.up("nghttpx", keys, lambda: start_nghttpx(
            ctx, "nghttpx-http", px, b + 3, ctx.p_origin, "http/1.1"), b + 3, needs=["nghttpx"]), b + 3),
    ]
    for r in ctx.rounds("http"):
        for name, kind, pids, port in variants:
            ctx.run("h1k", name, kind, r, pids, lambda p=port: ctx.load.wrk(64, f"http://127.0.0.1:{p}/1k.bin"), key2="h1k99")
            ctx.run("h1m", name, kind, r, pids, lambda p=port: ctx.load.wrk(64, f"http://127.0.0.1:{p}/1m.bin"), key2="h1m99")
    ctx.end_group(ctx.origins)


def group_h2c(ctx):
    ctx.results.workload("h2c", "h2c → h2 reverse proxy, 1 KiB, h2load -c16 -m10", "high", "req/s")
    if not ctx.needs(["h2c"], ["h2load"], origin=True):
        return
    b, px = ctx.base + 30, ctx.px
    variants = [
        ("direct", "direct", [], ctx.p_origin_h2),
        ("proxystack", "ours", ctx.up("proxystack", ["h2c"], lambda: start_ours(
            ctx, "ours-h2c", px, "http_proxy", "--listen", f"127.0.0.1:{b}", "--upstream",
            f"127.0.0.1:{ctx.p_origin_h2}", "--upstream-h2"), b), b),
        ("nghttpx", "peer", ctx.up("nghttpx", ["h2c"], lambda: start_nghttpx(
            ctx, "nghttpx-h2c", px, b + 1, ctx.p_origin_h2, "h2"), b + 1, needs=["nghttpx"]), b + 1),
        ("haproxy", "peer", ctx.up("haproxy", ["h2c"], lambda: start_haproxy(ctx, "haproxy-h2c", px, f"""  mode http
frontend h2c
  bind 127.0.0.1:{b + 2} proto h2
  default_backend origin
backend origin
  server origin 127.0.0.1:{ctx.p_origin_h2} proto h2"""), b + 2, needs=["haproxy"]), b + 2),
    ]
    for r in ctx.rounds("h2c"):
        for name, kind, pids, port in variants:
            ctx.run("h2c", name, kind, r, pids, lambda p=port: ctx.load.h2load(f"http://127.0.0.1:{p}/1k.bin"))
    ctx.end_group(ctx.origins)


def group_tls(ctx):
    w = ctx.results.workload
    w("tlsn", "TLS 1.3 termination → plaintext origin: new connections/s (full handshake + one 1 KiB request)", "high", "conn/s")
    w("tlsb", "TLS 1.3 termination → plaintext origin: bulk download, curl 1 stream", "high", "Gb/s")
    keys = ["tlsn", "tlsb"]
    if not ctx.needs(keys, ["curl"], origin=True):
        return
    b, px, pki, org = ctx.base + 40, ctx.px, ctx.pki, f"127.0.0.1:{ctx.p_origin}"
    conf = ctx.work / "sni_router.toml"
    conf.write_text(f'listen = ["127.0.0.1:{b}"]\n[[terminate]]\nsni = "localhost"\ncert = "{pki}/leaf.pem"\n'
                    f'key = "{pki}/leaf.p8"\nupstream = "{org}"\n')
    variants = [
        ("proxystack", "ours", ctx.up("proxystack", keys, lambda: start_ours(ctx, "ours-tls", px, "sni_router", "--config", conf), b), b),
        ("haproxy", "peer", ctx.up("haproxy", keys, lambda: start_haproxy(ctx, "haproxy-tls", px, f"""  mode tcp
listen tls
  bind 127.0.0.1:{b + 1} ssl crt {pki}/leaf-combined.pem alpn http/1.1
  server origin {org}"""), b + 1, needs=["haproxy"]), b + 1),
        ("nginx", "peer", ctx.up("nginx", keys, lambda: start_nginx(ctx, "nginx-tls", px, f"""stream {{
  server {{
    listen 127.0.0.1:{b + 2} ssl backlog=4096;
    ssl_certificate {pki}/leaf.pem;
    ssl_certificate_key {pki}/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    proxy_pass {org};
  }}
}}"""), b + 2, needs=["nginx"]), b + 2),
    ]
    L, direct = ctx.load, "direct (plaintext)"
    for r in ctx.rounds("tls"):
        ctx.run("tlsn", direct, "direct", r, [], lambda: L.rate("--connect", org, "--concurrency", "32"), shared="rate-origin")
        ctx.run("tlsb", direct, "direct", r, [], lambda: L.curl(f"http://{org}/big.bin"))
        for name, kind, pids, port in variants:
            ctx.run("tlsn", name, kind, r, pids, lambda p=port: L.rate(
                "--connect", f"127.0.0.1:{p}", "--tls", "localhost", "--concurrency", "32"))
            ctx.run("tlsb", name, kind, r, pids, lambda p=port: L.curl(
                f"https://localhost:{p}/big.bin", "-k", "--resolve", f"localhost:{p}:127.0.0.1"))
    ctx.end_group(ctx.origins)


def group_connect(ctx):
    w = ctx.results.workload
    w("conb", "HTTP CONNECT tunnel, iperf3 1 stream (through a CONNECT driver on the endpoints' CPU)", "high", "Gb/s")
    w("conn", "HTTP CONNECT tunnels/s (new connection, CONNECT, one 1 KiB request through it)", "high", "tunnels/s")
    ctx.needs(["conb"], ["iperf3"])
    ctx.needs(["conn"], origin=True)
    b, px, ep, client = ctx.base + 50, ctx.px, ctx.ep, ctx.load.client
    it, org = f"127.0.0.1:{ctx.p_iperf}", f"127.0.0.1:{ctx.p_origin}"
    ours = ctx.up("proxystack", ["conb", "conn"], lambda: start_ours(
        ctx, "ours-connect", px, "connect_proxy", "--listen", f"127.0.0.1:{b}", "--allow-net", "127.0.0.0/8"), b)
    squid = ctx.up("squid", ["conb", "conn"], lambda: start_squid(
        ctx, "squid", px, b + 1, [ctx.p_iperf, ctx.p_origin]), b + 1, needs=["squid"])

    # iperf3 cannot speak CONNECT: a driver on the endpoints' CPU opens the tunnel for it.
    def driver(name, port, *proxy):
        return ctx.up(name, ["conb"], lambda: ctx.runner.start(
            name, [client, "drive", "--listen", f"127.0.0.1:{port}", *proxy, "--target", it], ep), port)

    d_ours = driver("driver for proxystack", b + 2, "--proxy", f"127.0.0.1:{b}") if ours else None
    d_squid = driver("driver for squid", b + 3, "--proxy", f"127.0.0.1:{b + 1}") if squid else None
    d_none = driver("driver only", b + 4)
    L = ctx.load
    for r in ctx.rounds("connect"):
        ctx.run("conb", "direct", "direct", r, [], lambda: L.iperf3("127.0.0.1", ctx.p_iperf), shared="iperf-lo")
        ctx.run("conb", "driver only, no proxy", "info", r, [] if d_none else None, lambda: L.iperf3("127.0.0.1", b + 4))
        ctx.run("conb", "proxystack", "ours", r, ours if d_ours else None, lambda: L.iperf3("127.0.0.1", b + 2))
        ctx.run("conb", "squid", "peer", r, squid if d_squid else None, lambda: L.iperf3("127.0.0.1", b + 3))
        ctx.run("conn", "direct", "direct", r, [], lambda: L.rate("--connect", org, "--concurrency", "32"), shared="rate-origin")
        for name, kind, pids, port in [("proxystack", "ours", ours, b), ("squid", "peer", squid, b + 1)]:
            ctx.run("conn", name, kind, r, pids, lambda p=port: L.rate(
                "--connect", f"127.0.0.1:{p}", "--via-connect", org, "--concurrency", "32"))
    ctx.end_group(ctx.origins)


def group_hbone(ctx):
    """Two namespaces joined by a veth pair (10.201.0.1 ↔ 10.201.0.2, addresses that exist
    only inside them); the client in A, iperf3 in B, each tunnel's two ends on the proxy CPU."""
    ctx.results.workload("hbone", "Encrypted tunnel between two network namespaces (veth), iperf3 1 stream", "high", "Gb/s")
    if not ctx.needs(["hbone"], ["iperf3"]):
        return
    try:
        hbone_variants(ctx)
    except (StartError, OSError, subprocess.SubprocessError) as e:
        ctx.results.skip("hbone", "all variants", f"namespaces did not come up: {e}")
    ctx.end_group(ctx.origins)
    ctx.runner.stop_namespaces()


def hbone_variants(ctx):
    b, px, pki, tag = ctx.base + 60, ctx.px, ctx.pki, os.getpid()
    A, B, va, vb = f"pscmpa{tag}", f"pscmpb{tag}", f"pca{tag}", f"pcb{tag}"
    ip = ctx.runner.netns
    sh = lambda *a: subprocess.run([str(x) for x in a], check=True, timeout=10, capture_output=True)
    ip(A)
    ip(B)
    sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
    sh("ip", "link", "set", va, "netns", A)
    sh("ip", "link", "set", vb, "netns", B)
    for ns, dev, addr in [(A, va, "10.201.0.1/24"), (B, vb, "10.201.0.2/24")]:
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
    iperf_b = ctx.runner.start("iperf3-nsb", ["iperf3", "-s", "-p", ctx.p_iperf], ctx.ep, B)
    ctx.runner.wait_port(iperf_b, ctx.p_iperf, B)

    server, client = ctx.work / "hbone-server.toml", ctx.work / "hbone-client.toml"
    server.write_text(hbone_toml(pki, "server", listen="10.201.0.2:15008", app_ip="127.0.0.1"))
    client.write_text(hbone_toml(pki, "client", listen=f"127.0.0.1:{b}", peer="10.201.0.2:15008",
                                 authority=f"10.201.0.2:{ctx.p_iperf}", identity="spiffe://cluster.local/ns/bench/sa/bench"))
    hs = ctx.up("proxystack HBONE", ["hbone"], lambda: start_ours(ctx, "hbone-server", px, "hbone", "--config", server, ns=B), 15008, B)
    hc = ctx.up("proxystack HBONE", ["hbone"], lambda: start_ours(ctx, "hbone-client", px, "hbone", "--config", client, ns=A), b, A) if hs else None
    ours = hs + hc if hs and hc else None

    wg = wireguard(ctx, A, B, sh) if shutil.which("wireguard-go") and shutil.which("wg") else \
        ctx._skip(["hbone"], "wireguard-go", "wireguard-go or wg not installed")

    ng_b = ctx.up("nginx TLS tunnel", ["hbone"], lambda: start_nginx(ctx, "nginx-tun-b", px, f"""stream {{
  server {{
    listen 10.201.0.2:{b + 2} ssl;
    ssl_certificate {pki}/leaf.pem;
    ssl_certificate_key {pki}/leaf.key;
    ssl_client_certificate {pki}/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:{ctx.p_iperf};
  }}
}}""", B), b + 2, B, needs=["nginx"])
    ng_a = ctx.up("nginx TLS tunnel", ["hbone"], lambda: start_nginx(ctx, "nginx-tun-a", px, f"""stream {{
  server {{
    listen 127.0.0.1:{b + 1};
    proxy_pass 10.201.0.2:{b + 2};
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate {pki}/leaf.pem;
    proxy_ssl_certificate_key {pki}/leaf.key;
    proxy_ssl_trusted_certificate {pki}/ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_name bench.local;
    proxy_ssl_session_reuse on;
  }}
}}""", A), b + 1, A) if ng_b else None
    ng = ng_a + ng_b if ng_a and ng_b else None

    L = ctx.load
    for r in ctx.rounds("hbone"):
        ctx.run("hbone", "direct (veth, no encryption)", "direct", r, [], lambda: L.iperf3("10.201.0.2", ctx.p_iperf, A))
        ctx.run("hbone", "proxystack HBONE (client + server side)", "ours", r, ours, lambda: L.iperf3("127.0.0.1", b, A))
        ctx.run("hbone", "wireguard-go (both ends)", "peer", r, wg, lambda: L.iperf3("10.202.0.2", ctx.p_iperf, A))
        ctx.run("hbone", "nginx TLS tunnel (stream proxy_ssl → ssl)", "peer", r, ng, lambda: L.iperf3("127.0.0.1", b + 1, A))


def wireguard(ctx, A, B, sh):
    """wireguard-go in each namespace (GOMAXPROCS=1: one worker thread like every proxy here),
    10.202.0.1 ↔ 10.202.0.2 over the veth pair. The pids, or None (skipped row) on failure."""
    d = ctx.work / "wg"
    d.mkdir(mode=0o700, exist_ok=True)
    keys = {}
    for side in "ab":
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True, timeout=10).stdout
        (d / f"{side}.key").write_text(priv)
        keys[side] = pub.strip()
    env = {"GOMAXPROCS": "1", "LOG_LEVEL": "error"}
    pids = [ctx.runner.start("wg-a", ["wireguard-go", "-f", "wgA"], ctx.px, A, env),
            ctx.runner.start("wg-b", ["wireguard-go", "-f", "wgB"], ctx.px, B, env)]
    try:
        for _ in range(100):
            if all(subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", dev], capture_output=True,
                                  timeout=10).returncode == 0 for ns, dev in [(A, "wgA"), (B, "wgB")]):
                break
            time.sleep(0.1)
        for ns, dev, me, peer, mine, theirs in [(A, "wgA", "a", "b", "10.202.0.1", "10.201.0.2"),
                                                (B, "wgB", "b", "a", "10.202.0.2", "10.201.0.1")]:
            other = "10.202.0.2" if me == "a" else "10.202.0.1"
            sh("ip", "netns", "exec", ns, "wg", "set", dev, "private-key", d / f"{me}.key", "listen-port", "51820",
               "peer", keys[peer], "allowed-ips", f"{other}/32", "endpoint", f"{theirs}:51820")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{mine}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "mtu", "1420", "up")
        return pids
    except (subprocess.SubprocessError, OSError) as e:
        ctx.runner.stop(*pids)
        return ctx._skip(["hbone"], "wireguard-go", f"did not come up: {e} {ctx.runner.log_tail('wg-a')}")


def group_mem(ctx):
    n = ctx.args.mem_conns
    w = ctx.results.workload
    w("memtcp", f"Memory: RSS per idle relayed TCP connection, {n} held (1 byte each way first)", "low", "KiB")
    w("memtun", f"Memory: RSS per idle tunnel, {n} held, per side", "low", "KiB")
    b, bk, px, pki = ctx.base + 70, ctx.base + 79, ctx.px, ctx.pki
    # One variant at a time: each holds n connections, started after the previous stopped.
    ours = ctx.up("proxystack", ["memtcp"], lambda: start_ours(
        ctx, "mem-ours", px, "tcp_relay", "--listen", f"127.0.0.1:{b}", "--upstream", f"127.0.0.1:{bk}"), b)
    if ours:
        mem_measure(ctx, "memtcp", b, bk, [("proxystack", "ours", ours[0])])
    ctx.end_group(ctx.origins)
    haproxy = ctx.up("haproxy", ["memtcp"], lambda: start_haproxy(ctx, "mem-haproxy", px, f"""  mode tcp
listen relay
  bind 127.0.0.1:{b + 1}
  server backend 127.0.0.1:{bk}""", maxconn=n + 50), b + 1, needs=["haproxy"])
    if haproxy:
        mem_measure(ctx, "memtcp", b + 1, bk, [("haproxy", "peer", haproxy[0])])
    ctx.end_group(ctx.origins)
    nginx = ctx.up("nginx", ["memtcp"], lambda: start_nginx(
        ctx, "mem-nginx", px, f"stream {{ server {{ listen 127.0.0.1:{b + 2} backlog=4096; proxy_pass 127.0.0.1:{bk}; }} }}"),
        b + 2, needs=["nginx"])
    if nginx:
        mem_measure(ctx, "memtcp", b + 2, bk, [("nginx", "peer", first_child(nginx[0]))])
    ctx.end_group(ctx.origins)
    ctx.results.skip("memtcp", "socat", "not measured: socat forks one process per connection")

    # Tunnels on loopback: HBONE client side → server side; nginx stream proxy_ssl → ssl.
    server, client = ctx.work / "mem-hbs.toml", ctx.work / "mem-hbc.toml"
    server.write_text(hbone_toml(pki, "server", listen=f"127.0.0.1:{b + 4}", app_ip="127.0.0.1"))
    client.write_text(hbone_toml(pki, "client", listen=f"127.0.0.1:{b + 3}", peer=f"127.0.0.1:{b + 4}",
                                 authority=f"127.0.0.1:{bk}", identity="spiffe://cluster.local/ns/bench/sa/bench"))
    hs = ctx.up("proxystack HBONE", ["memtun"], lambda: start_ours(ctx, "mem-hbs", px, "hbone", "--config", server), b + 4)
    hc = ctx.up("proxystack HBONE", ["memtun"], lambda: start_ours(ctx, "mem-hbc", px, "hbone", "--config", client), b + 3) if hs else None
    if hs and hc:
        mem_measure(ctx, "memtun", b + 3, bk, [("proxystack HBONE client side", "ours", hc[0]),
                                               ("proxystack HBONE server side", "ours", hs[0])])
    ctx.end_group(ctx.origins)
    ngs = ctx.up("nginx TLS tunnel", ["memtun"], lambda: start_nginx(ctx, "mem-ngs", px, f"""stream {{ server {{
    listen 127.0.0.1:{b + 6} ssl backlog=4096;
    ssl_certificate {pki}/leaf.pem; ssl_certificate_key {pki}/leaf.key;
    ssl_client_certificate {pki}/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:{bk}; }} }}"""), b + 6, needs=["nginx"])
    ngc = ctx.up("nginx TLS tunnel", ["memtun"], lambda: start_nginx(ctx, "mem-ngc", px, f"""stream {{ server {{
    listen 127.0.0.1:{b + 5} backlog=4096; proxy_pass 127.0.0.1:{b + 6};
    proxy_ssl on; proxy_ssl_protocols TLSv1.3;
    proxy_ssl_certificate {pki}/leaf.pem; proxy_ssl_certificate_key {pki}/leaf.key;
    proxy_ssl_trusted_certificate {pki}/ca.pem; proxy_ssl_verify on; proxy_ssl_name bench.local;
    proxy_ssl_session_reuse on; }} }}"""), b + 5) if ngs else None
    if ngs and ngc:
        mem_measure(ctx, "memtun", b + 5, bk, [("nginx TLS tunnel client side", "peer", first_child(ngc[0])),
                                               ("nginx TLS tunnel server side", "peer", first_child(ngs[0]))])
    ctx.end_group(ctx.origins)


def mem_measure(ctx, key, port, sink_port, variants):
    """RSS growth per connection of each (variant, kind, pid) while `mem_conns` connections
    are held through `port` to a sink on `sink_port` (two processes: each needs one fd per
    connection)."""
    n, client, ep = ctx.args.mem_conns, ctx.load.client, ctx.ep
    time.sleep(0.5)
    before = [rss_kib(pid) for _, _, pid in variants]
    why = None
    try:
        sink = ctx.runner.start("sink", [client, "sink", "--listen", f"127.0.0.1:{sink_port}", "--seconds", "600"], ep)
        ctx.runner.wait_port(sink, sink_port)
        hold = ctx.runner.start("hold", [client, "hold", "--connect", f"127.0.0.1:{port}", "-n", n, "--seconds", "600"], ep)
        log = ctx.work / "log" / "hold.log"
        deadline = time.monotonic() + 180
        while not any(line.startswith("held ") for line in log.read_text().splitlines()):
            if ctx.runner.procs[hold][1].poll() is not None:
                raise StartError(f"hold: {ctx.runner.log_tail('hold')}")
            if time.monotonic() > deadline:
                raise StartError("hold: not done after 180 s")
            time.sleep(0.1)
        time.sleep(1)
        for (variant, kind, pid), b in zip(variants, before):
            per = (rss_kib(pid) - b) / n
            ctx.results.record(key, variant, kind, 1, per)
            print(f"  {key} / {variant}: {per:.2f} KiB per connection", flush=True)
    except (StartError, OSError) as e:
        why = str(e)
    if why:
        for variant, kind, _ in variants:
            ctx.results.record(key, variant, kind, 1, None)
            ctx.results.failures.append(f"{key} / {variant}: {why}")
        print(f"  {key}: FAILED: {why}", flush=True)
    ctx.runner.stop(*[p for p, (name, _) in list(ctx.runner.procs.items()) if name in ("sink", "hold")])
    time.sleep(1)


RUN = {"l4": group_l4, "http": group_http, "h2c": group_h2c, "tls": group_tls,
       "connect": group_connect, "hbone": group_hbone, "mem": group_mem}
