// vitserve's page: try the model, read its card, watch it live. Plain DOM, no library, nothing from another host.
// Every figure comes from the service's own API: /info, /metrics and POST /classify. Text is set with textContent,
// never parsed as HTML, so a label or an error message can hold anything.
"use strict";

const KEY = "vitserve-api-key";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = (x, digits = 4) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
const pct = (x, digits = 2) => (x === null || x === undefined ? "–" : (100 * x).toFixed(digits) + " %");

class NeedsKey extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("Authorization", "Bearer " + key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askForKey(key ? "That key was not accepted." : "");
    throw new NeedsKey();
  }
  return response;
}

// ---- API key ------------------------------------------------------------------------------------------------------
function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value.trim());
  $("key-form").hidden = true;
  start();
});

// ---- try it -------------------------------------------------------------------------------------------------------
async function classify(files) {
  const images = [...files].filter((f) => f.size > 0);
  if (!images.length) return;
  $("try-error").textContent = "";
  $("results").replaceChildren();
  $("try-status").textContent = `Classifying ${images.length} image${images.length > 1 ? "s" : ""}…`;
  const form = new FormData();
  for (const f of images) form.append("images", f, f.name || "pasted");
  let response, body;
  try {
    response = await api("/classify", { method: "POST", body: form });
    body = await response.json();
  } catch (e) {
    $("try-status").textContent = "";
    if (!(e instanceof NeedsKey)) $("try-error").textContent = "The service could not be reached: " + e.message;
    return;
  }
  $("try-status").textContent = "";
  if (!response.ok) {
    const err = body && body.error ? body.error : { message: response.statusText };
    const which = err.index !== null && err.index !== undefined && images[err.index] ? ` (${images[err.index].name})` : "";
    $("try-error").textContent = `${response.status}: ${err.message}${which}`;
    return;
  }
  const timings = [];
  for (const [name, value] of response.headers) {
    const m = /^x-vitserve-(.+)-ms$/.exec(name);
    if (m) timings.push(`${m[1]} ${value} ms`);
  }
  const results = $("results");
  results.replaceChildren();
  body.predictions.forEach((p, i) => results.append(resultView(images[i], p)));
  results.append(el("p", { class: "timings muted" }, `${body.model} v${body.version} · batch ${response.headers.get("x-vitserve-batch-size") || "?"} · ${timings.join(" · ")}`));
}

function resultView(file, prediction) {
  const img = el("img", { alt: file.name || "your image" });
  img.src = URL.createObjectURL(file);
  img.onload = () => URL.revokeObjectURL(img.src);
  const bars = el("ol", { class: "bars", "aria-label": "top predictions" });
  for (const p of prediction.top5) {
    bars.append(el("li", {},
      el("span", { class: "name" }, p.label),
      el("span", { class: "track", "aria-hidden": "true" }, el("span", { class: "fill", style: `width:${(100 * p.score).toFixed(1)}%; display:block` })),
      el("span", { class: "score" }, pct(p.score, 1))));
  }
  return el("div", { class: "result", "data-top1": prediction.top1.label },
    img, el("div", {}, el("h3", {}, el("span", { class: "top1" }, prediction.top1.label), " ", el("span", { class: "muted" }, file.name || "")), bars));
}

const drop = $("drop");
$("file-input").addEventListener("change", (e) => classify(e.target.files));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify(e.dataTransfer.files); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); } });
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) classify(files);
});

// ---- model card ---------------------------------------------------------------------------------------------------
function table(head, rows) {
  return el("div", { class: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, head.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c)))))));
}

function cardView(info) {
  const m = info.model, pre = info.preprocessing;
  const size = pre.center_crop || pre.resize_size;
  const engine = info.engine || {};
  const chosen = (info.engine_selection || []).map((a) => {
    const s = a.startup_check;
    return [a.engine, a.file || "–", a.outcome, a.reason || "",
      s ? `${s.passed ? "passed" : "failed"}: ${s.images} images, top-1 agreement ${fmt(s.top1_agreement, 4)}, max |Δlogit| ${fmt(s.max_abs_logit_diff, 5)}` : "–"];
  });
  const gate = (info.gate || []).map((g) => [g.file, `${g.precision} · ${g.device}`,
    g.passed === null ? "not gated" : g.passed ? "passed" : "failed", g.images ?? "–",
    fmt(g.top1_agreement, 4), fmt(g.top1_agreement_ci95_low, 4), fmt(g.max_abs_logit_diff, 5)]);
  const parts = [
    el("dl", { class: "figures" },
      el("div", {}, el("dt", {}, "model"), el("dd", {}, `${m.name} v${m.version}`)),
      el("div", {}, el("dt", {}, "parameters"), el("dd", {}, (m.num_parameters / 1e6).toFixed(1) + " M")),
      el("div", {}, el("dt", {}, "input"), el("dd", {}, `${size[0]}×${size[1]} ${pre.channel_order}`)),
      el("div", {}, el("dt", {}, "classes"), el("dd", {}, info.labels.length)),
      el("div", {}, el("dt", {}, "temperature"), el("dd", {}, fmt(info.temperature, 3))),
      el("div", {}, el("dt", {}, "serving on"), el("dd", { id: "engine-now" }, `${engine.name || engine.engine || "?"}`))),
    el("h3", {}, "Labels"), el("p", { id: "labels" }, info.labels.join(", ")),
    el("h3", {}, "Preprocessing"),
    el("p", {}, `${pre.resize_mode} resize to ${pre.resize_size.join("×")} (${pre.resample})` +
      (pre.center_crop ? `, centre crop ${pre.center_crop.join("×")}` : "") +
      `, × ${fmt(pre.rescale_factor, 5)}, mean ${pre.mean.join(", ")}, std ${pre.std.join(", ")}`),
    el("h3", {}, "Engine serving now, and why"),
    el("p", {}, Object.entries(engine).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ")),
    table(["engine tried", "file", "outcome", "reason", "startup check on this machine"], chosen),
    el("h3", {}, "Export gate against the FP32 model"),
    table(["file", "precision", "gate", "images", "top-1 agreement", "95 % lower bound", "max |Δlogit|"], gate),
  ];
  const ev = info.evaluation;
  parts.push(el("h3", {}, "Evaluation from fine-tuning"));
  if (!ev) {
    parts.push(el("p", { class: "muted" }, "This artifact carries no evaluation (it was exported from a checkpoint without a vitserve finetune run folder)."));
  } else {
    parts.push(el("dl", { class: "figures" },
      el("div", {}, el("dt", {}, `${ev.split} images`), el("dd", {}, ev.images)),
      el("div", {}, el("dt", {}, "top-1"), el("dd", {}, pct(ev.top1))),
      el("div", {}, el("dt", {}, "top-5"), el("dd", {}, pct(ev.top5))),
      el("div", {}, el("dt", {}, "macro-F1"), el("dd", {}, fmt(ev.macro_f1, 3))),
      el("div", {}, el("dt", {}, "ECE"), el("dd", {}, fmt(ev.ece, 4)))));
    if (ev.confusion) {
      parts.push(el("div", { class: "scroll" }, el("table", { class: "confusion", "aria-label": "confusion matrix, rows true class, columns predicted" },
        el("thead", {}, el("tr", {}, el("th", {}, "true \\ predicted"), info.labels.map((l) => el("th", { scope: "col" }, l)))),
        el("tbody", {}, ev.confusion.map((row, i) => el("tr", {}, el("th", { scope: "row" }, info.labels[i]), row.map((n) => el("td", {}, n))))))));
    }
  }
  return parts;
}

// ---- live ---------------------------------------------------------------------------------------------------------
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: parseFloat(m[3]) });
  }
  return samples;
}

