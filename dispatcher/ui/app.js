// The operator page. It talks only to the daemon's public /v1 JSON API with the token the
// person signs in with, and renders every value from the API as text (never as HTML).

const TOKEN_KEY = "dispatcher.token";
const FINISHED = new Set(["delivered", "failed", "expired"]);
const PAGE = 50;
const WATCH_MS = 700;
const WATCH_FOR_MS = 120_000;
// The page refreshes what it shows this often while open (and visible), without reloading.
const POLL_MS = 5_000;
// Trend periods: the series' window and bucket, in seconds (GET .../stats?window=&bucket=).
const PERIODS = { 86400: 3600, 604800: 21600 };
// How often a poll re-reads a trend: its buckets are an hour or six, and a week's series reads
// about a million attempts for a busy subscription (~1 s of database time; README).
const TREND_EVERY_MS = { 86400: 30_000, 604800: 300_000 };
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  subs: [],
  subsCursor: null,
  stats: new Map(), // subscription id -> stats | Error
  selected: null, // the subscription shown
  deliveries: [],
  cursor: null,
  expanded: new Set(), // delivery ids whose detail is open
  details: new Map(), // delivery id -> detail | Error
  checked: new Set(), // delivery ids ticked for "resend selected"
  watching: new Map(), // delivery id -> deadline (ms) while a resend is in progress
  watchTimer: null,
  job: null,
  generation: 0, // bumped on every switch; late answers for an old view are dropped
  view: "none", // "subscription" | "delivery" | "search" | "none"
  trendWindow: 86400,
  trends: null, // the selected subscription's stats with a series | Error
  trendsAt: 0, // when they were last read (ms)
  delivery: null, // the delivery view's detail | Error
  deliveryId: null,
  found: [], // search results
  search: null, // the search's query parameters
  pollTimer: null,
  polling: false,
};

// -- small helpers ------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with attributes and children; strings become text nodes, so never HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "checked" || key === "disabled") el[key] = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function setText(el, text) {
  el.textContent = text ?? "";
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function formatTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return `${Math.round(ms)} ms`;
}

function formatRate(rate) {
  if (rate === null || rate === undefined) return "—";
  const pct = rate * 100;
  return `${pct === 100 || pct === 0 ? pct.toFixed(0) : pct.toFixed(1)}%`;
}

function prettyJson(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function subscriptionTitle(sub) {
  if (sub.name) return sub.name;
  try {
    const url = new URL(sub.url);
    return url.host + (url.pathname === "/" ? "" : url.pathname);
  } catch {
    return sub.url;
  }
}

function statusTone(status) {
  if (status === "delivered") return "ok";
  if (status === "failed" || status === "expired") return "bad";
  if (status === "paused") return "off";
  return "wait"; // pending, sending, retrying, waiting
}

function outcomeTone(outcome) {
  if (outcome === "delivered") return "ok";
  if (outcome === "retry") return "wait";
  return "bad"; // failed, expired
}

function pill(text, tone, extra = {}) {
  return h("span", { class: `pill ${tone}`, ...extra }, text);
}

// -- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${state.token}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "unreachable", `the daemon did not answer (${err.message})`);
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && typeof data.error === "object" && data.error ? data.error : {};
    throw new ApiError(
      response.status,
      String(error.code ?? `http_${response.status}`),
      String(error.message ?? response.statusText ?? "request failed"),
      error.field ?? null,
    );
  }
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") q.set(key, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

// -- messages -----------------------------------------------------------------------------

function showError(err, doing) {
  if (err instanceof ApiError && err.status === 401) {
    signOut(`The token was not accepted (${err.message}). Sign in again.`);
    return;
  }
  const banner = $("banner");
  banner.className = "banner error";
  setText($("banner-title"), doing ? `Could not ${doing}.` : "Something went wrong.");
  const parts = [];
  if (err instanceof ApiError) {
    parts.push(err.message);
    if (err.field) parts.push(`(field: ${err.field})`);
    parts.push(`[${err.code}${err.status ? `, HTTP ${err.status}` : ""}]`);
  } else {
    parts.push(String(err?.message ?? err));
  }
  setText($("banner-message"), parts.join(" "));
  banner.hidden = false;
}

