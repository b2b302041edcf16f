// glmvision's browser page: images and short videos in, streamed answers out, conversations kept in this browser.
// Model output is only ever set as text (textContent), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const config = {
  maxSide: Number(document.body.dataset.maxImageSide) || 2048,
  maxBody: Number(document.body.dataset.maxBodyBytes) || 20 * 1024 * 1024,
  needsKey: document.body.dataset.needsKey === "true",
};
// A video goes as base64 inside the JSON body: a third larger than the file, under the body's cap too.
const BODY_ROOM = 64 * 1024; // the question, the JSON around it
const maxVideo = Math.min(
  Number(document.body.dataset.maxVideoBytes) || 50 * 1024 * 1024,
  Math.floor(((config.maxBody - BODY_ROOM) * 3) / 4),
);
const VIDEO_TYPES = ["video/mp4", "video/webm"];
const KEY_STORAGE = "glmvision.apiKey";
const BOX = /<\|begin_of_box\|>([\s\S]*?)(?:<\|end_of_box\|>|$)/g;
const QUAD = /\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]/g;
// What is left of a box once the server has taken its markers out: a list of quadruples, [[...], ...].
const NUM = "-?\\d+(?:\\.\\d+)?";
const QUAD_TEXT = `\\[\\s*${NUM}\\s*(?:,\\s*${NUM}\\s*){3}\\]`;
const GROUP = new RegExp(`\\[\\s*${QUAD_TEXT}\\s*(?:,\\s*${QUAD_TEXT}\\s*)*\\]`, "g");
const COLOURS = ["#e03131", "#1971c2", "#2f9e44", "#f08c00", "#9c36b5", "#0c8599"];

const state = { conversation: null, image: null, video: null, controller: null, busy: false };

// ---- Storage: conversations in IndexedDB (images make them too big for localStorage). ----

const store = {
  db: null,
  open() {
    if (this.db) return Promise.resolve(this.db);
    return new Promise((resolve, reject) => {
      const request = indexedDB.open("glmvision", 1);
      request.onupgradeneeded = () => request.result.createObjectStore("conversations", { keyPath: "id" });
      request.onsuccess = () => resolve((this.db = request.result));
      request.onerror = () => reject(request.error);
    });
  },
  async run(mode, action) {
    const db = await this.open();
    return new Promise((resolve, reject) => {
      const transaction = db.transaction("conversations", mode);
      const request = action(transaction.objectStore("conversations"));
      transaction.oncomplete = () => resolve(request && request.result);
      transaction.onerror = () => reject(transaction.error);
    });
  },
  all() { return this.run("readonly", (s) => s.getAll()); },
  get(id) { return this.run("readonly", (s) => s.get(id)); },
  put(conversation) { return this.run("readwrite", (s) => s.put(conversation)); },
  remove(id) { return this.run("readwrite", (s) => s.delete(id)); },
};

function newConversation() {
  const now = Date.now();
  const id = (crypto.randomUUID && crypto.randomUUID()) || `${now}-${Math.random().toString(16).slice(2)}`;
  return { id, title: "New conversation", created: now, updated: now, messages: [] };
}

async function save(conversation) {
  conversation.updated = Date.now();
  try {
    await store.put(conversation);
  } catch (error) {
    showError(`This conversation could not be kept in the browser (${error && error.name}).`);
  }
  await renderHistory();
}

// ---- History list. ----

async function renderHistory() {
  let conversations = [];
  try {
    conversations = (await store.all()).sort((a, b) => b.updated - a.updated);
  } catch (error) {
    conversations = [];
  }
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of conversations) {
    const item = document.createElement("li");
    item.dataset.id = conversation.id;
    if (state.conversation && state.conversation.id === conversation.id) item.classList.add("current");
    const open = button(conversation.title, "open", () => openConversation(conversation.id));
    open.title = conversation.title;
    const rename = button("✎", "rename", () => startRename(item, conversation));
    rename.setAttribute("aria-label", `Rename “${conversation.title}”`);
    rename.title = "Rename";
    const remove = button("✕", "delete", () => deleteConversation(conversation));
    remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
    remove.title = "Delete";
    item.append(open, rename, remove);
    list.append(item);
  }
}