const sum = (samples, name, where = () => true) =>
  samples.filter((s) => s.name === name && where(s.labels)).reduce((a, s) => a + s.value, 0);

function buckets(samples, name) {
  const by = new Map();
  for (const s of samples) if (s.name === name) by.set(s.labels.le, (by.get(s.labels.le) || 0) + s.value);
  return [...by.entries()].map(([le, n]) => [le === "+Inf" ? Infinity : parseFloat(le), n]).sort((a, b) => a[0] - b[0]);
}

function quantile(now, before, q) {
  const b0 = new Map(before);
  const d = now.map(([le, n]) => [le, n - (b0.get(le) || 0)]);
  const total = d.length ? d[d.length - 1][1] : 0;
  if (!total) return null;
  let prevLe = 0, prevN = 0;
  for (const [le, n] of d) {
    if (n >= q * total) {
      if (le === Infinity) return prevLe;
      return prevLe + (le - prevLe) * ((q * total - prevN) / Math.max(n - prevN, 1e-9));  // as PromQL interpolates
    }
    prevLe = le; prevN = n;
  }
  return null;
}

let previous = null;
async function poll() {
  let samples;
  try {
    const r = await api("/metrics");
    if (!r.ok) { $("live-note").textContent = `/metrics answered ${r.status}`; return; }
    samples = parseMetrics(await r.text());
  } catch (e) {
    if (!(e instanceof NeedsKey)) $("live-note").textContent = "metrics unavailable: " + e.message;
    return;
  }
  const now = { t: performance.now(), samples, latency: buckets(samples, "vitserve_request_duration_seconds_bucket") };
  const figure = (label, value, id) => el("div", {}, el("dt", {}, label), el("dd", { id }, value));
  const f = [];
  if (previous) {
    const dt = (now.t - previous.t) / 1000;
    const rate = (name, where) => (sum(samples, name, where) - sum(previous.samples, name, where)) / dt;
    f.push(figure("images/s", rate("vitserve_images_total").toFixed(1), "live-images"));
    f.push(figure("requests/s", rate("vitserve_requests_total").toFixed(1), "live-requests"));
    f.push(figure("refused/s (429, 503)", rate("vitserve_requests_total", (l) => l.status === "429" || l.status === "503").toFixed(1), "live-refused"));
    const p50 = quantile(now.latency, previous.latency, 0.5), p99 = quantile(now.latency, previous.latency, 0.99);
    f.push(figure("p50 / p99 ms", p50 === null ? "idle" : `${(1000 * p50).toFixed(1)} / ${(1000 * p99).toFixed(1)}`, "live-latency"));
  }
  f.push(figure("queue depth", sum(samples, "vitserve_queue_depth"), "live-queue"));
  f.push(figure("in flight", sum(samples, "vitserve_requests_in_flight"), "live-in-flight"));
  f.push(figure("admission limit (images)", sum(samples, "vitserve_admission_limit_images").toFixed(0), "live-limit"));
  $("live-figures").replaceChildren(...f);
  $("live-note").textContent = previous ? "Rates over the last 2 s, from /metrics." : "Measuring…";
  previous = now;
}

// ---- start --------------------------------------------------------------------------------------------------------
let polling = null;
async function start() {
  try {
    const r = await api("/info");
    const info = await r.json();
    if (!r.ok) throw new Error(info.error ? info.error.message : r.statusText);
    $("model-name").textContent = `${info.model.name} v${info.model.version}`;
    $("card-body").replaceChildren(...cardView(info));
  } catch (e) {
    if (!(e instanceof NeedsKey)) $("card-body").replaceChildren(el("p", { class: "error" }, "Could not read /info: " + e.message));
    return;
  }
  poll();
  if (!polling) polling = setInterval(poll, 2000);
}

start();
