// The overview's charts: the admin API's usage series (`GET /admin/stats/series`) drawn with
// uPlot (vendored). Cost arrives in micro-units and is shown in the node's currency.
"use strict";

(function () {
  const totals = document.getElementById("totals");
  if (!totals || !window.uPlot || !window.aihub) return;
  const currency = document.querySelector('meta[name="currency"]').content;
  const text = (id, value) => { document.getElementById(id).textContent = value; };
  const number = (n) => n.toLocaleString("en");

  // Small amounts (a request costs micro-units) keep three significant digits on the axis.
  const small = (u, splits) => splits.map((v) => v === null ? "" : v.toLocaleString("en", { maximumSignificantDigits: 3 }));

  function chart(id, data, series, values) {
    const box = document.getElementById(id);
    const options = {
      width: Math.max(320, box.clientWidth),
      height: 200,
      legend: { live: false },
      scales: { x: { time: true } },
      axes: [{}, values ? { size: 90, values: values } : { size: 60 }],
      series: [{}].concat(series),
    };
    return new window.uPlot(options, data, box);
  }

  async function draw() {
    const series = await window.aihub.call("GET /admin/stats/series?window=" + totals.dataset.window);
    const points = series.data;
    const x = points.map((p) => p.start_ms / 1000);
    const col = (name) => points.map((p) => p[name]);
    const sum = (name) => points.reduce((total, p) => total + p[name], 0);
    const p95s = points.map((p) => p.p95_ms).filter((v) => v !== null);
    text("total-requests", number(sum("requests")));
    text("total-errors", number(sum("errors")));
    text("total-tokens", number(sum("tokens_in")) + " / " + number(sum("tokens_out")));
    text("total-cost", (sum("cost_micros") / 1e6).toLocaleString("en", { maximumFractionDigits: 6 }) + " " + currency);
    text("total-p95", p95s.length ? Math.max.apply(null, p95s) + " ms" : "–");
    chart("chart-requests", [x, col("requests"), col("errors")], [
      { label: "requests", stroke: "#2563eb", fill: "rgba(37,99,235,0.1)" },
      { label: "errors", stroke: "#dc2626" },
    ]);
    chart("chart-tokens", [x, col("tokens_in"), col("tokens_out")], [
      { label: "in", stroke: "#0891b2" },
      { label: "out", stroke: "#7c3aed" },
    ]);
    chart("chart-cost", [x, points.map((p) => p.cost_micros / 1e6)], [
      { label: currency, stroke: "#059669", fill: "rgba(5,150,105,0.1)" },
    ], small);
    chart("chart-latency", [x, col("p50_ms"), col("p95_ms")], [
      // A bucket without requests has no latency: points, so that a lone bucket shows.
      { label: "p50", stroke: "#2563eb", spanGaps: true, points: { show: true, size: 6 } },
      { label: "p95", stroke: "#ea580c", spanGaps: true, points: { show: true, size: 6 } },
    ]);
    totals.dataset.loaded = "true";
  }

  draw().catch((e) => window.aihub.flash("The charts could not be drawn: " + e.message));
})();
