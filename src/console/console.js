// The admin console: polls the admin API every two seconds and draws what it answers. The
// admin token is typed into the page, kept in this script's memory only, and sent as an
// Authorization header on changes (no cookies, so no CSRF).
"use strict";

const POLL_MS = 2000;
let token = "";

const $ = (id) => document.getElementById(id);

function text(id, value) {
  $(id).textContent = value;
}

function cell(row, value, className) {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${path}: ${answer.error || response.statusText} (HTTP ${response.status})`);
  return answer;
}

async function change(method, path, body) {
  if (!token) {
    show("error", "Type the admin token first.");
    return false;
  }
  const response = await fetch(path, {
    method,
    cache: "no-store",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    show("error", `${method} ${path}: ${answer.error || response.statusText} (HTTP ${response.status})`);
    return false;
  }
  show("ok", `${method} ${path}: done${answer.revision != null ? ` (revision ${answer.revision})` : ""}`);
  refresh();
  return true;
}

function show(kind, message) {
  const box = $("message");
  box.className = kind;
  box.textContent = message;
}

// Prometheus text: the sum of a counter's series whose labels include `want`.
function counter(metrics, name, want) {
  let sum = 0;
  for (const line of metrics.split("\n")) {
    if (!line.startsWith(name + "{")) continue;
    const labels = line.slice(name.length + 1, line.indexOf("}"));
    if (Object.entries(want).every(([k, v]) => labels.includes(`${k}="${v}"`))) {
      sum += Number(line.slice(line.lastIndexOf(" ") + 1)) || 0;
    }
  }
  return sum;
}

function drawStatus(status) {
  text("revision", `revision ${status.revision}`);
  text("legacy-percent", status.routes.legacy_v1_percent);
  text("legacy-source", status.routes.legacy_v1_percent_source === "admin"
    ? `set through the admin API or the ramp (the file says ${status.routes.config_legacy_v1_percent}%)`
    : "from the config file");
  text("pins-v1", status.sessions.active.v1);
  text("pins-v2", status.sessions.active.v2);

  const drain = status.drain;
  const state = $("drain-state");
  state.textContent = drain.drained ? "drained" : "not drained";
  state.className = "big " + (drain.drained ? "drained" : "waiting");
  const progress = $("drain-progress");
  progress.value = drain.quiet_window_seconds > 0 ? Math.min(1, drain.quiet_for_seconds / drain.quiet_window_seconds) : 0;
  const eta = drain.drained_eta ? `; drained at ${new Date(drain.drained_eta).toLocaleString()} at the earliest` : "";
  text("drain-detail", `${drain.v1_active_pins} live v1 pins; v1 quiet for ${duration(drain.quiet_for_seconds)} of ${duration(drain.quiet_window_seconds)}${eta}`
    + (drain.withheld ? `; withheld: ${drain.withheld}` : ""));

  const rows = $("upstream-rows");
  rows.replaceChildren();
  for (const pool of ["v1", "v2"]) {
    for (const u of status.pools[pool].upstreams) {
      const row = document.createElement("tr");
      cell(row, pool);
      cell(row, u.name);
      cell(row, u.url || "");
      cell(row, u.weight, "num");
      cell(row, u.weight_source === "admin" ? `admin (file: ${u.config_weight})` : "config");
      cell(row, u.healthy ? "healthy" : "unhealthy", u.healthy ? "healthy" : "unhealthy");
      const set = cell(row, "");
      const input = document.createElement("input");
      input.type = "number";
      input.min = "0";
      input.className = "weight";
      input.value = u.weight;
      const button = document.createElement("button");
      button.textContent = "Set";
      button.addEventListener("click", () =>
        change("PUT", `/pools/${pool}/upstreams/${encodeURIComponent(u.name)}`, { weight: Number(input.value) }));
      set.append(input, " ", button);
      rows.appendChild(row);
    }
  }

  const fleet = status.fleet;
  $("fleet").hidden = !fleet;
  if (fleet) {
    text("fleet-summary", `fleet revision ${fleet.revision}; store ${fleet.store_up ? "reachable" : "UNREACHABLE"}`);
    const fleetRows = $("fleet-rows");
    fleetRows.replaceChildren();
    for (const r of fleet.replicas) {
      const row = document.createElement("tr");
      cell(row, r.replica + (r.this ? " (this one)" : ""));
      cell(row, `${r.revision}${r.applied ? "" : " (behind)"}`, "num");
      cell(row, `${duration(r.reported_seconds_ago)} ago`);
      fleetRows.appendChild(row);
    }
  }
}

function drawTraffic(metrics) {
  const rows = $("traffic-rows");
  rows.replaceChildren();
  for (const pool of ["v1", "v2"]) {
    const all = counter(metrics, "rollout_requests_total", { pool });
    const errors = counter(metrics, "rollout_requests_total", { pool, code_class: "5xx" });
    const row = document.createElement("tr");
    row.id = `traffic-${pool}`;
    cell(row, pool);
    cell(row, all, "num");
    cell(row, errors, "num");
    cell(row, all > 0 ? `${(100 * errors / all).toFixed(2)}%` : "–", "num");
    rows.appendChild(row);
  }
}

function drawHistory(history) {
  const svg = $("pins-chart");
  svg.replaceChildren();
  const samples = history.samples;
  if (samples.length < 2) {
    text("pins-span", "the chart fills in as the proxy runs");
    return;
  }
  const first = samples[0].at_unix_ms, last = samples[samples.length - 1].at_unix_ms;
  const top = Math.max(1, ...samples.map((s) => Math.max(s.v1, s.v2)));
  for (const pool of ["v1", "v2"]) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("class", pool);
    line.setAttribute("points", samples
      .map((s) => `${(600 * (s.at_unix_ms - first) / Math.max(1, last - first)).toFixed(1)},${(115 - 110 * s[pool] / top).toFixed(1)}`)
      .join(" "));
    svg.appendChild(line);
  }
  text("pins-span", `the last ${duration((last - first) / 1000)}; top of the chart: ${top} pins`);
}

function drawRamp(ramp) {
  if (ramp.state === "none") {
    text("ramp-summary", "No ramp has been started.");
    text("ramp-detail", "");
    return;
  }
  const by = ramp.paused_by ? ` (by ${ramp.paused_by})` : "";
  text("ramp-summary", `${ramp.state}${by}: step ${ramp.step + 1} of ${ramp.steps}, v1 gets ${ramp.v1_percent}% of new sessions`);
  const parts = [];
  if (ramp.state === "progressing" || ramp.state === "paused") parts.push(`${duration(ramp.hold_left_seconds)} left in the hold`);
  const last = ramp.analyses && ramp.analyses[0];
  if (last) parts.push(`last analysis: ${last.judgement.verdict}${last.judgement.reasons.length ? " – " + last.judgement.reasons.join("; ") : ""}`);
  if (ramp.gates && !ramp.gates.open) parts.push("held by its gates");
  if (ramp.stalled) parts.push(ramp.stalled);
  if (ramp.leader && ramp.leader.replica) parts.push(`driven by ${ramp.leader.replica}`);
  text("ramp-detail", parts.join(" · "));
}

function drawAudit(audit) {
  const rows = $("audit-rows");
  rows.replaceChildren();
  for (const e of audit.events) {
    const row = document.createElement("tr");
    cell(row, new Date(e.at_unix_ms).toLocaleTimeString());
    cell(row, e.actor);
    cell(row, e.kind);
    cell(row, e.detail);
    rows.appendChild(row);
  }
}

async function refresh() {
  try {
    const [status, ramp, history, audit, metrics] = await Promise.all([
      getJson("/status"),
      getJson("/ramp"),
      getJson("/history"),
      getJson("/audit"),
      fetch("/metrics", { cache: "no-store" }).then((r) => r.text()),
    ]);
    drawStatus(status);
    drawRamp(ramp);
    drawHistory(history);
    drawAudit(audit);
    drawTraffic(metrics);
    text("updated", `updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.revision = status.revision;
  } catch (error) {
    text("updated", `cannot read the admin API: ${error.message || error}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").addEventListener("input", (event) => { token = event.target.value.trim(); });
  $("percent-apply").addEventListener("click", () => {
    const force = $("percent-force").checked ? "?force=true" : "";
    change("PUT", `/routes/legacy${force}`, { v1_percent: Number($("percent-input").value) });
  });
  $("session-end").addEventListener("click", () => {
    const key = $("session-key").value.trim();
    if (key) change("DELETE", `/sessions/${encodeURIComponent(key)}`);
  });
  for (const button of document.querySelectorAll("[data-ramp]")) {
    button.addEventListener("click", () => change("POST", `/ramp/${button.dataset.ramp}`));
  }
  // The next poll is asked for only once the last one answered, so a slow admin API is not
  // piled up with requests.
  const poll = () => refresh().finally(() => setTimeout(poll, POLL_MS));
  poll();
});
