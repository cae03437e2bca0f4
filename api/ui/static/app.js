// The page's scripts: live progress, the Pareto chart's "use this point", uploads, the job form.
// Plain JavaScript, no library, no build step. Everything goes through /ui/api (the sign-in
// cookie plus the CSRF token below); the pages work without it for reading.
"use strict";

const CSRF = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
const SVG_NS = "http://www.w3.org/2000/svg";

async function callApi(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": CSRF } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch("/ui/api" + path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = { detail: resp.statusText }; }
  return { status: resp.status, ok: resp.ok, data };
}

function pct(v) { return v === null || v === undefined || v === "" ? "" : (Number(v) * 100).toFixed(2) + "%"; }
function num(v) { return Number(v).toLocaleString("en-US"); }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return s >= 60 ? `· about ${Math.floor(s / 60)} min ${s % 60} s left` : `· about ${s} s left`;
}
const FINISHED = ["succeeded", "failed", "canceled"];

// ---------------------------------------------------------------------------------------
// jobs list: progress bars follow the running jobs

function jobsPage() {
  const rows = () => Array.from(document.querySelectorAll("#jobs tbody tr"));
  const live = () => rows().some((r) => !FINISHED.includes(r.dataset.status));
  async function refresh() {
    if (!live()) return;
    const res = await callApi("GET", "/jobs?limit=100");
    if (res.ok) {
      const byId = new Map(res.data.data.map((j) => [j.id, j]));
      for (const row of rows()) {
        const job = byId.get(row.dataset.jobId);
        if (!job) continue;
        if (job.status !== row.dataset.status && FINISHED.includes(job.status)) {
          window.location.reload(); // the finished job's figures are rendered by the server
          return;
        }
        row.dataset.status = job.status;
        const badge = row.querySelector(".status");
        badge.textContent = job.status;
        badge.className = "status status-" + job.status;
        row.querySelector("progress").value = job.progress;
        let text = Math.round(job.progress * 100) + "%";
        if (job.stage) text += " · " + job.stage + (job.epoch ? ` ${job.epoch}/${job.epochs}` : "");
        row.querySelector(".stage-text").textContent = text;
      }
    }
    setTimeout(refresh, 1500);
  }
  setTimeout(refresh, 1000);
}

// ---------------------------------------------------------------------------------------
// job page: live progress, the loss / accuracy chart, the Pareto chart

