// Refreshes the live cells of the Connections page every 10 s (docs/admin-api.md#health-and-trends):
// the light, the token bar, the sparkline, the recent counts, the last error and the summary
// line of red, amber and green connections. The server
// renders them (GET /connections/live); this puts each cell in place of the page's cell of the
// same row and data-live name, so the Test results and the forms are left alone. No framework.
"use strict";

const GLANCE_INTERVAL_MS = 10000;

async function refreshGlance() {
  if (document.hidden) {
    return;
  }
  let response;
  try {
    response = await fetch("/connections/live", {credentials: "same-origin", cache: "no-store"});
  } catch (error) {
    return;  // the sidecar is restarting or gone; the next round tries again
  }
  if (!response.ok) {
    return;
  }
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  const summary = fresh.getElementById("connections-summary");
  const shown = document.getElementById("connections-summary");
  if (summary && shown) {
    shown.replaceWith(document.importNode(summary, true));
  }
  for (const row of fresh.querySelectorAll("tr[id^='connection-']")) {
    const current = document.getElementById(row.id);
    if (!current) {
      continue;  // added since the page was loaded: it appears on the next page load
    }
    for (const cell of row.querySelectorAll("td[data-live]")) {
      const old = current.querySelector(`td[data-live="${cell.dataset.live}"]`);
      if (old) {
        old.replaceWith(document.importNode(cell, true));
      }
    }
  }
  document.body.dataset.refreshed = String(Date.now());
}

setInterval(refreshGlance, GLANCE_INTERVAL_MS);
