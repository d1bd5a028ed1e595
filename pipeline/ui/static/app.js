// The VMH web view. Everything from records is put on the page with textContent or as attribute values of
// elements made here (never innerHTML), so a query text or stream id is shown as text, whatever it holds.
"use strict";

const state = { queries: new Map(), streams: new Map(), matches: new Set() };
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function frameUrl(streamId, t) {
  return `/keyframes/${encodeURIComponent(streamId)}/${encodeURIComponent(t)}`;
}

function strip(streamId, frames) {
  const row = el("div", "strip");
  for (const t of frames) {
    const img = el("img");
    img.src = frameUrl(streamId, t);
    img.alt = `second ${t} of ${streamId}`;
    img.title = `${streamId}, second ${t}`;
    img.loading = "lazy";
    row.append(img);
  }
  return row;
}

function ago(seconds) {
  return seconds < 1 ? "now" : seconds < 90 ? `${Math.round(seconds)} s ago` : `${Math.round(seconds / 60)} min ago`;
}

function showProblem(message) {
  const box = $("problem");
  box.textContent = message;
  box.hidden = !message;
}

// streams ----------------------------------------------------------------------------------------------------------
function renderStream(stream) {
  let card = state.streams.get(stream.stream_id);
  if (!card) {
    card = $("stream-card").content.firstElementChild.cloneNode(true);
    card.dataset.stream = stream.stream_id;
    card.querySelector(".name").textContent = stream.stream_id;
    state.streams.set(stream.stream_id, card);
    const list = $("streams");
    const after = [...list.children].find((c) => c.dataset.stream > stream.stream_id);
    list.insertBefore(card, after || null);
    $("no-streams").hidden = true;
  }
  if (stream.latest !== null && stream.latest !== undefined) {
    card.querySelector(".latest").src = frameUrl(stream.stream_id, stream.latest);
  }
  card.querySelector(".seconds").textContent = `${stream.seconds} seconds seen`;
  const error = stream.error;
  card.querySelector(".error").textContent = error ? `${error.kind}: ${error.message}` : "";
}

// queries ----------------------------------------------------------------------------------------------------------
function renderQueries() {
  const list = $("queries");
  list.replaceChildren();
  for (const query of [...state.queries.values()].sort((a, b) => a.created_time - b.created_time)) {
    const item = el("li");
    item.dataset.query = query.query_id;
    const threshold = query.threshold === null ? "model's threshold" : `≤ ${query.threshold} bits`;
    const remove = el("button", "remove", "remove");
    remove.type = "button";
    remove.addEventListener("click", () => removeQuery(query.query_id));
    item.append(el("span", "text", query.text ?? "(code)"), el("span", "meta", `${query.query_id} · ${threshold}`), remove);
    list.append(item);
  }
}

async function act(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

const post = (url, body) => act(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

async function addQuery(event) {
  event.preventDefault();
  const text = $("query-text").value.trim();
  const thresholdText = $("query-threshold").value.trim();
  try {
    await post("/api/queries", { text, threshold: thresholdText === "" ? null : Number(thresholdText) });
    $("query-text").value = "";
    showProblem("");
  } catch (error) {
    showProblem(`query not added: ${error.message}`);
  }
}

async function removeQuery(queryId) {
  try {
    await act(`/api/queries/${encodeURIComponent(queryId)}`, { method: "DELETE" });
  } catch (error) {
    showProblem(`query not removed: ${error.message}`);
  }
}

// matches ----------------------------------------------------------------------------------------------------------
function renderMatch(match) {
  const key = `${match.query_id}|${match.stream_id}|${match.start}|${match.end}|${match.match_time}`;
  if (state.matches.has(key)) return;
  state.matches.add(key);
  const text = state.queries.get(match.query_id)?.text ?? match.text ?? match.query_id;
  const item = el("li", "match");
  const head = el("div", "head");
  head.append(el("span", "text", text), el("span", "where", `${match.stream_id}, ${match.start}–${match.end} s`),
              el("span", "meta", `distance ${match.distance} of ${match.bits} bits`),
              el("span", "meta", `${match.latency.toFixed(1)} s after capture`),
              el("span", "meta when", new Date(match.match_time * 1000).toLocaleTimeString()));
  item.append(head, strip(match.stream_id, match.frames));
  $("matches").prepend(item);
  $("no-matches").hidden = true;
  while ($("matches").children.length > 200) $("matches").lastElementChild.remove();
}

// search -----------------------------------------------------------------------------------------------------------
async function search(event) {
  event.preventDefault();
  const text = $("search-text").value.trim();
  $("search-status").textContent = "searching…";
  $("hits").replaceChildren();
  try {
    const { hits } = await post("/api/search", { text, top_k: 10 });
    $("search-status").textContent = hits.length ? `${hits.length} nearest moments` : "no moment archived yet";
    const now = Date.now() / 1000;
    for (const hit of hits) {
      const item = el("li", "hit");
      const head = el("div", "head");
      head.append(el("span", "where", `${hit.stream_id}, ${hit.start}–${hit.end} s`),
                  el("span", "meta", `distance ${hit.distance}`), el("span", "meta", ago(now - hit.capture_time)));
      item.append(head, strip(hit.stream_id, hit.frames));
      $("hits").append(item);
    }
  } catch (error) {
    $("search-status").textContent = `search failed: ${error.message}`;
  }
}

// live events ------------------------------------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/events");
  const status = $("connection");
  source.onopen = () => { status.textContent = "live"; status.className = "status live"; };
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "status down"; };
  const on = (type, handle) => source.addEventListener(type, (event) => handle(JSON.parse(event.data)));
  on("snapshot", (snap) => {
    state.queries = new Map(snap.queries.map((q) => [q.query_id, q]));
    renderQueries();
    snap.streams.forEach(renderStream);
    snap.matches.forEach(renderMatch);
  });
  on("stream", renderStream);
  on("query", (query) => { state.queries.set(query.query_id, query); renderQueries(); });
  on("query-removed", ({ query_id }) => { state.queries.delete(query_id); renderQueries(); });
  on("match", renderMatch);
  on("problem", (error) => showProblem(`${error.source}: ${error.kind}: ${error.message}`));
}

$("query-form").addEventListener("submit", addQuery);
$("search-form").addEventListener("submit", search);
connect();
