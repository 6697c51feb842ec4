// The page of `imagegen serve`: a form over the server's own images API (streamed), a gallery, a details view.
// Plain JS, no build step, nothing fetched from anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imagegen-api-key"; // sessionStorage: the key lives as long as the tab
const state = { models: new Map(), references: [], loras: [], chosenLoras: [], init: null, running: null };

// ---- talking to the server ----------------------------------------------------------------
class ServerError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A fetch whose failures (HTTP errors with OpenAI-shaped bodies, a dead server) become ServerErrors.
async function call(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(`Cannot reach the server (${e.message}).`, 0);
  }
  if (!response.ok) {
    let message = `The server answered ${response.status} ${response.statusText}.`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ServerError(message, response.status);
  }
  return response;
}

// Server-sent events from a fetch body: yields {event, data} with data parsed as JSON.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function bytesOf(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

// The PNG's tEXt chunks: the server writes its generation metadata as JSON under "imagegen".
function pngText(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const text = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    if (type === "IEND") break;
    if (type === "tEXt") {
      const body = bytes.subarray(at + 8, at + 8 + length);
      const zero = body.indexOf(0);
      text[latin1.decode(body.subarray(0, zero))] = latin1.decode(body.subarray(zero + 1));
    }
    at += 12 + length;
  }
  return text;
}

// ---- messages -------------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setProgress(text, fraction) {
  $("progress").textContent = text;
  $("progress-bar").value = fraction;
}

// ---- API key --------------------------------------------------------------------------------
function askForKey(refused) {
  $("key-form").hidden = false;
  $("generate").disabled = true;
  $("server-status").textContent = "locked";
  showError(refused ? "The server refused that API key." : "");
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  loadModels();
});

// ---- models and the form --------------------------------------------------------------------
async function loadModels() {
  let list;
  try {
    list = await (await call("v1/models")).json();
  } catch (e) {
    if (e.status === 401) return askForKey(sessionStorage.getItem(KEY_STORE) !== null);
    return showError(e.message);
  }
  $("key-form").hidden = true;
  showError("");
  state.loras = await loraFiles();
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  state.models.clear();
  const missing = document.createElement("optgroup");
  missing.label = "No weights on the server (imagegen pull ID)";
  for (const model of list.data) {
    state.models.set(model.id, model);
    const option = new Option(model.loaded ? `${model.id} (loaded)` : model.id, model.id);
    option.title = model.description || "";
    (model.available ? select : missing).append(option);
  }
  if (missing.children.length) select.append(missing);
  const preferred = list.data.find((m) => m.default) || list.data.find((m) => m.loaded) || list.data[0];
  select.value = state.models.has(previous) ? previous : preferred ? preferred.id : "";
  $("server-status").textContent = `${list.data.length} models`;
  $("generate").disabled = list.data.length === 0;
  modelChanged();
}

// The adapters of the server's --lora-dir; none when it has no folder (or predates GET /v1/loras).
async function loraFiles() {
  try {
    return (await (await call("v1/loras")).json()).data.map((file) => file.name);
  } catch (_) {
    return [];
  }
}

function sizePresets(model) {
  // Aspect ratios at the model's default pixel count, rounded to the multiple it needs.
  const [w, h] = model.default_size.split("x").map(Number);
  const m = model.size_multiple;
  const round = (v) => Math.max(m, Math.round(v / m) * m);
  const presets = [];
  for (const [a, b] of [[1, 1], [4, 3], [3, 4], [3, 2], [2, 3], [16, 9], [9, 16]]) {
    const scale = Math.sqrt((w * h) / (a * b));
    const size = [round(a * scale), round(b * scale)];
    if (size[0] * size[1] <= model.max_pixels) presets.push(size);
  }
  if (!presets.some(([pw, ph]) => pw === w && ph === h)) presets.unshift([w, h]);
  return presets;
}

function modelChanged() {
  const model = state.models.get($("model").value);
  if (!model) return;
  const takes = (option) => model.options.includes(option);
  $("negative-field").hidden = !takes("negative_prompt");
  $("guidance-field").hidden = !takes("guidance");
  const edits = model.tasks.includes("image-edit");
  $("reference-field").hidden = !(edits && takes("images"));
  $("init-field").hidden = !(edits && takes("init_image"));
  $("lora-field").hidden = !(takes("loras") && state.loras.length > 0);
  $("lora-pick").replaceChildren(...state.loras.map((name) => new Option(name, name)));
  const strengths = model.default_strength || []; // [img2img, inpainting], for models that take an init image
  $("strength").placeholder = strengths.length ? strengths[0] : "";
  $("steps").placeholder = model.default_steps ?? "";
  $("guidance").placeholder = model.default_guidance ?? "";
  for (const id of ["width", "height"]) $(id).step = model.size_multiple;

  const preset = $("size-preset");
  preset.replaceChildren(new Option("custom", ""));
  for (const [w, h] of sizePresets(model)) preset.add(new Option(`${w} × ${h}`, `${w}x${h}`));
  const [w, h] = model.default_size.split("x");
  $("width").value = w;
  $("height").value = h;
  preset.value = model.default_size;

  drawModelOptions(model);

  const quantize = $("quantize");
  quantize.replaceChildren(new Option(model.default_dtype || "default", ""));
  for (const mode of model.quantize_modes) quantize.add(new Option(/^\d+$/.test(mode) ? `${mode}-bit` : mode, mode));
  $("quantize-field").hidden = model.quantize_modes.length === 0;
}

