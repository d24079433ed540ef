"""FHIR-shaped traffic: searchset pages through the sidecar, side by side, in one run.

    .venv/bin/python bench/run_pages.py                      # 3 s x 3 interleaved repeats
    .venv/bin/python bench/run_pages.py --baseline-src DIR   # also the sidecar package in DIR

Pages (bench/pages.py): Observation searchsets of 8 KB, 80 KB, 400 KB and 6 MB in JSON and
400 KB in XML, links before entries, fullUrls under the upstream base, served by the same
HTTPS nginx upstream as bench/run.py. Targets: the sidecar as configured by default
(``rewrite_links`` on), the sidecar with ``rewrite_links: false``, plain mitmdump and direct
HTTPS to nginx. Load: ``wrk -t1 -c4`` keep-alive; targets interleaved per page and repeat, so
the load of others on the machine hits all of them alike. Every number is the median of the
repeats. RSS of each proxy is sampled every 20 ms while it serves the 6 MB page.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import PAGES, Page, body, next_link
from run import Scenario, run_wrk
from targets import (
    BASIC_AUTHORIZATION,
    BENCH_DIR,
    PAGES_PATH,
    PATIENT_PATH,
    Bench,
    Target,
    _opener,
    cpu_seconds,
    rss_mib,
)

LABELS = {"sidecar": "sidecar (default)", "sidecar-norewrite": "sidecar, rewrite_links off",
          "sidecar-before": "sidecar before", "mitmdump": "plain mitmdump",
          "direct": "nginx direct (HTTPS)"}
KEEPALIVE_C4 = Scenario(True, 4)


@dataclass
class PageSample:
    target: str
    page: str
    rps: float
    mb_per_s: float
    p50_ms: float
    cpu_ms_per_req: float | None
    rss_growth_mib: float | None
    errors: int
    requests: int


def page_target(target: Target, page: Page) -> Target:
    return replace(target, url=target.url.replace(PATIENT_PATH, PAGES_PATH + page.file_name))


def check(bench: Bench, target: Target, page: Page) -> None:
    """The target answers the page: unchanged, or (the sidecar) with only its links
    rewritten -- otherwise the numbers would compare different work."""
    upstream = bench.fhir_base
    original = body(upstream, page)
    request = urllib.request.Request(page_target(target, page).url, headers=target.headers)
    trusting = ssl.create_default_context(cafile=str(bench.pki.ca_bundle_path))
    with _opener(trusting).open(request, timeout=60) as answer:
        got = answer.read()
        status = answer.status
    if status != 200:
        raise RuntimeError(f"{target.key} answered {status} for {page.key}")
    buffered = len(original) <= 1024 * 1024
    if target.key == "sidecar" or (target.key == "sidecar-before" and buffered):
        app = target.url.split(PATIENT_PATH)[0]
        expected = original.replace(
            (f'"url":"{upstream}' if not page.xml else f'<url value="{upstream}').encode(),
            (f'"url":"{app}' if not page.xml else f'<url value="{app}').encode())
        if got != expected:
            raise RuntimeError(f"{target.key}: {page.key} not rewritten as expected")
        if next_link(app, page).replace("&", "&amp;" if page.xml else "&").encode() not in got:
            raise RuntimeError(f"{target.key}: {page.key} next link not rewritten")
    elif got != original:
        raise RuntimeError(f"{target.key}: {page.key} changed on the way")


class RssSampler:
    """Highest VmRSS of each target's processes while :meth:`watch` is on."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = [t for t in targets if t.proc]
        self.peak: dict[str, float] = {}
        self._on = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._on.is_set():
                for target in self.targets:
                    assert target.proc is not None
                    rss = rss_mib(target.proc.pids)
                    self.peak[target.key] = max(self.peak.get(target.key, 0.0), rss)
            time.sleep(0.02)

    def watch(self, on: bool) -> None:
        (self._on.set if on else self._on.clear)()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(target: Target, page: Page, size: int, seconds: float,
            sampler: RssSampler | None, baseline: dict[str, float]) -> PageSample:
    pids = target.proc.pids if target.proc else []
    cpu_before = cpu_seconds(pids)
    if sampler is not None:
        sampler.peak.pop(target.key, None)
        sampler.watch(True)
    result = run_wrk(page_target(target, page), KEEPALIVE_C4, seconds)
    if sampler is not None:
        sampler.watch(False)
    cpu = cpu_seconds(pids) - cpu_before
    requests = int(result["requests"])
    rps = requests / (result["duration_us"] / 1e6)
    growth = None
    if sampler is not None and target.key in sampler.peak:
        growth = sampler.peak[target.key] - baseline[target.key]
    return PageSample(
        target=target.key, page=page.key, rps=rps, mb_per_s=rps * size / 1e6,
        p50_ms=result["p50_us"] / 1000,
        cpu_ms_per_req=cpu * 1000 / requests if target.proc and requests else None,
        rss_growth_mib=growth, errors=int(sum(result[k] for k in result
                                              if k.startswith("errors_"))),
        requests=requests)