function showInfo(title, message) {
  const banner = $("banner");
  banner.className = "banner info";
  setText($("banner-title"), title);
  setText($("banner-message"), message);
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

/** Run an action, showing its error; buttons given are disabled while it runs. */
async function attempt(doing, action, ...buttons) {
  for (const b of buttons) b.disabled = true;
  try {
    return await action();
  } catch (err) {
    showError(err, doing);
    return undefined;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// -- sign in and out ----------------------------------------------------------------------

function showSignIn(message) {
  $("app").hidden = true;
  $("session").hidden = true;
  $("search-form").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  setText(error, message ?? "");
  error.hidden = !message;
  $("token").value = "";
  $("token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.generation += 1;
  stopWatching();
  state.job = null;
  state.subs = [];
  state.selected = null;
  state.stats.clear();
  stopPolling();
  hideBanner();
  history.replaceState(null, "", location.pathname);
  showSignIn(message);
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    showSignIn("Paste a token first.");
    return;
  }
  state.token = token;
  const button = $("signin-submit");
  button.disabled = true;
  try {
    await api("GET", "/v1/subscriptions?limit=1");
  } catch (err) {
    state.token = null;
    const why =
      err instanceof ApiError && err.status === 401
        ? "That token was not accepted."
        : `Could not sign in: ${err.message}`;
    showSignIn(why);
    return;
  } finally {
    button.disabled = false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  await start();
}

async function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("session").hidden = false;
  $("search-form").hidden = false;
  await Promise.all([loadSubscriptions(false), loadQueue()]);
  markUpdated();
  await route();
  startPolling();
}

// -- hash routing: every view has a link that can be shared ------------------------------
//   #/<subscription id>          a subscription's trends and history
//   #/deliveries/<id>            one delivery: next step, attempts side by side, payload
//   #/search?<query>             deliveries found across the environment's subscriptions

async function route() {
  if (!state.token) return;
  const hash = location.hash.replace(/^#\/?/, "");
  const delivery = hash.match(/^deliveries\/(\d{1,18})$/);
  if (delivery) return showDelivery(Number(delivery[1]));
  if (hash.startsWith("search?")) return runSearch(new URLSearchParams(hash.slice(7)));
  const id = hash.replace(/^subscriptions\//, "");
  const sub = state.subs.find((s) => s.id === id);
  if (sub) {
    if (state.view !== "subscription" || state.selected?.id !== sub.id) await selectSubscription(sub);
    return;
  }
  showView(state.selected ? "subscription" : "none");
}

function showView(view) {
  state.view = view;
  $("placeholder").hidden = view !== "none";
  $("sub-view").hidden = view !== "subscription";
  $("delivery-view").hidden = view !== "delivery";
  $("search-view").hidden = view !== "search";
}

// -- live: poll while the page is open ----------------------------------------------------

function startPolling() {
  stopPolling();
  state.pollTimer = setInterval(poll, POLL_MS);
}

function stopPolling() {
  if (state.pollTimer !== null) clearInterval(state.pollTimer);
  state.pollTimer = null;
}

/** Refresh what is on screen: the queue, the subscriptions' numbers and the open view. */
async function poll() {
  if (state.polling || document.hidden || !state.token) return;
  state.polling = true;
  try {
    const work = [loadQueue(), ...state.subs.map((s) => loadStats(s.id, true))];
    if (state.view === "subscription" && state.selected) {
      if (Date.now() - state.trendsAt >= TREND_EVERY_MS[state.trendWindow]) work.push(loadTrends(state.selected.id));
      // A resend in progress follows its own deliveries; the list waits for it.
      if (state.job === null && state.watching.size === 0) work.push(refreshDeliveries());
    } else if (state.view === "delivery" && state.deliveryId !== null) {
      work.push(loadDelivery(state.deliveryId, true));
    }
    await Promise.all(work);
    markUpdated();
  } finally {
    state.polling = false;
  }
}

function markUpdated() {
  const now = new Date();
  const el = $("updated");
  el.dataset.at = String(now.getTime());
  setText(el, `Updated ${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}`);
}

// -- the queue now ------------------------------------------------------------------------

async function loadQueue() {
  let queue;
  try {
    queue = await api("GET", "/v1/queue");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    $("queue-grid").replaceChildren(h("div", {}, h("dt", {}, "Queue"), h("dd", {}, err.message)));
    return;
  }
  const cell = (key, label, value, tone, title) =>
    h("div", { dataset: { key }, class: tone ?? "", title }, h("dt", {}, label), h("dd", {}, value));
  const age = queue.oldest_due_age_seconds;
  $("queue-grid").replaceChildren(
    cell("depth", "Depth", String(queue.depth), null, "Live deliveries, paused ones included"),
    cell(
      "waiting",
      "Waiting for a slot",
      String(queue.waiting_for_slot),
      queue.waiting_for_slot ? "wait" : null,
      "Due now, not yet being sent",
    ),
    cell("oldest", "Oldest due", formatAge(age), age >= 60 ? "bad" : null, "How long the longest-waiting due delivery has waited"),
    cell("sending", "Sending", String(queue.sending)),
    cell("scheduled", "Retrying later", String(queue.scheduled)),
    cell(
      "paused",
      "Paused",
      String(queue.paused + queue.endpoint_paused),
      null,
      "Deactivated subscriptions, and endpoints a Retry-After paused",
    ),
  );
}

function formatAge(seconds) {
  if (!seconds) return "—";
  if (seconds < 1) return "<1 s";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// -- subscriptions ------------------------------------------------------------------------

async function loadSubscriptions(more) {
  const page = await attempt("load the subscriptions", () =>
    api("GET", `/v1/subscriptions${query({ limit: PAGE, cursor: more ? state.subsCursor : null })}`),
  );
  if (!page) return;
  state.subs = more ? state.subs.concat(page.items) : page.items;
  state.subsCursor = page.next_cursor;
  if (state.selected) {
    const fresh = state.subs.find((s) => s.id === state.selected.id);
    if (fresh) state.selected = fresh;
  }
  renderSubscriptions();
  await Promise.all(page.items.map((s) => loadStats(s.id)));
}

async function loadStats(id, quiet = false) {
  const before = JSON.stringify(state.stats.get(id) ?? null);
  try {
    state.stats.set(id, await api("GET", `/v1/subscriptions/${encodeURIComponent(id)}/stats`));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    state.stats.set(id, err);
  }
  // A poll that changed nothing leaves the page as it is (nothing moves under the pointer).
  if (quiet && JSON.stringify(state.stats.get(id)) === before) return;
  renderSubscriptions();
  if (state.selected?.id === id) renderSubscriptionHead();
}

function statLine(stats) {
  if (!stats) return h("span", { class: "sub-stats muted" }, "Loading stats…");
  if (stats instanceof Error) {
    return h("span", { class: "sub-stats muted" }, `Stats unavailable: ${stats.message}`);
  }
  const d = stats.deliveries ?? {};
  if (!stats.attempts) {
    return h(
      "span",
      { class: "sub-stats" },
      h("span", {}, "No attempts in 24 h"),
      h("span", { title: "Deliveries waiting to be sent" }, String(d.pending ?? 0), " pending"),
    );
  }
  return h(
    "span",
    { class: "sub-stats" },
    h("span", { title: "Successful attempts, last 24 h" }, formatRate(stats.success_rate), " ok"),
    h("span", { title: "Mean response time" }, formatMs(stats.mean_response_ms), " mean"),
    h("span", { title: "95th percentile response time" }, formatMs(stats.p95_response_ms), " p95"),
    h("span", { title: "Deliveries waiting to be sent" }, String(d.pending ?? 0), " pending"),
  );
}

function renderSubscriptions() {
  const list = $("subs");
  list.replaceChildren(
    ...state.subs.map((sub) => {
      const selected = state.selected?.id === sub.id;
      return h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            class: `sub${selected ? " selected" : ""}${sub.active ? "" : " inactive"}`,
            "aria-current": selected ? "true" : null,
            dataset: { id: sub.id },
            onclick: () => selectSubscription(sub),
          },
          h(
            "span",
            { class: "sub-row" },
            h("span", { class: "sub-name" }, subscriptionTitle(sub)),
            sub.active
              ? h("span", { class: "badge ok" }, "Active")
              : h("span", { class: "badge bad" }, "Deactivated"),
          ),
          h("span", { class: "sub-link mono" }, sub.url),
          h(
            "span",
            { class: "sub-tags" },
            h("span", { class: "tag profile" }, sub.profile),
            sub.events.slice(0, 3).map((e) => h("span", { class: "tag mono" }, e)),
            sub.events.length > 3 ? h("span", { class: "tag" }, `+${sub.events.length - 3}`) : null,
          ),
          sub.active ? null : h("span", { class: "sub-reason" }, sub.deactivated_reason ?? "deactivated"),
          statLine(state.stats.get(sub.id)),
        ),
      );
    }),
  );
  $("subs-empty").hidden = state.subs.length > 0;
  $("more-subs").hidden = !state.subsCursor;
}

function renderSubscriptionHead() {
  const sub = state.selected;
  setText($("sub-name"), subscriptionTitle(sub));
  const badge = $("sub-state");
  badge.className = `badge ${sub.active ? "ok" : "bad"}`;
  setText(badge, sub.active ? "Active" : "Deactivated");
  setText($("sub-url"), sub.url);
  $("sub-meta").replaceChildren(
    h("span", {}, "Profile ", h("strong", {}, sub.profile)),
    h("span", {}, "Events ", h("strong", { class: "mono" }, sub.events.join(", "))),
    h("span", {}, "Environment ", h("strong", {}, sub.environment_id)),
    h("span", { class: "mono muted" }, sub.id),
  );
  $("deactivated").hidden = sub.active;
  setText($("deactivated-reason"), sub.active ? "" : `Reason: ${sub.deactivated_reason ?? "not given"}.`);

  const stats = state.stats.get(sub.id);
  const cell = (label, value, tone) =>
    h("div", { class: `stat${tone ? ` ${tone}` : ""}` }, h("dt", {}, label), h("dd", {}, value));
  if (!stats || stats instanceof Error) {
    $("stats").replaceChildren(cell("Stats", stats ? stats.message : "loading…"));
    return;
  }
  const d = stats.deliveries ?? {};
  const rate = stats.success_rate;
  $("stats").replaceChildren(
    cell("Success rate (24 h)", formatRate(rate), rate === null ? "" : rate >= 0.95 ? "ok" : "bad"),
    cell("Mean response", formatMs(stats.mean_response_ms)),
    cell("p95 response", formatMs(stats.p95_response_ms)),
    cell("Pending", String(d.pending ?? 0)),
    cell("Delivered · failed", `${d.delivered ?? 0} · ${(d.failed ?? 0) + (d.expired ?? 0)}`),
  );
}

async function selectSubscription(sub) {
  hideBanner();
  state.generation += 1;
  stopWatching();
  state.job = null;
  state.selected = sub;
  state.deliveries = [];
  state.cursor = null;
  state.expanded.clear();
  state.details.clear();
  state.checked.clear();
  state.trends = null;
  history.replaceState(null, "", `#/${sub.id}`);
  showView("subscription");
  $("job").hidden = true;
  renderSubscriptions();
  renderSubscriptionHead();
  renderRows();
  renderTrends();
  await Promise.all([loadDeliveries(false), loadStats(sub.id), loadTrends(sub.id)]);
}

async function reactivate() {
  const sub = state.selected;
  const fresh = await attempt(
    "reactivate the subscription",
    () => api("POST", `/v1/subscriptions/${encodeURIComponent(sub.id)}/activate`),
    $("reactivate"),
  );
  if (!fresh) return;
  replaceSubscription(fresh);
  showInfo("Reactivated.", "Its paused deliveries are queued again.");
  await Promise.all([loadDeliveries(false), loadStats(fresh.id)]);
  // Follow what was waiting for the reactivation until it has been sent.
  const waiting = state.deliveries.filter((d) => !FINISHED.has(d.status)).map((d) => d.id);
  if (waiting.length) watch(waiting);
}

function replaceSubscription(fresh) {
  state.subs = state.subs.map((s) => (s.id === fresh.id ? fresh : s));
  if (state.selected?.id === fresh.id) state.selected = fresh;
  renderSubscriptions();
  renderSubscriptionHead();
}

// -- deliveries ---------------------------------------------------------------------------

async function loadDeliveries(more) {
  const generation = state.generation;
  const sub = state.selected;
  const page = await attempt("load the deliveries", () =>
    api(
      "GET",
      `/v1/deliveries${query({
        subscription_id: sub.id,
        status: $("status-filter").value,
        limit: PAGE,
        cursor: more ? state.cursor : null,
      })}`,
    ),
  );
  if (!page || generation !== state.generation) return;
  if (more) {
    const known = new Set(state.deliveries.map((d) => d.id));
    state.deliveries = state.deliveries.concat(page.items.filter((d) => !known.has(d.id)));
  } else {
    state.deliveries = page.items;
    const shown = new Set(page.items.map((d) => d.id));
    for (const id of [...state.checked]) if (!shown.has(id)) state.checked.delete(id);
  }
  state.cursor = page.next_cursor;
  renderRows();
  for (const id of state.expanded) loadDetail(id);
}

/** The poll's refresh of the history: the first page again, merged into what is shown (new
 * deliveries on top, changed ones updated, pages loaded with "Load more" kept). */
async function refreshDeliveries() {
  const generation = state.generation;
  const sub = state.selected;
  let page;
  try {
    page = await api(
      "GET",
      `/v1/deliveries${query({ subscription_id: sub.id, status: $("status-filter").value, limit: PAGE })}`,
    );
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) showError(err);
    return;
  }
  if (generation !== state.generation || state.job !== null || state.watching.size) return;
  const old = new Map(state.deliveries.map((d) => [d.id, JSON.stringify(d)]));
  const changed = page.items.filter((d) => old.get(d.id) !== JSON.stringify(d));
  if (!changed.length) return;
  if (state.cursor === null) {
    state.deliveries = page.items;
    state.cursor = page.next_cursor;
  } else {
    const fresh = new Map(page.items.map((d) => [d.id, d]));
    const newest = state.deliveries.length ? state.deliveries[0].id : 0;
    const added = page.items.filter((d) => d.id > newest);
    state.deliveries = added.concat(state.deliveries.map((d) => fresh.get(d.id) ?? d));
  }
  renderRows();
  for (const d of changed) if (state.expanded.has(d.id)) loadDetail(d.id);
}

async function loadDetail(id) {
  const generation = state.generation;
  let detail;
  try {
    detail = await api("GET", `/v1/deliveries/${id}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    detail = err;
  }
  if (generation !== state.generation) return;
  state.details.set(id, detail);
  if (!(detail instanceof Error)) updateDelivery(detail);
  renderRows();
}

/** Put a fresher copy of a delivery (from a detail or a resend answer) into the list. */
function updateDelivery(fresh) {
  const { payload, attempt_history, request_headers, ...summary } = fresh;
  state.deliveries = state.deliveries.map((d) => (d.id === summary.id ? summary : d));
}

function toggle(id) {
  if (state.expanded.has(id)) {
    state.expanded.delete(id);
    renderRows();
    return;
  }
  state.expanded.add(id);
  renderRows();
  loadDetail(id);
}

function lastResponse(d) {
  if (d.last_status_code !== null && d.last_status_code !== undefined) {
    return h("span", { class: "mono" }, `HTTP ${d.last_status_code}`);
  }
  if (d.last_error) return h("span", { class: "error-text", title: d.last_error }, d.last_error);
  return h("span", { class: "muted" }, "—");
}

function deliveryRow(d) {
  const open = state.expanded.has(d.id);
  const finished = FINISHED.has(d.status);
  const watching = state.watching.has(d.id);
  const next =
    d.status === "retrying" && d.next_attempt_at
      ? `next ${formatTime(d.next_attempt_at)}`
      : d.waiting_behind
        ? `waiting behind delivery ${d.waiting_behind}` // ordering: after its key's head
        : null;
  return h(
    "tr",
    {
      class: `delivery${open ? " open" : ""}`,
      dataset: { id: String(d.id), status: d.status },
      onclick: (event) => {
        if (event.target.closest("button, input, label")) return;
        toggle(d.id);
      },
    },
    h(
      "td",
      { class: "col-check" },
      h("input", {
        type: "checkbox",
        class: "pick",
        "aria-label": `Select delivery ${d.id}`,
        checked: state.checked.has(d.id),
        disabled: !finished,
        title: finished ? null : "only finished deliveries can be resent in bulk",
        onchange: (event) => {
          if (event.target.checked) state.checked.add(d.id);
          else state.checked.delete(d.id);
          renderSelection();
        },
      }),
    ),
    h(
      "td",
      { class: "col-id" },
      h(
        "button",
        {
          type: "button",
          class: "expander",
          "aria-expanded": open ? "true" : "false",
          onclick: () => toggle(d.id),
        },
        h("span", { class: "chevron", "aria-hidden": "true" }, open ? "▾" : "▸"),
        `#${d.id}`,
      ),
      h("a", { class: "open-link", href: `#/deliveries/${d.id}`, title: "Open (a link to share)" }, "↗"),
    ),
    h(
      "td",
      { class: "col-event" },
      h("div", { class: "mono" }, d.test ? h("span", { class: "tag test" }, "test") : null, d.event_name),
      d.entity_instance_id ? h("div", { class: "muted small" }, d.entity_instance_id) : null,
    ),
    h(
      "td",
      { class: "col-status" },
      pill(d.status, statusTone(d.status), { dataset: { status: d.status } }),
      next ? h("div", { class: "muted small" }, next) : null,
    ),
    h("td", { class: "col-num" }, String(d.attempts)),
    h("td", { class: "col-last" }, lastResponse(d)),
    h("td", { class: "col-time" }, formatTime(d.created_at)),
    h(
      "td",
      { class: "col-action" },
      h(
        "button",
        {
          type: "button",
          class: "button small resend",
          disabled: d.status === "sending" || watching,
          onclick: (event) => resendOne(d.id, event.currentTarget),
        },
        watching ? "Resending…" : "Resend",
      ),
    ),
  );
}

function detailRow(id) {
  const detail = state.details.get(id);
  let body;
  if (!detail) {
    body = h("p", { class: "muted" }, "Loading…");
  } else if (detail instanceof Error) {
    body = h("p", { class: "error-text" }, `Could not load the delivery: ${detail.message}`);
  } else {
    body = h(
      "div",
      { class: "expansion-grid" },
      h(
        "section",
        { class: "attempts" },
        h("h3", {}, `Attempts (${detail.attempt_history.length})`),
        detail.attempt_history.length === 0
          ? h("p", { class: "muted" }, "No attempt yet.")
          : attemptsTable(detail.attempt_history),
      ),
      h(
        "section",
        { class: "payload" },
        h(
          "h3",
          {},
          "Payload sent ",
          h(
            "span",
            { class: "h3-note" },
            `event ${detail.event_id}`,
            detail.finished_at ? ` · finished ${formatTime(detail.finished_at)}` : "",
            detail.next_attempt_at ? ` · next attempt ${formatTime(detail.next_attempt_at)}` : "",
          ),
        ),
        h("pre", { class: "code" }, prettyJson(detail.payload)),
      ),
    );
  }
  return h(
    "tr",
    { class: "expansion", dataset: { for: String(id) } },
    h("td", { colspan: "8" }, body),
  );
}

function attemptsTable(attempts) {
  return h(
    "table",
    { class: "attempt-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { class: "col-num" }, "#"),
        h("th", {}, "Time"),
        h("th", {}, "Duration"),
        h("th", {}, "Status"),
        h("th", {}, "Outcome"),
        h("th", {}, "Error / response"),
      ),
    ),
    h(
      "tbody",
      {},
      attempts.map((a) =>
        h(
          "tr",
          { class: "attempt", dataset: { outcome: a.outcome } },
          h("td", { class: "col-num" }, String(a.attempt)),
          h("td", { class: "nowrap" }, formatTime(a.started_at)),
          h("td", { class: "nowrap" }, formatMs(a.duration_ms)),
          h("td", { class: "mono" }, a.status_code === null ? "—" : String(a.status_code)),
          h("td", {}, pill(a.outcome, outcomeTone(a.outcome))),
          h(
            "td",
            { class: "excerpt" },
            a.error ? h("div", { class: "error-text" }, a.error) : null,
            a.response_excerpt ? h("pre", { class: "code small" }, a.response_excerpt) : null,
            !a.error && !a.response_excerpt ? h("span", { class: "muted" }, "—") : null,
          ),
        ),
      ),
    ),
  );
}