function drawLiveChart(box, rows) {
  box.replaceChildren();
  const pts = rows.map((r, i) => ({
    i,
    label: `${r.dataset.stage} ${r.dataset.epoch}`,
    loss: r.dataset.loss === "" ? null : Number(r.dataset.loss),
    acc: r.dataset.accuracy === "" ? null : Number(r.dataset.accuracy),
  }));
  if (!pts.length) {
    box.appendChild(el("p", { class: "muted small" }, "The chart fills in as epochs finish."));
    return;
  }
  const W = 640, H = 220, L = 56, R = 56, T = 12, B = 36;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart live" });
  const losses = pts.filter((p) => p.loss !== null).map((p) => p.loss);
  const maxLoss = Math.max(...losses, 1e-9);
  const x = (i) => L + (pts.length === 1 ? 0.5 : i / (pts.length - 1)) * (W - L - R);
  const yLoss = (v) => H - B - (v / maxLoss) * (H - T - B);
  const yAcc = (v) => H - B - v * (H - T - B);
  root.appendChild(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  root.appendChild(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  root.appendChild(svg("line", { class: "axis", x1: W - R, y1: T, x2: W - R, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    root.appendChild(svg("text", { class: "tick-label", x: L - 6, y: yLoss(maxLoss * f) + 4, "text-anchor": "end" }, (maxLoss * f).toPrecision(2)));
    root.appendChild(svg("text", { class: "tick-label", x: W - R + 6, y: yAcc(f) + 4 }, Math.round(f * 100) + "%"));
  }
  root.appendChild(svg("text", { class: "axis-label loss-label", x: L, y: H - 6 }, "— training loss (left)"));
  root.appendChild(svg("text", { class: "axis-label acc-label", x: W - R, y: H - 6, "text-anchor": "end" }, "- - validation accuracy (right)"));
  const series = (key, y, cls) => {
    const line = pts.filter((p) => p[key] !== null).map((p) => `${x(p.i).toFixed(1)},${y(p[key]).toFixed(1)}`);
    if (line.length) root.appendChild(svg("polyline", { class: cls, points: line.join(" ") }));
    for (const p of pts.filter((q) => q[key] !== null)) {
      const c = svg("circle", { class: cls + "-dot", cx: x(p.i).toFixed(1), cy: y(p[key]).toFixed(1), r: 3 });
      c.appendChild(svg("title", {}, `${p.label}: ${key === "loss" ? p.loss.toFixed(4) : pct(p.acc)}`));
      root.appendChild(c);
    }
  };
  series("loss", yLoss, "loss-line");
  series("acc", yAcc, "acc-line");
  box.appendChild(root);
}

function jobPage() {
  const root = document.getElementById("job");
  if (!root) return;
  const jobId = root.dataset.jobId;
  const chartBox = document.getElementById("live-chart");
  const rows = () => Array.from(document.querySelectorAll("#epoch-rows tr"));
  drawLiveChart(chartBox, rows());
  setupPareto(jobId);

  if (root.dataset.finished === "true") return;
  // one row per (stage, epoch); progress and epoch events both fill it in as they arrive
  const upsert = (stage, epoch, loss, acc) => {
    if (epoch === null || epoch === undefined || (loss == null && acc == null)) return;
    if (stage !== "train" && stage !== "finetune") return;
    const key = `${stage}-${epoch}`;
    let tr = document.querySelector(`#epoch-rows tr[data-key="${key}"]`);
    if (!tr) {
      tr = el("tr", { "data-key": key, "data-stage": stage, "data-epoch": epoch, "data-loss": "", "data-accuracy": "" });
      for (let i = 0; i < 4; i++) tr.appendChild(el("td"));
      document.getElementById("epoch-rows").appendChild(tr);
    }
    if (loss != null) tr.dataset.loss = loss;
    if (acc != null) tr.dataset.accuracy = acc;
    const cells = tr.children;
    cells[0].textContent = stage;
    cells[1].textContent = epoch;
    cells[2].textContent = tr.dataset.loss === "" ? "" : Number(tr.dataset.loss).toFixed(4);
    cells[3].textContent = pct(tr.dataset.accuracy);
    drawLiveChart(chartBox, rows());
  };
  const source = new EventSource(`/ui/api/jobs/${jobId}/stream`);
  source.addEventListener("progress", (ev) => {
    const d = JSON.parse(ev.data);
    document.getElementById("job-progress").value = d.progress;
    document.getElementById("progress-percent").textContent = Math.round(d.progress * 100) + "%";
    document.getElementById("progress-stage").textContent = d.stage ? "· " + d.stage : "";
    document.getElementById("progress-epoch").textContent =
      d.epoch && !FINISHED.includes(d.status) ? `· epoch ${d.epoch}/${d.epochs}` + (d.loss != null ? `, loss ${d.loss.toFixed(4)}` : "") + (d.val_accuracy != null ? `, val ${pct(d.val_accuracy)}` : "") : "";
    document.getElementById("progress-eta").textContent = FINISHED.includes(d.status) ? "" : eta(d.eta_seconds);
    const badge = document.getElementById("job-status");
    badge.textContent = d.status;
    badge.className = "status status-" + d.status;
    root.dataset.status = d.status;
    if (!FINISHED.includes(d.status)) upsert(d.stage, d.epoch, d.loss, d.val_accuracy);
  });
  source.addEventListener("epoch", (ev) => {
    const e = JSON.parse(ev.data);
    upsert(e.stage, e.epoch, e.loss, e.val_accuracy);
  });
  source.addEventListener("end", (ev) => {
    source.close();
    const d = JSON.parse(ev.data);
    if (d.status === "succeeded" || d.status === "failed" || d.status === "canceled") {
      setTimeout(() => window.location.reload(), 300); // the server renders the results
    }
  });
}

function setupPareto(jobId) {
  const section = document.getElementById("pareto");
  if (!section) return;
  const form = document.getElementById("use-point");
  const info = document.getElementById("point-info");
  const axis = () => section.querySelector('input[name="pareto-axis"]:checked').value;
  for (const radio of section.querySelectorAll('input[name="pareto-axis"]')) {
    radio.addEventListener("change", () => {
      for (const box of section.querySelectorAll(".chart-box[data-axis]")) box.hidden = box.dataset.axis !== axis();
    });
  }
  const describe = (c) =>
    `Point #${c.dataset.index}: ${num(c.dataset.params)} parameters (${pct(c.dataset.paramsFraction)}), ` +
    `${num(c.dataset.flops)} FLOPs (${pct(c.dataset.flopsFraction)}), validation accuracy ${pct(c.dataset.accuracy)}` +
    (c.dataset.chosen === "true" ? " — the point this job chose." : ".");
  const choose = (c) => {
    for (const other of section.querySelectorAll("circle.point.selected")) other.classList.remove("selected");
    c.classList.add("selected");
    // the server reads this point's per-layer ranks from the job's report (policy "ranks")
    form.elements.point.value = c.dataset.index;
    form.elements.idempotency_key.value = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()));
    document.getElementById("use-point-text").textContent =
      `${describe(c)} A new job (no training) will truncate every layer to this point's ranks ` +
      `(policy ranks): the same model, so the same parameters, FLOPs and validation accuracy.`;
    form.hidden = false;
    document.getElementById("use-point-button").focus();
  };
  for (const c of section.querySelectorAll("circle.point")) {
    c.addEventListener("mouseenter", () => { info.textContent = describe(c); });
    c.addEventListener("focus", () => { info.textContent = describe(c); });
    c.addEventListener("click", () => choose(c));
    c.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); choose(c); }
    });
  }
  for (const b of section.querySelectorAll(".pick-point")) {
    b.addEventListener("click", () => {
      const c = section.querySelector(`.chart-box[data-axis="${axis()}"] circle.point[data-index="${b.dataset.index}"]`);
      if (c) choose(c);
    });
  }
}

