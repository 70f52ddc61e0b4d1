// The conversation's messages as DOM: built once per message, and the streaming answer updated at most once a
// frame (only that message is re-rendered, never the whole conversation).

import { copyText, renderInto } from "./markdown.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, aria) {
  const node = element("button", "message-action", label);
  node.type = "button";
  if (aria) node.setAttribute("aria-label", aria);
  node.addEventListener("click", onClick);
  return node;
}

/**
 * What to show under an answer: token counts from the server's usage; times from the server's own timings
 * when it sent them (they leave out the network and the page), else from the page's clock.
 */
export function statsFor(usage, timings, started, firstToken, finish) {
  const ended = performance.now();
  const tokens = usage.completion_tokens;
  const decodeSeconds = firstToken != null ? (ended - firstToken) / 1000 : 0;
  const server = timings && typeof timings.prompt_ms === "number";
  return {
    completion_tokens: tokens,
    prompt_tokens: usage.prompt_tokens,
    cached_tokens: usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0,
    ttft_ms: server ? timings.prompt_ms : firstToken != null ? firstToken - started : null,
    // The first token ends the prompt's reading: the rate counts the tokens after it.
    tokens_per_second: server
      ? timings.predicted_per_second
      : tokens > 1 && decodeSeconds > 0
        ? (tokens - 1) / decodeSeconds
        : null,
    timed_by: server ? "server" : "page",
    finish_reason: finish,
    stopped: finish === "cancelled",
  };
}