function button(label, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function startRename(item, conversation) {
  const input = document.createElement("input");
  input.value = conversation.title;
  input.setAttribute("aria-label", "New name");
  const done = async (keep) => {
    if (keep && input.value.trim()) conversation.title = input.value.trim().slice(0, 120);
    if (state.conversation && state.conversation.id === conversation.id) state.conversation.title = conversation.title;
    await save(conversation);
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); done(true); }
    if (event.key === "Escape") { event.preventDefault(); done(false); }
  });
  input.addEventListener("blur", () => done(true), { once: true });
  item.replaceChildren(input);
  input.focus();
  input.select();
}

async function deleteConversation(conversation) {
  if (!window.confirm(`Delete “${conversation.title}”?`)) return;
  await store.remove(conversation.id);
  if (state.conversation && state.conversation.id === conversation.id) startNew();
  await renderHistory();
}

async function openConversation(id) {
  if (state.busy) return;
  const conversation = await store.get(id);
  if (!conversation) return;
  state.conversation = conversation;
  renderMessages();
  await renderHistory();
}

function startNew() {
  if (state.busy) return;
  state.conversation = newConversation();
  renderMessages();
  renderHistory();
  $("question").focus();
}

// ---- Messages. ----

function renderMessages() {
  const container = $("messages");
  container.replaceChildren();
  if (state.conversation.messages.length === 0) container.append(emptyHint());
  let lastImage = null;
  for (const message of state.conversation.messages) {
    if (message.role === "user") {
      if (message.image || message.video) lastImage = message.image || null; // boxes are not drawn on a video
      container.append(userElement(message));
    } else {
      const view = assistantElement();
      container.append(view.root);
      fillAnswer(view, message, lastImage);
    }
  }
  container.scrollTop = container.scrollHeight;
}

// A first-time visitor sees what to do, and can try it without an image of their own.
function emptyHint() {
  const hint = document.createElement("div");
  hint.id = "empty-hint";
  hint.className = "empty-hint";
  const words = document.createElement("p");
  words.textContent =
    "Drop an image or a short video below (or paste an image, or choose a file), then ask a question about it.";
  hint.append(words, button("Try the sample", "try-sample", trySample));
  return hint;
}

// The sample: a bar chart drawn here, so the page needs no file of its own.
function trySample() {
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 200;
  const draw = canvas.getContext("2d");
  draw.fillStyle = "#ffffff";
  draw.fillRect(0, 0, 320, 200);
  const bars = [["Mon", 60, "#4e79a7"], ["Tue", 140, "#e15759"], ["Wed", 95, "#59a14f"]];
  draw.font = "16px sans-serif";
  bars.forEach(([label, height, colour], index) => {
    const x = 40 + index * 95;
    draw.fillStyle = colour;
    draw.fillRect(x, 170 - height, 60, height);
    draw.fillStyle = "#222222";
    draw.fillText(label, x + 14, 192);
  });
  hideError();
  showImage(canvas.toDataURL("image/png"));
  $("question").value = "Which day has the tallest bar?";
  $("question").focus();
}

function userElement(message) {
  const root = document.createElement("article");
  root.className = "message user";
  if (message.image) {
    const image = document.createElement("img");
    image.className = "thumb";
    image.alt = "Image sent with this question";
    image.src = message.image;
    root.append(image);
  }
  if (message.video) {
    const video = document.createElement("video");
    video.className = "thumb";
    video.muted = true;
    video.controls = true;
    video.preload = "metadata";
    video.setAttribute("aria-label", "Video sent with this question");
    video.src = message.video;
    root.append(video);
  }
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = message.text;
  root.append(text);
  return root;
}

function assistantElement() {
  const root = document.createElement("article");
  root.className = "message assistant";
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const reasoningText = document.createElement("pre");
  reasoning.append(summary, reasoningText);
  const text = document.createElement("p");
  text.className = "text answer";
  const meta = document.createElement("p");
  meta.className = "meta";
  root.append(reasoning, text, meta);
  return { root, reasoning, reasoningText, text, meta };
}