// ---------------------------------------------------------------------------------------
// new job: uploads with progress, the form, the plan

function uploadForms() {
  for (const form of document.querySelectorAll("form.upload")) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const bar = form.querySelector(".upload-progress");
      const out = form.querySelector(".upload-result");
      const data = new FormData(form);
      const file = data.get("file");
      if (form.dataset.kind === "models" && file && file.name.toLowerCase().endsWith(".pt2")) {
        for (const k of ["arch", "num_classes", "input_shape", "options"]) data.delete(k);
      }
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/ui/api/" + form.dataset.kind);
      xhr.setRequestHeader("X-CSRF-Token", CSRF);
      bar.hidden = false;
      bar.value = 0;
      out.textContent = "Uploading…";
      out.classList.remove("error");
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = { detail: xhr.statusText }; }
        if (xhr.status === 201) {
          bar.value = 1;
          out.textContent = `Uploaded ${body.name} (id ${body.id}, sha256 ${body.sha256.slice(0, 12)}…).`;
          if ((body.image_sizes || []).length > 1) {
            out.textContent += ` Its images differ in size (${body.image_sizes.map((s) => s.size).join(", ")}): set an image size below.`;
          }
          const select = document.getElementById(form.dataset.kind === "models" ? "f-model.weights" : "f-dataset");
          const value = form.dataset.kind === "models" ? body.id : "upload:" + body.id;
          const label = form.dataset.kind === "models" ? `${body.name} (${body.arch || "program"})` : `${body.name} (uploaded, ${body.num_classes} classes)`;
          const opt = el("option", { value }, label);
          select.appendChild(opt);
          select.value = value;
        } else {
          out.textContent = body.detail || `upload failed (${xhr.status})`;
          out.classList.add("error");
        }
      });
      xhr.addEventListener("error", () => { out.textContent = "The upload was interrupted; try again."; out.classList.add("error"); });
      xhr.send(data);
    });
  }
}

function setPath(obj, path, value) {
  const keys = path.split(".");
  let o = obj;
  for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
  o[keys[keys.length - 1]] = value;
}

const POLICY_FIELDS = {
  accuracy_budget: ["max_drop", "max_evals"], params_budget: ["budget", "max_evals"],
  flops_budget: ["budget", "max_evals"], latency_budget: ["budget", "batch_size", "runtime", "max_evals"],
  global: ["keep"], uniform: ["keep"], energy: ["energy"], none: [],
};

function buildConfig(form) {
  const config = {};
  const problems = [];
  for (const input of form.querySelectorAll("[data-path]")) {
    const path = input.dataset.path;
    let value = input.value.trim();
    if (path === "dataset") {
      const [kind, id] = value.split(/:(.*)/s);
      setPath(config, "dataset", kind === "upload" ? { id } : { name: id });
      continue;
    }
    if (path.startsWith("compress.") && path !== "compress.policy") continue;
    if (value === "") continue;
    if (input.dataset.json) {
      try { value = JSON.parse(value); } catch (e) { problems.push([path, "not valid JSON"]); continue; }
    } else if (input.type === "number") {
      value = Number(value);
    }
    setPath(config, path, value);
  }
  const policy = config.compress.policy;
  for (const f of POLICY_FIELDS[policy] || []) {
    const field = form.querySelector(`[data-path="compress.${f}"]`);
    const v = field.value.trim();
    if (v !== "") config.compress[f] = field.type === "number" ? Number(v) : v;
  }
  const ds = form.querySelector('[data-path="dataset.val_fraction"]').value.trim();
  if (ds !== "") config.dataset.val_fraction = Number(ds);
  config.export = Array.from(form.querySelectorAll("[data-export]")).filter((c) => c.checked).map((c) => c.dataset.export);
  return { config, problems };
}

