// Submit: paste or upload a spec (YAML or JSON), validate it (the preflight report, rendered as
// `tuneplane validate` prints it), then submit. Problems are listed under the editor, each with its field.

import { load } from "../vendor/js-yaml-4.1.0/js-yaml.mjs";
import { api } from "./api.js";
import { h, replace, table } from "./dom.js";
import { number } from "./format.js";
import { DRAFT_KEY } from "./job.js";

export async function render(main) {
  document.title = "Submit · Tuneplane";
  const editor = h("textarea", { id: "spec", spellcheck: "false", "aria-describedby": "spec-help" });
  editor.value = sessionStorage.getItem(DRAFT_KEY) || "";
  editor.addEventListener("input", () => sessionStorage.setItem(DRAFT_KEY, editor.value));
  const upload = h("input", { id: "spec-file", type: "file", accept: ".yaml,.yml,.json" });
  upload.addEventListener("change", async () => {
    if (!upload.files.length) return;
    editor.value = await upload.files[0].text();
    sessionStorage.setItem(DRAFT_KEY, editor.value);
  });
  const problems = h("div", { id: "problems", "aria-live": "polite" });
  const report = h("div", { id: "report" });
  const validate = h("button", { type: "button", id: "validate", class: "quiet", onclick: () => run("validate") }, "Validate");
  const submit = h("button", { type: "button", id: "submit", onclick: () => run("submit") }, "Submit");
  replace(main,
    h("h1", {}, "Submit a job"),
    h("div", {}, h("label", { for: "spec" }, "Tuning spec")),
    h("p", { id: "spec-help", class: "muted" }, "YAML or JSON, as in jobs/*.yaml. Relative paths are not resolved here: use object-storage URIs or absolute paths."),
    editor,
    h("div", { class: "row" }, h("label", { for: "spec-file" }, "Or upload a file"), upload),
    h("div", { class: "row" }, validate, submit),
    problems, report);

  const sent = { text: null, key: null };

  async function run(action) {
    replace(problems);
    replace(report);
    let spec;
    try {
      spec = load(editor.value);
    } catch (error) {
      return showProblems(problems, [{ field: `line ${(error.mark?.line ?? 0) + 1}`, message: error.reason || error.message }], "The spec is not valid YAML");
    }
    if (!spec || typeof spec !== "object" || Array.isArray(spec)) {
      return showProblems(problems, [{ field: "spec", message: "expected a mapping (name, model, data, ...)" }], "Nothing to send");
    }
    validate.disabled = submit.disabled = true;
    try {
      if (action === "validate") {
        const result = await api("/validate", { method: "POST", body: spec });
        if (result.problems.length) showProblems(problems, result.problems, "The spec has problems");
        replace(report, renderReport(result));
      } else {
        // The same text sent again (a retry after a lost answer) carries the same key: one job, not two.
        if (sent.text !== editor.value) Object.assign(sent, { text: editor.value, key: randomKey() });
        const job = await api("/jobs", { method: "POST", body: spec, headers: { "Idempotency-Key": sent.key } });
        sessionStorage.removeItem(DRAFT_KEY);
        window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
      }
    } catch (error) {
      showProblems(problems, error.errors?.length ? error.errors : [{ field: error.title || "request", message: error.message }], "Not accepted");
    } finally {
      validate.disabled = submit.disabled = false;
    }
  }
  return null;
}

function randomKey() {
  // crypto.getRandomValues works outside secure contexts too (randomUUID does not).
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function showProblems(box, list, title) {
  replace(box, h("div", { class: "panel", role: "alert" },
    h("h2", {}, title),
    h("ul", { class: "problems" }, list.map((p) => h("li", {}, h("span", { class: "field" }, p.field || "spec"), ": ", p.message)))));
}

function renderReport(result) {
  const data = result.data;
  const parts = [h("h2", {}, result.ok ? "Validation passed" : "Validation found problems")];
  for (const note of result.notes || []) parts.push(h("p", { class: "muted" }, note));
  if (result.memory?.summary) parts.push(h("p", {}, `Memory per GPU (estimate): ${result.memory.summary}`));
  if (!data) return h("section", { "aria-label": "Validation report" }, parts);
  parts.push(h("p", {}, `Trained-token share: ${(data.trained_token_share * 100).toFixed(1)}% of ${data.max_seq_len}-token rows`));
  parts.push(table(
    ["Source", "URI", { label: "Records", num: true }, { label: "Examples", num: true }, { label: "Bad", num: true },
      { label: "Truncated", num: true }, { label: "Tokens", num: true }, { label: "Trained", num: true }],
    data.sources.map((s) => h("tr", {},
      h("td", {}, s.name), h("td", { class: "name" }, s.uri), h("td", { class: "num" }, s.records), h("td", { class: "num" }, s.examples),
      h("td", { class: "num" }, s.bad_records), h("td", { class: "num" }, s.truncated), h("td", { class: "num" }, number(s.tokens)),
      h("td", { class: "num" }, number(s.trained_tokens)))), "Sources"));
  const bad = data.sources.flatMap((s) => s.bad_record_samples || []);
  if (bad.length) parts.push(h("h3", {}, "Bad records"), h("ul", { class: "problems" }, bad.map((b) => h("li", {}, String(b)))));
  for (const error of data.errors || []) parts.push(h("p", { class: "error" }, error));
  if (data.quality?.summary) parts.push(h("p", {}, `Data quality: ${data.quality.summary}`));
  for (const s of data.sources) {
    const bins = Object.entries(s.length_histogram || {});
    if (bins.length) parts.push(histogram(s.name, bins));
    (s.samples || []).slice(0, 1).forEach((sample) => parts.push(samplePanel(s.name, sample)));
    (s.pair_samples || []).slice(0, 1).forEach((pair) => parts.push(pairPanel(s.name, pair)));
  }
  return h("section", { "aria-label": "Validation report" }, parts);
}

function histogram(name, bins) {
  const most = Math.max(...bins.map(([, n]) => n));
  return h("figure", { class: "panel" },
    h("figcaption", {}, `${name}: example lengths (tokens)`),
    table(["Tokens", { label: "Examples", num: true }, "Share"], bins.map(([range, n]) => {
      const bar = h("span", { class: "bar" });
      bar.style.width = `${Math.max(2, Math.round((120 * n) / most))}px`; // CSSOM, allowed by the CSP
      return h("tr", {}, h("td", {}, range), h("td", { class: "num" }, n), h("td", {}, bar));
    }), `${name} lengths`));
}

function spans(list) {
  // Trained tokens (what the loss counts) are marked; the rest is prompt or template, masked out.
  return list.map((span) => (span.trained ? h("mark", { class: "trained" }, span.text) : h("span", {}, span.text)));
}

function samplePanel(name, sample) {
  return h("figure", { class: "panel" },
    h("figcaption", {}, `${name}: a rendered example; `, h("mark", { class: "trained" }, "marked"), " text is trained on"),
    h("pre", { class: "sample", tabindex: 0 }, spans(sample)));
}

function pairPanel(name, pair) {
  return h("figure", { class: "panel" },
    h("figcaption", {}, `${name}: a preference pair (the prompt is shared and masked)`),
    h("pre", { class: "sample", tabindex: 0 }, spans(pair.prompt)),
    h("p", {}, "Chosen"), h("pre", { class: "sample", tabindex: 0 }, spans(pair.chosen)),
    h("p", {}, "Rejected"), h("pre", { class: "sample", tabindex: 0 }, spans(pair.rejected)));
}
