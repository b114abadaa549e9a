// The page's behaviour: fill the genre menu from /v1/conditions, pick a review, ask for a new one and show
// it as it is written (StreamGenerate's server-sent events).
// Text goes into the page with textContent only, so generated text can never become markup.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(message, isError) {
  $("status").textContent = message;
  $("status").classList.toggle("error", Boolean(isError));
}

// Call the JSON API (a path, or a response already fetched); resolve with the body, or throw an Error
// carrying the AIP-193 message and HTTP status.
async function api(path, options) {
  const response = typeof path === "string" ? await fetch(path, options) : path;
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const error = new Error((body && body.error && body.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function filters() {
  const out = { score: Number($("score").value) };
  if ($("genre").value) out.genre = $("genre").value;
  return out;
}

function show(review) {
  $("review-score").textContent = review.score !== undefined ? `Score ${Number(review.score).toFixed(1)}` : "No score";
  $("review-genre").textContent = review.genre || "No genre";
  const text = $("review-text");
  text.replaceChildren();
  for (const part of String(review.text).split("\n")) {
    if (!part.trim()) continue;
    const p = document.createElement("p");
    p.textContent = part;
    text.appendChild(p);
  }
  const link = $("permalink");
  if (review.id) {
    link.href = `/r/${encodeURIComponent(review.id)}`;
    link.hidden = false;
  } else {
    link.hidden = true; // a rejected or unstored sample has no page of its own
  }
  $("review-meta").textContent = `${review.length || 0} words`;
  $("review").hidden = false;
}

async function loadConditions() {
  try {
    const data = await api("/v1/conditions");
    const menu = $("genre");
    for (const genre of data.genres || []) {
      const option = document.createElement("option");
      option.value = genre;
      option.textContent = genre;
      menu.appendChild(option);
    }
    if (!data.total || data.total === "0") setStatus("The store holds no reviews yet: run `pitchkeras populate`.", true);
  } catch (error) {
    setStatus(`Could not load the genres: ${error.message}`, true);
  }
}

async function showModelButton() {
  try {
    const response = await fetch("/readyz");
    const data = await response.json();
    $("write").hidden = !(data.model === "ready" || data.model === "loading");
  } catch (_) {
    $("write").hidden = true;
  }
}

async function pick(event) {
  event.preventDefault();
  const query = new URLSearchParams(Object.entries(filters()).map(([k, v]) => [k, String(v)]));
  $("show").disabled = true;
  setStatus("Finding a review ...");
  try {
    const data = await api(`/v1/reviews:pick?${query}`);
    show(data.review);
    setStatus("");
  } catch (error) {
    setStatus(error.status === 404 ? "No review matches that score and genre yet; try another." : error.message, true);
  } finally {
    $("show").disabled = false;
  }
}

// Read a text/event-stream answer: call onEvent(name, data) for every event, in order.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// Show the text as the model writes it: each delta is appended as text (never markup).
function showLive(text) {
  const live = $("review-text");
  if (!live.dataset.deltas) {
    live.replaceChildren(document.createElement("p"));
    $("review-score").textContent = `Score ${Number($("score").value).toFixed(1)}`;
    $("review-genre").textContent = $("genre").value || "Any genre";
    $("permalink").hidden = true;
    $("review-meta").textContent = "writing ...";
    $("review").hidden = false;
  }
  live.dataset.deltas = String(Number(live.dataset.deltas || 0) + 1);
  live.lastChild.textContent += text;
}

async function write() {
  $("write").disabled = true;
  setStatus("Writing a new review ...");
  delete $("review-text").dataset.deltas;
  try {
    const response = await fetch("/v1/reviews:streamGenerate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(Object.assign(filters(), { store: true })),
    });
    if (!response.ok) await api(response); // an error before the stream started: a JSON error body
    let item = null;
    await readEvents(response, (name, data) => {
      if (name === "error") throw Object.assign(new Error(data.error.message), { status: data.error.code });
      if (data.delta !== undefined) showLive(data.delta);
      if (data.review !== undefined) item = data.review;
    });
    if (!item) throw new Error("the stream ended before the review was complete; try again");
    if (item.status === "SAMPLE_STATUS_REJECTED") {
      setStatus(`The model's attempt was rejected (${item.rejectionReason}); try again.`, true);
    } else {
      show(item.review);
      setStatus(item.stored ? "A fresh review, now stored." : "A fresh review.");
    }
  } catch (error) {
    const why = {
      429: "Too many requests right now; wait a moment and try again.",
      503: "The model is still warming up; try again shortly.",
      401: "Writing needs an API key on this server.",
    }[error.status];
    setStatus(why || error.message, true);
  } finally {
    $("write").disabled = false;
  }
}

$("score").addEventListener("input", () => { $("score-value").textContent = Number($("score").value).toFixed(1); });
$("pick").addEventListener("submit", pick);
$("write").addEventListener("click", write);
loadConditions();
showModelButton();