function renderRows() {
  const rows = [];
  for (const d of state.deliveries) {
    rows.push(deliveryRow(d));
    if (state.expanded.has(d.id)) rows.push(detailRow(d.id));
  }
  $("rows").replaceChildren(...rows);
  $("rows-empty").hidden = state.deliveries.length > 0;
  $("more").hidden = !state.cursor;
  renderSelection();
}

function renderSelection() {
  const n = state.checked.size;
  const button = $("resend-selected");
  button.disabled = n === 0 || state.job !== null;
  setText(button, n ? `Resend selected (${n})` : "Resend selected");
  const selectable = state.deliveries.filter((d) => FINISHED.has(d.status));
  const all = $("select-all");
  all.checked = selectable.length > 0 && selectable.every((d) => state.checked.has(d.id));
  all.indeterminate = !all.checked && selectable.some((d) => state.checked.has(d.id));
  all.disabled = selectable.length === 0;
  $("resend-failed").disabled = state.job !== null;
}

function selectAll(event) {
  for (const d of state.deliveries) {
    if (!FINISHED.has(d.status)) continue;
    if (event.target.checked) state.checked.add(d.id);
    else state.checked.delete(d.id);
  }
  renderRows();
}

// -- resend -------------------------------------------------------------------------------

async function resendOne(id, button) {
  const fresh = await attempt("resend the delivery", () => api("POST", `/v1/deliveries/${id}/resend`), button);
  if (!fresh) return;
  updateDelivery(fresh);
  watch([id]);
}

