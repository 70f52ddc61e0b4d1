// Conversations, kept in this browser's IndexedDB (nothing is stored on the server), and their JSON export.

const DB_NAME = "sovereign-chat";
const STORE = "conversations";
export const EXPORT_FORMAT = "sovereign-chat";

let opened = null;

function database() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => {
      request.result.createObjectStore(STORE, { keyPath: "id" });
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function transaction(mode, work) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const result = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(result.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("the transaction was aborted")); // a full disk aborts
  });
}

/** A new, empty conversation (not saved until it has a message). */
export function newConversation(model) {
  const now = Date.now();
  return {
    id: crypto.randomUUID(),
    title: "New chat",
    created: now,
    updated: now,
    model,
    system: "",
    settings: { temperature: null, top_p: null, max_tokens: null },
    messages: [],
  };
}

/** Every conversation, the most recently changed first. */
export async function allConversations() {
  const list = await transaction("readonly", (store) => store.getAll());
  return list.sort((a, b) => b.updated - a.updated);
}

export function saveConversation(conversation) {
  return transaction("readwrite", (store) => store.put(conversation));
}

export function deleteConversation(id) {
  return transaction("readwrite", (store) => store.delete(id));
}

function getConversation(id) {
  return transaction("readonly", (store) => store.get(id));
}

/**
 * Save imported conversations without losing any kept here: one whose id is taken by a different conversation
 * (an older export of a chat that went on, say) comes in beside it under a new id; the very same one is skipped.
 * Resolves to how many were added.
 */
export async function importConversations(conversations) {
  let added = 0;
  for (const conversation of conversations) {
    const kept = await getConversation(conversation.id);
    if (kept && sameContent(kept, conversation)) continue;
    if (kept) conversation.id = crypto.randomUUID();
    await saveConversation(conversation);
    added += 1;
  }
  return added;
}

function sameContent(a, b) {
  const content = (c) => JSON.stringify([c.title, c.system, c.messages.map((m) => [m.role, m.content])]);
  return content(a) === content(b);
}

/** The export file's contents for these conversations. */
export function exportJson(conversations) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), conversations }, null, 2);
}

function validMessage(message) {
  return (
    message &&
    ["user", "assistant"].includes(message.role) &&
    typeof message.content === "string" &&
    (message.reasoning === undefined || typeof message.reasoning === "string")
  );
}

/** The conversations in an export file, checked; throws an Error in words for anything else. */
export function parseExport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("This file is not JSON: import takes a file that this page exported.");
  }
  const list = data && data.format === EXPORT_FORMAT ? data.conversations : null;
  if (!Array.isArray(list)) throw new Error("This JSON is not a sovereign chat export (its format is not 'sovereign-chat').");
  return list.map((c, index) => {
    if (!c || typeof c.id !== "string" || !Array.isArray(c.messages) || !c.messages.every(validMessage)) {
      throw new Error(`Conversation ${index + 1} in this file is damaged: it has no id or a message is not text.`);
    }
    const settings = c.settings && typeof c.settings === "object" ? c.settings : {};
    return {
      id: c.id,
      title: typeof c.title === "string" && c.title ? c.title.slice(0, 200) : "Imported chat",
      created: Number(c.created) || Date.now(),
      updated: Number(c.updated) || Date.now(),
      model: typeof c.model === "string" ? c.model : null,
      system: typeof c.system === "string" ? c.system : "",
      settings: {
        temperature: numberOrNull(settings.temperature),
        top_p: numberOrNull(settings.top_p),
        max_tokens: numberOrNull(settings.max_tokens),
      },
      messages: c.messages.map((m) => ({
        role: m.role,
        content: m.content,
        reasoning: m.reasoning || "",
        attachments: Array.isArray(m.attachments)
          ? m.attachments.filter(validAttachment).map((a) => ({ name: a.name, text: a.text }))
          : [],
        stats: validStats(m.stats),
        error: m.error && typeof m.error.message === "string" ? { message: m.error.message, code: stringOrNull(m.error.code) } : null,
      })),
    };
  });
}

function numberOrNull(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function stringOrNull(value) {
  return typeof value === "string" ? value : null;
}

/** An answer's stats, each field of the type the page draws (a file could hold anything: "fast".toFixed throws). */
function validStats(stats) {
  if (!stats || typeof stats !== "object") return null;
  return {
    completion_tokens: numberOrNull(stats.completion_tokens),
    prompt_tokens: numberOrNull(stats.prompt_tokens),
    cached_tokens: numberOrNull(stats.cached_tokens),
    ttft_ms: numberOrNull(stats.ttft_ms),
    tokens_per_second: numberOrNull(stats.tokens_per_second),
    timed_by: stringOrNull(stats.timed_by),
    finish_reason: stringOrNull(stats.finish_reason),
    stopped: stats.stopped === true,
  };
}

function validAttachment(a) {
  return a && typeof a.name === "string" && typeof a.text === "string";
}
