"""Processes of a run: start pinned, wait for the port, sample CPU, stop.

Only processes started here are ever signalled (by their own pid), and only namespaces
created here are deleted. `taskset` and `ip netns exec` exec the command, so the pid we hold
is the proxy itself and its CPU time (with its children's) is what we sample.
"""

import os
import subprocess
import time
from pathlib import Path

from measure import parse_rss_kib, parse_stat_ticks

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A variant that did not come up; the message says why (it becomes a "skipped" row)."""


def pid_tree(pid):
    """The pid and all its descendants that are alive now."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += pid_tree(int(k))
    return out


def cpu_ticks(pids):
    total = 0
    for root in pids:
        for pid in pid_tree(root):
            try:
                total += parse_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
            except (OSError, ValueError):
                pass  # exited in between
    return total


def rss_kib(pid):
    return parse_rss_kib(Path(f"/proc/{pid}/status").read_text())


def first_child(pid):
    """nginx's worker (the master's first child): where its connections' memory is."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids = (task / "children").read_text().split()
        if kids:
            return int(kids[0])
    raise StartError(f"pid {pid} has no child")


def listening(port, ns=None):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    p = subprocess.run(prefix + ["ss", "-Hltn", f"( sport = :{port} )"], capture_output=True, text=True, timeout=10)
    return bool(p.stdout.strip())


class Runner:
    def __init__(self, work):
        self.work = Path(work)
        (self.work / "log").mkdir(parents=True, exist_ok=True)
        self.procs = {}  # pid → (name, Popen), every process not yet stopped
        self.namespaces = []

    def log_tail(self, name, n=3):
        try:
            return " ".join((self.work / "log" / f"{name}.log").read_text().strip().splitlines()[-n:])[:200]
        except OSError:
            return ""

    def start(self, name, argv, cpu, ns=None, env=None):
        """Starts argv pinned to `cpu` (in namespace `ns`), output to log/NAME.log; the pid."""
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["taskset", "-c", str(cpu)] + [str(a) for a in argv]
        with open(self.work / "log" / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})})
        self.procs[p.pid] = (name, p)
        return p.pid

    def wait_port(self, pid, port, ns=None, seconds=15):
        """Returns once `port` listens (in `ns`); StartError if `pid` exits or after `seconds`."""
        name, p = self.procs[pid]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise StartError(f"{name} exited at start: {self.log_tail(name)}")
            if listening(port, ns):
                return
            time.sleep(0.1)
        raise StartError(f"{name}: port {port} not open after {seconds} s")

    def stop(self, *pids):
        """TERM, up to 5 s, then KILL; each pid one of ours."""
        live = [self.procs.pop(pid)[1] for pid in pids if pid in self.procs]
        for p in live:
            if p.poll() is None:
                p.terminate()
        for p in live:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def stop_namespaces(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces = []

    def stop_all(self):
        self.stop(*list(self.procs))
        self.stop_namespaces()

    def netns(self, name):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        self.namespaces.append(name)

    def sample(self, pids, measure):
        """Runs measure() and returns (its result, proxy CPU % of `pids`' trees over it)."""
        c0, t0 = cpu_ticks(pids), time.monotonic()
        result = measure()
        c1, t1 = cpu_ticks(pids), time.monotonic()
        cpu = 100 * (c1 - c0) / CLK_TCK / (t1 - t0) if pids else None
        return result, cpu
