"""``fhir-sidecar test``: the Test button on the command line
(docs/command-line.md#testing-connections).

Two ways to run the same steps (:func:`sidecar.check.probe.run.probe_connection`):

- :func:`run_locally`: in this process, against the config file, with token sources of its own
  (so it fetches its own tokens);
- :func:`run_remotely`: inside a running sidecar, through its ``POST
  /api/connections/{name}/test`` with the admin token, for servers that allow one active token
  per client (a token fetched here would revoke the running sidecar's).

Both answer ``{name: report}`` in the API's shape; :func:`as_text` and :func:`as_json` print it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sidecar.check.probe.run import probe_connection
from sidecar.runtime.snapshot import Snapshot

Reports = dict[str, dict[str, Any]]
# A test of one name may run once a second: a busy answer is asked again, at most this long.
BUSY_WAIT_SECONDS = 30.0
# Each step waits at most 20 s; four steps and the way there.
REMOTE_TIMEOUT_SECONDS = 120.0


class TestsNotRun(Exception):
    """The tests could not be run (unknown name, admin listener unreachable or refusing)."""


def unknown_names(known: Sequence[str], names: Sequence[str]) -> list[str]:
    return [name for name in names if name not in known]


async def run_locally(snapshot: Snapshot, names: Sequence[str]) -> Reports:
    """Steps 1-4 for each connection of ``names`` (all when empty), one after the other."""
    chosen = list(names) or sorted(snapshot.connections)
    missing = unknown_names(list(snapshot.connections), chosen)
    if missing:
        raise TestsNotRun(_no_such(missing, sorted(snapshot.connections)))
    reports: Reports = {}
    try:
        for name in chosen:
            reports[name] = await probe_connection(snapshot, name, fresh=False)
    finally:
        for source in snapshot.token_sources.values():
            await source.aclose()
    return reports


def run_remotely(admin_url: str, admin_token: str, names: Sequence[str]) -> Reports:
    """The same steps inside the sidecar at ``admin_url`` (its live token sources: the cached
    token is reused, none is fetched while it is usable)."""
    import httpx

    headers = {"Authorization": f"Bearer {admin_token}"}
    try:
        with httpx.Client(base_url=admin_url.rstrip("/"), headers=headers, trust_env=False,
                          timeout=REMOTE_TIMEOUT_SECONDS) as client:
            listed = client.get("/api/connections")
            _require_ok(listed, admin_url)
            known = sorted(c["name"] for c in listed.json()["items"])
            chosen = list(names) or known
            missing = unknown_names(known, chosen)
            if missing:
                raise TestsNotRun(_no_such(missing, known))
            return {name: _post_test(client, name, admin_url) for name in chosen}
    except httpx.HTTPError as exc:
        raise TestsNotRun(f"cannot reach the admin listener at {admin_url}: "
                          f"{type(exc).__name__}: {exc}") from None


def _post_test(client: Any, name: str, admin_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    while True:
        answer = client.post(f"/api/connections/{name}/test")
        if answer.status_code != 429 or time.monotonic() > deadline:
            break
        # Another test of this connection runs now or ran within the second: its turn comes.
        time.sleep(min(float(answer.headers.get("Retry-After") or 1), 5.0))
    _require_ok(answer, admin_url)
    report: dict[str, Any] = answer.json()
    return report


def _require_ok(answer: Any, admin_url: str) -> None:
    if answer.status_code == 200:
        return
    try:
        said = answer.json().get("error") or answer.text
    except ValueError:
        said = answer.text
    raise TestsNotRun(f"the admin listener at {admin_url} answered {answer.status_code}: "
                      f"{str(said).strip()[:300]}")


def _no_such(missing: list[str], known: list[str]) -> str:
    return (f"no connection named {', '.join(repr(m) for m in missing)} "
            f"(known: {', '.join(known) or 'none'})")


def all_passed(reports: Reports) -> bool:
    return all(report["ok"] for report in reports.values())


def as_json(reports: Reports) -> str:
    """``{"connections": {NAME: {"ok": bool, "steps": [...]}}}``, steps as the API has them."""
    return json.dumps({"connections": {name: {"ok": r["ok"], "steps": r["steps"]}
                                       for name, r in reports.items()}}, indent=2)


def as_text(reports: Reports) -> str:
    """Each connection's verdict, then each step with its time and detail, as the dashboard
    shows them."""
    lines: list[str] = []
    width = max((len(s["step"]) for r in reports.values() for s in r["steps"]), default=0)
    for name, report in reports.items():
        lines.append(f"{name}: {'ok' if report['ok'] else 'FAILED'} ({report['url']})")
        for step in report["steps"]:
            took = "" if step["ms"] is None else f"{step['ms']:g} ms"
            lines.append(f"  {step['step']:<{width}}  {step['status']:<7}  {took:>10}  "
                         f"{step['detail']}")
    return "\n".join(lines)