/** Follow resent deliveries until they finish again, refreshing their rows and details. */
function watch(ids) {
  const deadline = Date.now() + WATCH_FOR_MS;
  for (const id of ids) state.watching.set(id, deadline);
  renderRows();
  if (state.watchTimer === null) state.watchTimer = setTimeout(watchTick, WATCH_MS);
}

function stopWatching() {
  if (state.watchTimer !== null) clearTimeout(state.watchTimer);
  state.watchTimer = null;
  state.watching.clear();
}

async function watchTick() {
  const generation = state.generation;
  const now = Date.now();
  await Promise.all(
    [...state.watching.keys()].map(async (id) => {
      try {
        const detail = await api("GET", `/v1/deliveries/${id}`);
        if (generation !== state.generation) return;
        state.details.set(id, detail);
        updateDelivery(detail);
        if (FINISHED.has(detail.status)) state.watching.delete(id);
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) showError(err);
        state.watching.delete(id);
      }
    }),
  );
  if (generation !== state.generation) return;
  for (const [id, deadline] of state.watching) if (deadline < now) state.watching.delete(id);
  renderRows();
  if (state.watching.size) {
    state.watchTimer = setTimeout(watchTick, WATCH_MS);
  } else {
    state.watchTimer = null;
    if (state.selected) {
      loadStats(state.selected.id);
      loadTrends(state.selected.id);
    }
  }
}

