// The dashboard's Test buttons (docs/admin-api.md#testing-a-connection). A button POSTs to its
// test endpoint with the session cookie and the session's CSRF token (the scheme every API
// write from a browser uses), then shows the steps in the row below it. No framework; every
// text is set with textContent, so nothing from the answer is ever parsed as HTML.
"use strict";

function testLine(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function showTest(area, status, body) {
  const summary = area.querySelector(".test-summary");
  const list = area.querySelector(".test-steps");
  list.replaceChildren();
  if (status !== 200 || !body || !Array.isArray(body.steps)) {
    summary.className = "test-summary failed";
    summary.textContent = "Not tested: " + (body && body.error ? body.error : "HTTP " + status);
    return;
  }
  summary.className = "test-summary " + (body.ok ? "ok" : "failed");
  summary.textContent = (body.ok ? "Works: " : "Failed: ") + body.url + " (tested at " +
    body.started_at + ")";
  for (const step of body.steps) {
    const item = document.createElement("li");
    item.className = "step " + step.status;
    item.dataset.step = step.step;
    item.dataset.status = step.status;
    item.append(testLine("title", step.title), testLine("state", step.status),
      testLine("ms", step.ms === null ? "" : step.ms + " ms"), testLine("detail", step.detail));
    if (step.certificate) {
      const cert = step.certificate;
      item.append(testLine("certificate", "certificate: " + cert.subject + ", issued by " +
        cert.issuer + ", valid until " + cert.not_after));
    }
    list.append(item);
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.test-button");
  if (!button || button.disabled || !button.dataset.url) {
    return;
  }
  const area = document.getElementById(button.dataset.output);
  button.disabled = true;
  area.hidden = false;
  area.querySelector(".test-steps").replaceChildren();
  const summary = area.querySelector(".test-summary");
  summary.className = "test-summary running";
  summary.textContent = "Testing…";
  try {
    const response = await fetch(button.dataset.url, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: {"X-CSRF-Token": button.dataset.csrf, "Accept": "application/json"},
    });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    showTest(area, response.status, body);
  } catch (error) {
    showTest(area, 0, {error: "the dashboard could not reach the sidecar"});
  } finally {
    button.disabled = false;
  }
});
