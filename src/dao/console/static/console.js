// The console's pages, kept live. Each page is rendered by the server; this script fetches the same JSON the
// page was drawn from (/api/...), listens to /api/live (server-sent events) and redraws what changed.
"use strict";

const CSRF = document.querySelector("meta[name=csrf]").content;

async function api(method, path, body) {
  const init = { method, headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const doc = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((doc && doc.error) || response.statusText);
  return doc;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function size(n) {
  if (n == null) return "-";
  for (const [unit, f] of [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= f) return (n / f).toFixed(1) + " " + unit;
  }
  return n + " B";
}

function pct(used, total) { return total ? (100 * used) / total : 0; }

function fullestDisk(sample) {
  let best = 0;
  for (const d of Object.values(sample.disks || {})) best = Math.max(best, pct(d.used, d.total));
  return best;
}

function statusOf(host) { return host.online ? "online" : host.revoked ? "revoked" : "offline"; }

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}

// "12:34" left until a capsule's end (or "ended"), in a span that tick() keeps counting down.
function countdown(endsAt) {
  const span = el("span", { class: "countdown", "data-ends": String(endsAt) });
  tickOne(span);
  return span;
}

function tickOne(span) {
  const s = Math.round(Number(span.dataset.ends) - Date.now() / 1000);
  if (s <= 0) { span.textContent = "ended"; return; }
  const m = Math.floor(s / 60);
  span.textContent = (m >= 60 ? Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") : m) + ":" + String(s % 60).padStart(2, "0") + " left";
}

setInterval(() => document.querySelectorAll(".countdown").forEach(tickOne), 1000);

function live(onMessage) {
  const source = new EventSource("/api/live");
  source.onmessage = (e) => onMessage(JSON.parse(e.data));
  return source;
}

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// -- My hosts -------------------------------------------------------------------------------------------------

function hostsPage() {
  const body = document.querySelector("#hosts tbody");
  async function refresh() {
    const hosts = await api("GET", "/api/hosts");
    body.replaceChildren();
    if (!hosts.length) {
      body.append(el("tr", { class: "empty" }, el("td", { colSpan: 10 }, "No hosts yet. ", el("a", { href: "/hosts/add" }, "Add one"), ".")));
      return;
    }
    for (const h of hosts) {
      const m = h.metrics;
      const state = statusOf(h);
      body.append(el("tr", { "data-host": h.id },
        el("td", {}, el("a", { href: "/hosts/" + h.id }, h.name)),
        el("td", { class: "status " + state }, state === "online" ? "online" : state + " (seen " + ago(h.last_seen) + ")",
          ...(h.expires_at ? [el("br"), "capsule, ", countdown(h.expires_at)] : [])),
        el("td", {}, (h.facts.os || "") + " " + (h.facts.kernel || "")),
        el("td", {}, (h.facts.cpus || "?") + " / " + size(h.facts.mem_total)),
        el("td", {}, (h.facts.docker || "-") + " / " + h.version),
        el("td", { class: "cpu" }, m ? m.cpu.toFixed(0) + " %" : "-"),
        el("td", { class: "mem" }, m ? pct(m.mem_used, m.mem_total).toFixed(0) + " %" : "-"),
        el("td", { class: "disk" }, m ? fullestDisk(m).toFixed(0) + " %" : "-"),
        el("td", { class: "containers" }, h.facts.provider
          ? `lends capsules (${h.facts.provider.running} of ${h.facts.provider.max} at the last hello)`
          : h.counts.running + " running / " + h.counts.total),
        el("td", {}, Object.entries(h.labels || {}).map(([k, v]) => k + "=" + v).join(", ")),
      ));
    }
  }
  refresh();
  const later = debounce(refresh, 300);
  live(later);
  setInterval(refresh, 15000); // "seen ... ago" and offline-by-silence
}

// -- Add host -------------------------------------------------------------------------------------------------

function addHostPage() {
  const button = document.getElementById("new-token");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const made = await api("POST", "/api/hosts/enroll-token");
      const pre = document.getElementById("install-command");
      pre.textContent = made.command;
      pre.hidden = false;
      document.getElementById("token-note").hidden = false;
    } catch (err) {
      alert(err.message);
    } finally {
      button.disabled = false;
    }
  });
  const capsuleButton = document.getElementById("new-capsule");
  const list = document.getElementById("capsules");
  async function capsules() {
    const found = await api("GET", "/api/capsules");
    list.replaceChildren(...found.map((c) => el("li", { "data-capsule": c.id, "data-host": c.host || "" },
      el("a", { href: "/hosts/" + c.host }, "capsule " + c.id), " ", c.ended ? "ended" : countdown(c.expires_at))));
  }
  capsuleButton.addEventListener("click", async () => {
    const said = document.getElementById("capsule-said");
    capsuleButton.disabled = true;
    said.textContent = "making your capsule host…";
    said.className = "hint";
    try {
      const made = await api("POST", "/api/capsules", {});
      said.textContent = `capsule ${made.id} is up: it is one of your hosts now`;
      await capsules();
    } catch (err) {
      said.textContent = err.message;
      said.className = "error";
    } finally {
      capsuleButton.disabled = false;
    }
  });
  capsules();
}

