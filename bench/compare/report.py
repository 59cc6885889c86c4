"""Results of a comparison run and the markdown table made from them.

Nothing here starts a process or reads a file: the unit tests drive it with made-up samples.
"""

import statistics
from dataclasses import dataclass, field
from typing import Optional

# Units whose values are counts per second: printed without decimals, and used for the
# "CPU time per operation" note under the table.
RATES = ("req/s", "conn/s", "tunnels/s")


@dataclass
class Workload:
    key: str
    title: str
    better: str  # "high" or "low"
    unit: str


@dataclass
class Sample:
    key: str
    variant: str
    kind: str  # "direct" (no proxy), "ours", "peer" or "info" (shown, never compared)
    round: int
    value: Optional[float]  # None: the run failed
    cpu: Optional[float] = None  # proxy CPU %, None where no proxy ran


@dataclass
class Results:
    workloads: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    skips: list = field(default_factory=list)  # (key, variant, why)
    failures: list = field(default_factory=list)  # one line each

    def workload(self, key, title, better, unit):
        assert better in ("high", "low"), better
        self.workloads.append(Workload(key, title, better, unit))

    def record(self, key, variant, kind, rnd, value, cpu=None):
        self.samples.append(Sample(key, variant, kind, rnd, value, cpu))

    def skip(self, key, variant, why):
        self.skips.append((key, variant, why))


def fmt(value, unit):
    if unit in RATES:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


@dataclass
class Row:
    """One variant of one workload, aggregated over its rounds."""

    variant: str
    kind: str
    values: list
    cpus: list
    failed: int

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    @property
    def cpu(self):
        return statistics.median(self.cpus) if self.cpus else None


def aggregate(results, key):
    """The rows of workload `key`, in the order their variants first ran."""
    rows = {}
    for s in results.samples:
        if s.key != key:
            continue
        row = rows.setdefault(s.variant, Row(s.variant, s.kind, [], [], 0))
        if s.value is None:
            row.failed += 1
            continue
        row.values.append(s.value)
        if s.cpu is not None:
            row.cpus.append(s.cpu)
    return list(rows.values())


def ratios(rows, better):
    """(median of direct, best peer median): what the "× direct" and "× best peer" columns
    divide by; None where there is none."""
    direct = next((r.median for r in rows if r.kind == "direct" and r.values), None)
    peers = [r.median for r in rows if r.kind == "peer" and r.values]
    best = (max(peers) if better == "high" else min(peers)) if peers else None
    return direct, best


def table(results):
    """The markdown table: one line per (workload, variant), then the CPU-per-operation note."""
    out = [
        "| Workload | Variant | Median | Min | Max | × direct | × best peer | Proxy CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for w in results.workloads:
        rows = aggregate(results, w.key)
        direct, best = ratios(rows, w.better)
        label = f"{w.title} ({w.unit}{', lower is better' if w.better == 'low' else ''})"
        for r in rows:
            name = f"**{r.variant}**" if r.kind == "ours" else r.variant
            cpu = f"{r.cpu:.0f}" if r.cpu is not None else "–"
            m = r.median
            if m is None:
                cells = [f"failed ({r.failed} runs)", "", "", "", "", cpu]
            else:
                compared = r.kind not in ("direct", "info")
                rd = f"{m / direct:.2f}×" if direct and compared else "–"
                rp = f"{m / best:.2f}×" if best and compared else "–"
                cells = [fmt(m, w.unit), fmt(min(r.values), w.unit), fmt(max(r.values), w.unit), rd, rp, cpu]
                if r.failed:
                    cells[0] += f" ({r.failed} of {r.failed + len(r.values)} runs failed)"
                if w.unit in RATES and r.cpu is not None and m > 0 and compared:
                    notes.append(f"{r.variant} {r.cpu / 100 * 1e6 / m:.1f} µs ({w.key})")
            out.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
            label = ""
        for key, variant, why in results.skips:
            if key == w.key:
                out.append(f"| {label} | {variant} | skipped: {why.replace('|', '/')} | | | | | |")
                label = ""
    if notes:
        out += ["", "Proxy CPU time per request / connection / tunnel (CPU % × 10⁴ ÷ rate): " + "; ".join(notes) + "."]
    return "\n".join(out)