async function resendSelected() {
  const ids = [...state.checked];
  if (!ids.length) return;
  await startJob(
    "resend the selected deliveries",
    {
      subscription_id: state.selected.id,
      ids,
      status: ["delivered", "failed", "expired"],
    },
    `Resending ${ids.length} selected`,
    ids,
  );
}

async function resendFailed() {
  await startJob(
    "resend the failed deliveries",
    { subscription_id: state.selected.id, status: "failed" },
    "Resending every failed delivery",
    null,
  );
}

async function startJob(doing, filter, label, ids) {
  const generation = state.generation;
  const job = await attempt(
    doing,
    () => api("POST", "/v1/deliveries/resend", filter),
    $("resend-selected"),
    $("resend-failed"),
  );
  if (!job || generation !== state.generation) return;
  hideBanner();
  state.job = job;
  renderJob(label);
  renderSelection();
  while (state.job && state.job.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, WATCH_MS));
    if (generation !== state.generation) return;
    try {
      state.job = await api("GET", `/v1/resend-jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      showError(err, "follow the resend job");
      break;
    }
    renderJob(label);
  }
  const done = state.job;
  state.job = null;
  state.checked.clear();
  renderSelection();
  if (done?.status === "failed") {
    showError(new ApiError(0, "job_failed", done.error ?? "the resend job failed"), doing);
  }
  // What was resent is no longer failed: show every status so it can be followed.
  if (FINISHED.has($("status-filter").value)) $("status-filter").value = "";
  await loadDeliveries(false);
  const resent = ids ?? state.deliveries.filter((d) => !FINISHED.has(d.status)).map((d) => d.id);
  if (resent.length) watch(resent);
}

function renderJob(label) {
  const job = state.job;
  const box = $("job");
  box.hidden = false;
  box.dataset.status = job.status;
  const progress = $("job-progress");
  const matched = job.matched ?? 0;
  progress.max = Math.max(matched, 1);
  progress.value = job.status === "done" ? progress.max : job.resent;
  const what =
    job.status === "running"
      ? `${label}: ${job.resent} of ${job.matched ?? "?"} sent back to the queue…`
      : job.status === "done"
        ? `Done: ${job.resent} of ${matched} deliveries sent back to the queue.`
        : `The resend job failed after ${job.resent} deliveries: ${job.error ?? "unknown error"}`;
  setText($("job-text"), what);
}

// -- trends: two hand-drawn SVG charts from one stats call --------------------------------
// Hand-drawn rather than a charting library: two small charts (stacked bars, two lines)
// are ~150 lines here, need no fourth file, and keep the strict CSP (no inline styles).

async function loadTrends(id) {
  const span = state.trendWindow;
  const generation = state.generation;
  state.trendsAt = Date.now();
  let trends;
  try {
    trends = await api(
      "GET",
      `/v1/subscriptions/${encodeURIComponent(id)}/stats${query({ window: span, bucket: PERIODS[span] })}`,
    );
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    trends = err;
  }
  if (generation !== state.generation || span !== state.trendWindow) return;
  if (JSON.stringify(trends) === JSON.stringify(state.trends)) return;
  state.trends = trends;
  renderTrends();
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "dataset") for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function bucketLabel(iso, bucket) {
  const d = new Date(iso);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return bucket >= 86400 || time === "00:00" ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())}` : time;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

const CHART = { width: 560, height: 180, left: 44, right: 8, top: 8, bottom: 22 };

/** The frame of a chart: horizontal grid lines with their values, time labels below. */
function frame(series, bucket, max, format) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    parts.push(svg("line", { class: "grid", x1: left, x2: width - right, y1: y, y2: y }));
    parts.push(svg("text", { class: "axis", x: left - 6, y: y + 4, "text-anchor": "end" }, format(max * f)));
  }
  const slot = (width - left - right) / series.length;
  const every = Math.max(1, Math.ceil(series.length / 6));
  series.forEach((b, i) => {
    if (i % every !== 0) return;
    parts.push(
      svg("text", { class: "axis", x: left + slot * i + slot / 2, y: height - 6, "text-anchor": "middle" }, bucketLabel(b.start, bucket)),
    );
  });
  return parts;
}