// -- Host detail ----------------------------------------------------------------------------------------------

// A canvas cleared and scaled to the screen's pixels: its 2D context and its size in CSS pixels.
function surface(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  return { g, w, h };
}

function drawChart(canvas, series, opts) {
  const { g, w, h } = surface(canvas);
  const left = 44, right = 8, top = 8, bottom = 18;
  const t0 = opts.from, t1 = opts.to;
  let max = opts.max || 0;
  for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
  if (!max) max = 1;
  g.strokeStyle = "#e3e7ee"; g.fillStyle = "#667085"; g.font = "11px system-ui";
  for (const f of [0, 0.5, 1]) {
    const y = top + (1 - f) * (h - top - bottom);
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    g.fillText(opts.format(max * f), 2, y + 4);
  }
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (w - left - right);
  const y = (v) => top + (1 - v / max) * (h - top - bottom);
  g.fillText(new Date(t0 * 1000).toLocaleTimeString(), left, h - 4);
  const end = new Date(t1 * 1000).toLocaleTimeString();
  g.fillText(end, w - right - g.measureText(end).width, h - 4);
  for (const s of series) {
    g.strokeStyle = s.color; g.lineWidth = 1.5; g.beginPath();
    let last = null;
    for (const [t, v] of s.points) {
      if (last === null || t - last > opts.gap) g.moveTo(x(t), y(v)); else g.lineTo(x(t), y(v));
      last = t;
    }
    g.stroke();
  }
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
}

