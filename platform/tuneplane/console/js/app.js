// The console's shell: sign-in state, the hash router (#/jobs, #/jobs/<id>, #/submit, #/models) and the
// polling every page uses for live updates. Pages are modules with `render(main, ctx)` returning a cleanup.

import { api, session } from "./api.js";
import { h, replace } from "./dom.js";
import * as jobs from "./jobs.js";
import * as job from "./job.js";
import * as models from "./models.js";
import * as submit from "./submit.js";

export const POLL_MS = 2000; // live updates by polling the API (no server push: one code path, proxy-proof)

const main = document.getElementById("main");
let cleanup = () => {};
let me = null;

function decode(part) {
  try { return decodeURIComponent(part); } catch { return part; } // a malformed %-escape: taken as written
}

function routeOf(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/").map(decode);
  if (parts[0] === "jobs" && parts[1]) return { page: job, name: "jobs", id: parts[1] };
  if (parts[0] === "submit") return { page: submit, name: "submit" };
  if (parts[0] === "models") return { page: models, name: "models" };
  return { page: jobs, name: "jobs" };
}

// Calls fn now and every POLL_MS until stopped, never two at once; a failed call is shown and retried.
export function poll(fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      const more = await fn();
      if (more === false) stopped = true;
    } catch (error) {
      console.warn("poll", error.message);
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

let rendering = 0; // which render is current: an older one that finishes later must not touch the page

async function render() {
  const mine = ++rendering;
  cleanup();
  cleanup = () => {};
  if (!session.token) return renderSignIn();
  if (!me) {
    try {
      me = await api("/me");
    } catch (error) {
      if (mine === rendering) renderSignIn(error.status === 401 ? "That token is not known here." : error.message);
      return;
    }
    if (mine !== rendering) return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  replace(document.getElementById("who"), `${me.team}${me.role === "admin" ? " (admin)" : ""}`);
  const route = routeOf(window.location.hash);
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.route === route.name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const page = h("div", {});
  replace(main, page);
  let stop;
  try {
    stop = (await route.page.render(page, { me, route, poll })) || (() => {});
  } catch (error) {
    stop = () => {};
    if (mine === rendering) replace(page, h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, error.message));
  }
  if (mine !== rendering) { // the user moved on while this page was loading
    stop();
    return;
  }
  cleanup = stop;
  main.focus({ preventScroll: true });
}

function renderSignIn(problem) {
  me = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  replace(document.getElementById("who"));
  document.title = "Sign in · Tuneplane";
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const form = h("form", {
    class: "signin panel",
    onsubmit: (event) => {
      event.preventDefault();
      session.signIn(input.value.trim());
      render();
    },
  },
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste your team's API token. It stays in this browser tab only and is sent to the API as a bearer header."),
  h("p", { class: "muted" }, "On the embedded default (make demo), the local admin token is in ~/.cache/tuneplane/token."),
  h("div", {}, h("label", { for: "token" }, "API token")),
  h("div", { class: "row" }, input),
  problem ? h("p", { class: "error", role: "alert" }, problem) : null,
  h("button", { type: "submit" }, "Sign in"));
  replace(main, form);
  input.focus();
}

document.getElementById("signout").addEventListener("click", () => {
  session.signOut();
  window.location.hash = "#/jobs";
  render();
});
// A token refused mid-session (revoked, rotated): back to sign-in. During sign-in itself render() says why.
window.addEventListener("tuneplane:signed-out", () => { if (me) { me = null; render(); } });
window.addEventListener("hashchange", render);
render();
