// Building the page: every string becomes a text node or an attribute value, never markup, so a job name,
// log line or error message that contains "<script>" shows as those characters. There is no innerHTML here.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key in PROPERTIES) el[PROPERTIES[key]] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

const PROPERTIES = { value: "value", checked: "checked", for: "htmlFor" };

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function say(message) {
  // Announced to screen readers and shown briefly.
  const status = document.getElementById("status");
  status.textContent = message;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { status.textContent = ""; }, 4000);
}

export function stateBadge(state) {
  return h("span", { class: `state state-${state}` }, state);
}

export function table(headers, rows, label) {
  // A wide table scrolls sideways on a phone; the scroll box is focusable so the keyboard can scroll it too.
  return h("div", { class: "scroll", tabindex: 0, role: "region", "aria-label": label },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", class: x.num ? "num" : null }, x.label ?? x)))),
      h("tbody", {}, rows)));
}

export function copyButton(text, label) {
  return h("button", {
    type: "button", class: "quiet", "aria-label": label,
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(text);
        say("Copied");
      } catch {
        say("Copy failed: select the text and copy it");
      }
    },
  }, "Copy");
}

// Polling rebuilds parts of a page; a part holding the keyboard focus (or an open menu) is left alone until the
// user leaves it, so a periodic refresh never throws keyboard and screen-reader users back to the top.
export function busy(el) {
  return el.contains(document.activeElement) && document.activeElement !== document.body;
}