function hostPage() {
  const host = JSON.parse(document.getElementById("host-data").textContent);
  const base = "/api/hosts/" + host.id;
  let range = "1h";
  let samples = [];

  function setStatus(state) {
    const badge = document.getElementById("status");
    badge.textContent = state;
    badge.className = "badge status " + state;
  }

  function charts() {
    const now = Date.now() / 1000;
    const span = range === "1h" ? 3600 : 86400;
    // From the first sample when the host is younger than the range: a new host's chart is not a dot.
    const first = samples.length ? samples[0].at : now;
    const from = Math.max(now - span, Math.min(first, now - 60));
    const interval = samples.length > 1 ? (samples[samples.length - 1].at - first) / (samples.length - 1) : 10;
    const opts = { from, to: now, gap: Math.max(3 * interval, span === 3600 ? 35 : 900) };
    const pctFmt = (v) => v.toFixed(0) + "%";
    const at = (f) => samples.map((s) => [s.at, f(s)]);
    drawChart(document.getElementById("chart-cpu"), [{ color: "#0b63ce", points: at((s) => s.cpu) }], { ...opts, max: 100, format: pctFmt });
    drawChart(document.getElementById("chart-mem"), [{ color: "#7a5af8", points: at((s) => pct(s.mem_used, s.mem_total)) }], { ...opts, max: 100, format: pctFmt });
    drawChart(document.getElementById("chart-disk"), [{ color: "#dc6803", points: at(fullestDisk) }], { ...opts, max: 100, format: pctFmt });
    drawChart(document.getElementById("chart-net"), [
      { color: "#12805c", points: at((s) => s.net_rx) }, { color: "#b42318", points: at((s) => s.net_tx) },
    ], { ...opts, format: (v) => size(v) });
  }

  async function loadSamples() {
    samples = (await api("GET", base + "/samples?range=" + range)).samples;
    charts();
  }

  const said = (text, bad) => {
    const line = document.getElementById("labels-said");
    line.textContent = text;
    line.className = bad ? "error" : "hint";
  };

  function containers(list) {
    const body = document.querySelector("#containers tbody");
    body.replaceChildren();
    for (const c of list) {
      const running = c.state === "running";
      const actions = el("td", {});
      for (const action of running ? ["stop", "restart", "logs"] : ["start", "remove", "logs"]) {
        actions.append(el("button", { "data-action": action, "data-container": c.id, type: "button" }, action));
      }
      body.append(el("tr", { "data-container": c.id, "data-name": c.name },
        el("td", {}, c.name), el("td", {}, c.image),
        el("td", { class: "state state-" + c.state }, c.state), el("td", {}, c.status), actions));
    }
  }

  function images(list) {
    const body = document.querySelector("#images tbody");
    body.replaceChildren();
    for (const i of list) {
      body.append(el("tr", {}, el("td", {}, (i.tags || []).join(", ") || "<none>"),
        el("td", {}, i.id.replace("sha256:", "").slice(0, 12)), el("td", {}, size(i.size))));
    }
  }

  function events(list) {
    const ul = document.getElementById("events");
    ul.replaceChildren();
    for (const e of list.slice(-30).reverse()) {
      const when = e.time ? new Date(e.time * 1000).toLocaleTimeString() : "";
      ul.append(el("li", {}, `${when} ${e.type} ${e.action} ${e.name || e.id.slice(0, 12)}` + (e.exitCode ? ` (exit ${e.exitCode})` : "")));
    }
  }
  let eventList = host.events || [];

  let logSource = null;
  function closeLogs() {
    if (logSource) logSource.close();
    logSource = null;
    document.getElementById("logs-panel").hidden = true;
  }
  function openLogs(id) {
    closeLogs();
    const row = document.querySelector(`tr[data-container="${id}"]`);
    document.getElementById("logs-name").textContent = row ? row.dataset.name : id;
    const pre = document.getElementById("logs");
    pre.textContent = "";
    document.getElementById("logs-panel").hidden = false;
    logSource = new EventSource(`${base}/containers/${encodeURIComponent(id)}/logs`);
    logSource.onmessage = (e) => { pre.textContent += JSON.parse(e.data); pre.scrollTop = pre.scrollHeight; };
    logSource.addEventListener("end", () => { pre.textContent += "\n[the container's output ended]\n"; logSource.close(); });
    logSource.addEventListener("failed", (e) => { pre.textContent += "\n[" + JSON.parse(e.data) + "]\n"; logSource.close(); });
  }
  document.getElementById("logs-close").addEventListener("click", closeLogs);

  document.getElementById("containers").addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button) return;
    const { action, container } = button.dataset;
    if (action === "logs") return openLogs(container);
    if (action === "remove" && !confirm("Remove this container?")) return;
    button.disabled = true;
    try {
      await api("POST", `${base}/containers/${encodeURIComponent(container)}/${action}`);
    } catch (err) {
      alert(`${action}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });

  document.getElementById("pull-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = document.getElementById("pull-output");
    out.hidden = false;
    out.textContent = "";
    const response = await fetch(base + "/pull", {
      method: "POST", credentials: "same-origin",
      headers: { "X-CSRF-Token": CSRF, "Content-Type": "application/json" },
      body: JSON.stringify({ ref: document.getElementById("pull-ref").value }),
    });
    if (!response.ok) { out.textContent = (await response.json()).error; return; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        const doc = JSON.parse(line);
        if ("output" in doc) out.textContent += doc.output;
        else out.textContent += doc.ok ? "done\n" : "failed: " + doc.result + "\n";
      }
    }
  });

  document.getElementById("clean-plan").addEventListener("click", async () => {
    const box = document.getElementById("clean-out");
    box.replaceChildren(el("p", { class: "hint" }, "reading the host's engine ..."));
    let made;
    try { made = await api("POST", base + "/clean/plan"); } catch (err) { box.replaceChildren(el("p", { class: "error" }, err.message)); return; }
    const plan = made.plan;
    const table = el("table", { class: "grid", id: "clean-plan-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "Kind"), el("th", {}, "Name"), el("th", {}, "Reason"), el("th", {}, "Size"))));
    const tbody = el("tbody");
    for (const item of plan.items) tbody.append(el("tr", {}, el("td", {}, item.kind), el("td", {}, item.name || item.id.slice(0, 19)), el("td", {}, item.reason), el("td", {}, size(item.size))));
    table.append(tbody);
    const summary = el("p", { id: "clean-summary" }, plan.items.length ? `${plan.items.length} items; would free ${size(plan.size)}` : "nothing to clean");
    box.replaceChildren(summary, table);
    if (!plan.items.length) return;
    const apply = el("button", { class: "primary", id: "clean-apply", type: "button" }, "Apply exactly this plan");
    apply.addEventListener("click", async () => {
      apply.disabled = true;
      try {
        const result = await api("POST", base + "/clean/apply", { plan_id: made.plan_id });
        const skipped = result.skipped.length ? `, skipped ${result.skipped.length}` : "";
        const failed = result.failed.length ? `, ${result.failed.length} failed` : "";
        box.append(el("p", { id: "clean-result" }, `removed ${result.removed.length} items${skipped}${failed}, freed ${size(result.size)}`));
      } catch (err) {
        box.append(el("p", { class: "error" }, err.message));
      }
    });
    box.append(apply);
  });

  document.getElementById("labels-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const labels = {};
    for (const part of document.getElementById("labels").value.split(",")) {
      if (!part.trim()) continue;
      const [k, ...v] = part.split("=");
      labels[k.trim()] = v.join("=").trim();
    }
    try { await api("PUT", base + "/labels", { labels }); said("saved"); } catch (err) { said(err.message, true); }
  });

  document.getElementById("revoke").addEventListener("click", async () => {
    if (!confirm("Revoke this host? Its agent stops at once.")) return;
    try { await api("POST", base + "/revoke"); setStatus("revoked"); } catch (err) { alert(err.message); }
  });

  for (const button of document.querySelectorAll(".range button")) {
    button.addEventListener("click", () => {
      range = button.dataset.range;
      for (const b of document.querySelectorAll(".range button")) b.classList.toggle("on", b === button);
      loadSamples();
    });
  }

  containers(host.containers || []);
  images(host.images || []);
  events(eventList);
  setStatus(statusOf(host));
  loadSamples();
  live((m) => {
    if (m.kind === "reload") return location.reload();
    if (m.host !== host.id) return;
    if (m.kind === "state") { containers(m.data.containers); images(m.data.images); }
    else if (m.kind === "event") { eventList.push(m.data); events(eventList); }
    else if (m.kind === "metrics") { if (range === "1h") { samples.push(m.data); charts(); } }
    else if (m.kind === "online" || m.kind === "offline") setStatus(m.kind);
  });
}

// -- Accelerator ----------------------------------------------------------------------------------------------

function barChart(canvas, bars) {
  const { g, w, h } = surface(canvas);
  const max = Math.max(1, ...bars.map((b) => b.value));
  const slot = (w - 60) / Math.max(bars.length, 1);
  g.font = "11px system-ui"; g.fillStyle = "#667085";
  g.fillText(size(max), 2, 12);
  bars.forEach((b, i) => {
    const bh = (b.value / max) * (h - 34);
    g.fillStyle = "#0b63ce";
    g.fillRect(56 + i * slot + 4, h - 18 - bh, Math.min(Math.max(slot - 8, 2), 80), bh);
    g.fillStyle = "#667085";
    g.fillText(b.label, 56 + i * slot + 4, h - 4);
  });
  canvas.dataset.bars = String(bars.length);
}

function acceleratorPage() {
  let accel = JSON.parse(document.getElementById("accel-data").textContent);
  const said = (text, bad) => {
    const line = document.getElementById("quota-said");
    line.textContent = text;
    line.className = bad ? "error" : "hint";
  };
  function draw() {
    document.getElementById("usage").textContent = size(accel.used) + " of " + (accel.quota ? size(accel.quota) : "no limit");
    barChart(document.getElementById("chart-months"), accel.months.map((m) => ({ label: m.month, value: m.bytes })));
    const body = document.querySelector("#my-requests tbody");
    body.replaceChildren();
    for (const r of accel.requests) {
      body.append(el("tr", {}, el("td", {}, new Date(r.created_at * 1000).toLocaleString()), el("td", {}, size(r.quota_bytes)),
        el("td", {}, r.reason), el("td", { class: "status" }, r.status)));
    }
  }
  let pending = async () => {}; // the admin's table of waiting requests, when this user is an admin
  async function refresh() { accel = await api("GET", "/api/accelerator"); draw(); await pending(); }
  draw();
  setInterval(refresh, 10000);
  document.getElementById("reissue").addEventListener("click", async () => {
    if (accel.address && !confirm("Issue a new address? The current one stops working.")) return;
    const made = await api("POST", "/api/accelerator/address");
    document.getElementById("address").textContent = made.address || "issued (the console does not know the accelerator's URL)";
    await refresh();
  });
  document.getElementById("quota-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("POST", "/api/accelerator/quota-requests", {
        quota: document.getElementById("quota-wanted").value, reason: document.getElementById("quota-reason").value,
      });
      said("sent: an admin will answer it");
      await refresh();
    } catch (err) { said(err.message, true); }
  });
  const admin = document.getElementById("admin");
  if (!admin) return;
  const pendingBody = document.querySelector("#pending-requests tbody");
  pending = async () => {
    const rows = await api("GET", "/api/admin/quota-requests");
    pendingBody.replaceChildren();
    for (const r of rows) {
      const act = el("td", {});
      for (const verdict of ["approve", "decline"]) {
        const b = el("button", { type: "button", "data-verdict": verdict }, verdict);
        b.addEventListener("click", async () => {
          try { await api("POST", `/api/admin/quota-requests/${r.id}/${verdict}`); } catch (err) { alert(err.message); }
          refresh();
        });
        act.append(b);
      }
      pendingBody.append(el("tr", { "data-request": r.id }, el("td", {}, r.user), el("td", {}, size(r.quota_bytes)),
        el("td", {}, r.reason), el("td", {}, new Date(r.created_at * 1000).toLocaleString()), act));
    }
    if (!rows.length) pendingBody.append(el("tr", {}, el("td", { colSpan: 5 }, "none waiting")));
  };
  pending();
}

// -- Apps -----------------------------------------------------------------------------------------------------

function appsPage() {
  const box = document.getElementById("apps");
  let names = {};
  let ends = {};
  async function refresh() {
    const [apps, hosts] = await Promise.all([api("GET", "/api/apps"), api("GET", "/api/hosts")]);
    names = Object.fromEntries(hosts.map((h) => [h.id, h.name]));
    ends = Object.fromEntries(hosts.filter((h) => h.expires_at).map((h) => [h.id, h.expires_at]));
    box.replaceChildren();
    if (!apps.length) box.append(el("p", { class: "hint" }, "No apps yet."));
    for (const a of apps) {
      const table = el("table", { class: "grid" },
        el("thead", {}, el("tr", {}, el("th", {}, "Service"), el("th", {}, "Image"), el("th", {}, "Running"), el("th", {}, "Replicas"))));
      const body = el("tbody");
      for (const [name, s] of Object.entries(a.services)) {
        const running = s.placed.filter((p) => p.state === "running").length;
        const where = el("td", {});
        for (const p of s.placed) {
          const how = p.draining ? "draining" : p.state === "running" && !p.ready ? "starting" : p.state;
          where.append(el("div", { class: "replica", "data-host": p.host, "data-replica": String(p.replica) },
            `#${p.replica} on ${names[p.host] || p.host}: ${how}`, ...(ends[p.host] ? [" (capsule, ", countdown(ends[p.host]), ")"] : [])));
        }
        for (const p of s.pending) where.append(el("div", { class: "pending" }, `#${p.replica} pending: ${p.why}`));
        const scale = el("input", { type: "number", min: 0, max: 100, value: s.replicas, class: "scale", title: "replicas" });
        scale.addEventListener("change", async () => {
          await api("POST", `/api/apps/${encodeURIComponent(a.name)}/scale`, { replicas: { [name]: Number(scale.value) } });
          refresh();
        });
        body.append(el("tr", { "data-service": name }, el("td", {}, name), el("td", {}, s.image),
          el("td", { class: "running" }, `${running}/${s.replicas} `, scale), where));
      }
      table.append(body);
      const remove = el("button", { class: "danger", type: "button" }, "Delete");
      remove.addEventListener("click", async () => {
        if (!confirm(`Delete ${a.name}? Its replicas are removed from your hosts.`)) return;
        await api("DELETE", `/api/apps/${a.name}`);
        refresh();
      });
      const edit = el("button", { type: "button" }, "Edit");
      edit.addEventListener("click", () => {
        document.getElementById("app-name").value = a.name;
        document.getElementById("app-compose").value = a.compose;
      });
      const toggle = el("button", { type: "button", class: "toggle" }, a.stopped ? "Start" : "Stop");
      toggle.addEventListener("click", async () => {
        await api("POST", `/api/apps/${encodeURIComponent(a.name)}/${a.stopped ? "start" : "stop"}`, {});
        refresh();
      });
      const errors = Object.entries(a.errors || {}).map(([k, v]) => el("p", { class: "error" }, `${k}: ${v}`));
      const title = el("h3", {}, el("a", { href: "/apps/" + encodeURIComponent(a.name) }, a.name), a.stopped ? " (stopped) " : " ", edit, " ", toggle, " ", remove);
      box.append(el("div", { class: "app", "data-app": a.name }, title, table, ...errors));
    }
  }
  document.getElementById("app-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) document.getElementById("app-compose").value = await file.text();
  });
  document.getElementById("deploy-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const said = document.getElementById("deploy-said");
    const name = document.getElementById("app-name").value;
    try {
      await api("PUT", `/api/apps/${encodeURIComponent(name)}`, { compose: document.getElementById("app-compose").value });
      said.textContent = `deployed ${name}`;
      said.className = "hint";
      refresh();
    } catch (err) {
      said.textContent = err.message;
      said.className = "error";
    }
  });
  refresh();
  live(debounce(refresh, 300));
  setInterval(refresh, 5000);
}

