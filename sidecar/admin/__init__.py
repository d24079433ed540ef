"""The admin listener (design §6): health, readiness and metrics; later the dashboard and API.

It reads live state through the snapshot and small status interfaces (:mod:`.readiness`) and
never changes the config itself.
"""

from sidecar.admin.readiness import ListenerState, StatusSources, readiness_report
from sidecar.admin.server import AdminServer, build_app, start_admin

__all__ = ["AdminServer", "ListenerState", "StatusSources", "build_app", "readiness_report",
           "start_admin"]