def median(samples: list[PageSample]) -> PageSample:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    first = samples[0]
    growth = [s.rss_growth_mib for s in samples if s.rss_growth_mib is not None]
    return PageSample(
        target=first.target, page=first.page,
        rps=statistics.median(s.rps for s in samples),
        mb_per_s=statistics.median(s.mb_per_s for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        cpu_ms_per_req=med([s.cpu_ms_per_req for s in samples]),
        rss_growth_mib=max(growth) if growth else None,
        errors=sum(s.errors for s in samples), requests=sum(s.requests for s in samples))


def _ratio(rows: list[PageSample], a: str, b: str, page: str) -> float | None:
    ra = next((r for r in rows if r.target == a and r.page == page), None)
    rb = next((r for r in rows if r.target == b and r.page == page), None)
    if ra is None or rb is None or not rb.rps:
        return None
    return ra.rps / rb.rps


def markdown(rows: list[PageSample], meta: dict[str, object], order: list[str],
             sizes: dict[str, int]) -> str:
    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    out = [f"Run {meta['started']}: `{meta['command']}` -- wrk -t1 -c4 keep-alive, "
           f"{meta['seconds_per_run']} s per run, median of {meta['repeats']} interleaved "
           f"repeats; load average before/after: {meta['loadavg_before']} / "
           f"{meta['loadavg_after']}.", "",
           "| page | target | req/s | MB/s | p50 ms | CPU ms/req | RSS growth MiB | errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for page in PAGES:
        for key in order:
            row = next((r for r in rows if r.target == key and r.page == page.key), None)
            if row is None:
                continue
            out.append(f"| {page.label} ({sizes[page.key] / 1000:.0f} kB) | {LABELS[key]} | "
                       f"{row.rps:.0f} | {row.mb_per_s:.1f} | {row.p50_ms:.2f} | "
                       f"{fmt(row.cpu_ms_per_req)} | {fmt(row.rss_growth_mib, 1)} | "
                       f"{row.errors} |")
    out += ["", "| page | default / rewrite off | default / mitmdump | default / before |",
            "|---|---:|---:|---:|"]
    for page in PAGES:
        ratios = [_ratio(rows, "sidecar", other, page.key)
                  for other in ("sidecar-norewrite", "mitmdump", "sidecar-before")]
        out.append(f"| {page.label} | " + " | ".join(fmt(r) for r in ratios) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pages", default=",".join(p.key for p in PAGES))
    parser.add_argument("--baseline-src", type=Path,
                        help="directory with the sidecar package before a change: adds "
                             "target sidecar-before (rewrite_links on) to the same run")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install -y nginx wrk)")
    pages = [p for p in PAGES if p.key in args.pages.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="fhir-sidecar-pages-"))
    bench = Bench(workdir)
    started = time.time()
    loadavg_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    raw: list[PageSample] = []
    sampler: RssSampler | None = None
    try:
        bench.start_upstream(pages)
        bench.add_sidecar("basic", key="sidecar")
        bench.add_sidecar("basic", rewrite_links=False, key="sidecar-norewrite")
        if args.baseline_src is not None:
            bench.add_sidecar("basic", source=args.baseline_src.resolve())
        bench.add_mitmdump()
        bench.targets.append(Target("direct", "nginx direct", bench.base + PATIENT_PATH, None,
                                    headers={"Authorization": BASIC_AUTHORIZATION}))
        for page in pages:
            for target in bench.targets:
                check(bench, target, page)
        for target in bench.targets:  # warm up: imports, caches, handshakes
            for page in pages:
                run_wrk(page_target(target, page), KEEPALIVE_C4, 1.0)
        sizes = {p.key: len(body(bench.fhir_base, p)) for p in pages}
        sampler = RssSampler(bench.targets)
        baseline = {t.key: rss_mib(t.proc.pids) for t in bench.targets if t.proc}
        for rep in range(args.repeats):
            for page in pages:
                watch = page.key == "json-6m"
                for target in bench.targets:
                    sample = measure(target, page, sizes[page.key], args.seconds,
                                     sampler if watch else None, baseline)
                    raw.append(sample)
                    print(f"[{rep + 1}/{args.repeats}] {page.key:10} {target.key:18} "
                          f"{sample.rps:8.0f} req/s {sample.mb_per_s:8.1f} MB/s  "
                          f"errors {sample.errors}", flush=True)
    finally:
        if sampler is not None:
            sampler.close()
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    order = [t.key for t in bench.targets]
    rows = [median([s for s in raw if s.target == key and s.page == page.key])
            for page in pages for key in order]
    meta: dict[str, object] = {
        "command": " ".join(["python", "bench/run_pages.py", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds_per_run": args.seconds, "repeats": args.repeats,
        "loadavg_before": loadavg_before,
        "loadavg_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "cpus": os.cpu_count(), "page_bytes": sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pages.json").write_text(json.dumps(
        {"meta": meta, "medians": [r.__dict__ for r in rows],
         "raw": [s.__dict__ for s in raw]}, indent=1))
    text = markdown(rows, meta, order, sizes)
    (args.out / "pages.md").write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
