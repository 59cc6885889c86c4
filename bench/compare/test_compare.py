"""Unit tests of the comparison tool's parsing and aggregation: `python3 -m unittest
discover -s bench/compare` (no root, no network, no peers needed)."""

import contextlib
import io
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
from measure import (MeasureError, parse_curl_speed, parse_h2load, parse_iperf3, parse_rate,  # noqa: E402
                     parse_rss_kib, parse_stat_ticks, parse_wrk)
from report import Results, aggregate, fmt, ratios, table  # noqa: E402

WRK = """Running 2s test @ http://127.0.0.1:21002/1k.bin
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  212.33us   4.81ms   80.12%
    Req/Sec    62.10k     1.52k   64.33k    70.00%
  Latency Distribution
     50%    0.98ms
     75%    1.10ms
     90%    1.28ms
     99%  {p99}
  123456 requests in 2.00s, 150.30MB read
{non2xx}Requests/sec:  61728.00
Transfer/sec:     75.15MB
"""

H2LOAD = """finished in 2.00s, 45678.50 req/s, 52.10MB/s
requests: 91357 total, 91357 started, 91357 done, {ok} succeeded, {failed} failed, 0 errored, 0 timeout
status codes: 91357 2xx, 0 3xx, 0 4xx, 0 5xx
"""


class Parsers(unittest.TestCase):
    def test_wrk_units_of_p99(self):
        for p99, ms in [("812.00us", 0.812), ("2.50ms", 2.5), ("1.20s", 1200.0), ("1.00m", 60000.0)]:
            rps, got = parse_wrk(WRK.format(p99=p99, non2xx=""))
            self.assertEqual(rps, 61728.0)
            self.assertAlmostEqual(got, ms)

    def test_wrk_non_2xx_over_one_percent_fails(self):
        ok = WRK.format(p99="1ms", non2xx="  Non-2xx or 3xx responses: 1234\n")
        self.assertEqual(parse_wrk(ok)[0], 61728.0)  # 1 % exactly still counts
        bad = WRK.format(p99="1ms", non2xx="  Non-2xx or 3xx responses: 1235\n")
        with self.assertRaisesRegex(MeasureError, "not 2xx"):
            parse_wrk(bad)

    def test_wrk_without_requests_or_percentiles_fails(self):
        with self.assertRaises(MeasureError):
            parse_wrk("unable to connect to 127.0.0.1:21002 Connection refused\n")
        with self.assertRaises(MeasureError):
            parse_wrk(WRK.format(p99="1ms", non2xx="").replace("99%", "98%"))

    def test_h2load(self):
        self.assertEqual(parse_h2load(H2LOAD.format(ok=91357, failed=0)), 45678.5)
        with self.assertRaisesRegex(MeasureError, "failed or errored"):
            parse_h2load(H2LOAD.format(ok=90000, failed=1357))
        with self.assertRaises(MeasureError):
            parse_h2load("connect error\n")

    def test_iperf3(self):
        self.assertAlmostEqual(parse_iperf3('{"end": {"sum_received": {"bits_per_second": 25.5e9}}}'), 25.5)
        with self.assertRaisesRegex(MeasureError, "iperf3: unable to connect to server"):
            parse_iperf3('{"start": {"connected": []}, "error": "unable to connect to server"}')
        with self.assertRaisesRegex(MeasureError, "no received total"):
            parse_iperf3('{"start": {"connected": []}, "end": {}}')
        with self.assertRaises(MeasureError):
            parse_iperf3("not json")

    def test_curl_and_rate(self):
        self.assertAlmostEqual(parse_curl_speed("1250000000\n"), 10.0)
        with self.assertRaises(MeasureError):
            parse_curl_speed("0")
        self.assertEqual(parse_rate("rate 1234.5 ok 2469 errors 0\n"), 1234.5)
        with self.assertRaises(MeasureError):
            parse_rate("error: connection refused\n")

    def test_proc_files(self):
        # A command name with spaces and parentheses must not shift the fields.
        stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 100 0 0"
        self.assertEqual(parse_stat_ticks(stat), 7 + 3 + 2 + 1)
        self.assertEqual(parse_rss_kib("Name:\tnginx\nVmRSS:\t   12345 kB\n"), 12345)
        with self.assertRaises(MeasureError):
            parse_rss_kib("Name:\tzombie\n")


