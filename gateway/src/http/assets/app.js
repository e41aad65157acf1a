// Outpost status page: one event stream (/events) brings a status document every second;
// the page redraws from it without reloading. Text goes in with textContent only, so a
// bridge error or a device name can never inject markup.
"use strict";

const HOUR = 3600;
const COLORS = ["#7c3aed", "#0891b2", "#be123c", "#15803d", "#a16207"];
const history = { t: [], rateIn: [], rateOut: [], spool: [] };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function rate(x) {
  return (x >= 100 ? x.toFixed(0) : x.toFixed(1)) + "/s";
}

function field(dl, label, value) {
  const d = el("div");
  d.append(el("dt", null, label), el("dd", null, value));
  dl.append(d);
  return d;
}

function renderHeader(s) {
  document.getElementById("gw").textContent = s.gateway_id;
  const clock = s.clock_synchronised === null ? "clock state unknown"
    : s.clock_synchronised ? "clock synchronised" : "clock NOT synchronised";
  document.getElementById("meta").textContent =
    "version " + s.version + " · up " + duration(s.uptime_s) + " · " + clock;
  document.title = "Outpost " + s.gateway_id;
}

function renderBroker(s) {
  const b = s.broker, dl = document.getElementById("broker");
  dl.replaceChildren();
  field(dl, "State", b.accepting ? "accepting" : "NOT answering");
  field(dl, "Listeners", b.listeners.join(", "));
  field(dl, "Clients connected", String(b.clients_connected));
  field(dl, "Messages in", rate(b.rate_in));
  field(dl, "Messages out", rate(b.rate_out));
  field(dl, "Subscriptions", String(b.subscriptions));
  field(dl, "Retained", String(b.retained));
  const p = s.process;
  if (p.rss_bytes !== null) field(dl, "Memory (RSS)", bytes(p.rss_bytes));
  if (p.open_fds !== null) field(dl, "Open files", String(p.open_fds));
}

function renderBridges(s) {
  const box = document.getElementById("bridges");
  if (s.bridges.length === 0) return;
  box.replaceChildren();
  s.bridges.forEach((b, i) => {
    const card = el("div", "bridge");
    card.dataset.name = b.name;
    card.dataset.state = b.connected ? "up" : "down";
    card.dataset.spool = String(b.spool_messages);
    const h = el("h3");
    const swatch = el("span", null, "■");
    swatch.style.color = COLORS[i % COLORS.length];
    const since = b.since_ms > 0 ? " since " + new Date(b.since_ms).toLocaleTimeString() +
      " (" + duration((s.time_ms - b.since_ms) / 1000) + ")" : "";
    h.append(swatch, el("span", null, b.name),
      el("span", "pill state " + (b.connected ? "ok" : "bad"), b.connected ? "link up" : "link down"),
      el("span", "muted", since));
    card.append(h);
    if (b.last_error && !b.connected) card.append(el("p", "error", "Last error: " + b.last_error));
    if (b.cert_expires_in_days !== null && b.cert_expires_in_days !== undefined) {
      const days = b.cert_expires_in_days;
      const text = days < 0 ? "Client certificate EXPIRED " + (-days) + " days ago"
        : "Client certificate expires in " + days + " days";
      const warn = days < 0 || (b.cert_warn_days > 0 && days <= b.cert_warn_days);
      card.append(el("p", warn ? "error cert" : "muted cert", text));
    }
    const dl = el("dl", "grid");
    if (b.address) field(dl, "Cloud", b.address);
    field(dl, "Spool", b.spool_messages + " msgs").className = "spool";
    field(dl, "Spool size", bytes(b.spool_bytes) + " of " + bytes(b.spool_max_bytes));
    field(dl, "Oldest waiting", duration(b.oldest_age_s));
    field(dl, "Drain rate", rate(b.drain_rate));
    field(dl, "Time to empty", b.spool_messages === 0 ? "empty" : duration(b.time_to_empty_s));
    field(dl, "Dead letters", String(b.dead_letters));
    field(dl, "Forwarded", String(b.forwarded));
    const dropped = b.dropped.reduce((a, [, n]) => a + n, 0);
    field(dl, "Dropped", String(dropped));
    card.append(dl);
    box.append(card);
  });
}

