// pagedllm's chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the conversation so far
let controller = null; // AbortController of the reply being streamed
let modelName = null;

$("api-key").value = localStorage.getItem("pagedllm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("pagedllm-api-key", $("api-key").value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "no model: " + e.message;
  }
}

// --- Markdown: escape everything first, then add the few tags we allow. ----------
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(s) {
  return s
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
}

function renderMarkdown(text) {
  const parts = text.split(/```/);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 1) { // inside a code fence (maybe still open while streaming)
      const body = part.replace(/^[\w+-]*\n/, "");
      html += "<pre><code>" + escapeHtml(body) + "</code></pre>";
      return;
    }
    let list = null;
    for (const raw of escapeHtml(part).split("\n")) {
      const line = raw.trimEnd();
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const item = line.match(/^\s*(?:[-*]|\d+\.)\s+(.*)$/);
      if (item) {
        const kind = /^\s*\d+\./.test(line) ? "ol" : "ul";
        if (list !== kind) { if (list) html += `</${list}>`; html += `<${kind}>`; list = kind; }
        html += "<li>" + inline(item[1]) + "</li>";
        continue;
      }
      if (list) { html += `</${list}>`; list = null; }
      if (heading) html += `<h${heading[1].length}>${inline(heading[2])}</h${heading[1].length}>`;
      else if (line) html += "<p>" + inline(line) + "</p>";
    }
    if (list) html += `</${list}>`;
  });
  return html;
}

// --- Conversation view -------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.dataset.testid = "message-" + role;
  if (role === "user") div.textContent = text;
  else div.innerHTML = renderMarkdown(text);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  const content = document.createElement("div");
  content.className = "content";
  const stats = document.createElement("div");
  stats.className = "stats";
  box.append(content, stats);
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstAt = null, reply = "", tokens = 0, stopped = false;
  const showStats = () => {
    if (firstAt === null) return;
    const ttft = (firstAt - started) / 1000;
    const secs = (performance.now() - firstAt) / 1000;
    const rate = tokens > 1 && secs > 0 ? (tokens - 1) / secs : 0;
    stats.textContent = `TTFT ${ttft.toFixed(2)} s · ${rate.toFixed(1)} tokens/s · ${tokens} tokens` +
      (stopped ? " · stopped" : "");
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (firstAt === null) firstAt = performance.now();
          reply += delta.content;
          tokens += chunk.usage ? 0 : 1;
          content.innerHTML = renderMarkdown(reply);
          box.scrollIntoView({ block: "end" });
        }
      }
      showStats();
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { box.classList.add("error"); content.textContent = "Error: " + e.message; }
  } finally {
    controller = null;
    setBusy(false);
    showStats();
    if (reply) history.push({ role: "assistant", content: reply });
    else if (!box.classList.contains("error")) history.pop(); // nothing came back
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("input").focus();
});
$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});

loadModel();
