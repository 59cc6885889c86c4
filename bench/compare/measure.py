"""The load generators: how each is run, and how its output is read.

Every `parse_*` function takes the tool's output as text and returns the figures or raises
`MeasureError` saying why the run does not count; the unit tests feed them recorded output.
`Load` runs the tools pinned to the endpoints' CPU, each bounded by a timeout.
"""

import json
import re
import subprocess


class MeasureError(Exception):
    """A measurement that failed or whose output does not count (the reason is the message)."""


def last_lines(text, n=2, width=200):
    return " ".join(text.strip().splitlines()[-n:])[:width]


def parse_iperf3(text):
    """iperf3 -J output → Gb/s received."""
    try:
        report = json.loads(text)
    except ValueError:
        raise MeasureError(f"iperf3: unparsable output: {text[:200]}") from None
    if isinstance(report, dict) and report.get("error"):
        raise MeasureError(f"iperf3: {report['error']}")
    try:
        return report["end"]["sum_received"]["bits_per_second"] / 1e9
    except (KeyError, TypeError):
        raise MeasureError("iperf3: no received total in its report") from None


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text):
    """wrk --latency output → (req/s, p99 ms). More than 1 % non-2xx answers fails the run."""
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not total or int(total.group(1)) == 0:
        raise MeasureError("wrk: no requests: " + last_lines(text))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non2xx and int(non2xx.group(1)) * 100 > int(total.group(1)):
        raise MeasureError(f"wrk: {non2xx.group(1)} of {total.group(1)} responses were not 2xx")
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
    if not rps or not p99:
        raise MeasureError("wrk: unparsable output: " + last_lines(text))
    return float(rps.group(1)), float(p99.group(1)) * _UNIT_MS[p99.group(2)]


def parse_h2load(text):
    """h2load output → req/s. More than 1 % failed or errored requests fails the run."""
    req = re.search(r"^requests: .*?(\d+) succeeded, (\d+) failed, (\d+) errored", text, re.M)
    rps = re.search(r"^finished in [^,]+, ([\d.]+) req/s", text, re.M)
    if not req or not rps:
        raise MeasureError("h2load: unparsable output: " + last_lines(text))
    ok, bad = int(req.group(1)), int(req.group(2)) + int(req.group(3))
    if ok == 0 or bad * 100 > ok:
        raise MeasureError(f"h2load: {ok} succeeded, {bad} failed or errored")
    return float(rps.group(1))


def parse_curl_speed(text):
    """curl -w '%{speed_download}' (bytes/s) → Gb/s."""
    try:
        gbps = float(text.strip()) * 8 / 1e9
    except ValueError:
        raise MeasureError(f"curl: unparsable speed {text[:100]!r}") from None
    if gbps <= 0:
        raise MeasureError("curl: nothing downloaded")
    return gbps


def parse_rate(text):
    """compare_client rate output (`rate <ops/s> ok <n> errors <n>`) → ops/s."""
    m = re.search(r"^rate ([\d.]+)", text, re.M)
    if not m:
        raise MeasureError("compare_client: no rate: " + last_lines(text))
    return float(m.group(1))


def parse_stat_ticks(stat):
    """/proc/PID/stat → utime + stime + cutime + cstime in clock ticks. Children that exited
    were reaped into their parent's cutime/cstime, so summing a tree counts nothing twice.
    The command name (field 2) may hold spaces and parentheses: split after the last ')'."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14.
    return sum(int(f) for f in fields[11:15])


def parse_rss_kib(status):
    """/proc/PID/status → VmRSS in KiB."""
    m = re.search(r"^VmRSS:\s*(\d+) kB", status, re.M)
    if not m:
        raise MeasureError("no VmRSS")
    return int(m.group(1))


class Load:
    """Runs the load generators on the endpoints' CPU for `seconds` each."""

    def __init__(self, cpu, seconds, client, work):
        self.cpu, self.seconds, self.client, self.work = cpu, seconds, client, work

    def _run(self, argv, ns=None, ok=(0,)):
        prefix = ["ip", "netns", "exec", ns] if ns else []
        cmd = prefix + ["taskset", "-c", str(self.cpu)] + argv
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"{argv[0]}: no result after {self.seconds + 30} s") from None
        if p.returncode not in ok:
            raise MeasureError(f"{argv[0]} exit {p.returncode}: " + last_lines(p.stdout + p.stderr))
        return p.stdout

    def iperf3(self, host, port, ns=None):
        """Gb/s of one TCP stream."""
        out = self._run(["iperf3", "-c", host, "-p", str(port), "-t", str(self.seconds), "-J",
                         "--connect-timeout", "5000"], ns)
        return parse_iperf3(out), None

    def wrk(self, conns, url, *headers):
        """(req/s, p99 ms) with one thread and `conns` connections."""
        args = ["wrk", "-t1", f"-c{conns}", f"-d{self.seconds}s", "--timeout", "10s", "--latency"]
        for h in headers:
            args += ["-H", h]
        return parse_wrk(self._run(args + [url]))

    def h2load(self, url):
        """req/s over 16 connections × 10 streams."""
        return parse_h2load(self._run(["h2load", "-t1", "-c16", "-m10", "-D", str(self.seconds), url])), None

    def curl(self, url, *args):
        """Gb/s downloading a file larger than the run: 28 (--max-time) is how each run ends."""
        out = self._run(["curl", "-sS", "--http1.1", "--max-time", str(self.seconds), "-o", "/dev/null",
                         "-w", "%{speed_download}", *args, url], ok=(0, 28))
        return parse_curl_speed(out), None

    def rate(self, *args):
        """compare_client rate: new connections (or TLS handshakes, or tunnels) per second."""
        return parse_rate(self._run([str(self.client), "rate", "--seconds", str(self.seconds), *args])), None
