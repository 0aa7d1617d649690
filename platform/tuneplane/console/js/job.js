// One job: state, progress, live charts, events, the log tail, zero-shot before/after, its model, the spec;
// cancel (confirmed) and "submit again" (the submit page prefilled with this spec).

import { dump } from "../vendor/js-yaml-4.1.0/js-yaml.mjs";
import { api } from "./api.js";
import { Chart, CHART_GROUPS, groupKeys } from "./charts.js";
import { busy, copyButton, h, replace, say, stateBadge, table } from "./dom.js";
import { number, TERMINAL, when } from "./format.js";
import { progressCell } from "./jobs.js";

export const DRAFT_KEY = "tuneplane.draft";
const LOG_LINES = 200;

export async function render(main, { route, poll }) {
  let job;
  try {
    job = await api(`/jobs/${encodeURIComponent(route.id)}`);
  } catch (error) {
    replace(main, h("h1", {}, "Job not found"), h("p", { class: "error", role: "alert" }, error.message),
      h("a", { href: "#/jobs" }, "Back to jobs"));
    return null;
  }
  document.title = `${job.name} · Tuneplane`;
  // The head's figures are rebuilt on every poll; its controls only when they change (and never while one
  // has the focus), so a keyboard user's place survives the refresh.
  const info = h("div", {});
  const model = h("div", {});
  const actions = h("div", { class: "row" });
  const head = h("div", {}, info, model, actions);
  // One slot per chart group, so the charts keep their order whichever appears first.
  const slots = CHART_GROUPS.map(() => h("div", { class: "slot" }));
  const noMetrics = h("p", { class: "muted" }, "No metrics yet.");
  const charts = h("div", { class: "charts" }, slots);
  const zeroShot = h("div", { id: "zero-shot" });
  const events = h("ol", { class: "timeline" });
  const log = h("pre", { class: "log", tabindex: 0, "aria-label": "Log tail" });
  const built = new Map();
  const dialog = cancelDialog(job);
  replace(main,
    head,
    h("h2", {}, "Training curves"), noMetrics, charts,
    h("h2", {}, "Zero-shot accuracy, before and after"), zeroShot,
    h("h2", {}, "Events"), events,
    h("h2", {}, "Log"), log,
    h("h2", {}, "Spec"), h("pre", { class: "spec", tabindex: 0, "aria-label": "Spec (YAML)" }, dump(job.spec, { lineWidth: 110 })));

  let readsAfterEnd = 0;

  async function refresh() {
    job = await api(`/jobs/${encodeURIComponent(route.id)}`);
    const [metrics, history, tail] = await Promise.all([
      api(`/jobs/${encodeURIComponent(job.id)}/metrics`).catch(() => null),
      api(`/jobs/${encodeURIComponent(job.id)}/events`),
      api(`/jobs/${encodeURIComponent(job.id)}/logs`, { query: { tail: LOG_LINES }, text: true }).catch(() => ""),
    ]);
    renderHead(info, job, metrics);
    if (!busy(model) && model.dataset.uri !== String(job.model_uri)) {
      model.dataset.uri = String(job.model_uri);
      replace(model, job.model_uri
        ? h("div", { class: "row panel" }, "Registered model ", h("code", { class: "model-uri" }, job.model_uri),
          copyButton(job.model_uri, "Copy the model URI"), h("a", { href: "#/models" }, "Models"))
        : null);
    }
    const ended = TERMINAL.has(job.state);
    if (!busy(actions) && actions.dataset.ended !== String(ended)) {
      actions.dataset.ended = String(ended);
      replace(actions, ended ? null : h("button", {
        type: "button", class: "danger",
        onclick: () => { dialog.returnValue = ""; dialog.showModal(); },
      }, "Cancel…"), h("button", {
        type: "button", class: "quiet",
        onclick: () => {
          sessionStorage.setItem(DRAFT_KEY, dump(job.spec, { lineWidth: 110 }));
          window.location.hash = "#/submit";
        },
      }, "Submit again"));
    }
    for (const [index, group] of CHART_GROUPS.entries()) {
      const keys = groupKeys(group, metrics?.history || {});
      if (!keys.length) continue;
      const id = keys.join(",");
      if (built.get(index)?.id !== id) { // new, or a metric joined the group (eval_loss after the first eval)
        const chart = new Chart(group.title, keys);
        chart.id = id;
        built.set(index, chart);
        replace(slots[index], chart.el);
      }
      built.get(index).update(metrics.history);
    }
    noMetrics.hidden = built.size > 0;
    replace(zeroShot, zeroShotTable(metrics?.latest || {}));
    replace(events, history.map((e) => h("li", {},
      h("time", { datetime: e.at }, when(e.at)),
      e.to_state ? [stateBadge(e.to_state), " "] : null,
      h("span", {}, e.message), h("span", { class: "muted" }, ` · ${e.actor}`))));
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = tail || "(no log yet)";
    if (atBottom) log.scrollTop = log.scrollHeight; // follow, unless the reader scrolled up
    // Poll until the job ended, then once more for its final metrics and log, then stop.
    if (TERMINAL.has(job.state)) readsAfterEnd += 1;
    return readsAfterEnd < 2;
  }
  const stop = poll(refresh);
  return () => { stop(); dialog.remove(); };
}