/** "212 tokens · first token 0.41 s · 23.5 tokens/s · 180 prompt tokens reused" */
export function statsText(stats) {
  if (!stats) return "";
  const parts = stats.completion_tokens != null ? [`${stats.completion_tokens} tokens`] : [];
  if (stats.ttft_ms != null) parts.push(`first token ${(stats.ttft_ms / 1000).toFixed(2)} s`);
  if (stats.tokens_per_second != null) parts.push(`${stats.tokens_per_second.toFixed(1)} tokens/s`);
  if (stats.prompt_tokens != null) parts.push(`${stats.prompt_tokens} prompt tokens, ${stats.cached_tokens || 0} reused`);
  if (stats.stopped) parts.push("stopped");
  else if (stats.finish_reason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function thinkingBlock(reasoning, open) {
  const details = element("details", "thinking");
  details.open = open;
  details.append(element("summary", null, "Thinking"));
  const body = element("div", "thinking-body", reasoning);
  details.append(body);
  return details;
}

function errorBlock(error, onRetry) {
  const box = element("div", "message-error");
  box.setAttribute("role", "alert");
  box.append(element("p", null, error.message));
  if (onRetry) box.append(button("Retry", onRetry));
  return box;
}

/** One message's element. `actions` holds the callbacks its buttons may call (regenerate, edit, retry). */
export function messageElement(message, { isLast, actions }) {
  const item = element("article", `message ${message.role}`);
  item.setAttribute("aria-label", message.role === "user" ? "You" : "Assistant");
  item.append(element("div", "message-role", message.role === "user" ? "You" : "Assistant"));
  if (message.reasoning) item.append(thinkingBlock(message.reasoning, false));
  const content = element("div", "message-content");
  if (message.role === "user") {
    content.textContent = message.content; // what a person typed is shown as typed
    content.classList.add("plain");
  } else {
    renderInto(content, message.content);
  }
  item.append(content);
  if (message.attachments && message.attachments.length) {
    const files = element("ul", "attachment-list");
    for (const file of message.attachments) files.append(element("li", "attachment", file.name));
    item.append(files);
  }
  if (message.error) item.append(errorBlock(message.error, isLast ? actions.retry : null));
  const footer = element("div", "message-footer");
  if (message.role === "assistant") {
    const stats = element("span", "stats", statsText(message.stats));
    if (message.stats && message.stats.timed_by === "server") stats.title = "Times measured by the server";
    footer.append(stats);
    footer.append(button("Copy", () => copyText(message.content), "Copy this answer"));
    if (isLast) footer.append(button("Regenerate", actions.regenerate, "Regenerate this answer"));
  } else {
    footer.append(button("Edit", () => actions.edit(item, message), "Edit this message and send it again"));
  }
  item.append(footer);
  return item;
}

/** An editor in place of a user message's text: Save & send resends from that message. */
export function editInPlace(item, message, onSave) {
  const content = item.querySelector(".message-content");
  const footer = item.querySelector(".message-footer");
  const area = element("textarea", "edit-area");
  area.value = message.content;
  area.setAttribute("aria-label", "Edit message");
  const save = button("Save & send", () => onSave(area.value));
  const cancel = button("Cancel", () => {
    area.replaceWith(content);
    bar.replaceWith(footer);
  });
  const bar = element("div", "message-footer");
  bar.append(save, cancel);
  content.replaceWith(area);
  footer.replaceWith(bar);
  area.focus();
}

/**
 * Where the streamed text can be cut for good: after the last blank line outside a code fence, at or after
 * `from` (itself such a cut). Markdown before such a cut renders the same whatever follows (near enough while
 * streaming: the finished answer is rendered again whole). A fence is CommonMark's: up to three spaces, then
 * three or more backticks or tildes; only a run of the same character, at least as long and with nothing
 * after it, closes it (so a ```` block may hold ``` lines).
 */
export function settledEnd(text, from) {
  let cut = from;
  let fence = null; // the open fence's marker ("```", "~~~~", ...)
  const lines = /^ {0,3}(`{3,}|~{3,})(.*)$|\n\n/gm;
  lines.lastIndex = from;
  for (let match; (match = lines.exec(text)); ) {
    const [, marker, rest] = match;
    if (marker === undefined) {
      if (!fence) cut = match.index + 2;
    } else if (!fence) {
      if (!(marker[0] === "`" && rest.includes("`"))) fence = marker; // an info string holds no backtick
    } else if (marker[0] === fence[0] && marker.length >= fence.length && rest.trim() === "") {
      fence = null;
    }
  }
  return cut;
}

/**
 * The answer being streamed: text arrives in pieces, the DOM is updated once per animation frame, and
 * only the unsettled tail is rendered again: the cost of a frame does not grow with the answer.
 */
export class StreamView {
  constructor(item, scroller) {
    this.item = item;
    this.scroller = scroller;
    this.content = item.querySelector(".message-content");
    this.settled = element("div", "settled");
    this.tail = element("div", "tail");
    this.content.replaceChildren(this.settled, this.tail);
    this.status = element("p", "stream-status");
    this.status.setAttribute("role", "status");
    this.content.before(this.status);
    this.text = "";
    this.settledLength = 0;
    this.reasoning = "";
    this.thinking = null;
    this.scheduled = false;
  }

  setStatus(text) {
    this.status.textContent = text;
    this.status.hidden = !text;
  }

  addContent(piece) {
    this.text += piece;
    this.schedule();
  }

  addReasoning(piece) {
    this.reasoning += piece;
    this.schedule();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => this.paint());
  }

  paint() {
    this.scheduled = false;
    const pinned = this.scroller.scrollHeight - this.scroller.scrollTop - this.scroller.clientHeight < 80;
    if (this.reasoning) {
      if (!this.thinking) {
        this.thinking = thinkingBlock("", true);
        this.status.before(this.thinking);
      }
      this.thinking.querySelector(".thinking-body").textContent = this.reasoning;
    }
    if (this.text) {
      this.setStatus("");
      const end = settledEnd(this.text, this.settledLength);
      if (end > this.settledLength) {
        const block = element("div");
        renderInto(block, this.text.slice(this.settledLength, end), { final: false });
        this.settled.append(...block.childNodes);
        this.settledLength = end;
      }
      renderInto(this.tail, this.text.slice(this.settledLength), { final: false });
    }
    if (pinned) this.scroller.scrollTop = this.scroller.scrollHeight;
  }
}
