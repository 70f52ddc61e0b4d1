// The chat page's controller: the current conversation, sending and stopping, models, settings, files.

import { ApiError, health, listModels, serverInfo, streamChat } from "./api.js";
import { messageText, readAttachment } from "./attachments.js";
import { download, drawAttachments, hideComposerError, showComposerError } from "./composer.js";
import { askForKey } from "./key_prompt.js";
import { StreamView, editInPlace, messageElement, statsFor } from "./messages.js";
import { drawModelOptions, modelStatus } from "./models.js";
import { renderList } from "./sidebar.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const MODEL_STORAGE = "sovereign.model";
const SETTINGS = ["temperature", "top_p", "max_tokens"];

const state = {
  conversations: [],
  current: null,
  models: [],
  defaults: {},
  pending: [], // attachments for the next message
  controller: null, // the AbortController of the answer streaming now
  running: null, // that answer's generate(), to wait for
};
const BUSY_NOTICE = "An answer is still coming: Stop it, or wait for it to end, first.";
const SAVE_EVERY_MS = 2000; // a streaming answer is saved this often, so a reload or a crash keeps most of it

// --- conversations -----------------------------------------------------------------------------

async function refreshList() {
  state.conversations = await store.allConversations();
  drawList();
}

function drawList() {
  renderList($("conversation-list"), state.conversations, {
    currentId: state.current && state.current.id,
    query: $("search").value,
    open: openConversation,
    rename: renameConversation,
    remove: removeConversation,
  });
}

function busy() {
  if (!state.controller) return false;
  // Switching mid-answer would leave the answer nowhere to go.
  showComposerError(BUSY_NOTICE, { info: true });
  return true;
}

function openConversation(id) {
  if (busy()) return;
  const found = state.conversations.find((c) => c.id === id);
  if (!found) return;
  state.current = found;
  showConversation();
  closeSidebarOnPhone();
}

function startNewConversation() {
  if (busy()) return;
  state.current = store.newConversation(selectedModel());
  showConversation();
  closeSidebarOnPhone();
  $("input").focus();
}

async function renameConversation(id, title) {
  // The open conversation is state.current, not the list's copy (the list is read again after each save):
  // renaming the copy would be undone by the next save of state.current.
  const current = state.current && state.current.id === id ? state.current : null;
  const conversation = current || state.conversations.find((c) => c.id === id);
  if (conversation && title) {
    conversation.title = title.slice(0, 200);
    if (conversation.messages.length) await store.saveConversation(conversation);
    const listed = state.conversations.find((c) => c.id === id);
    if (listed) listed.title = conversation.title;
  }
  drawList();
}

async function removeConversation(id) {
  const conversation = state.conversations.find((c) => c.id === id);
  if (!conversation || !confirm(`Delete "${conversation.title}"? This cannot be undone.`)) return;
  const isCurrent = state.current && state.current.id === id;
  if (isCurrent && state.running) {
    stop(); // its answer would otherwise be saved when it ends, bringing the conversation back
    await state.running;
  }
  await store.deleteConversation(id);
  if (isCurrent) startNewConversation();
  await refreshList();
}

async function save() {
  const conversation = state.current;
  if (!conversation.messages.length) return;
  conversation.updated = Date.now();
  try {
    await store.saveConversation(conversation);
  } catch (error) {
    // The conversation stays on screen; say why a reload would lose it (a full disk, a private window).
    showComposerError(`This browser did not save the conversation (${error && error.message}): export it to keep it.`);
    return;
  }
  await refreshList();
}

function showConversation() {
  const conversation = state.current;
  if (conversation.model && state.models.some((m) => m.id === conversation.model)) $("model").value = conversation.model;
  describeModel();
  $("system").value = conversation.system || "";
  for (const name of SETTINGS) $(name).value = conversation.settings[name] ?? "";
  drawMessages();
  drawList();
}

function drawMessages() {
  const list = $("messages");
  const messages = state.current.messages;
  list.replaceChildren(
    ...messages.map((message, index) =>
      messageElement(message, {
        isLast: index === messages.length - 1 && !state.controller,
        actions: { regenerate, retry: regenerate, edit: (item, m) => editInPlace(item, m, (text) => resendEdited(index, text)) },
      }),
    ),
  );
  if (!messages.length) list.append(emptyHint());
  list.scrollTop = list.scrollHeight;
}

function emptyHint() {
  const hint = document.createElement("p");
  hint.className = "empty-hint";
  hint.textContent = "Ask anything. The model runs on this machine: nothing you type leaves it.";
  return hint;
}

// --- sending -------------------------------------------------------------------------------------

