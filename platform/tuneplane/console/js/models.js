// Models: the team's registered adapters with their versions, base model, job, gate and scores, and how to
// load one.

import { api } from "./api.js";
import { copyButton, h, replace, table } from "./dom.js";
import { number, when } from "./format.js";

export async function render(main) {
  document.title = "Models · Tuneplane";
  replace(main, h("h1", {}, "Models"), h("p", { class: "muted" }, "Loading…"));
  const versions = await api("/models");
  const example = versions[0]?.uri || "models:/<team>.<name>/<version>";
  replace(main,
    h("h1", {}, "Models"),
    versions.length
      ? table(["Model", { label: "Version", num: true }, "Base model", "Job", "Gate", "Scores", "Registered", "URI"],
        versions.map((v) => h("tr", {},
          h("td", { class: "name" }, v.name),
          h("td", { class: "num" }, v.version),
          h("td", { class: "name" }, v.base_model || "—"),
          h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(v.job_id)}` }, v.job_id)),
          h("td", {}, v.gate || "—"),
          h("td", {}, Object.entries(v.scores || {}).map(([k, x]) => h("div", {}, `${k} ${number(x)}`))),
          h("td", {}, v.created_at ? when(new Date(v.created_at).toISOString()) : "—"),
          h("td", {}, copyButton(v.uri, `Copy ${v.uri}`)))), "Registered models")
      : h("p", { class: "muted" }, "No registered models yet: a job that succeeds (and passes its gate) registers one."),
    h("h2", {}, "How to load one"),
    h("p", {}, "Each version is an MLflow pyfunc (base model + adapter); with MLFLOW_TRACKING_URI pointing at the platform's MLflow:"),
    h("pre", { tabindex: 0 }, `import mlflow\n\nmodel = mlflow.pyfunc.load_model("${example}")\nprint(model.predict(["Is 41 even or odd?"]))`));
  return null;
}