// The model's own options (its family declares them: kind, range, help), sent under `options`.
function drawModelOptions(model) {
  const inputs = model.family_options.map((option) => {
    const input = document.createElement(option.kind === "choice" ? "select" : "input");
    if (option.kind === "choice") {
      input.append(new Option("default", ""), ...option.choices.map((c) => new Option(c, c)));
    } else if (option.kind === "bool") {
      input.type = "checkbox";
    } else if (option.kind === "int" || option.kind === "float") {
      input.type = "number";
      input.step = option.kind === "int" ? "1" : "any";
      if (option.minimum !== null) input.min = option.minimum;
      if (option.maximum !== null) input.max = option.maximum;
      input.placeholder = "default";
    } else {
      input.type = "text";
      input.placeholder = "default";
    }
    input.id = `option-${option.name}`;
    input.name = `options.${option.name}`;
    input.dataset.kind = option.kind;
    input.title = option.help;
    const label = document.createElement("label");
    label.htmlFor = input.id;
    label.textContent = option.name.replaceAll("_", " ");
    label.title = option.help;
    const cell = document.createElement("div");
    cell.append(label, input);
    return cell;
  });
  $("model-option-fields").replaceChildren(...inputs);
  $("model-options").hidden = inputs.length === 0;
}

function modelOptionValues() {
  const values = {};
  for (const input of $("model-option-fields").querySelectorAll("input, select")) {
    const name = input.name.slice("options.".length);
    const kind = input.dataset.kind;
    if (kind === "bool") {
      if (input.checked) values[name] = true;
    } else if (input.value.trim() !== "") {
      values[name] = kind === "int" || kind === "float" ? Number(input.value) : input.value;
    }
  }
  return values;
}

$("model").addEventListener("change", modelChanged);
$("size-preset").addEventListener("change", () => {
  if (!$("size-preset").value) return;
  [$("width").value, $("height").value] = $("size-preset").value.split("x");
});
for (const id of ["width", "height"]) {
  $(id).addEventListener("input", () => {
    const size = `${$("width").value}x${$("height").value}`;
    const match = [...$("size-preset").options].some((o) => o.value === size);
    $("size-preset").value = match ? size : "";
  });
}

// ---- reference images -----------------------------------------------------------------------
function addReferences(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const url = URL.createObjectURL(file);
    state.references.push({ file, url });
  }
  drawReferences();
}

function drawReferences() {
  $("references").replaceChildren(...state.references.map((ref, i) => {
    const img = document.createElement("img");
    img.src = ref.url;
    img.title = `${ref.file.name} (click to remove)`;
    img.addEventListener("click", () => {
      URL.revokeObjectURL(ref.url);
      state.references.splice(i, 1);
      drawReferences();
    });
    return img;
  }));
}

$("reference").addEventListener("change", () => {
  addReferences($("reference").files);
  $("reference").value = "";
});
$("drop").addEventListener("dragover", (e) => {
  e.preventDefault();
  $("drop").classList.add("over");
});
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  addReferences(e.dataTransfer.files);
});