const OUTCOMES = [
  ["delivered", "Delivered", "ok"],
  ["retried", "Retried", "wait"],
  ["failed", "Failed", "bad"],
];

function outcomesChart(series, bucket) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const max = niceMax(Math.max(0, ...series.map((b) => b.delivered + b.retried + b.failed)));
  const slot = (width - left - right) / series.length;
  const barW = Math.max(1, slot * 0.72);
  const bars = series.map((b, i) => {
    let y = top + plotH;
    const x = left + slot * i + (slot - barW) / 2;
    const total = b.delivered + b.retried + b.failed;
    const rects = OUTCOMES.map(([key, , tone]) => {
      const hgt = (b[key] / max) * plotH;
      y -= hgt;
      return b[key] ? svg("rect", { class: `bar ${tone}`, x, y, width: barW, height: hgt }) : null;
    });
    return svg(
      "g",
      { class: "bucket", dataset: { start: b.start, delivered: b.delivered, retried: b.retried, failed: b.failed } },
      svg("rect", { class: "hit", x: left + slot * i, y: top, width: slot, height: plotH }),
      rects,
      svg(
        "title",
        {},
        `${formatTime(b.start)}: ${total} attempts — ${b.delivered} delivered, ${b.retried} retried, ${b.failed} failed`,
      ),
    );
  });
  return svg(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Deliveries by outcome per bucket" },
    frame(series, bucket, max, (v) => String(Math.round(v))),
    bars,
  );
}

function latencyChart(series, bucket) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const values = series.flatMap((b) => [b.p50_response_ms, b.p95_response_ms]).filter((v) => v !== null);
  const max = niceMax(Math.max(0, ...values));
  const slot = (width - left - right) / series.length;
  const line = (key, tone) => {
    // One path; a bucket without attempts breaks the line instead of drawing through zero.
    let d = "";
    let open = false;
    const dots = [];
    series.forEach((b, i) => {
      const v = b[key];
      if (v === null) {
        open = false;
        return;
      }
      const x = left + slot * i + slot / 2;
      const y = top + plotH * (1 - v / max);
      d += `${open ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)} `;
      open = true;
      dots.push(svg("circle", { class: `dot ${tone}`, cx: x, cy: y, r: 2.5 }, svg("title", {}, `${formatTime(b.start)}: ${key.slice(0, 3)} ${formatMs(v)}`)));
    });
    return svg("g", { class: `series ${tone}`, dataset: { key } }, svg("path", { class: `line ${tone}`, d: d.trim() }), dots);
  };
  return svg(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Response time p50 and p95 per bucket" },
    frame(series, bucket, max, formatMs),
    line("p95_response_ms", "p95"),
    line("p50_response_ms", "p50"),
  );
}

function legendItem(key, tone, label, value) {
  return h("span", { class: `legend-item ${tone}`, dataset: { key } }, h("span", { class: "swatch" }), label, " ", h("strong", {}, value));
}