async function send() {
  if (state.controller) return; // Enter while an answer streams does nothing: no double send
  const text = $("input").value.trim();
  if (!text && !state.pending.length) return;
  if (!selectedModel()) return showComposerError("No model to answer: pull one with `sovereign pull`, then reload.");
  const conversation = state.current;
  if (!conversation.messages.length) conversation.title = (text || state.pending[0].name).slice(0, 60);
  conversation.messages.push({ role: "user", content: text, attachments: state.pending });
  state.pending = [];
  drawAttachments(state.pending);
  $("input").value = "";
  await generate();
}

async function regenerate() {
  if (state.controller) return;
  const messages = state.current.messages;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  await generate();
}

async function resendEdited(index, text) {
  if (busy() || !text.trim()) return;
  const messages = state.current.messages;
  messages.splice(index, messages.length - index, { ...messages[index], content: text.trim() });
  await generate();
}

function requestFor(conversation) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const message of conversation.messages) {
    if (message.role === "assistant" && (message.error || !message.content)) continue;
    messages.push({ role: message.role, content: messageText(message) });
  }
  const request = { model: conversation.model, messages };
  for (const name of SETTINGS) {
    if (conversation.settings[name] != null) request[name] = conversation.settings[name];
  }
  return request;
}

function generate() {
  const running = answerOnce();
  state.running = running;
  return running.finally(() => {
    if (state.running === running) state.running = null;
  });
}

async function answerOnce() {
  const conversation = state.current;
  conversation.model = selectedModel();
  readSettings();
  const answer = { role: "assistant", content: "", reasoning: "", stats: null, error: null };
  const request = requestFor(conversation);
  conversation.messages.push(answer);
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  drawMessages();
  const view = new StreamView($("messages").lastElementChild, $("messages"));
  view.setStatus("Waiting for the model…");
  const started = performance.now();
  let firstToken = null;
  let gotHeaders = false;
  let usage = null;
  let timings = null;
  let pieces = 0; // streamed pieces: about one a token, the count shown when a stop leaves no usage
  const loadingWatch = watchLoading(conversation.model, view, () => gotHeaders || controller.signal.aborted);
  const first = () => (firstToken ??= performance.now());
  // Kept as it comes: the question at once, the answer every few seconds (a reload mid-answer loses neither).
  saveSnapshot(conversation, answer).then(refreshList);
  const snapshots = setInterval(() => saveSnapshot(conversation, answer), SAVE_EVERY_MS);
  try {
    const finish = await streamChat(
      request,
      {
        headers: () => {
          gotHeaders = true;
          view.setStatus("Reading the prompt…");
        },
        content: (text) => {
          first();
          pieces += 1;
          answer.content += text;
          view.addContent(text);
        },
        reasoning: (text) => {
          first();
          pieces += 1;
          answer.reasoning += text;
          view.addReasoning(text);
        },
        usage: (value, measured) => {
          usage = value;
          timings = measured;
        },
      },
      controller.signal,
    );
    const counted = usage || { completion_tokens: pieces, prompt_tokens: null };
    answer.stats = statsFor(counted, timings, started, firstToken, finish);
  } catch (error) {
    answer.error = { message: error.message, code: error.code || null };
    if (error instanceof ApiError && error.status === 401) {
      clearInterval(loadingWatch);
      clearInterval(snapshots);
      conversation.messages.pop();
      state.controller = null;
      setStreaming(false);
      drawMessages();
      if (await askForKey(error.message)) return answerOnce();
      conversation.messages.push(answer);
    }
  } finally {
    clearInterval(loadingWatch);
    clearInterval(snapshots);
  }
  state.controller = null;
  setStreaming(false);
  drawMessages();
  await save();
  refreshModels();
  $("input").focus();
}

/** Save the conversation as it stands mid-answer: should the page go away now, the answer says it was cut off. */
function saveSnapshot(conversation, answer) {
  const cut = { message: "This answer was cut off: the page was closed or reloaded while it came.", code: "interrupted" };
  const messages = conversation.messages.map((m) => (m === answer ? { ...answer, error: cut } : m));
  return store.saveConversation({ ...conversation, messages, updated: Date.now() }).catch(() => {});
}

/** While no byte of the answer has come, say whether the model is still loading (it can take a while). */
function watchLoading(model, view, answered) {
  return setInterval(async () => {
    if (answered()) return;
    try {
      const status = await health();
      if (answered()) return;
      const loading = (status.loading || []).includes(model);
      view.setStatus(loading ? `Loading ${model} into memory… (the first answer from a model waits for this)` : "Waiting for the model…");
    } catch {
      // the request itself will report an unreachable server
    }
  }, 700);
}

function stop() {
  if (state.controller) state.controller.abort(); // closing the stream cancels the request: the server frees the slot
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("model").disabled = on;
  if (!on) $("send").disabled = false;
  if (!on && $("composer-error").textContent === BUSY_NOTICE) hideComposerError();
}

// --- models and settings -----------------------------------------------------------------------

