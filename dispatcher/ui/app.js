// The operator page. It talks only to the daemon's public /v1 JSON API with the token the
// person signs in with, and renders every value from the API as text (never as HTML).

const TOKEN_KEY = "dispatcher.token";
const FINISHED = new Set(["delivered", "failed", "expired"]);
const PAGE = 50;
const WATCH_MS = 700;
const WATCH_FOR_MS = 120_000;

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
  await loadSubscriptions(false);
  const wanted = location.hash.replace(/^#\/?/, "");
  const sub = state.subs.find((s) => s.id === wanted);
  if (sub) await selectSubscription(sub);
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

async function loadStats(id) {
  try {
    state.stats.set(id, await api("GET", `/v1/subscriptions/${encodeURIComponent(id)}/stats`));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showError(err);
    state.stats.set(id, err);
  }
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
  history.replaceState(null, "", `#/${sub.id}`);
  $("placeholder").hidden = true;
  $("sub-view").hidden = false;
  $("job").hidden = true;
  renderSubscriptions();
  renderSubscriptionHead();
  renderRows();
  await Promise.all([loadDeliveries(false), loadStats(sub.id)]);
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
  const { payload, attempt_history, ...summary } = fresh;
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
    ),
    h(
      "td",
      { class: "col-event" },
      h("div", { class: "mono" }, d.event_name),
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
    loadStats(state.selected.id);
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
  });
  $("more").addEventListener("click", () => loadDeliveries(true));
  $("select-all").addEventListener("change", selectAll);
  $("resend-selected").addEventListener("click", resendSelected);
  $("resend-failed").addEventListener("click", resendFailed);
  $("reactivate").addEventListener("click", reactivate);
}

wire();
if (state.token) start();
else showSignIn();