function fillAnswer(view, message, image) {
  view.reasoning.hidden = !message.reasoning;
  view.reasoningText.textContent = message.reasoning || "";
  view.text.textContent = visibleText(message.text || "");
  const parts = [];
  if (message.latency_ms != null) parts.push(`${(message.latency_ms / 1000).toFixed(2)} s`);
  if (message.usage) parts.push(`${message.usage.prompt_tokens} prompt + ${message.usage.completion_tokens} answer tokens`);
  if (message.stopped) parts.push("stopped");
  view.meta.textContent = parts.join(" · ");
  // The server's boxes when it sent them (the finish chunk), else what the text holds.
  const boxes = message.boxes
    ? message.boxes.map((b) => ({ x1: b.box[0], y1: b.box[1], x2: b.box[2], y2: b.box[3], label: b.label || "" }))
    : parseBoxes(message.text || "");
  const old = view.root.querySelector(".boxes");
  if (old) old.remove();
  if (boxes.length && image) view.root.append(boxesElement(image, boxes));
}

function visibleText(text) {
  return text.replace(/<\|begin_of_box\|>/g, "").replace(/<\|end_of_box\|>/g, "");
}

// Grounding boxes: <|begin_of_box|>[[x1,y1,x2,y2], ...]<|end_of_box|>, or JSON with bbox_2d and
// label, coordinates normalised to 0..1000 of the image the model saw.
function parseBoxes(text) {
  const boxes = [];
  const add = (values, label) => {
    const [x1, y1, x2, y2] = values.map(Number);
    if ([x1, y1, x2, y2].some((v) => !Number.isFinite(v))) return;
    const clamp = (v) => Math.min(1000, Math.max(0, v));
    boxes.push({
      x1: clamp(Math.min(x1, x2)), y1: clamp(Math.min(y1, y2)),
      x2: clamp(Math.max(x1, x2)), y2: clamp(Math.max(y1, y2)), label: label || "",
    });
  };
  for (const match of text.matchAll(BOX)) {
    for (const quad of match[1].matchAll(QUAD)) add(quad.slice(1, 5), "");
  }
  for (const group of text.replace(BOX, " ").matchAll(GROUP)) {
    for (const quad of group[0].matchAll(QUAD)) add(quad.slice(1, 5), "");
  }
  for (const candidate of text.match(/\{[^{}]*"bbox_2d"[^{}]*\}/g) || []) {
    try {
      const parsed = JSON.parse(candidate);
      if (Array.isArray(parsed.bbox_2d) && parsed.bbox_2d.length === 4) add(parsed.bbox_2d, String(parsed.label || ""));
    } catch (error) {
      // half-written JSON while streaming: picked up once complete
    }
  }
  return boxes;
}

function boxesElement(source, boxes) {
  const root = document.createElement("figure");
  root.className = "boxes";
  root.dataset.count = String(boxes.length);
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `The image with ${boxes.length} box${boxes.length === 1 ? "" : "es"} drawn`);
  const legend = document.createElement("ol");
  boxes.forEach((box, index) => {
    const item = document.createElement("li");
    item.style.color = COLOURS[index % COLOURS.length];
    item.textContent = `${box.label || `box ${index + 1}`}: [${box.x1}, ${box.y1}, ${box.x2}, ${box.y2}]`;
    legend.append(item);
  });
  root.append(canvas, legend);
  const image = new Image();
  image.onload = () => {
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 250));
    context.lineWidth = line;
    context.font = `${Math.max(12, line * 6)}px sans-serif`;
    context.textBaseline = "top";
    boxes.forEach((box, index) => {
      const colour = COLOURS[index % COLOURS.length];
      const x = (box.x1 / 1000) * canvas.width;
      const y = (box.y1 / 1000) * canvas.height;
      const w = ((box.x2 - box.x1) / 1000) * canvas.width;
      const h = ((box.y2 - box.y1) / 1000) * canvas.height;
      context.strokeStyle = colour;
      context.strokeRect(x, y, w, h);
      if (box.label) {
        const width = context.measureText(box.label).width + line * 2;
        const height = Math.max(12, line * 6) + line;
        context.fillStyle = colour;
        context.fillRect(x, Math.max(0, y - height), width, height);
        context.fillStyle = "#fff";
        context.fillText(box.label, x + line, Math.max(0, y - height) + line / 2);
      }
    });
    root.dataset.drawn = "true";
  };
  image.src = source;
  return root;
}

