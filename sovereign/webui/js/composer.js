// The composer's small pieces: the files waiting to be sent, a line of notice, and downloads.

const $ = (id) => document.getElementById(id);

/** Show the files that go with the next message, each with a button that takes it off `pending`. */
export function drawAttachments(pending) {
  const list = $("attachment-list");
  list.replaceChildren(
    ...pending.map((file, index) => {
      const item = document.createElement("li");
      item.className = "attachment";
      item.textContent = `${file.name} `;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "icon-button";
      remove.textContent = "✕";
      remove.setAttribute("aria-label", `Remove ${file.name}`);
      remove.addEventListener("click", () => {
        pending.splice(index, 1);
        drawAttachments(pending);
      });
      item.append(remove);
      return item;
    }),
  );
}

/** A line above the message box: an error in words, or (info) a plain notice. */
export function showComposerError(message, { info = false } = {}) {
  $("composer-error").textContent = message;
  $("composer-error").classList.toggle("info", info);
  $("composer-error").hidden = false;
}

export function hideComposerError() {
  $("composer-error").hidden = true;
}

/** Save text as a file through the browser (a blob: URL, which never leaves the page). */
export function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
