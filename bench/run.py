"""fhir-sidecar benchmark: five targets side by side, in one run, on this machine.

    /work/venv/bin/python bench/run.py --quick     # c16 only, short runs (~2 minutes)
    /work/venv/bin/python bench/run.py             # c1/c16/c64, keep-alive and new connections

Targets: direct HTTPS to an nginx upstream (the floor), nginx as a reverse proxy with a static
Authorization header (the C reference), plain ``mitmdump --mode reverse`` with ``upstream_auth``,
and fhir-sidecar with Basic and with OAuth (a token endpoint on loopback). Load comes from
``wrk`` (one thread, so the proxies keep a core). Runs are interleaved target by target and
repeated; every number reported is the median of the repeats. Results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from report import Sample
from targets import BENCH_DIR, Bench, Target, cpu_seconds, peak_rss_mib

WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"


@dataclass(frozen=True)
class Scenario:
    keepalive: bool
    concurrency: int

    @property
    def name(self) -> str:
        return f"{'keep-alive' if self.keepalive else 'new-conn'} c{self.concurrency}"


def run_wrk(target: Target, scenario: Scenario, seconds: float) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{scenario.concurrency}", f"-d{max(1, round(seconds))}s",
            "--timeout", "5s", "-s", str(WRK_SCRIPT)]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    if not scenario.keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(target.url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(bench: Bench, target: Target, scenario: Scenario, seconds: float) -> Sample:
    pids = target.proc.pids if target.proc else []
    cpu_before = cpu_seconds(pids)
    tokens_before = target.token_count() if target.token_count else None
    full_before, resumed_before = bench.upstream_handshakes()
    result = run_wrk(target, scenario, seconds)
    cpu = cpu_seconds(pids) - cpu_before
    full_after, resumed_after = bench.upstream_handshakes()
    requests = int(result["requests"])
    rps = requests / (result["duration_us"] / 1e6)
    errors = int(sum(result[k] for k in result if k.startswith("errors_")))
    tokens = None
    if target.token_count is not None and tokens_before is not None:
        tokens = target.token_count() - tokens_before
    return Sample(
        target=target.key, scenario=scenario.name, rps=rps,
        p50_ms=result["p50_us"] / 1000, p99_ms=result["p99_us"] / 1000,
        cpu_ms_per_req=cpu * 1000 / requests if target.proc and requests else None,
        peak_rss_mib=peak_rss_mib(pids) if target.proc else None,
        token_requests=tokens, errors=errors, requests=requests,
        upstream_full=full_after - full_before, upstream_resumed=resumed_after - resumed_before)


def median_samples(samples: list[Sample]) -> Sample:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    first = samples[0]
    tokens = [s.token_requests for s in samples if s.token_requests is not None]
    return Sample(
        target=first.target, scenario=first.scenario,
        rps=statistics.median(s.rps for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        cpu_ms_per_req=med([s.cpu_ms_per_req for s in samples]),
        peak_rss_mib=max((s.peak_rss_mib for s in samples if s.peak_rss_mib), default=None),
        token_requests=sum(tokens) if tokens else None,
        errors=sum(s.errors for s in samples), requests=sum(s.requests for s in samples),
        upstream_full=sum(s.upstream_full for s in samples),
        upstream_resumed=sum(s.upstream_resumed for s in samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="c16 only, shorter runs: a quick before/after check")
    parser.add_argument("--seconds", type=float, help="length of one load run")
    parser.add_argument("--repeats", type=int, help="repeats per target and scenario")
    parser.add_argument("--targets", default="direct,nginx,mitmdump,sidecar-basic,sidecar-oauth",
                        help="also: sidecar-callers (Basic, with a workload token per request), "
                        "sidecar-audit (Basic, with the audit file on)")
    parser.add_argument("--token-lifetime", type=int, default=300,
                        help="expires_in of the bench token endpoint, seconds")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--baseline-src", type=Path,
                        help="directory with the sidecar package before a change: adds target "
                             "sidecar-before (Basic) for a before/after in the same run")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install -y nginx wrk)")
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    repeats = args.repeats or 3
    concurrencies = [16] if args.quick else [1, 16, 64]
    scenarios = [Scenario(ka, c) for ka in (True, False) for c in concurrencies]
    wanted = args.targets.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="fhir-sidecar-bench-"))
    bench = Bench(workdir, token_lifetime=args.token_lifetime)
    started = time.time()
    try:
        bench.start_upstream()
        if "direct" in wanted:
            bench.add_direct()
        if "nginx" in wanted:
            bench.add_nginx_proxy()
        if "mitmdump" in wanted:
            bench.add_mitmdump()
        if "sidecar-oauth" in wanted:
            bench.start_token_server()
        if "sidecar-basic" in wanted:
            bench.add_sidecar("basic")
        if "sidecar-oauth" in wanted:
            bench.add_sidecar("oauth")
        if "sidecar-callers" in wanted:
            bench.add_sidecar("basic", callers=True)
        if "sidecar-audit" in wanted:
            bench.add_sidecar("basic", audit=True)
        if args.baseline_src is not None:
            bench.add_sidecar("basic", source=args.baseline_src.resolve())
        bench.check_targets()
        # Streaming first, on fresh processes: after load, RSS sits at its high-water mark and
        # a stream would reuse that memory, hiding any growth.
        streaming = {}
        for target in bench.targets:
            if target.key in ("mitmdump", "sidecar-basic"):
                streaming[target.key] = bench.stream_big(target)
        oauth_started = time.monotonic()
        tokens_at_start = bench.tokens_issued() if "sidecar-oauth" in wanted else 0
        for target in bench.targets:  # warm up: imports, caches, first handshakes
            run_wrk(target, Scenario(True, 4), 1.0)

        raw: list[Sample] = []
        for rep in range(repeats):
            for scenario in scenarios:
                for target in bench.targets:  # interleaved: noise from others hits all alike
                    sample = measure(bench, target, scenario, seconds)
                    raw.append(sample)
                    print(f"[{rep + 1}/{repeats}] {scenario.name:15} {target.key:14} "
                          f"{sample.rps:9.0f} req/s  p50 {sample.p50_ms:7.2f} ms  "
                          f"p99 {sample.p99_ms:7.2f} ms  errors {sample.errors}", flush=True)

        extras: dict[str, object] = {}
        ready = {t.key: round(t.proc.ready_seconds, 3) for t in bench.targets
                 if t.proc and t.proc.ready_seconds is not None}
        extras["start_to_ready_s"] = ready
        if "sidecar-oauth" in wanted:
            elapsed = time.monotonic() - oauth_started
            extras["oauth_tokens"] = {
                "issued_during_load": bench.tokens_issued() - tokens_at_start,
                "issued_total": bench.tokens_issued(),
                "load_seconds": round(elapsed, 1), "token_lifetime_s": args.token_lifetime}
        extras["streaming_100mb"] = streaming
        extras["peak_rss_mib"] = {t.key: round(peak_rss_mib(t.proc.pids), 1)
                                  for t in bench.targets if t.proc}
    finally:
        bench.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    medians = []
    for scenario in scenarios:
        for key in [t.key for t in bench.targets]:
            group = [s for s in raw if s.target == key and s.scenario == scenario.name]
            medians.append(median_samples(group))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds_per_run": seconds, "repeats": repeats, **extras}
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "medians": [asdict(s) for s in medians],
         "raw": [asdict(s) for s in raw]}, indent=1))
    text = report.markdown(medians, meta, [t.key for t in bench.targets])
    (args.out / "results.md").write_text(text)
    written = "results.md, results.json"
    if importlib.util.find_spec("matplotlib") is None:
        print("no chart: matplotlib is not installed (.venv/bin/pip install matplotlib)")
    else:
        report.chart(medians, [t.key for t in bench.targets], args.out / "results.png")
        written += ", results.png"
    print()
    print(text)
    print(f"written: {args.out}/{{{written}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