// -- One app --------------------------------------------------------------------------------------------------

function appPage() {
  const first = JSON.parse(document.getElementById("app-data").textContent);
  const path = "/api/apps/" + encodeURIComponent(first.name);
  let names = {};
  let ends = {};
  let logSource = null;

  function closeLogs() {
    if (logSource) logSource.close();
    logSource = null;
    document.getElementById("logs-panel").hidden = true;
  }

  function openLogs(p) {
    closeLogs();
    document.getElementById("logs-name").textContent = `${p.container} on ${names[p.host] || p.host}`;
    const pre = document.getElementById("logs");
    pre.textContent = "";
    document.getElementById("logs-panel").hidden = false;
    logSource = new EventSource(`/api/hosts/${p.host}/containers/${encodeURIComponent(p.container)}/logs`);
    logSource.onmessage = (e) => { pre.textContent += JSON.parse(e.data); pre.scrollTop = pre.scrollHeight; };
    logSource.addEventListener("end", () => { pre.textContent += "\n[the replica's output ended]\n"; logSource.close(); });
    logSource.addEventListener("failed", (e) => { pre.textContent += "\n[" + JSON.parse(e.data) + "]\n"; logSource.close(); });
  }

  function draw(a) {
    const body = document.querySelector("#replicas tbody");
    body.replaceChildren();
    for (const [service, s] of Object.entries(a.services)) {
      for (const p of s.placed) {
        const logs = el("button", { type: "button", class: "logs" }, "Logs");
        logs.addEventListener("click", () => openLogs(p));
        const health = p.draining ? "draining" : p.ready ? "ready" : p.state === "running" ? "starting" : "-";
        body.append(el("tr", { "data-service": service, "data-replica": String(p.replica), "data-host": p.host },
          el("td", {}, service), el("td", {}, "#" + p.replica),
          el("td", {}, el("a", { href: "/hosts/" + p.host }, names[p.host] || p.host), ...(ends[p.host] ? [" (capsule, ", countdown(ends[p.host]), ")"] : [])),
          el("td", { class: "state" }, p.state + (p.status ? " · " + p.status : "")), el("td", { class: "health" }, health),
          el("td", {}, p.endpoints.join(", ") || "-"), el("td", {}, logs)));
      }
    }
    const pending = document.getElementById("app-pending");
    pending.replaceChildren(
      ...Object.entries(a.services).flatMap(([service, s]) => s.pending.map((p) => el("p", { class: "pending" }, `${service} #${p.replica} pending: ${p.why}`))),
      ...Object.entries(a.errors || {}).map(([k, v]) => el("p", { class: "error" }, `${k}: ${v}`)));
    document.getElementById("app-events").replaceChildren(...a.events.map((e) =>
      el("li", {}, el("span", { class: "when" }, new Date(e.at * 1000).toLocaleString()), " ", e.text)));
    document.getElementById("app-versions").replaceChildren(...a.versions.map((v, i) =>
      el("li", {}, el("details", {}, el("summary", {}, `version ${a.versions.length - i}, ${new Date(v.at * 1000).toLocaleString()}`),
        el("pre", { class: "command" }, v.compose)))));
  }

  async function refresh() {
    const [a, hosts] = await Promise.all([api("GET", path), api("GET", "/api/hosts")]);
    names = Object.fromEntries(hosts.map((h) => [h.id, h.name]));
    ends = Object.fromEntries(hosts.filter((h) => h.expires_at).map((h) => [h.id, h.expires_at]));
    draw(a);
  }
  document.getElementById("logs-close").addEventListener("click", closeLogs);
  draw(first);
  refresh();
  live(debounce(refresh, 300));
  setInterval(refresh, 5000);
}

const PAGES = { app: appPage, apps: appsPage, hosts: hostsPage, "add-host": addHostPage, host: hostPage, accelerator: acceleratorPage };
const page = PAGES[document.body.dataset.page];
if (page) page();
