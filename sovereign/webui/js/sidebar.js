// The list of conversations: open, rename, delete, and a search by title.

/** Draw the conversations whose title holds `query`, marking `currentId`. */
export function renderList(list, conversations, { currentId, query, open, rename, remove }) {
  const needle = query.trim().toLowerCase();
  const shown = conversations.filter((c) => !needle || c.title.toLowerCase().includes(needle));
  list.replaceChildren();
  if (!shown.length) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = needle ? "No conversation has that in its title." : "No conversations yet.";
    list.append(empty);
    return;
  }
  for (const conversation of shown) {
    const item = document.createElement("li");
    item.className = "conversation" + (conversation.id === currentId ? " current" : "");
    const title = document.createElement("button");
    title.type = "button";
    title.className = "conversation-title";
    title.textContent = conversation.title;
    if (conversation.id === currentId) title.setAttribute("aria-current", "true");
    title.addEventListener("click", () => open(conversation.id));
    const renameButton = smallButton("✎", `Rename ${conversation.title}`, () => startRename(item, conversation, rename));
    const deleteButton = smallButton("×", `Delete ${conversation.title}`, () => remove(conversation.id));
    item.append(title, renameButton, deleteButton);
    list.append(item);
  }
}

function smallButton(symbol, label, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = "icon-button";
  node.textContent = symbol;
  node.title = label;
  node.setAttribute("aria-label", label);
  node.addEventListener("click", onClick);
  return node;
}

function startRename(item, conversation, rename) {
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = conversation.title;
  input.setAttribute("aria-label", "New title");
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    rename(conversation.id, save ? input.value.trim() : null);
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}
