// Jobs: the team's jobs (admins: every team's, with a team filter), paged and filtered by state, with
// progress, ETA, queue place and the team's quota use, refreshed by polling.

import { api } from "./api.js";
import { busy, h, replace, stateBadge, table } from "./dom.js";
import { duration, eta, STATES, TERMINAL, when } from "./format.js";

const PAGE = 20;

export async function render(main, { me, poll }) {
  document.title = "Jobs · Tuneplane";
  const filters = { state: "", team: "", offset: 0 };
  const quota = h("section", { class: "panel quota", "aria-label": "Quota" });
  const list = h("div", {});
  const pager = h("div", { class: "row" });
  const stateSelect = h("select", { id: "state-filter", onchange: () => { filters.state = stateSelect.value; filters.offset = 0; refresh().catch(() => {}); } },
    h("option", { value: "" }, "any state"), STATES.map((s) => h("option", { value: s }, s)));
  const teamInput = me.role === "admin"
    ? h("input", { id: "team-filter", type: "search", placeholder: "all teams", onchange: () => { filters.team = teamInput.value.trim(); filters.offset = 0; refresh().catch(() => {}); } })
    : null;
  replace(main,
    h("h1", {}, "Jobs"),
    quota,
    h("div", { class: "row" },
      h("label", { for: "state-filter" }, "State"), stateSelect,
      teamInput ? [h("label", { for: "team-filter" }, "Team"), teamInput] : null,
      h("a", { href: "#/submit" }, "Submit a job")),
    list, pager);

  let latest = 0; // a filter change and a poll may overlap: only the newest answer is shown
  const ended = new Map(); // job id -> metrics of a job that ended (they no longer change)

  async function refresh() {
    const mine = ++latest;
    const query = { state: filters.state, team: filters.team, limit: PAGE, offset: filters.offset };
    const page = await api("/jobs", { query });
    const progress = await Promise.all(page.items.map((job) => progressOf(job, ended)));
    const usage = await api("/usage", { query: { team: filters.team } });
    if (mine !== latest) return;
    if (!busy(list)) {
      replace(list, page.items.length
        ? table(
          ["Name", "Team", "State", "Progress", { label: "Queue", num: true }, "Created", "Started", "Finished"],
          page.items.map((job, i) => row(job, progress[i])), "Jobs")
        : h("p", { class: "muted" }, "No jobs match."));
    }
    const range = `${page.items.length ? filters.offset + 1 : 0}–${filters.offset + page.items.length}`;
    if (pager.dataset.range !== range || pager.dataset.more !== String(page.next_offset)) {
      pager.dataset.range = range;
      pager.dataset.more = String(page.next_offset);
      replace(pager,
        h("button", { type: "button", class: "quiet", disabled: filters.offset === 0, onclick: () => { filters.offset = Math.max(0, filters.offset - PAGE); refresh().catch(() => {}); } }, "Previous"),
        h("span", { class: "muted" }, range),
        h("button", { type: "button", class: "quiet", disabled: page.next_offset === null, onclick: () => { filters.offset = page.next_offset; refresh().catch(() => {}); } }, "Next"));
    }
    replace(quota,
      h("strong", {}, `Team ${usage.team}`),
      meterOf("Jobs running", usage.jobs), meterOf("GPUs", usage.gpus), meterOf("Waiting", usage.waiting));
  }
  return poll(refresh);
}

async function progressOf(job, ended) {
  // Running jobs are read on every poll; an ended job's figures once (they no longer change).
  if (job.state !== "RUNNING" && job.state !== "SUCCEEDED") return null;
  if (ended.has(job.id)) return ended.get(job.id);
  try {
    const metrics = await api(`/jobs/${encodeURIComponent(job.id)}/metrics`, { query: { history: "false" } });
    if (TERMINAL.has(job.state)) ended.set(job.id, metrics);
    return metrics;
  } catch {
    return null; // metrics are best effort: the list still shows
  }
}

function row(job, metrics) {
  return h("tr", {},
    h("td", { class: "name" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name), h("div", { class: "muted" }, job.id)),
    h("td", {}, job.team),
    h("td", {}, stateBadge(job.state)),
    h("td", {}, progressCell(job, metrics)),
    h("td", { class: "num" }, job.queue_position ?? "—"),
    h("td", {}, when(job.created_at)),
    h("td", {}, when(job.started_at)),
    h("td", {}, when(job.finished_at)));
}

export function progressCell(job, metrics) {
  const step = metrics?.step ?? (job.state === "SUCCEEDED" ? metrics?.max_steps : null);
  const total = metrics?.max_steps;
  if (!total) return TERMINAL.has(job.state) || !metrics?.step ? "—" : `step ${metrics.step}`;
  const left = TERMINAL.has(job.state) ? null : eta(job, step, total);
  return h("span", {},
    h("progress", { max: total, value: step || 0, "aria-label": `${job.name}: step ${step || 0} of ${total}` }),
    ` ${step || 0}/${total}`,
    left === null ? null : h("span", { class: "muted" }, ` · ETA ${duration(left)}`));
}

function meterOf(label, use) {
  return h("span", {},
    `${label} ${use.in_use}/${use.allowed} `,
    h("meter", { min: 0, max: Math.max(use.allowed, 1), value: use.in_use, "aria-label": `${label}: ${use.in_use} of ${use.allowed}` }));
}
