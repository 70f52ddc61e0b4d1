// The API key prompt: asked for on a 401, kept in localStorage (api.js sends it as Authorization: Bearer).

import { setApiKey } from "./api.js";

const $ = (id) => document.getElementById(id);
let open = null; // the dialog's answer while it is shown

/**
 * Ask for the key; resolves true once one is given. A second 401 while the dialog is open (the model
 * list's refresh and a message, say) waits for the same answer: a second prompt would take over the
 * dialog and leave the first caller waiting for ever.
 */
export function askForKey(reason) {
  open ??= promptForKey(reason).finally(() => (open = null));
  return open;
}

function promptForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  return new Promise((resolve) => {
    const done = (ok) => {
      $("key-form").onsubmit = null;
      $("key-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(ok);
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      setApiKey(key);
      done(true);
    };
    $("key-cancel").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
  });
}
