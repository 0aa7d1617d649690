// Times, durations and numbers as the console shows them.

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

// Time left at the pace this page has seen: (time / steps since the first sighting) x steps to go. Before a
// second sighting, the pace since the job started (start-up included, so an overestimate).
const sightings = new Map(); // job id -> first {at, step} seen with step > 0

export function eta(job, step, maxSteps, now = Date.now()) {
  if (!job.started_at || !step || !maxSteps || step >= maxSteps) return null;
  const first = sightings.get(job.id);
  if (!first) sightings.set(job.id, { at: now, step });
  if (first && step > first.step) return ((now - first.at) / 1000 / (step - first.step)) * (maxSteps - step);
  const elapsed = (now - new Date(job.started_at).getTime()) / 1000;
  return (elapsed / step) * (maxSteps - step);
}

export function number(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

export const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
export const STATES = ["PENDING", "VALIDATING", "QUEUED", "SUBMITTED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
