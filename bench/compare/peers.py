"""How each peer is configured and started: one worker thread or process each, access logs
off, everything on loopback (or in the run's own namespaces). The table's notes describe the
same settings; change both together."""


def nginx_conf(ctx, name, body):
    d = ctx.work / name
    return f"""{ctx.nginx_stream_module}
daemon off;
worker_processes 1;
worker_rlimit_nofile {ctx.nofile};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {ctx.nofile}; }}
{body}
"""


def nginx_http_common(ctx, name):
    d = ctx.work / name
    return f"""  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;"""


def start_nginx(ctx, name, cpu, body, ns=None):
    d = ctx.work / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(nginx_conf(ctx, name, body))
    return ctx.runner.start(name, ["nginx", "-p", d, "-e", d / "error.log", "-c", d / "nginx.conf"], cpu, ns)


def haproxy_conf(maxconn, body):
    return f"""global
  nbthread 1
  maxconn {maxconn}
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-request 10s
  timeout http-keep-alive 60s
{body}
"""


def start_haproxy(ctx, name, cpu, body, maxconn=None):
    d = ctx.work / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "haproxy.cfg").write_text(haproxy_conf(maxconn or ctx.haproxy_maxconn, body))
    return ctx.runner.start(name, ["haproxy", "-db", "-f", d / "haproxy.cfg"], cpu)


def squid_conf(d, port, allowed_ports):
    return "\n".join([
        f"http_port 127.0.0.1:{port}",
        "visible_hostname proxystack-compare",
        "acl bench_src src 127.0.0.0/8",
        "acl bench_dst dst 127.0.0.0/8",
        "acl bench_ports port " + " ".join(str(p) for p in allowed_ports),
        "acl CONNECT method CONNECT",
        "http_access allow CONNECT bench_src bench_dst bench_ports",
        "http_access deny all",
        "cache deny all",
        "access_log none",
        f"cache_log {d}/cache.log",
        f"pid_filename {d}/squid.pid",
        f"coredump_dir {d}",
        "cache_effective_user proxy",  # squid drops to this user: it must reach the work dir
        "shutdown_lifetime 1 seconds",
        "max_filedescriptors 65536",
    ]) + "\n"


def start_squid(ctx, name, cpu, port, allowed_ports):
    d = ctx.work / name
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o777)
    (d / "squid.conf").write_text(squid_conf(d, port, allowed_ports))
    return ctx.runner.start(name, ["squid", "-N", "-f", d / "squid.conf"], cpu)


def start_nghttpx(ctx, name, cpu, port, backend, proto):
    d = ctx.work / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.conf").write_text("")
    return ctx.runner.start(name, ["nghttpx", "-n1", f"--conf={d}/empty.conf", f"--frontend=127.0.0.1,{port};no-tls",
                                   f"--backend=127.0.0.1,{backend};;proto={proto}"], cpu)


def start_socat(ctx, name, cpu, port, upstream):
    return ctx.runner.start(name, ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                                   f"TCP:{upstream}"], cpu)


def start_ours(ctx, name, cpu, example, *args, ns=None):
    """One of our release examples: one tokio worker thread, no per-request logs."""
    return ctx.runner.start(name, [ctx.bin / example, "--drain-secs", "1", *args], cpu, ns,
                            env={"TOKIO_WORKER_THREADS": "1", "RUST_LOG": "warn"})


def hbone_toml(pki, section, **kv):
    lines = ["[identity]", f'cert = "{pki}/leaf.pem"', f'key = "{pki}/leaf.p8"', f'roots = "{pki}/ca.pem"', f"[{section}]"]
    return "\n".join(lines + [f'{k} = "{v}"' for k, v in kv.items()]) + "\n"


NOTES = """Configurations (all on loopback unless noted, access logs off, one worker thread or process):

* **proxystack**: the release examples with `TOKIO_WORKER_THREADS=1 RUST_LOG=warn`: `tcp_relay` (splice(2)), `http_proxy --upstream` (`--upstream-h2` for h2c → h2), `sni_router` (terminate SNI `localhost`, relay the plaintext), `connect_proxy --allow-net 127.0.0.0/8`, `hbone` (client side in namespace A, server side in B; SPIFFE mTLS + HTTP/2 CONNECT).
* **haproxy**: `nbthread 1`, `maxconn` from the fd limit; L4 `mode tcp` + `option splice-auto`; HTTP `mode http`, keep-alive, `http-reuse safe`; h2c → h2 `bind … proto h2` / `server … proto h2`; TLS `bind … ssl crt … alpn http/1.1` in `mode tcp`.
* **nginx**: `worker_processes 1`; L4 `stream { proxy_pass }`; HTTP `proxy_pass` to an `upstream` with `keepalive 64`, `proxy_http_version 1.1`, `proxy_buffers 8 64k`, `proxy_max_temp_file_size 0`; TLS `stream` `listen … ssl`, `ssl_session_cache shared:SSL:10m`; tunnel `stream` `proxy_ssl on` (TLS 1.3, client certificate, server verified) → `stream` `ssl_verify_client on`.
* **nghttpx**: `-n1`, `--frontend='…;no-tls'`, `--backend='…;;proto=http/1.1'` or `proto=h2`.
* **squid**: one process (`-N`), `cache deny all`, `access_log none`, CONNECT allowed between 127.0.0.0/8 addresses on the bench ports.
* **socat**: `TCP-LISTEN:…,fork,reuseaddr TCP:…` (a process per connection, default 8 KiB buffer).
* **wireguard-go**: one per namespace, `GOMAXPROCS=1`, MTU 1420, over the same veth pair (MTU 1500) as the HBONE and nginx tunnels.
* Origins (endpoints' CPU): `iperf3 -s`; nginx serving 1 KiB, 1 MiB and a sparse 64 GiB file (sendfile, keep-alive) over HTTP/1.1 and prior-knowledge h2c.
* Load (endpoints' CPU): `iperf3` (1 stream); `wrk -t1` (-c64 keep-alive, or -c32 with `Connection: close`); `h2load -t1 -c16 -m10`; `curl --http1.1` for the bulk TLS row (cut at the run's length; rate = bytes ÷ time); `benches/compare_client.rs` (rustls, TLS 1.3 only, no resumption, 32 concurrent connections) for handshakes/s and tunnels/s, as the CONNECT driver for iperf3 (splice(2); what it costs shows in "driver only") and to hold idle connections (1 byte each way) for the memory rows (VmRSS of the proxy, or nginx worker, before and after).
* Proxy CPU % = CPU time of the proxy's processes and their children (both ends for the namespace tunnels) ÷ wall time; 100 = the whole proxy core."""