function renderTrends() {
  for (const id of ["window-day", "window-week"]) {
    $(id).setAttribute("aria-pressed", String(Number($(id).dataset.window) === state.trendWindow));
  }
  const trends = state.trends;
  const outcomes = $("outcomes-plot");
  const latency = $("latency-plot");
  if (!trends || trends instanceof Error) {
    const note = h("p", { class: "muted chart-note" }, trends ? `Trends unavailable: ${trends.message}` : "Loading…");
    outcomes.replaceChildren(note);
    latency.replaceChildren(note.cloneNode(true));
    $("outcomes-legend").replaceChildren();
    $("latency-legend").replaceChildren();
    return;
  }
  const series = trends.series;
  const bucket = trends.bucket_seconds;
  setText($("outcomes-unit"), `per ${bucket >= 3600 ? `${bucket / 3600} h` : `${bucket / 60} min`}`);
  const sum = (key) => series.reduce((n, b) => n + b[key], 0);
  $("outcomes-legend").replaceChildren(...OUTCOMES.map(([key, label, tone]) => legendItem(key, tone, label, String(sum(key)))));
  $("latency-legend").replaceChildren(
    legendItem("p50", "p50", "p50", ""),
    legendItem("p95", "p95", "p95", ""),
    h("span", { class: "muted" }, `over the period: mean ${formatMs(trends.mean_response_ms)}, p95 ${formatMs(trends.p95_response_ms)}`),
  );
  outcomes.replaceChildren(outcomesChart(series, bucket));
  latency.replaceChildren(latencyChart(series, bucket));
}

// -- test event ---------------------------------------------------------------------------

async function sendTest() {
  const sub = state.selected;
  const sent = await attempt(
    "send a test event",
    () => api("POST", `/v1/subscriptions/${encodeURIComponent(sub.id)}/test`),
    $("send-test"),
  );
  if (!sent) return;
  showInfo("Test event sent.", `Delivery #${sent.id} (${sent.event_name}, an example payload) is on its way.`);
  if (FINISHED.has($("status-filter").value)) $("status-filter").value = "";
  await loadDeliveries(false);
  watch([sent.id]);
}

// -- find a delivery ----------------------------------------------------------------------

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function submitSearch(event) {
  event.preventDefault();
  const text = $("search").value.trim();
  const code = $("search-code").value.trim();
  const since = $("search-since").value;
  if (/^\d{1,18}$/.test(text) && !code && !since) {
    location.hash = `#/deliveries/${text}`;
    return;
  }
  const params = new URLSearchParams();
  if (UUID_RE.test(text)) params.set("event_id", text);
  else if (text) params.set("entity_instance_id", text);
  if (code) params.set("status_code", code);
  if (since) params.set("since", new Date(Date.now() - Number(since) * 1000).toISOString());
  location.hash = `#/search?${params}`;
}

async function runSearch(params) {
  state.generation += 1;
  stopWatching();
  const generation = state.generation;
  showView("search");
  state.search = params;
  const said = [];
  if (params.get("event_id")) said.push(`event ${params.get("event_id")}`);
  if (params.get("entity_instance_id")) said.push(`entity ${params.get("entity_instance_id")}`);
  if (params.get("status_code")) said.push(`last answered HTTP ${params.get("status_code")}`);
  if (params.get("since")) said.push(`created since ${formatTime(params.get("since"))}`);
  setText($("search-what"), said.length ? `Across every subscription: ${said.join(", ")}.` : "Across every subscription: the latest.");
  const allowed = ["event_id", "entity_instance_id", "status_code", "since", "until", "status", "event_name"];
  const asked = Object.fromEntries(allowed.filter((k) => params.get(k)).map((k) => [k, params.get(k)]));
  const page = await attempt("find deliveries", () => api("GET", `/v1/deliveries${query({ ...asked, limit: PAGE })}`));
  if (generation !== state.generation) return;
  state.found = page ? page.items : [];
  const byId = new Map(state.subs.map((s) => [s.id, s]));
  $("found-rows").replaceChildren(
    ...state.found.map((d) =>
      h(
        "tr",
        { class: "found", dataset: { id: String(d.id), status: d.status } },
        h("td", { class: "col-id" }, h("a", { href: `#/deliveries/${d.id}`, class: "mono" }, `#${d.id}`)),
        h(
          "td",
          { class: "col-event" },
          h("div", { class: "mono" }, d.test ? h("span", { class: "tag test" }, "test") : null, d.event_name),
          d.entity_instance_id ? h("div", { class: "muted small" }, d.entity_instance_id) : null,
        ),
        h("td", {}, byId.has(d.subscription_id) ? subscriptionTitle(byId.get(d.subscription_id)) : h("span", { class: "mono small" }, d.subscription_id)),
        h("td", { class: "col-status" }, pill(d.status, statusTone(d.status))),
        h("td", { class: "col-num" }, String(d.attempts)),
        h("td", { class: "col-last" }, lastResponse(d)),
        h("td", { class: "col-time" }, formatTime(d.created_at)),
      ),
    ),
  );
  $("found-empty").hidden = state.found.length > 0;
}

// -- one delivery: why, and what happens next ---------------------------------------------

async function showDelivery(id) {
  state.generation += 1;
  stopWatching();
  state.deliveryId = id;
  state.delivery = null;
  showView("delivery");
  renderDelivery();
  await loadDelivery(id, false);
}

async function loadDelivery(id, quiet) {
  const generation = state.generation;
  let detail;
  try {
    detail = await api("GET", `/v1/deliveries/${id}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    detail = err;
  }
  if (generation !== state.generation || state.deliveryId !== id) return;
  if (quiet && JSON.stringify(detail) === JSON.stringify(state.delivery)) return;
  state.delivery = detail;
  renderDelivery();
}

/** What happens next, in words: the answer to "will it still arrive?". */
function nextStep(d) {
  const n = d.attempts;
  const times = `${n} attempt${n === 1 ? "" : "s"}`;
  switch (d.status) {
    case "delivered":
      return ["ok", `Delivered after ${times}, at ${formatTime(d.finished_at)}.`];
    case "failed":
      if (!d.attempt_history.some((a) => a.outcome === "retry")) {
        return ["bad", `Gave up after ${times}: the subscription's settings do not retry this answer. Resend it once the receiver is fixed.`];
      }
      return ["bad", `Gave up after ${times}: the retry limit was reached. Resend it once the receiver is fixed.`];
    case "expired":
      return ["bad", `Expired after ${times}: older than the retry policy's maximum age. Resend it to try again.`];
    case "retrying":
      return ["wait", `Retry at ${formatTime(d.next_attempt_at)} (attempt ${n + 1}).`];
    case "pending":
      return ["wait", `First attempt due at ${formatTime(d.next_attempt_at)}.`];
    case "sending":
      return ["wait", `Attempt ${n + 1} is being sent right now.`];
    case "paused":
      return ["off", "Waits until its subscription is reactivated."];
    default:
      return ["off", d.status];
  }
}

