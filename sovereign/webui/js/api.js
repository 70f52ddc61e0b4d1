// Talking to this server: the API key, the model list, and one streamed chat completion.

const KEY_STORAGE = "sovereign.apiKey";

/** An error the page can put in words: `code` is the server's (or ours), `status` the HTTP status. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = null, retryable = true } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryable = retryable;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** The error a non-2xx answer carries, in words (the server's own message when it sent one). */
async function errorFrom(response) {
  let message = `The server answered ${response.status} ${response.statusText}.`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || body.error.type || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) code = "invalid_api_key";
  return new ApiError(message, { status: response.status, code });
}

/** The server's self-description: version and the sampling defaults a request gets. */
export async function serverInfo() {
  const response = await fetch("/", { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/** The models this server can answer with, as /v1/models lists them. */
export async function listModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await errorFrom(response);
  return (await response.json()).data;
}

/** /health: which models are loading right now. */
export async function health() {
  const response = await fetch("/health");
  return response.json();
}

/**
 * Split a server-sent-event stream into its events' data (a multi-line `data:` joins with "\n"), as the
 * EventSource spec reads it: lines end with CRLF, LF or CR, a blank line ends an event, other fields are
 * ignored. Exported for the tests.
 */
export async function* sseData(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const endings = /\r\n|\r|\n/g;
      let start = 0;
      for (let match; (match = endings.exec(buffer)); ) {
        if (match[0] === "\r" && match.index === buffer.length - 1) break; // maybe the first half of a CRLF
        const line = buffer.slice(start, match.index);
        start = endings.lastIndex;
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
      buffer = buffer.slice(start);
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

/**
 * Stream one chat completion. `on` gets { headers(), content(text), reasoning(text), usage(usage, timings) }
 * (timings: the server's own measure, llama-server's shape, when it sends them);
 * aborting `signal` closes the connection, which the server takes as a cancel and frees the slot.
 * Resolves to the finish reason ("stop", "length", or "cancelled").
 */
export async function streamChat(request, on, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
  } catch (error) {
    if (signal.aborted) return "cancelled";
    throw new ApiError(`The server cannot be reached (${error.message}). Is sovereign serve still running?`, {
      code: "unreachable",
    });
  }
  if (!response.ok) throw await errorFrom(response);
  on.headers();
  let finish = null;
  let ended = false; // whether [DONE] came: a stream that stops without it was cut off (a proxy, a dropped line)
  try {
    for await (const data of sseData(response.body, signal)) {
      if (data === "[DONE]") {
        ended = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new ApiError(chunk.error.message || "The server failed while answering.", {
          code: chunk.error.code || chunk.error.type,
        });
      }
      if (chunk.usage) on.usage(chunk.usage, chunk.timings || null);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) on.reasoning(delta.reasoning_content);
      if (delta.content) on.content(delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (error) {
    if (signal.aborted) return "cancelled";
    if (error instanceof ApiError) throw error;
    throw new ApiError(`The answer was cut off (${error.message}).`, { code: "stream_broken" });
  }
  if (signal.aborted) return "cancelled";
  if (!ended) throw new ApiError("The answer was cut off: the stream ended before the server finished it.", { code: "stream_broken" });
  return finish || "stop";
}
