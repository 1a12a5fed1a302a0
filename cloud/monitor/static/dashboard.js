// fedcmd monitor: renders the server's state snapshots (server-sent events from /events) with uPlot.
// Read-only: the page only ever GETs its own origin. No inline script (the page's CSP forbids it).
"use strict";
(function () {
  // 12 colours (Okabe-Ito + Tableau) x 4 dash patterns: distinct lines for up to 48 overlaid runs.
  const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
                   "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF"];
  const DASHES = [[], [8, 4], [2, 3], [10, 3, 2, 3]];
  const ROUND_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];  // whole rounds
  const $ = (id) => document.getElementById(id);
  const charts = {};
  let last = null;

  function style(i) { return { stroke: COLOURS[i % COLOURS.length], dash: DASHES[Math.floor(i / COLOURS.length) % DASHES.length] }; }
  function fmt(v, d) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }
  function text(id, v) { const el = $(id); if (el.textContent !== String(v)) el.textContent = v; }
  function ago(t, now) { if (!t) return "–"; const s = Math.max(0, now - t); return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(1) + " min ago"; }
  function shortName(name) { const parts = String(name).split("/").filter(Boolean); return parts.slice(-3).join("/") || name; }

  function width(el) { return Math.max(300, el.clientWidth || 400); }

  // The paper metric's window: the last `w` rounds of the longest run, shaded under the curves. It reads the
  // newest state (`last`), not the one the chart was made with.
  function windowHook() {
    return (u) => {
      const state = last;
      if (!state) return;
      const n = Math.max(0, ...state.runs.map((r) => r.rounds.length ? r.rounds[r.rounds.length - 1].round : 0));
      if (n < 1) return;
      const w = state.paper_window || 10;
      const x0 = u.valToPos(Math.max(0.5, n - w + 0.5), "x", true), x1 = u.valToPos(n + 0.5, "x", true);
      const ctx = u.ctx;
      ctx.save();
      ctx.fillStyle = "rgba(52, 101, 164, 0.10)";
      ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
      ctx.restore();
    };
  }

  function lineChart(id, title, series, data, yLabel, hooks) {
    const el = $(id);
    const key = series.map((s) => s.label).join("|");
    const c = charts[id];
    if (c && c.key === key) { c.plot.setData(data); return; }
    if (c) c.plot.destroy();
    const opts = {
      width: width(el), height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: ROUND_TICKS }, { label: yLabel, size: 60 }],
      series: [{ label: "round" }, ...series],
      legend: { live: true },
      hooks: hooks || {},
    };
    charts[id] = { key, plot: new uPlot(opts, data, el) };
  }

  function roundsAxis(state) {
    const n = Math.max(0, ...state.runs.map((r) => r.rounds.length ? r.rounds[r.rounds.length - 1].round : 0));
    return Array.from({ length: n }, (_, i) => i + 1);
  }

  function column(run, xs, key, scale) {
    const byRound = new Map(run.rounds.map((r) => [r.round, r[key]]));
    return xs.map((x) => { const v = byRound.get(x); return v === null || v === undefined ? null : v * (scale || 1); });
  }

  function renderCharts(state) {
    const xs = roundsAxis(state);
    const many = state.runs.length > 1;
    const acc = [], accData = [xs], loss = [], lossData = [xs];
    state.runs.forEach((run, i) => {
      const name = many ? shortName(run.name) + " " : "";
      const s = style(i);
      acc.push({ label: name + "before training", stroke: s.stroke, dash: s.dash, width: 2 });
      accData.push(column(run, xs, "test_before_acc"));
      acc.push({ label: name + "after training", stroke: s.stroke, dash: [4, 4], width: 1 });
      accData.push(column(run, xs, "test_after_acc"));
      loss.push({ label: name + "loss before", stroke: s.stroke, dash: s.dash, width: 2 });
      lossData.push(column(run, xs, "test_before_loss"));
      loss.push({ label: name + "loss after", stroke: s.stroke, dash: [4, 4], width: 1 });
      lossData.push(column(run, xs, "test_after_loss"));
    });
    lineChart("chart-acc", "accuracy", acc, accData, "accuracy (%)", { drawAxes: [windowHook()] });
    lineChart("chart-loss", "loss", loss, lossData, "loss");
    const run = state.runs[state.runs.length - 1];
    const kib = 1 / 1024;
    lineChart("chart-bytes", "bytes", [
      { label: "down KiB", stroke: COLOURS[0], width: 2 }, { label: "up KiB", stroke: COLOURS[1], width: 2 },
    ], [xs, column(run, xs, "bytes_down", kib), column(run, xs, "bytes_up", kib)], "KiB");
    const fit = column(run, xs, "fit_seconds"), agg = column(run, xs, "aggregate_seconds"), tot = column(run, xs, "seconds");
    const other = tot.map((t, i) => t === null ? null : Math.max(0, t - (fit[i] || 0) - (agg[i] || 0)));
    lineChart("chart-time", "time", [
      { label: "round s", stroke: COLOURS[6], width: 2 }, { label: "slowest device's training s", stroke: COLOURS[2], width: 2 },
      { label: "aggregation s", stroke: COLOURS[1], width: 2 }, { label: "waiting + transfer s", stroke: COLOURS[5], width: 2 },
    ], [xs, tot, fit, agg, other], "seconds");
  }

  function renderCurrent(state) {
    const c = state.current, run = state.run || {};
    text("cur-round", c ? `${c.round} of ${run.global_epoch || "?"}` + (c.closed ? " (closed)" : "") : (state.status === "finished" ? "done" : "–"));
    text("cur-phase", c ? c.phase : "–");
    text("cur-sampled", c ? c.sampled : "–");
    text("cur-answered", c ? c.answered : "–");
    text("cur-quorum", c ? `${c.answered >= c.min_clients ? "met" : "not yet"} (min ${c.min_clients})` : "–");
    let dl = "none (waits for every device)";
    if (c && c.deadline) {
      const left = c.started_at + c.deadline - (Date.now() / 1000);
      dl = c.closed ? `${c.deadline} s` : `${Math.max(0, left).toFixed(0)} s left of ${c.deadline} s`;
    }
    text("cur-deadline", c ? dl : "–");
    const rounds = state.runs[state.runs.length - 1].rounds;
    const w = rounds.slice(-(state.paper_window || 10)).map((r) => r.test_before_acc).filter((v) => v !== null);
    const sm = state.runs[state.runs.length - 1].summary || {};
    const pm = sm.paper_metric !== undefined && sm.paper_metric !== null ? sm.paper_metric : (w.length ? w.reduce((a, b) => a + b, 0) / w.length : null);
    text("paper-metric", pm === null ? "–" : fmt(pm, 2) + " %");
    const fa = state.final && state.final.test_before_acc !== undefined ? state.final.test_before_acc : sm.final_personalized_acc;
    text("final-acc", fa === null || fa === undefined ? "–" : fmt(fa, 2) + " %");
  }

  function renderStrategy(state) {
    const s = state.strategy || {};
    text("chosen-layer", s.chosen_layer || "not chosen yet");
    const votes = Object.entries(s.vote_counts || {}).sort((a, b) => b[1] - a[1]);
    const max = Math.max(1, ...votes.map((v) => v[1]));
    $("votes").tBodies[0].innerHTML = "";
    for (const [layer, n] of votes) {
      const tr = $("votes").tBodies[0].insertRow();
      tr.insertCell().textContent = layer;
      tr.insertCell().textContent = n;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = (100 * n / max).toFixed(0) + "px";
      tr.insertCell().appendChild(bar);
    }
    const sim = s.similarity, canvas = $("heatmap"), ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!sim || !sim.clients.length) { text("heatmap-note", "no similarity matrix (FedCMD after its selection rounds, pFedSim)"); return; }
    const n = sim.clients.length, cell = canvas.width / n;
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      const v = sim.matrix[i][j];
      if (v === null) { ctx.fillStyle = "#eee"; } else {
        const t = Math.max(0, Math.min(1, v));  // similarity in [0, 1]: white -> dark blue
        ctx.fillStyle = `rgb(${Math.round(255 - 220 * t)}, ${Math.round(255 - 170 * t)}, ${Math.round(255 - 80 * t)})`;
      }
      ctx.fillRect(j * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
    }
    text("heatmap-note", `devices ${sim.clients.slice(0, 12).join(", ")}${n > 12 ? ", …" : ""} (rows and columns in this order; white 0, dark 1, grey never compared)`);
  }

  function renderRejects(state) {
    const rows = Object.entries(state.rejected || {}).sort((a, b) => b[1] - a[1]);
    const body = $("rejects").tBodies[0];
    body.innerHTML = "";
    for (const [reason, n] of rows) { const tr = body.insertRow(); tr.dataset.reason = reason; tr.insertCell().textContent = reason; tr.insertCell().textContent = n; }
    $("rejects-none").hidden = rows.length > 0;
  }

  function renderDevices(state) {
    $("devices-panel").hidden = !state.fleet_view;
    if (!state.fleet_view) return;
    const counts = Object.entries(state.device_states || {}).map(([k, v]) => `${v} ${k}`).join(", ");
    text("device-counts", counts ? `(${counts})` : "");
    const body = $("devices").tBodies[0];
    body.innerHTML = "";
    for (const d of state.devices) {
      const tr = body.insertRow();
      tr.dataset.client = d.client;
      tr.dataset.state = d.state;
      tr.insertCell().textContent = d.client;
      const st = tr.insertCell(); st.textContent = d.state; st.className = "state-" + d.state; if (d.reason) st.title = d.reason;
      tr.insertCell().textContent = d.profile || "–";
      tr.insertCell().textContent = ago(d.last_seen, state.now);
      tr.insertCell().textContent = d.rounds;
      tr.insertCell().textContent = d.last_update_bytes === null ? "–" : (d.last_update_bytes / 1024).toFixed(1) + " KiB";
      tr.insertCell().textContent = d.rejects;
    }
    text("devices-note", state.devices_total > state.devices.length ? `showing ${state.devices.length} of ${state.devices_total} devices` : "");
  }

  function renderRounds(state) {
    const body = $("rounds").tBodies[0];
    body.innerHTML = "";
    const many = state.runs.length > 1;
    state.runs.forEach((run) => {
      for (const r of run.rounds.slice().reverse()) {
        const tr = body.insertRow();
        tr.dataset.run = run.name;
        tr.dataset.round = r.round;
        const cells = [[many ? shortName(run.name) : "", null], [r.round, null], [r.phase, null], [r.answered === undefined ? "–" : r.answered, null],
          [fmt(r.test_before_acc, 2), ["test_before_acc", r.test_before_acc]], [fmt(r.test_after_acc, 2), ["test_after_acc", r.test_after_acc]],
          [fmt(r.test_before_loss, 4), ["test_before_loss", r.test_before_loss]],
          [fmt(r.bytes_down / 1024, 0), ["bytes_down", r.bytes_down]], [fmt(r.bytes_up / 1024, 0), ["bytes_up", r.bytes_up]],
          [fmt(r.seconds, 2), null]];
        for (const [shown, raw] of cells) {
          const td = tr.insertCell();
          td.textContent = shown;
          if (raw) { td.dataset.key = raw[0]; td.dataset.value = raw[1] === null ? "" : raw[1]; }
        }
      }
    });
  }

  function render(state) {
    last = state;
    document.title = `${state.title} – fedcmd monitor`;
    text("title", state.title);
    const badge = $("status");
    badge.textContent = state.status;
    badge.className = "badge " + state.status;
    const run = state.run || {};
    text("runinfo", run.algo ? `${run.algo}, ${run.num_clients} devices, join ratio ${run.join_ratio}` : "");
    text("live", "updated " + new Date(state.now * 1000).toLocaleTimeString());
    document.body.dataset.version = state.version;
    document.body.dataset.status = state.status;
    renderCurrent(state);
    renderCharts(state);
    renderStrategy(state);
    renderRejects(state);
    renderDevices(state);
    renderRounds(state);
  }

  function connect() {
    const source = new EventSource("events" + window.location.search);
    source.addEventListener("state", (e) => { render(JSON.parse(e.data)); });
    source.onerror = () => {
      const badge = $("status");
      if (!last || last.status !== "finished") { badge.textContent = "disconnected (retrying)"; badge.className = "badge disconnected"; }
    };
  }

  // The deadline countdown moves between snapshots.
  setInterval(() => { if (last && last.current) renderCurrent(last); }, 1000);
  window.addEventListener("resize", () => { for (const c of Object.values(charts)) c.plot.setSize({ width: width(c.plot.root.parentElement), height: 260 }); });
  connect();
})();
