// The chat page: sends the conversation to /v1/chat/completions and streams the answer in, rendered
// by markdown.js. Loaded from this server only (the page's Content-Security-Policy allows nothing else).
"use strict";
const $ = (id) => document.getElementById(id);
const view = $("messages");
let model = null;
let history = [];          // [{role, content}] sent with every request
let controller = null;     // AbortController of the answer being streamed
let conversation = 0;      // counts Clear presses: an answer stopped by Clear stays out of the new history

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  $("empty")?.remove();
  const node = document.createElement("div");
  node.className = "message " + role;
  node.textContent = text;     // text only: model output is never interpreted as HTML
  view.appendChild(node);
  view.scrollTop = view.scrollHeight;
  return node;
}

// An answer's text so far rendered as Markdown into `content` (DOM nodes only, see markdown.js); each
// delta renders the whole answer again, a few thousand characters at most.
function show(content, text) {
  content.replaceChildren(Markdown.render(text));
  view.scrollTop = view.scrollHeight;
}

function note(node, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  node.appendChild(span);
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return "HTTP " + response.status; }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) { $("model").textContent = await errorText(response); return; }
    model = (await response.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

function options() {
  const body = {};
  const number = (id) => $(id).value === "" ? null : Number($(id).value);
  if (number("temperature") !== null) body.temperature = number("temperature");
  if (number("top_p") !== null) body.top_p = number("top_p");
  if (number("max_tokens") !== null) body.max_tokens = number("max_tokens");
  if (number("seed") !== null) body.seed = number("seed");
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  if (!model) await loadModel();
  if (!model) { bubble("error", "no model: " + $("model").textContent); return; }
  $("input").value = "";
  bubble("user", text);
  const messages = [...history, {role: "user", content: text}];
  const answer = bubble("assistant streaming", "");
  const content = answer.appendChild(document.createElement("div"));
  content.className = "content";
  const started = conversation;
  controller = new AbortController();
  busy(true);
  let written = "", finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model, messages, stream: true, ...options()}),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta.content) { written += choice.delta.content; show(content, written); }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    history = [...messages, {role: "assistant", content: written}];
    if (finish === "length") note(answer, "(cut at max_tokens)");
  } catch (error) {
    if (error.name === "AbortError") {
      if (started === conversation) history = [...messages, {role: "assistant", content: written}];
      note(answer, "(stopped)");
    } else {
      answer.remove();
      bubble("error", error.message);
    }
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    controller = null;
    busy(false);
    $("input").focus();
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  conversation += 1;
  controller?.abort();
  history = [];
  view.replaceChildren();
  const empty = document.createElement("div");
  empty.className = "empty"; empty.id = "empty"; empty.textContent = "Conversation cleared.";
  view.appendChild(empty);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
$("api_key").addEventListener("change", loadModel);
loadModel();