function selectedModel() {
  return $("model").value || null;
}

async function refreshModels() {
  let models;
  try {
    models = await listModels();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && (await askForKey(error.message))) return refreshModels();
    $("model-status").textContent = error.message;
    return;
  }
  state.models = models;
  const select = $("model");
  const wanted = (state.current && state.current.model) || select.value || localStorage.getItem(MODEL_STORAGE);
  drawModelOptions(select, models, wanted);
  describeModel();
  if (!models.length) $("model-status").textContent = "No models: pull one with `sovereign pull`.";
}

function describeModel() {
  const model = state.models.find((m) => m.id === selectedModel());
  $("model-status").textContent = modelStatus(model);
}

function readSettings() {
  const conversation = state.current;
  conversation.system = $("system").value;
  for (const name of SETTINGS) {
    const value = $(name).value.trim();
    const number = name === "max_tokens" ? parseInt(value, 10) : parseFloat(value);
    conversation.settings[name] = value === "" || Number.isNaN(number) ? null : number;
  }
}

function showDefaults() {
  const defaults = state.defaults;
  for (const name of SETTINGS) {
    const value = defaults[name];
    $(name).placeholder = value == null ? "server default: until the answer ends" : `server default: ${value}`;
  }
}

// --- files, export, import -------------------------------------------------------------------------

async function attach(files) {
  hideComposerError();
  for (const file of files) {
    try {
      state.pending.push(await readAttachment(file));
    } catch (error) {
      showComposerError(error.message);
    }
  }
  drawAttachments(state.pending);
}

async function importFile(file) {
  hideComposerError();
  try {
    const conversations = store.parseExport(await file.text());
    const count = await store.importConversations(conversations);
    await refreshList();
    const same = conversations.length - count;
    const note = same ? ` (${same} already here, unchanged)` : "";
    showComposerError(`Imported ${count} conversation${count === 1 ? "" : "s"}${note}.`, { info: true });
  } catch (error) {
    showComposerError(error.message);
  }
}

// --- layout --------------------------------------------------------------------------------------

function toggleSidebar(open) {
  const sidebar = $("sidebar");
  const show = open ?? !sidebar.classList.contains("open");
  sidebar.classList.toggle("open", show);
  $("toggle-sidebar").setAttribute("aria-expanded", String(show));
}

function closeSidebarOnPhone() {
  if (matchMedia("(max-width: 760px)").matches) toggleSidebar(false);
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", startNewConversation);
  $("search").addEventListener("input", drawList);
  $("model").addEventListener("change", () => {
    localStorage.setItem(MODEL_STORAGE, selectedModel());
    state.current.model = selectedModel();
    describeModel();
  });
  // Which models are loaded changes as others use the server: refresh now and then, never under the user's hand.
  setInterval(() => {
    if (document.activeElement !== $("model") && !state.controller) refreshModels();
  }, 15000);
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  for (const id of ["system", ...SETTINGS]) {
    $(id).addEventListener("change", () => {
      readSettings();
      if (!state.controller) save(); // mid-answer, the answer's own saves carry it (marked cut off until it ends)
    });
  }
  $("attach").addEventListener("click", () => $("attach-file").click());
  $("attach-file").addEventListener("change", (event) => {
    attach([...event.target.files]);
    event.target.value = "";
  });
  const main = document.querySelector(".main");
  main.addEventListener("dragover", (event) => {
    event.preventDefault();
    main.classList.add("dropping");
  });
  main.addEventListener("dragleave", () => main.classList.remove("dropping"));
  main.addEventListener("drop", (event) => {
    event.preventDefault();
    main.classList.remove("dropping");
    attach([...event.dataTransfer.files]);
  });
  $("export-all").addEventListener("click", () => download("sovereign-chats.json", store.exportJson(state.conversations)));
  $("export-one").addEventListener("click", () => {
    if (state.current.messages.length) download(`sovereign-chat-${state.current.id}.json`, store.exportJson([state.current]));
  });
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (event) => {
    if (event.target.files[0]) importFile(event.target.files[0]);
    event.target.value = "";
  });
  $("toggle-sidebar").addEventListener("click", () => toggleSidebar());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") toggleSidebar(false);
  });
}

async function start() {
  wire();
  try {
    state.defaults = (await serverInfo()).sampling_defaults || {};
  } catch {
    state.defaults = {};
  }
  showDefaults();
  await refreshModels();
  try {
    await refreshList();
  } catch (error) {
    showComposerError(`This browser does not keep conversations here (IndexedDB: ${error && error.message}).`);
  }
  state.current = state.conversations[0] || store.newConversation(selectedModel());
  showConversation();
  document.body.dataset.ready = "true"; // for tests and scripts: the page has drawn what it stores
  $("input").focus();
}

start();
