"""Profile fhir-sidecar's hot path with py-spy while wrk loads it.

    /work/venv/bin/python bench/profile.py                 # keep-alive and new-conn, c16
    /work/venv/bin/python bench/profile.py --target mitmdump
    .venv/bin/python bench/profile.py --page json-400k [--baseline-src DIR]  # a searchset page

Writes, per scenario, a flame graph (``profile-<target>-<scenario>.svg``) and a text summary of
the functions with the most self and inclusive samples (``profile-<target>-<scenario>.txt``)
into ``bench/results/``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import PAGES
from run import Scenario, run_wrk
from run_pages import page_target
from targets import BENCH_DIR, Bench


def summarize(collapsed: Path, top: int = 40) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                  if " (" in f else f for f in stack.split(";")]
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    lines = [f"total samples: {total}", "", "top self:"]
    lines += [f"{c * 100 / total:6.1f}%  {f}" for f, c in self_counts.most_common(top)]
    lines += ["", "top inclusive:"]
    lines += [f"{c * 100 / total:6.1f}%  {f}" for f, c in incl_counts.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["sidecar-basic", "sidecar-oauth", "mitmdump"],
                        default="sidecar-basic")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--page", choices=[p.key for p in PAGES],
                        help="load a searchset page (bench/pages.py) with wrk -c4 keep-alive "
                             "instead of the Patient read")
    parser.add_argument("--baseline-src", type=Path,
                        help="profile the sidecar package in this directory instead")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fhir-sidecar-profile-"))
    bench = Bench(workdir)
    try:
        page = next((p for p in PAGES if p.key == args.page), None)
        bench.start_upstream([page] if page else [])
        if args.target == "mitmdump":
            bench.add_mitmdump()
        else:
            if args.target == "sidecar-oauth":
                bench.start_token_server()
            source = args.baseline_src.resolve() if args.baseline_src else None
            bench.add_sidecar(args.target.removeprefix("sidecar-"), source=source)
        bench.check_targets()
        target = bench.targets[0]
        if page is not None:
            target = page_target(target, page)
        assert target.proc is not None
        run_wrk(target, Scenario(True, 4), 1.0)
        scenarios = [Scenario(True, args.concurrency), Scenario(False, args.concurrency)]
        if page is not None:
            scenarios = [Scenario(True, 4)]
        for scenario in scenarios:
            stem = f"profile-{args.target}-{scenario.name.replace(' ', '-')}"
            if page is not None:
                stem += f"-{page.key}" + ("-before" if args.baseline_src else "")
            collapsed = workdir / f"{stem}.collapsed"
            base = [py_spy, "record", "--pid", str(target.proc.popen.pid), "--rate", "250",
                    "--duration", str(args.seconds), "--nonblocking"]
            spies = [subprocess.Popen([*base, "--format", "raw", "-o", str(collapsed)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
            result = run_wrk(target, scenario, args.seconds)
            for spy in spies:
                spy.wait(timeout=args.seconds + 30)
            rps = result["requests"] / (result["duration_us"] / 1e6)
            text = f"{args.target} {scenario.name}: {rps:.0f} req/s under profiling\n\n"
            text += summarize(collapsed)
            (args.out / f"{stem}.txt").write_text(text)
            shutil.copy(collapsed, args.out / f"{stem}.collapsed")
            print(text[:4000])
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
