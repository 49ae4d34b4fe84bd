// The mesh dashboard: polls /api/view (one scrape of every process's admin
// port, made by shopctl) and draws the service graph, each service's golden
// metrics over time, endpoints by state, retries, ejections and processes.

/** One row of `shopctl top`: rates over the scrape window. */
interface Row {
  rps: number;
  success_rate: number | null;
  p50_ms: number | null;
  p95_ms: number | null;
  p99_ms: number | null;
  responses: number;
}
interface ServiceRow extends Row {
  service: string;
}
interface EdgeRow extends Row {
  from: string;
  to: string;
}
interface TargetRow {
  from: string;
  to: string;
  endpoints: Record<string, number>;
  ejections_total: number;
  ejections: number;
  retries_total: number;
  retries_per_second: number;
}
interface Process {
  service: string;
  replica: number;
  address: string;
  pid: number | null;
  state: string;
  restarts: number;
  last_exit: string | null;
}
interface View {
  seq: number;
  unix_ms: number;
  window_seconds: number;
  services: ServiceRow[];
  edges: EdgeRow[];
  targets: TargetRow[];
  unreachable: string[];
  warming_up: string[];
  processes?: Process[];
}

const SVG = "http://www.w3.org/2000/svg";
/** Samples kept per series: two minutes at one scrape a second. */
const HISTORY = 120;
/** Events kept in the log. */
const EVENTS = 50;
/** Where the shop's services sit in the graph (the two callers on the
 *  left, fanning out to the three callees on the right); others go on a
 *  circle. */
const PLACES: Record<string, [number, number]> = {
  gateway: [90, 110],
  orders: [90, 330],
  auth: [540, 60],
  inventory: [540, 210],
  payments: [540, 360],
};
/** How far an edge bows from the straight line (to its left); the one
 *  that would cross inventory goes around it. */
const BOW: Record<string, number> = { "payments>auth": 80 };

const series = new Map<string, { rps: number[]; success: number[]; p99: number[] }>();
let lastSeq = 0;
/** Non-ready endpoint counts per target at the previous view, for events. */
const lastOut = new Map<string, string>();

const $ = (id: string) => document.getElementById(id) as HTMLElement;