function clearErrors() {
  for (const p of document.querySelectorAll("[data-error-for]")) { p.hidden = true; p.textContent = ""; }
  for (const i of document.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
  const top = document.getElementById("form-error");
  top.hidden = true;
  top.textContent = "";
}

function showErrors(problems) {
  const top = [];
  let first = null;
  for (let [path, message] of problems) {
    // a policy's fields come back as compress.<policy>.<field>
    path = path.replace(/^compress\.[a-z_]+\.(?=[a-z_]+$)/, "compress.").replace(/^dataset\.(id|name|path)$/, "dataset");
    let target = null;
    for (let p = path; p; p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "") {
      target = document.querySelector(`[data-error-for="${CSS.escape(p)}"]`);
      if (target) break;
    }
    if (!target) { top.push(`${path}: ${message}`); continue; }
    target.textContent = target.textContent ? target.textContent + "; " + message : message;
    target.hidden = false;
    const input = document.getElementById("f-" + target.dataset.errorFor);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", target.id);
      first = first || input;
    }
  }
  if (top.length) {
    const box = document.getElementById("form-error");
    box.textContent = top.join("; ");
    box.hidden = false;
  }
  if (first) first.focus();
}

function parseDetail(detail) {
  // "invalid request: train.epochs: must be >= 1; compress.budget: ..." or one message
  const text = String(detail || "").replace(/^invalid request: /, "");
  const out = [];
  for (const part of text.split("; ")) {
    const m = part.match(/^([a-z_]+(?:\.[A-Za-z0-9_]+)*):? (.*)$/s);
    if (m && m[1].includes(".") || (m && ["name", "model", "dataset", "train", "compress", "finetune", "export", "device", "measure"].includes(m[1]))) {
      out.push([m[1], m[2]]);
    } else {
      out.push(["", part]);
    }
  }
  return out;
}

function renderPlan(box, plan) {
  box.replaceChildren();
  box.appendChild(el("h3", {}, "Plan"));
  const t = plan.training;
  box.appendChild(el("p", {},
    `${plan.arch} with N=${plan.factors} factors, input ${JSON.stringify(plan.input_shape)}, ${plan.num_classes} classes: ` +
    `${num(plan.params)} parameters, ${num(plan.flops)} FLOPs per sample. Training holds ${num(t.trainable_params)} trainable ` +
    `parameters (${t.extra_params >= 0 ? "+" : ""}${num(t.extra_params)}), about ` +
    `${(t.memory_bytes.lorita / 2 ** 20).toFixed(2)} MiB of weights, gradients and optimizer state ` +
    `(${(t.memory_bytes.extra / 2 ** 20 >= 0 ? "+" : "")}${(t.memory_bytes.extra / 2 ** 20).toFixed(2)} MiB over dense).`));
  const table = el("table", { id: "plan-table" });
  const head = el("tr");
  for (const h of ["Weight", "Kind", "Matrix", "LoRITa"]) head.appendChild(el("th", { scope: "col" }, h));
  table.appendChild(el("thead")).appendChild(head);
  const body = table.appendChild(el("tbody"));
  for (const r of plan.composed.concat(plan.skipped)) {
    const tr = el("tr");
    const how = r.composed ? (r.space === "layer" ? "composed, as a chain of layers" : "composed") : "skipped: " + r.reason;
    for (const v of [r.name, r.kind, r.matrix.join("x"), how]) tr.appendChild(el("td", {}, v));
    body.appendChild(tr);
  }
  const wrap = el("div", { class: "table-wrap" });
  wrap.appendChild(table);
  box.appendChild(wrap);
}

function newJobPage() {
  uploadForms();
  const form = document.getElementById("job-form");
  const policy = document.getElementById("f-compress.policy");
  const showPolicyFields = () => {
    for (const f of form.querySelectorAll("[data-policies]")) f.hidden = !f.dataset.policies.split(" ").includes(policy.value);
  };
  policy.addEventListener("change", showPolicyFields);
  showPolicyFields();
  const planBox = document.getElementById("plan");
  async function send(path) {
    clearErrors();
    const { config, problems } = buildConfig(form);
    if (problems.length) { showErrors(problems); return null; }
    const res = await callApi("POST", path, config);
    if (!res.ok) showErrors(parseDetail(res.data.detail));
    return res;
  }
  document.getElementById("plan-button").addEventListener("click", async () => {
    planBox.textContent = "Building the plan…";
    const res = await send("/plan");
    if (res && res.ok) renderPlan(planBox, res.data);
    else planBox.textContent = "";
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = document.getElementById("submit-job");
    button.disabled = true;
    const res = await send("/jobs");
    button.disabled = false;
    if (res && res.ok) window.location.assign("/ui/jobs/" + res.data.id);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "jobs") jobsPage();
  else if (page === "job") jobPage();
  else if (page === "new") newJobPage();
});
