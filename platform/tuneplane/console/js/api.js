// The console's only way to the server: the public /v1 API, with the signed-in token as a bearer header.
// The token lives in this tab's sessionStorage: never in a URL, a cookie or a log line.

const TOKEN_KEY = "tuneplane.token";

export class ApiError extends Error {
  constructor(status, title, detail, errors) {
    super(detail || title);
    this.status = status;
    this.title = title;
    this.errors = errors || [];
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  signIn(token) { sessionStorage.setItem(TOKEN_KEY, token); },
  signOut() { sessionStorage.clear(); },
};

export async function api(path, { method = "GET", body, query, text = false, signal, headers: extra } = {}) {
  const url = new URL(`/v1${path}`, window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const one of [].concat(value)) url.searchParams.append(key, one);
  }
  const headers = { ...extra, Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
    cache: "no-store", credentials: "omit",
  });
  if (response.status === 401) {
    session.signOut();
    window.dispatchEvent(new Event("tuneplane:signed-out"));
  }
  if (!response.ok) {
    let problem = {};
    try { problem = await response.json(); } catch { /* not problem+json */ }
    throw new ApiError(response.status, problem.title || response.statusText, problem.detail, problem.errors);
  }
  return text ? response.text() : response.json();
}
