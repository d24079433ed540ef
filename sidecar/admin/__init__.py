"""The admin listener: health, readiness, metrics, the dashboard and the JSON API.

Reference: docs/admin-api.md and docs/metrics.md.

It reads live state through the snapshot and small status interfaces (:mod:`.readiness`) and
never changes the config itself.
"""

from sidecar.admin.readiness import ListenerState, StatusSources, readiness_report
from sidecar.admin.server import AdminServer, build_app, start_admin

__all__ = ["AdminServer", "ListenerState", "StatusSources", "build_app", "readiness_report",
           "start_admin"]