function renderHead(info, job, metrics) {
  replace(info,
    h("h1", {}, job.name),
    h("div", { class: "row" }, stateBadge(job.state), h("span", { class: "job-message" }, job.message)),
    h("div", { class: "row muted" },
      `${job.id} · team ${job.team} · ${job.gpus} GPU${job.gpus === 1 ? "" : "s"}`,
      job.queue_position ? ` · place ${job.queue_position} in the queue` : null),
    h("div", { class: "row" }, progressCell(job, metrics)),
    h("div", { class: "row muted" },
      `created ${when(job.created_at)} · started ${when(job.started_at)} · finished ${when(job.finished_at)}`));
}

function cancelDialog(job) {
  const dialog = h("dialog", { "aria-labelledby": "cancel-title" },
    h("h2", { id: "cancel-title" }, "Cancel this job?"),
    h("p", {}, `${job.name} (${job.id}) stops; a running job keeps its last checkpoint but will not resume.`),
    h("div", { class: "row" },
      h("button", { type: "button", class: "danger", onclick: () => dialog.close("yes") }, "Cancel job"),
      h("button", { type: "button", class: "quiet", autofocus: true, onclick: () => dialog.close("no") }, "Keep running")));
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "yes") return;
    document.getElementById("main").focus(); // the cancel button is about to go: keep the focus on the page
    try {
      await api(`/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
      say("Cancel requested");
    } catch (error) {
      say(`Cancel failed: ${error.message}`);
    }
  });
  document.body.append(dialog);
  return dialog;
}

function zeroShotTable(latest) {
  const tasks = Object.keys(latest).filter((k) => k.startsWith("zero_shot/")).map((k) => k.slice("zero_shot/".length));
  if (!tasks.length) return h("p", { class: "muted" }, "No zero-shot scores (yet).");
  return table(["Task", { label: "Base", num: true }, { label: "Tuned", num: true }, { label: "Change", num: true }],
    tasks.sort((a, b) => (a === "mean") - (b === "mean") || a.localeCompare(b)).map((task) => { // mean last
      const base = latest[`zero_shot_base/${task}`];
      const tuned = latest[`zero_shot/${task}`];
      return h("tr", {}, h("td", {}, task), h("td", { class: "num" }, number(base)), h("td", { class: "num" }, number(tuned)),
        h("td", { class: "num" }, base === undefined ? "—" : `${tuned - base >= 0 ? "+" : ""}${number(tuned - base)}`));
    }), "Zero-shot scores");
}