// ---- LoRA adapters ------------------------------------------------------------------------------
function drawLoras() {
  $("loras").replaceChildren(...state.chosenLoras.map((lora, i) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = lora.name;
    const scale = document.createElement("input");
    scale.type = "number";
    scale.step = "0.05";
    scale.value = lora.scale;
    scale.name = "lora_scale";
    scale.setAttribute("aria-label", `scale of ${lora.name}`);
    scale.addEventListener("input", () => { lora.scale = Number(scale.value); });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${lora.name}`;
    remove.addEventListener("click", () => {
      state.chosenLoras.splice(i, 1);
      drawLoras();
    });
    item.append(name, scale, remove);
    return item;
  }));
}

$("lora-add").addEventListener("click", () => {
  const name = $("lora-pick").value;
  if (!name || state.chosenLoras.some((l) => l.name === name)) return;
  state.chosenLoras.push({ name, scale: Number($("lora-scale").value || 1) });
  drawLoras();
});

// ---- init image and mask painting ---------------------------------------------------------------
function setInit(file) {
  if (state.init) URL.revokeObjectURL(state.init.url);
  state.init = file ? { file, url: URL.createObjectURL(file), painted: false } : null;
  $("init-editor").hidden = !file;
  if (!file) {
    const model = state.models.get($("model").value);
    [$("width").value, $("height").value] = model.default_size.split("x");
    for (const id of ["width", "height"]) $(id).placeholder = "";
    return;
  }
  const img = $("init-preview");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth; // paint at the image's own resolution: the mask is sent at that size
    canvas.height = img.naturalHeight;
  };
  for (const id of ["width", "height"]) { // no size: the model sizes the output from the init image
    $(id).value = "";
    $(id).placeholder = "from image";
  }
  $("size-preset").value = "";
  img.src = state.init.url;
}

function paintAt(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const context = canvas.getContext("2d");
  context.fillStyle = "rgba(255, 40, 120, 0.55)";
  context.beginPath();
  context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
    (Number($("brush").value) / 2) * scale, 0, 2 * Math.PI);
  context.fill();
  state.init.painted = true;
}

$("mask").addEventListener("pointerdown", (e) => {
  $("mask").setPointerCapture(e.pointerId);
  paintAt(e);
});
$("mask").addEventListener("pointermove", (e) => { if (e.buttons) paintAt(e); });
$("clear-mask").addEventListener("click", () => {
  $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height);
  state.init.painted = false;
});
$("remove-init").addEventListener("click", () => setInit(null));
$("init-image").addEventListener("change", () => {
  setInit($("init-image").files[0] || null);
  $("init-image").value = "";
});

// OpenAI's mask: fully transparent where painted (repaint there), opaque elsewhere.
function maskBlob() {
  const canvas = $("mask");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const mask = out.getContext("2d").createImageData(canvas.width, canvas.height);
  for (let i = 3; i < mask.data.length; i += 4) mask.data[i] = painted.data[i] > 0 ? 0 : 255;
  out.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// ---- generating -----------------------------------------------------------------------------
// The request's fields from the form; empty inputs are left out so the model's defaults apply.
function requestFields() {
  const model = state.models.get($("model").value);
  const fields = { model: $("model").value, prompt: $("prompt").value, stream: true };
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  if ($("width").value || $("height").value) fields.size = `${$("width").value}x${$("height").value}`;
  const optional = {
    seed: number("seed"), steps: number("steps"), n: number("count"),
    guidance: $("guidance-field").hidden ? null : number("guidance"),
    negative_prompt: $("negative-field").hidden || !$("negative").value ? null : $("negative").value,
    quantize: $("quantize-field").hidden || !$("quantize").value ? null : $("quantize").value,
  };
  for (const [name, value] of Object.entries(optional)) if (value !== null) fields[name] = value;
  if (!$("lora-field").hidden && state.chosenLoras.length) {
    fields.loras = state.chosenLoras.map(({ name, scale }) => ({ name, scale }));
  }
  if (!$("init-field").hidden && state.init) {
    // a strength makes the server repaint the first upload (else it would be a reference image)
    fields.strength = number("strength") ?? (model.default_strength || [1, 1])[state.init.painted ? 1 : 0];
  }
  const own = modelOptionValues();
  if (Object.keys(own).length) fields.options = own;
  const steps = fields.steps ?? model?.default_steps ?? 1;
  // Previews of the latents while denoising; each costs a VAE decode, so one per four steps, at most three.
  fields.partial_images = Math.min(3, Math.floor(steps / 4));
  return fields;
}

async function post(fields, signal) {
  const references = $("reference-field").hidden ? [] : state.references;
  const init = $("init-field").hidden ? null : state.init;
  if (!references.length && !init) {
    return call("v1/images/generations", {
      method: "POST", signal, body: JSON.stringify(fields), headers: { "Content-Type": "application/json" },
    });
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  if (init) form.append("image[]", init.file, init.file.name); // the first upload is the one repainted
  for (const ref of references) form.append("image[]", ref.file, ref.file.name);
  if (init && init.painted) form.append("mask", await maskBlob(), "mask.png");
  return call("v1/images/edits", { method: "POST", signal, body: form });
}

const STAGES = { load: "Loading the model", encode: "Encoding the prompt", decode: "Decoding" };

async function generate() {
  showError("");
  const fields = requestFields();
  const controller = new AbortController();
  state.running = controller;
  $("generate").disabled = true;
  $("stop").hidden = false;
  $("run").hidden = false;
  $("preview").hidden = true;
  setProgress("Sending…", 0);
  const started = performance.now();
  let received = 0;
  try {
    const response = await post(fields, controller.signal);
    for await (const { event, data } of events(response)) {
      const kind = event.slice(event.indexOf(".") + 1);
      if (event === "error") throw new ServerError(data.error.message, 500);
      if (kind === "queued") {
        setProgress(data.position ? `Queued (position ${data.position})` : "Queued", 0);
      } else if (kind === "progress") {
        const batch = data.images > 1 ? ` (images ${data.first_image + 1}–${data.first_image + data.images})` : "";
        const text = data.stage === "denoise" ? `Step ${data.step} of ${data.total}` : STAGES[data.stage] || data.stage;
        setProgress(text + batch, data.stage === "denoise" ? data.step / data.total : data.stage === "decode" ? 1 : 0);
      } else if (kind === "partial_image") {
        $("preview").src = `data:image/png;base64,${data.b64_json}`;
        $("preview").hidden = false;
      } else if (kind === "completed") {
        addToGallery(data, (performance.now() - started) / 1000);
        received += 1;
      }
    }
    $("run").hidden = true;
    if (!received) showError("The server closed the connection before sending an image.");
  } catch (e) {
    $("run").hidden = true;
    if (e.name === "AbortError") return;
    if (e.status === 401) askForKey(true);
    showError(e.message);
  } finally {
    state.running = null;
    $("generate").disabled = $("key-form").hidden === false;
    $("stop").hidden = true;
  }
}

$("settings").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.running) generate();
});
$("stop").addEventListener("click", () => state.running && state.running.abort()); // the server cancels too

// ---- gallery and details --------------------------------------------------------------------
function addToGallery(event, seconds) {
  const bytes = bytesOf(event.b64_json);
  const metadata = JSON.parse(pngText(bytes).imagegen || "{}");
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const item = { url, metadata, seconds, seed: event.seed, model: event.model, size: event.size };

  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = metadata.prompt || "";
  img.dataset.seed = event.seed;
  img.dataset.model = event.model;
  const caption = document.createElement("figcaption");
  caption.textContent = `${event.model} · ${event.size} · seed ${event.seed}`;
  figure.append(img, caption);
  figure.addEventListener("click", () => showDetails(item));
  $("gallery").prepend(figure);
}

function showDetails(item) {
  const m = item.metadata;
  const rows = [
    ["Prompt", m.prompt], ["Negative prompt", m.negative_prompt], ["Model", item.model], ["Seed", item.seed],
    ["Size", item.size], ["Steps", m.steps], ["Guidance", m.guidance], ["Precision", m.quantize],
    ["Reference images", (m.images || []).join(", ")], ["Init image", m.init_image], ["Mask", m.mask],
    ["Strength", m.strength], ["LoRA", (m.loras || []).map((l) => `${l.name} × ${l.scale ?? 1}`).join(", ")],
    ["Time", `${item.seconds.toFixed(1)} s` + (m.timings?.total ? ` (device ${m.timings.total.toFixed(2)} s)` : "")],
  ];
  $("details-list").replaceChildren(...rows.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(
    ([name, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      dd.dataset.field = name.toLowerCase();
      return [dt, dd];
    }));
  $("details-image").src = item.url;
  $("download").href = item.url;
  $("download").download = `imagegen-${item.model}-${item.seed}.png`;
  $("reuse").onclick = () => reuse(item);
  $("details").showModal();
}

function reuse(item) {
  const m = item.metadata;
  if (state.models.has(item.model)) {
    $("model").value = item.model;
    modelChanged();
  }
  $("prompt").value = m.prompt ?? "";
  $("negative").value = m.negative_prompt ?? "";
  $("seed").value = item.seed;
  const [w, h] = item.size.split("x");
  $("width").value = w;
  $("height").value = h;
  $("width").dispatchEvent(new Event("input"));
  $("steps").value = m.steps ?? "";
  $("guidance").value = m.guidance ?? "";
  $("quantize").value = m.quantize ?? "";
  $("strength").value = m.strength ?? "";
  state.chosenLoras = (m.loras || []).filter((l) => state.loras.includes(l.name))
    .map((l) => ({ name: l.name, scale: l.scale ?? 1 }));
  drawLoras();
  for (const [name, value] of Object.entries(m.options || {})) {
    const input = $(`option-${name}`);
    if (!input) continue;
    if (input.dataset.kind === "bool") input.checked = Boolean(value);
    else input.value = value ?? "";
  }
  $("count").value = 1;
  $("details").close();
  $("prompt").focus();
}

$("close-details").addEventListener("click", () => $("details").close());

loadModels();