function el<K extends keyof HTMLElementTagNameMap>(tag: K, text?: string, cls?: string) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svg(tag: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

const pct = (v: number | null) => (v === null ? "-" : `${(v * 100).toFixed(v === 1 ? 0 : 1)}%`);
const ms = (v: number | null) => (v === null ? "-" : `${v < 10 ? v.toFixed(2) : v.toFixed(0)} ms`);
const rate = (v: number) => `${v.toFixed(1)} rps`;

/** Green, amber or red for a success rate (grey without traffic). */
function health(success: number | null): string {
  if (success === null) return "idle";
  if (success >= 0.99) return "good";
  if (success >= 0.9) return "warn";
  return "bad";
}

function place(name: string, i: number, n: number): [number, number] {
  return PLACES[name] ?? [350 + 150 * Math.cos((2 * Math.PI * i) / n), 210 + 150 * Math.sin((2 * Math.PI * i) / n)];
}

function drawGraph(view: View) {
  const graph = $("graph");
  const box = svg("svg", { viewBox: "0 0 760 420", role: "img", "aria-label": "service graph" });
  const defs = svg("defs", {});
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.append(marker);
  box.append(defs);

  // Every edge the mesh knows of: those with calls in the window and those
  // whose caller holds endpoints of the callee (a channel, idle or not).
  const edges = new Map<string, { from: string; to: string; row?: EdgeRow; target?: TargetRow }>();
  for (const t of view.targets) edges.set(`${t.from}>${t.to}`, { from: t.from, to: t.to, target: t });
  for (const e of view.edges) {
    const key = `${e.from}>${e.to}`;
    edges.set(key, { ...(edges.get(key) ?? { from: e.from, to: e.to }), row: e });
  }
  const names = [...new Set([...view.services.map((s) => s.service), ...[...edges.values()].flatMap((e) => [e.from, e.to])])].sort();
  const at = new Map(names.map((n, i) => [n, place(n, i, names.length)]));
  const R = 38;

  for (const { from, to, row, target } of edges.values()) {
    const [x1, y1] = at.get(from)!;
    const [x2, y2] = at.get(to)!;
    const len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const [ux, uy] = [(x2 - x1) / len, (y2 - y1) / len];
    // A slight curve, so two edges between the same nodes do not overlap.
    const bow = BOW[`${from}>${to}`] ?? 12;
    const [mx, my] = [(x1 + x2) / 2 - uy * bow, (y1 + y2) / 2 + ux * bow];
    const [sx, sy, ex, ey] = [x1 + ux * R, y1 + uy * R, x2 - ux * (R + 4), y2 - uy * (R + 4)];
    const notReady = target ? Object.entries(target.endpoints).filter(([s, n]) => s !== "ready" && n > 0) : [];
    const g = svg("g", {
      class: `edge ${health(row?.success_rate ?? null)}${notReady.length ? " degraded" : ""}`,
      "data-from": from,
      "data-to": to,
      "data-rps": (row?.rps ?? 0).toFixed(3),
      "data-success": row?.success_rate ?? "",
      "data-p99": row?.p99_ms ?? "",
    });
    g.append(svg("path", { d: `M ${sx} ${sy} Q ${mx} ${my} ${ex} ${ey}`, class: "line", "marker-end": "url(#arrow)" }));
    const label = `${rate(row?.rps ?? 0)} · ${pct(row?.success_rate ?? null)} · p99 ${ms(row?.p99_ms ?? null)}`;
    const [lx, ly] = [(sx + 2 * mx + ex) / 4, (sy + 2 * my + ey) / 4];
    // A bowed edge's label goes beside its bow, clear of the node it avoids.
    const anchor = `${from}>${to}` in BOW ? "start" : "middle";
    const tx = anchor === "start" ? lx + 6 : lx;
    g.append(svg("text", { x: tx, y: ly - 4, class: "edge-label", "text-anchor": anchor }, label));
    if (notReady.length) {
      const text = notReady.map(([s, n]) => `${n} ${s}`).join(", ");
      g.append(svg("text", { x: tx, y: ly + 10, class: "edge-alert", "text-anchor": anchor }, text));
    }
    box.append(g);
  }
  for (const name of names) {
    const [x, y] = at.get(name)!;
    const s = view.services.find((s) => s.service === name);
    const g = svg("g", { class: `node ${health(s?.success_rate ?? null)}`, "data-service": name });
    g.append(svg("circle", { cx: x, cy: y, r: R }));
    g.append(svg("text", { x, y: y - 2, "text-anchor": "middle", class: "node-name" }, name));
    g.append(svg("text", { x, y: y + 14, "text-anchor": "middle", class: "node-rate" }, s ? rate(s.rps) : "edge"));
    box.append(g);
  }
  graph.replaceChildren(box);
}

function sparkline(values: number[], max: number, cls: string): SVGElement {
  const w = 180;
  const h = 36;
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}`, class: `spark ${cls}` });
  const top = Math.max(max, ...values.filter(Number.isFinite), 1e-9);
  // The newest sample at the right edge; the line grows leftwards.
  const offset = HISTORY - values.length;
  const pts = values.map((v, i) => `${((offset + i) * w) / (HISTORY - 1)},${h - 2 - ((Number.isFinite(v) ? v : 0) / top) * (h - 4)}`);
  box.append(svg("polyline", { points: pts.join(" "), class: "spark-line" }));
  return box;
}

function drawServices(view: View) {
  for (const s of view.services) {
    const h = series.get(s.service) ?? { rps: [], success: [], p99: [] };
    h.rps.push(s.rps);
    h.success.push(s.success_rate === null ? NaN : s.success_rate * 100);
    h.p99.push(s.p99_ms ?? NaN);
    for (const line of [h.rps, h.success, h.p99]) if (line.length > HISTORY) line.shift();
    series.set(s.service, h);
  }
  const cards = [...series.entries()].sort().map(([name, h]) => {
    const now = view.services.find((s) => s.service === name);
    const card = el("div", undefined, `card ${health(now?.success_rate ?? null)}`);
    card.dataset.service = name;
    card.append(el("h3", name));
    const metric = (label: string, value: string, line: SVGElement) => {
      const m = el("div", undefined, "metric");
      m.append(el("span", label, "metric-name"), el("span", value, "metric-value"), line);
      return m;
    };
    card.append(
      metric("requests", now ? rate(now.rps) : "-", sparkline(h.rps, 0, "rps")),
      metric("success", pct(now?.success_rate ?? null), sparkline(h.success, 100, "success")),
      metric("p99", ms(now?.p99_ms ?? null), sparkline(h.p99, 0, "p99")),
    );
    return card;
  });
  $("services").replaceChildren(...cards);
}

const STATES = ["ready", "ejected", "reconnecting", "unhealthy"];

function drawTargets(view: View) {
  const rows = view.targets.map((t) => {
    const tr = el("tr");
    tr.dataset.from = t.from;
    tr.dataset.to = t.to;
    const out = STATES.slice(1).reduce((n, s) => n + (t.endpoints[s] ?? 0), 0);
    tr.dataset.notReady = String(out);
    tr.dataset.ejectionsTotal = String(t.ejections_total);
    if (out > 0) tr.className = "bad";
    tr.append(el("td", `${t.from} → ${t.to}`));
    for (const s of STATES) tr.append(el("td", String(t.endpoints[s] ?? 0), `state-${s}`));
    tr.append(el("td", `${t.ejections_total}${t.ejections ? ` (+${t.ejections})` : ""}`));
    tr.append(el("td", `${t.retries_total} (${t.retries_per_second.toFixed(1)}/s)`));
    return tr;
  });
  $("targets").replaceChildren(...rows);
}

function drawProcesses(view: View) {
  const rows = (view.processes ?? []).map((p) => {
    const tr = el("tr");
    tr.dataset.service = p.service;
    tr.dataset.replica = String(p.replica);
    tr.dataset.state = p.state;
    if (p.state !== "running") tr.className = "bad";
    for (const v of [`${p.service}[${p.replica}]`, p.address, p.pid?.toString() ?? "-", p.state, String(p.restarts), p.last_exit ?? "-"]) {
      tr.append(el("td", v));
    }
    return tr;
  });
  $("processes").replaceChildren(...rows);
  $("processes-box").hidden = rows.length === 0;
}

/** Adds an event line for each change worth a person's attention:
 *  endpoints leaving or rejoining rotation, ejections, unreachable
 *  processes, restarts. */
function logEvents(view: View) {
  const time = new Date(view.unix_ms).toLocaleTimeString();
  const add = (kind: string, text: string) => {
    const li = el("li", `${time} ${text}`, kind);
    li.dataset.kind = kind;
    $("events").prepend(li);
    while ($("events").children.length > EVENTS) $("events").lastElementChild?.remove();
  };
  for (const t of view.targets) {
    const key = `${t.from} → ${t.to}`;
    const out = STATES.slice(1)
      .filter((s) => (t.endpoints[s] ?? 0) > 0)
      .map((s) => `${t.endpoints[s]} ${s}`)
      .join(", ");
    if (out !== (lastOut.get(key) ?? "")) {
      add(out ? "out" : "back", out ? `${key}: endpoints out of rotation: ${out}` : `${key}: every endpoint ready again`);
    }
    lastOut.set(key, out);
    if (t.ejections > 0) add("ejection", `${key}: ${t.ejections} endpoint(s) ejected`);
  }
  for (const addr of view.unreachable) add("unreachable", `admin ${addr} unreachable`);
}

async function refresh() {
  let view: View;
  try {
    const response = await fetch("/api/view", { cache: "no-store" });
    view = await response.json();
  } catch (e) {
    $("updated").textContent = `dashboard unreachable: ${e}`;
    return;
  }
  if (!view.seq || view.seq === lastSeq) return;
  lastSeq = view.seq;
  drawGraph(view);
  drawServices(view);
  drawTargets(view);
  drawProcesses(view);
  logEvents(view);
  const updated = $("updated");
  updated.textContent = `scrape ${view.seq} at ${new Date(view.unix_ms).toLocaleTimeString()}, over ${view.window_seconds.toFixed(1)} s`;
  updated.dataset.seq = String(view.seq);
}

void refresh();
setInterval(refresh, 500);
export {};