def sample_results():
    r = Results()
    r.workload("h1k", "HTTP/1.1, 1 KiB", "high", "req/s")
    r.workload("h1k99", "HTTP/1.1, p99", "low", "ms")
    for rnd, (d, o, h, n) in enumerate([(100, 60, 50, 40), (110, 62, 52, 44), (90, 58, 48, None)], 1):
        r.record("h1k", "direct", "direct", rnd, d)
        r.record("h1k", "proxystack", "ours", rnd, o, cpu=100.0)
        r.record("h1k", "haproxy", "peer", rnd, h, cpu=90.0)
        r.record("h1k", "nginx", "peer", rnd, n, cpu=None if n is None else 80.0)
        r.record("h1k99", "proxystack", "ours", rnd, 2.0 + rnd)
        r.record("h1k99", "haproxy", "peer", rnd, 4.0)
    r.skip("h1k", "squid", "squid not installed")
    return r


class Aggregation(unittest.TestCase):
    def test_medians_failures_and_ratios(self):
        rows = {row.variant: row for row in aggregate(sample_results(), "h1k")}
        self.assertEqual(list(rows), ["direct", "proxystack", "haproxy", "nginx"])  # first-run order
        self.assertEqual(rows["proxystack"].median, 60)
        self.assertEqual(rows["nginx"].median, 42)  # the failed round is left out …
        self.assertEqual(rows["nginx"].failed, 1)  # … and counted
        self.assertEqual(rows["haproxy"].cpu, 90.0)
        self.assertEqual(ratios(list(rows.values()), "high"), (100, 50))  # best peer = the highest
        self.assertEqual(ratios(aggregate(sample_results(), "h1k99"), "low"), (None, 4.0))  # lowest

    def test_table(self):
        t = table(sample_results()).splitlines()
        self.assertEqual(t[0].count("|"), 9)
        self.assertIn("| HTTP/1.1, 1 KiB (req/s) | direct | 100 | 90 | 110 | – | – | – |", t)
        self.assertIn("|  | **proxystack** | 60 | 58 | 62 | 0.60× | 1.20× | 100 |", t)
        self.assertIn("|  | nginx | 42 (1 of 3 runs failed) | 40 | 44 | 0.42× | 0.84× | 80 |", t)
        self.assertIn("|  | squid | skipped: squid not installed | | | | | |", t)
        self.assertIn("| HTTP/1.1, p99 (ms, lower is better) | **proxystack** | 4.00 | 3.00 | 5.00 | – | 1.00× | – |", t)
        # CPU µs per request = CPU % / 100 × 10⁶ ÷ rate.
        self.assertIn("proxystack 16666.7 µs (h1k)", t[-1])

    def test_all_rounds_failed(self):
        r = Results()
        r.workload("tcp", "TCP", "high", "Gb/s")
        r.record("tcp", "proxystack", "ours", 1, None)
        self.assertIn("| TCP (Gb/s) | **proxystack** | failed (1 runs) |  |  |  |  | – |", table(r))

    def test_fmt(self):
        self.assertEqual(fmt(12345.6, "req/s"), "12,346")
        self.assertEqual(fmt(3.14159, "Gb/s"), "3.14")
        self.assertEqual(fmt(1234.5, "KiB"), "1,234")


class Arguments(unittest.TestCase):
    def test_defaults_and_bounds(self):
        a = compare.parse_args(["--seconds", "2", "--rounds", "1", "--only", "l4,mem"])
        self.assertEqual((a.seconds, a.rounds, a.groups), (2, 1, ["l4", "mem"]))
        for bad in (["--seconds", "0"], ["--rounds", "21"], ["--only", "l4,nope"], ["--endpoint-cpu", "1", "--proxy-cpu", "1"]):
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                compare.parse_args(bad)

    def test_dry_run_starts_nothing(self):
        text = compare.plan(compare.parse_args(["--dry-run"]))
        self.assertIn("groups: l4, http, h2c, tls, connect, hbone, mem", text)
        self.assertIn("installed:", text)


if __name__ == "__main__":
    unittest.main()
