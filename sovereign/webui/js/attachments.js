// Text files attached to a message: read in the browser, their contents sent inside the message.

export const MAX_FILE_BYTES = 512 * 1024; // far more than a small model's context holds; the server counts the rest

const TEXT_EXTENSIONS = new Set(
  (
    "txt md markdown rst csv tsv json jsonl yaml yml toml ini cfg conf env log xml html htm css scss js mjs cjs ts tsx " +
    "jsx py pyi rb go rs java kt kts scala c h cc cpp hpp cs swift m mm php pl lua r jl sh bash zsh fish ps1 bat sql " +
    "graphql proto tex bib vue svelte dart ex exs erl hs ml clj lisp el vim dockerfile makefile gitignore patch diff"
  ).split(" "),
);

function extension(name) {
  const lower = name.toLowerCase();
  const dot = lower.lastIndexOf(".");
  return dot >= 0 ? lower.slice(dot + 1) : lower; // "Makefile", "Dockerfile"
}

function looksBinary(text) {
  return text.slice(0, 8192).includes("\u0000");
}

/** Read one file as an attachment { name, text }; throws an Error in words when it is not text. */
export async function readAttachment(file) {
  const declaredText = file.type.startsWith("text/") || file.type === "application/json";
  if (!declaredText && !TEXT_EXTENSIONS.has(extension(file.name))) {
    throw new Error(`${file.name} is not a text file: these models read text (code, .txt, .md, ...), not ${file.type || "this type"}.`);
  }
  if (file.size > MAX_FILE_BYTES) {
    throw new Error(`${file.name} is ${Math.round(file.size / 1024)} KiB: attach text files up to ${MAX_FILE_BYTES / 1024} KiB.`);
  }
  const text = await file.text();
  if (looksBinary(text)) throw new Error(`${file.name} holds binary data, not text: these models read text.`);
  return { name: file.name, text };
}

/** The text the model reads for a message: what was typed, then each attached file in a fenced block. */
export function messageText(message) {
  const files = (message.attachments || []).map((a) => {
    // Longer than any run of backticks in the file, which could otherwise close it early.
    const longest = (a.text.match(/`+/g) || []).reduce((most, run) => Math.max(most, run.length), 2);
    const fence = "`".repeat(longest + 1);
    return `${a.name}:\n${fence}${extension(a.name)}\n${a.text}\n${fence}`;
  });
  return [message.content, ...files].filter(Boolean).join("\n\n");
}
