// Model output as safe HTML: markdown-it renders (raw HTML in the text stays text), DOMPurify sanitizes what
// it made, highlight.js colours finished code blocks. Nothing here loads anything from the network.

import "../vendor/markdown-it.js"; // a UMD build: it sets globalThis.markdownit
import DOMPurify from "../vendor/purify.es.mjs";
import hljs from "../vendor/highlight.min.js";

function renderer(highlight) {
  const md = globalThis.markdownit({
    html: false, // `<script>` or `<img onerror>` in model output is shown as text, never parsed as HTML
    linkify: true,
    breaks: true,
    highlight: highlight
      ? (code, lang) => {
          if (lang && hljs.getLanguage(lang)) {
            return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
          }
          return ""; // markdown-it escapes it
        }
      : null,
  });
  // No images: an image URL in an answer would make the browser fetch it (the CSP would block it, noisily).
  md.disable("image");
  // A table column's alignment as a class, not the style attribute markdown-it writes: the CSP refuses inline
  // styles, even while DOMPurify parses them (a console error per cell, every frame while streaming).
  md.core.ruler.push("align_classes", (state) => {
    for (const token of state.tokens) {
      const align = /^text-align:(left|right|center)$/.exec(token.attrGet("style") || "");
      if (!align) continue;
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      token.attrJoin("class", `align-${align[1]}`);
    }
  });
  return md;
}

const streaming = renderer(false); // highlighting as tokens arrive would redo every block on every frame
const finished = renderer(true);

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const PURIFY = {
  ADD_ATTR: ["target"],
  FORBID_TAGS: ["img", "style", "form", "input", "button", "iframe"],
  FORBID_ATTR: ["style"], // the CSP would refuse it anyway
};

/** Markdown text -> sanitized HTML string (highlighted when the text is final). */
export function toHtml(text, { final = true } = {}) {
  const html = (final ? finished : streaming).render(text);
  return DOMPurify.sanitize(html, PURIFY);
}

/** Put rendered markdown into `element`, adding a copy button to each code block. */
export function renderInto(element, text, { final = true } = {}) {
  element.innerHTML = toHtml(text, { final });
  if (!final) return;
  for (const pre of element.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (code && !code.classList.contains("hljs")) code.classList.add("hljs");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy this code");
    button.addEventListener("click", async () => {
      button.textContent = (await copyText((code || pre).textContent)) ? "Copied" : "Copy failed";
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    pre.prepend(button);
  }
}

/** Copy text to the clipboard; true on success (also off a secure context, where navigator.clipboard is absent). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
