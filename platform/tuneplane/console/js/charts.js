// Line charts of a job's metrics (uPlot, vendored). One chart per metric group; setData on every poll.

import uPlot from "../vendor/uplot-1.6.32/uPlot.esm.js";
import { h } from "./dom.js";

const COLOURS = ["#0a5bd3", "#a40e26", "#116329", "#7a4b00", "#6e40c9"];

// The charts a job page shows: title and the metric keys drawn in it (those the run has).
export const CHART_GROUPS = [
  { title: "Loss", keys: ["loss", "eval_loss"] },
  { title: "Learning rate", keys: ["lr"] },
  { title: "Tokens per second", keys: ["tokens_per_s"] },
  { title: "Evaluation", match: (key) => key.startsWith("eval/") || key.startsWith("zero_shot/") || key.startsWith("rewards/") },
];

// Axis labels that fit: 12000 -> "12k", 0.00025 -> "2.5e-4".
function compact(value) {
  if (value === null || value === undefined) return "";
  const size = Math.abs(value);
  if (size >= 1e6) return `${+(value / 1e6).toPrecision(3)}M`;
  if (size >= 1e4) return `${+(value / 1e3).toPrecision(3)}k`;
  if (size > 0 && size < 1e-3) return value.toExponential(1);
  return String(+value.toPrecision(4));
}

export function groupKeys(group, history) {
  const keys = Object.keys(history).filter((k) => history[k].length);
  return group.match ? keys.filter(group.match).sort() : group.keys.filter((k) => keys.includes(k));
}

export class Chart {
  constructor(title, keys) {
    this.keys = keys;
    this.box = h("div", { class: "plot" });
    this.el = h("figure", { class: "chart panel", "data-chart": title },
      h("h3", {}, title), this.box,
      h("figcaption", { class: "muted" }, `${keys.join(", ")} by step`));
    this.plot = null;
    this.points = 0;
  }

  update(history) {
    // Aligned on the union of steps; a metric missing at a step is a gap.
    const steps = [...new Set(this.keys.flatMap((k) => (history[k] || []).map((p) => p.step)))].sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const series = this.keys.map((k) => {
      const values = new Array(steps.length).fill(null);
      for (const p of history[k] || []) values[index.get(p.step)] = p.value;
      return values;
    });
    const data = [steps, ...series];
    this.points = steps.length;
    this.el.dataset.points = String(steps.length);
    if (!this.plot) {
      const width = Math.max(260, this.box.clientWidth || 320);
      this.plot = new uPlot({
        width, height: 200,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 64, values: (u, ticks) => ticks.map(compact) }],
        series: [{ label: "step" }, ...this.keys.map((k, i) => ({
          label: k, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true,
          // evaluations are a few points far apart: draw them as dots too
          points: k.startsWith("eval") || k.startsWith("zero_shot") ? { show: true, size: 7, fill: COLOURS[i % COLOURS.length] } : {},
        }))],
      }, data, this.box);
      new ResizeObserver(() => {
        if (this.box.clientWidth) this.plot.setSize({ width: this.box.clientWidth, height: 200 });
      }).observe(this.box);
    } else {
      this.plot.setData(data);
    }
  }
}