function renderDelivery() {
  const d = state.delivery;
  const id = state.deliveryId;
  setText($("dv-title"), `Delivery #${id}`);
  if (!d || d instanceof Error) {
    $("dv-status").replaceChildren();
    $("dv-meta").replaceChildren();
    $("next-step").replaceChildren(h("p", { class: d ? "error-text" : "muted" }, d ? `Could not load the delivery: ${d.message}` : "Loading…"));
    $("attempt-cards").replaceChildren();
    setText($("dv-payload"), "");
    $("dv-resend").disabled = true;
    return;
  }
  const sub = state.subs.find((s) => s.id === d.subscription_id);
  $("dv-status").replaceChildren(
    ...[pill(d.status, statusTone(d.status), { dataset: { status: d.status } }), d.test ? h("span", { class: "tag test" }, "test") : null].filter(Boolean),
  );
  $("dv-meta").replaceChildren(
    h("span", {}, "Event ", h("strong", { class: "mono" }, d.event_name)),
    d.entity_instance_id ? h("span", {}, "Entity ", h("strong", { class: "mono" }, d.entity_instance_id)) : "",
    h("span", {}, "Subscription ", h("a", { href: `#/${d.subscription_id}` }, sub ? subscriptionTitle(sub) : d.subscription_id)),
    h("span", {}, "Created ", h("strong", {}, formatTime(d.created_at))),
    h("span", { class: "mono muted" }, `event ${d.event_id}`),
  );
  const [tone, text] = nextStep(d);
  const box = $("next-step");
  box.className = `next-step ${tone}`;
  box.dataset.status = d.status;
  box.replaceChildren(h("strong", {}, "Next step: "), h("span", { id: "next-step-text" }, text));
  $("dv-resend").disabled = d.status === "sending";
  $("attempt-cards").replaceChildren(requestCard(d.request_headers), ...d.attempt_history.map(attemptCard));
  if (!d.attempt_history.length) $("attempt-cards").append(h("p", { class: "muted" }, "No attempt yet."));
  setText($("dv-payload"), prettyJson(d.payload));
}

function requestCard(headers) {
  return h(
    "section",
    { class: "attempt-card request" },
    h("h3", {}, "Request headers"),
    h("p", { class: "muted small" }, "As the subscription's settings send them; secrets masked."),
    h(
      "table",
      { class: "headers" },
      h("tbody", {}, headers.map((x) => h("tr", { class: x.masked ? "masked" : "" }, h("th", { class: "mono" }, x.name), h("td", { class: "mono" }, x.value)))),
    ),
  );
}

function attemptCard(a) {
  return h(
    "section",
    { class: `attempt-card tone-${outcomeTone(a.outcome)}`, dataset: { outcome: a.outcome, attempt: String(a.attempt) } },
    h("h3", {}, `Attempt ${a.attempt}`, " ", pill(a.outcome, outcomeTone(a.outcome))),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Started"),
      h("dd", {}, formatTime(a.started_at)),
      h("dt", {}, "Duration"),
      h("dd", {}, formatMs(a.duration_ms)),
      h("dt", {}, "Status"),
      h("dd", { class: "mono status-code" }, a.status_code === null ? "—" : String(a.status_code)),
      a.retry_after !== null && a.retry_after !== undefined ? [h("dt", {}, "Retry-After"), h("dd", {}, `${a.retry_after} s`)] : null,
    ),
    a.error ? h("p", { class: "error-text" }, a.error) : null,
    h("h4", {}, "Response body (start)"),
    a.response_excerpt ? h("pre", { class: "code small" }, a.response_excerpt) : h("p", { class: "muted" }, "—"),
  );
}

async function resendShown() {
  const id = state.deliveryId;
  const fresh = await attempt("resend the delivery", () => api("POST", `/v1/deliveries/${id}/resend`), $("dv-resend"));
  if (!fresh) return;
  showInfo("Resent.", `Delivery #${id} is queued again.`);
  await loadDelivery(id, false);
}

// -- wiring -------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("banner-close").addEventListener("click", hideBanner);
  $("refresh-subs").addEventListener("click", () => loadSubscriptions(false));
  $("more-subs").addEventListener("click", () => loadSubscriptions(true));
  $("status-filter").addEventListener("change", () => {
    state.checked.clear();
    loadDeliveries(false);
  });
  $("refresh").addEventListener("click", () => {
    loadDeliveries(false);
    loadStats(state.selected.id);
    loadTrends(state.selected.id);
  });
  $("more").addEventListener("click", () => loadDeliveries(true));
  $("select-all").addEventListener("change", selectAll);
  $("resend-selected").addEventListener("click", resendSelected);
  $("resend-failed").addEventListener("click", resendFailed);
  $("reactivate").addEventListener("click", reactivate);
  $("send-test").addEventListener("click", sendTest);
  for (const id of ["window-day", "window-week"]) {
    $(id).addEventListener("click", (event) => {
      state.trendWindow = Number(event.currentTarget.dataset.window);
      state.trends = null;
      renderTrends();
      loadTrends(state.selected.id);
    });
  }
  $("search-form").addEventListener("submit", submitSearch);
  $("dv-resend").addEventListener("click", resendShown);
  window.addEventListener("hashchange", () => route());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.token) poll();
  });
}

wire();
if (state.token) start();
else showSignIn();