function renderDevices(s) {
  if (s.devices.length === 0) return;
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of s.devices) {
    const tr = el("tr", "device");
    tr.dataset.name = d.name;
    tr.dataset.status = d.status;
    const cls = d.status === "online" ? "ok" : d.status === "unknown" ? "" : "bad";
    const state = el("td");
    state.append(el("span", "pill status " + cls, d.status));
    const last = d.last_reading_age_s === null ? "never" : duration(d.last_reading_age_s) + " ago";
    tr.append(el("td", null, d.name), state, el("td", null, last), el("td", "error", d.error || ""));
    body.append(tr);
  }
}

function renderWarnings(s) {
  if (s.warnings.length === 0) return;
  const ol = document.getElementById("warnings");
  ol.replaceChildren();
  for (const w of s.warnings.slice().reverse()) {
    const li = el("li");
    li.append(el("span", "muted", new Date(w.time_ms).toLocaleTimeString() + " " + w.level + " "),
      el("span", null, w.message));
    if (w.repeated > 1) li.append(el("span", "muted", " (×" + w.repeated + ", last shown)"));
    ol.append(li);
  }
}

function push(t, rateIn, rateOut, spool) {
  history.t.push(t); history.rateIn.push(rateIn); history.rateOut.push(rateOut); history.spool.push(spool);
  if (history.t.length > HOUR) {
    history.t.shift(); history.rateIn.shift(); history.rateOut.shift(); history.spool.shift();
  }
}

// Draws series (arrays of numbers, one per sample) as polylines over the last hour.
function chart(svg, series, colors) {
  // The x axis spans the data there is (at least a minute), up to the last hour.
  const end = history.t.length ? history.t[history.t.length - 1] : 0;
  const first = history.t.length ? history.t[0] : 0;
  const span = Math.min(HOUR * 1000, Math.max(60 * 1000, end - first)), start = end - span;
  let max = 1;
  for (const s of series) for (const v of s) if (v > max) max = v;
  svg.replaceChildren();
  series.forEach((s, k) => {
    const pts = [];
    for (let i = 0; i < s.length; i++) {
      if (history.t[i] < start) continue;
      const x = ((history.t[i] - start) / span) * 600;
      const y = 98 - (s[i] / max) * 94;
      pts.push(x.toFixed(1) + "," + y.toFixed(1));
    }
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("stroke", colors[k % colors.length]);
    svg.append(line);
  });
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4"); label.setAttribute("y", "12"); label.setAttribute("font-size", "11");
  label.setAttribute("fill", "#6b6b70");
  label.textContent = "max " + (Number.isInteger(max) ? max : max.toFixed(1)) +
    " · last " + duration(span / 1000);
  svg.append(label);
}

function renderCharts(s) {
  const n = s.bridges.length;
  const spool = [];
  for (let k = 0; k < n; k++) spool.push(history.spool.map((v) => v[k] || 0));
  chart(document.getElementById("chart-spool"), spool, COLORS);
  chart(document.getElementById("chart-rate"), [history.rateIn, history.rateOut], ["#2563eb", "#d97706"]);
  document.getElementById("spool-now").textContent = n
    ? "now " + s.bridges.map((b) => b.name + " " + b.spool_messages).join(", ") : "";
  document.getElementById("rate-now").textContent =
    "now " + rate(s.broker.rate_in) + " / " + rate(s.broker.rate_out);
}

function render(s) {
  renderHeader(s);
  renderBroker(s);
  renderBridges(s);
  renderDevices(s);
  renderWarnings(s);
  renderCharts(s);
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/events");
  es.addEventListener("status", (ev) => {
    let s;
    try { s = JSON.parse(ev.data); } catch (e) { return; }
    const last = history.t.length ? history.t[history.t.length - 1] : 0;
    if (s.time_ms > last) {
      push(s.time_ms, s.broker.rate_in, s.broker.rate_out, s.bridges.map((b) => b.spool_messages));
    }
    render(s);
    live.textContent = "live";
    live.className = "pill ok";
  });
  es.onerror = () => {
    // EventSource reconnects by itself; say that the numbers are not current meanwhile.
    live.textContent = "reconnecting…";
    live.className = "pill warn";
  };
}

fetch("/api/history", { cache: "no-store" })
  .then((r) => (r.ok ? r.json() : []))
  .then((points) => {
    for (const p of points) push(p.t, p.rate_in, p.rate_out, p.spool);
  })
  .catch(() => {})
  .finally(connect);
