// The model picker: each model's size and whether it is loaded, as /v1/models says.

/** 1536 -> "1.5 KiB"; binary units, as `sovereign list` shows sizes. */
export function humanSize(bytes) {
  if (!bytes) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 && unit > 0 ? 1 : 0)} ${units[unit]}`;
}

/** Fill the <select> with the models, keeping `wanted` selected when it is still there. */
export function drawModelOptions(select, models, wanted) {
  select.replaceChildren(
    ...models.map((model) => {
      const option = document.createElement("option");
      option.value = model.id;
      const facts = [humanSize(model.size), model.loaded ? "loaded" : "not loaded"].filter(Boolean);
      option.textContent = `${model.id} (${facts.join(", ")})`;
      return option;
    }),
  );
  if (models.some((m) => m.id === wanted)) select.value = wanted;
}

/** The words next to the picker for the selected model. */
export function modelStatus(model) {
  if (!model) return "";
  return model.loaded ? "loaded" : "loads on the first message";
}