// ---- Images in: pick, drop, paste; downscaled here to the server's max_image_side. ----
// ---- Videos in: pick or drop an MP4 or WebM, sent as it is, under the server's size cap. ----

function takeFile(file) {
  if (file && file.type.startsWith("video/")) return takeVideo(file);
  return takeImage(file);
}

async function takeImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image or a video file.");
    return;
  }
  hideError();
  try {
    state.image = await fitImage(file);
  } catch (error) {
    showError("The image could not be read by the browser.");
    return;
  }
  showImage(state.image);
}

function showImage(dataUrl) {
  clearVideo();
  state.image = dataUrl;
  $("preview").src = dataUrl;
  $("preview").hidden = false;
  $("clear-image").textContent = "Remove image";
  $("clear-image").hidden = false;
}

function fileSize(bytes) {
  if (bytes < 1024 * 1024) return `${Math.ceil(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

async function takeVideo(file) {
  if (!VIDEO_TYPES.includes(file.type)) {
    showError("Only MP4 and WebM videos can be sent.");
    return;
  }
  if (file.size > maxVideo) {
    $("file-input").value = "";
    showError(
      `The video is ${fileSize(file.size)}; this server takes videos up to ${fileSize(maxVideo)}. ` +
        "Send a shorter or smaller one.",
    );
    return;
  }
  hideError();
  let dataUrl;
  try {
    dataUrl = await readAsDataURL(file);
  } catch (error) {
    showError("The video could not be read by the browser.");
    return;
  }
  showVideo(dataUrl);
}

function showVideo(dataUrl) {
  clearImage();
  state.video = dataUrl;
  $("video-preview").src = dataUrl;
  $("video-preview").hidden = false;
  $("clear-image").textContent = "Remove video";
  $("clear-image").hidden = false;
}

function clearVideo() {
  state.video = null;
  $("video-preview").hidden = true;
  $("video-preview").removeAttribute("src");
  $("video-preview").load(); // lets the old video go
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function fitImage(file) {
  const url = URL.createObjectURL(file);
  try {
    const image = await new Promise((resolve, reject) => {
      const element = new Image();
      element.onload = () => resolve(element);
      element.onerror = reject;
      element.src = url;
    });
    const longest = Math.max(image.naturalWidth, image.naturalHeight);
    if (longest <= config.maxSide) return await readAsDataURL(file); // the bytes as they are
    const scale = config.maxSide / longest;
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    const type = file.type === "image/jpeg" ? "image/jpeg" : "image/png";
    return canvas.toDataURL(type, 0.92);
  } finally {
    URL.revokeObjectURL(url);
  }
}

function clearImage() {
  state.image = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("clear-image").hidden = true;
  $("file-input").value = "";
}

function clearAttachment() {
  clearImage();
  clearVideo();
}

// ---- Asking. ----

function wireMessages(conversation) {
  return conversation.messages.map((message) => {
    if (message.role === "assistant") return { role: "assistant", content: message.text || "" };
    const content = [];
    if (message.image) content.push({ type: "image_url", image_url: { url: message.image } });
    if (message.video) content.push({ type: "video_url", video_url: { url: message.video } });
    content.push({ type: "text", text: message.text });
    return { role: "user", content };
  });
}

function apiKey() {
  return $("api-key").value.trim();
}

async function ask(event) {
  event.preventDefault();
  if (state.busy) return;
  const question = $("question").value.trim();
  if (!question) {
    showError("Type a question first.");
    return;
  }
  const conversation = state.conversation;
  const hasMedia = state.image || state.video || conversation.messages.some((m) => m.image || m.video);
  if (!hasMedia) {
    showError("Add an image or a video first: drop one, paste an image, or choose a file.");
    return;
  }
  hideError();
  const userMessage = { role: "user", text: question, image: state.image };
  if (state.video) userMessage.video = state.video;
  if (conversation.messages.length === 0) conversation.title = question.slice(0, 60);
  conversation.messages.push(userMessage);
  const answer = { role: "assistant", text: "", reasoning: "", usage: null, latency_ms: null };
  $("question").value = "";
  clearAttachment();
  const lastImage = [...conversation.messages].reverse().find((m) => m.image || m.video).image || null;
  const asked = userElement(userMessage);
  const hint = $("empty-hint");
  if (hint) hint.remove();
  $("messages").append(asked);
  const view = assistantElement();
  $("messages").append(view.root);
  view.meta.textContent = "…";
  setBusy(true);
  const controller = (state.controller = new AbortController());
  const started = performance.now();
  const body = {
    messages: wireMessages(conversation),
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let failed = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      failed = await errorWords(response);
    } else {
      await readStream(response, (delta, usage) => {
        if (delta) {
          answer.reasoning += delta.reasoning_content || "";
          answer.text += delta.content || "";
          if (Array.isArray(delta.boxes)) answer.boxes = delta.boxes;
        }
        if (usage) answer.usage = usage;
        fillAnswer(view, answer, lastImage);
        $("messages").scrollTop = $("messages").scrollHeight;
      });
    }
  } catch (error) {
    if (error && error.name === "AbortError") answer.stopped = true;
    else failed = error instanceof StreamError ? error.message : "The server could not be reached. Is it running?";
  }
  answer.latency_ms = Math.round(performance.now() - started);
  if (failed) {
    // A failed question leaves the conversation; the banner says why, and the question and its
    // image or video are back in the form to send again.
    conversation.messages.pop();
    asked.remove();
    view.root.remove();
    showError(failed);
    if (failed.startsWith("This server needs an API key")) $("key-row").hidden = false;
    $("question").value = question;
    if (userMessage.image) showImage(userMessage.image); // ready to send again as it was
    if (userMessage.video) showVideo(userMessage.video);
  } else {
    conversation.messages.push(answer);
    fillAnswer(view, answer, lastImage);
    await save(conversation);
  }
  setBusy(false);
}

class StreamError extends Error {}

async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new StreamError(`The answer broke off: ${payload.error.message}`);
        const choice = (payload.choices || [])[0];
        onEvent(choice ? choice.delta : null, payload.usage || null);
      }
    }
  }
}

async function errorWords(response) {
  let message = "";
  let code = "";
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || "";
    code = (body.error && body.error.code) || "";
  } catch (error) {
    message = response.statusText;
  }
  const retry = response.headers.get("Retry-After");
  const when = retry ? ` Retry in ${retry} s.` : " Retry shortly.";
  switch (response.status) {
    case 401:
      return `This server needs an API key: enter a valid one above. (${message})`;
    case 413:
      return `The image, video or request is too large for this server: ${message}`;
    case 429:
      return `Too many requests for now.${when}`;
    case 503:
      return `The server is busy or still loading its model (${code || "unavailable"}).${when}`;
    default:
      return `${message || "The request failed"} (HTTP ${response.status}${code ? `, ${code}` : ""})`;
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
  if (busy) $("stop").focus();
  else $("question").focus();
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- Status line. ----

async function refreshStatus() {
  const status = $("status");
  let ready = false;
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    const body = await response.json();
    const model = body.model || {};
    ready = response.ok;
    status.className = `status ${ready ? "ready" : "loading"}`;
    const where = [model.id, model.device, model.dtype].filter(Boolean).join(" · ");
    status.textContent = `${where || "model"} · ${ready ? "ready" : "loading"}`;
    $("demo-banner").hidden = !model.demo;
  } catch (error) {
    status.className = "status down";
    status.textContent = "server unreachable";
  }
  setTimeout(refreshStatus, ready ? 30000 : 3000);
}

// ---- Wiring. ----

function wire() {
  $("ask-form").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", startNew);
  $("clear-image").addEventListener("click", clearAttachment);
  $("file-input").addEventListener("change", (event) => takeFile(event.target.files[0]));
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.busy && state.controller) state.controller.abort();
  });
  const zone = $("drop-zone");
  zone.addEventListener("keydown", (event) => {
    if (event.target === zone && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      $("file-input").click();
    }
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    takeFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData ? event.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      takeImage(item.getAsFile());
    }
  });
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, key.value.trim()));
  $("key-row").hidden = !config.needsKey && !key.value;
}

async function start() {
  wire();
  refreshStatus();
  const conversations = await store.all().catch(() => []);
  conversations.sort((a, b) => b.updated - a.updated);
  state.conversation = conversations[0] || newConversation();
  renderMessages();
  await renderHistory();
  document.body.dataset.ready = "true";
}

start();
