// The page at /: a client of the public API only (v1/models, v1/explain), so it is
// also an example of how to call it. No framework, no build step, no CDN.
//
// Heatmaps come as 8-bit gray levels (heatmap.format "gray", at the image's own
// size) and are coloured here with the service's colour map (sent in the page), so
// the opacity slider redraws without asking the service again. The blend is the
// service's "overlay" formula: colour over the image at opacity × level, so cold
// areas keep the image and hot ones take the colour; at 60% it is that overlay.
"use strict";

const config = JSON.parse(document.getElementById("page-config").textContent);
const COLOURS = config.colormap; // 256 × [r, g, b]
const METHODS = config.methods; // [[name, title], ...]
const EXAMPLES = config.examples; // [{name, findings: [kind, ...]}, ...]: page/examples/<name>

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"), token: $("token"), useToken: $("use-token"), model: $("model"),
  modelInfo: $("model-info"), modelWarning: $("model-warning"), layer: $("layer"),
  layerInfo: $("layer-info"), examples: $("examples"), exampleList: $("example-list"), target: $("target"), topK: $("top-k"),
  methods: $("methods"), opacity: $("opacity"), opacityValue: $("opacity-value"),
  files: $("files"), dropZone: $("drop-zone"), notice: $("notice"), status: $("status"),
  results: $("results"), explain: $("explain"),
};

const state = {
  token: "", // in this page's memory only: never stored, never in a URL
  model: null, // GET v1/models/<name>
  listing: new Map(), // name -> its entry in GET v1/models
  layers: new Map(), // name -> its entry in GET v1/models/<name>/layers
  items: [], // one per image: see addFiles()
  nextId: 0,
};

class ApiError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

// --- the API ------------------------------------------------------------------

// Relative URLs: the page works behind a proxy that serves the service under a prefix.
async function api(path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError("unreachable", `The service could not be reached (${error.message}).`, 0);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = JSON.parse(text);
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const error = payload && payload.error;
    if (error && error.message) throw new ApiError(error.code, error.message, response.status);
    throw new ApiError(`http_${response.status}`,
      `The service answered ${response.status} ${response.statusText}.`, response.status);
  }
  return payload;
}

// A POST whose progress a card shows: "uploading n%" while the body goes out, then
// "computing" until the answer starts to arrive (fetch cannot tell the two apart).
function post(path, body, onStage = () => {}) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("Content-Type", "application/json");
    if (state.token) request.setRequestHeader("Authorization", `Bearer ${state.token}`);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onStage("upload", Math.round((100 * event.loaded) / event.total));
    });
    request.upload.addEventListener("load", () => onStage("computing"));
    request.addEventListener("error", () => reject(new ApiError("unreachable",
      "The service could not be reached.", 0)));
    request.addEventListener("load", () => {
      let payload = null;
      try {
        payload = JSON.parse(request.responseText);
      } catch {
        payload = null;
      }
      if (request.status >= 200 && request.status < 300 && payload) {
        resolve(payload);
        return;
      }
      const error = payload && payload.error;
      if (error && error.message) {
        reject(new ApiError(error.code, error.message, request.status));
      } else {
        reject(new ApiError(`http_${request.status}`,
          `The service answered ${request.status} ${request.statusText}.`, request.status));
      }
    });
    onStage("upload", 0);
    request.send(JSON.stringify(body));
  });
}

function describeError(error) {
  if (error instanceof ApiError) {
    const retry = error.status === 503 ? " The service is busy: try again in a moment." : "";
    return `${error.message}${retry} (${error.code})`;
  }
  return `Unexpected problem in the page: ${error.message}`;
}

function showNotice(message) {
  ui.notice.textContent = message;
}

// --- models, layers, methods ----------------------------------------------------

// Long model and layer names: the lists are wide enough for them, the chosen one is
// written out in full below its list (lines that wrap), and it is the tooltip too.
function titleSelect(select) {
  const chosen = select.options[select.selectedIndex];
  select.title = chosen ? chosen.textContent : "";
  if (select === ui.model) describeModel();
  if (select === ui.layer) describeLayer();
}

// A model without trained weights answers, but its answers mean nothing: said plainly,
// next to the list (a listing without the field is a model with weights).
function describeModel() {
  const entry = state.listing.get(ui.model.value);
  const random = Boolean(entry && entry.random_weights === true);
  ui.modelWarning.hidden = !random;
  ui.modelWarning.textContent = random
    ? `The model ${entry.name} has random weights: its answers mean nothing.` : "";
  const model = state.model && state.model.name === ui.model.value ? state.model : null;
  if (!entry || !model) {
    ui.modelInfo.textContent = entry ? entry.arch : "";
    return;
  }
  const kind = model.multilabel ? "independent scores per finding" : "one class per image";
  ui.modelInfo.textContent = `${entry.arch}: ${model.num_classes} classes, ${kind}; input `
    + `${model.input_size[1]}×${model.input_size[0]}, ${model.channels} channel(s), on ${model.device}.`;
}

function describeLayer() {
  const layer = state.layers.get(ui.layer.value);
  if (!layer) {
    ui.layerInfo.textContent = "";
    return;
  }
  const layout = layer.layout ? `, ${layer.layout}` : "";
  ui.layerInfo.textContent = `${layer.name}: ${layer.kind}${layout}, ${layer.channels} channels `
    + `of ${layer.height}×${layer.width}`
    + (layer.name === state.defaultLayer ? " (the model's default)." : ".");
}

function shape(layer) {
  return `${layer.channels}×${layer.height}×${layer.width}`;
}

// The layers as the list shows them: the default first, then the others grouped by the
// block they are in ("features", or "features.stage1" where "features" alone would be a
// long group), in the model's order; layers alone in their block share a last group.
const GROUP_SIZE = 12;

function layerBlocks(layers, depth) {
  const blocks = new Map();
  for (const layer of layers) {
    const block = layer.name.split(".").slice(0, depth + 1).join(".");
    if (!blocks.has(block)) blocks.set(block, []);
    blocks.get(block).push(layer);
  }
  return [...blocks].flatMap(([block, members]) => {
    const deeper = members.some((layer) => layer.name.split(".").length > depth + 2);
    return members.length > GROUP_SIZE && deeper
      ? layerBlocks(members, depth + 1) : [[block, members]];
  });
}

function layerGroups(layers, defaultLayer) {
  const others = layers.filter((layer) => layer.name !== defaultLayer);
  const groups = [["Default", layers.filter((layer) => layer.name === defaultLayer)]];
  const single = [];
  for (const [block, members] of layerBlocks(others, 0)) {
    if (members.length === 1) single.push(...members);
    else groups.push([`${block} (${members.length} layers)`, members]);
  }
  groups.push([groups.length > 1 ? "Other layers" : "Layers", single]);
  return groups.filter(([, members]) => members.length);
}

function layerOptions(layers, defaultLayer) {
  return layerGroups(layers, defaultLayer).map(([label, members]) => {
    const group = document.createElement("optgroup");
    group.label = label;
    group.append(...members.map((layer) => option(layer.name,
      `${layer.name} — ${shape(layer)}` + (layer.name === defaultLayer ? " (default)" : ""),
      layer.name === defaultLayer)));
    return group;
  });
}

function option(value, text, selected = false) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  element.selected = selected;
  return element;
}

async function loadModels() {
  showNotice("");
  let listing;
  try {
    listing = await api("v1/models");
  } catch (error) {
    if (error.status === 401) {
      showNotice(`${error.message} Enter a token under Access and select "Use token".`);
      ui.token.focus();
    } else {
      showNotice(`The models could not be listed: ${describeError(error)}`);
    }
    return false;
  }
  state.listing = new Map(listing.models.map((m) => [m.name, m]));
  // The name alone in the list (the architecture is written out below it).
  ui.model.replaceChildren(...listing.models.map((m) => option(m.name,
    m.name + (m.random_weights === true ? " (random weights)" : ""), m.default)));
  titleSelect(ui.model);
  return loadModel();
}

async function loadModel() {
  const name = ui.model.value;
  let model;
  let layers;
  try {
    [model, layers] = await Promise.all([
      api(`v1/models/${encodeURIComponent(name)}`),
      api(`v1/models/${encodeURIComponent(name)}/layers`),
    ]);
  } catch (error) {
    showNotice(`Model ${name} could not be read: ${describeError(error)}`);
    return false;
  }
  state.model = model;
  state.layers = new Map(layers.layers.map((layer) => [layer.name, layer]));
  state.defaultLayer = layers.default_layer;
  describeModel();
  ui.layer.replaceChildren(...layerOptions(layers.layers, layers.default_layer));
  ui.target.replaceChildren(option("", "The top prediction", true),
    ...model.labels.map((label, index) => option(String(index), `${index}: ${label}`)));
  titleSelect(ui.layer);
  titleSelect(ui.target);
  ui.topK.max = String(model.num_classes);
  ui.topK.value = String(Math.min(model.multilabel ? model.num_classes : 5, model.num_classes));
  for (const item of state.items) {
    item.picture = null; // a 1-channel model shows the image in gray: ask again
    item.target = null;
  }
  updateButtons();
  return true;
}

function buildMethods() {
  const boxes = METHODS.map(([name, title], index) => {
    const id = `method-${index}`;
    const wrapper = document.createElement("div");
    wrapper.className = "check";
    const input = document.createElement("input");
    Object.assign(input, { type: "checkbox", id, value: name, checked: index === 0 });
    input.name = "method";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = title;
    wrapper.append(input, label);
    return wrapper;
  });
  ui.methods.append(...boxes);
}

function chosenMethods() {
  const checked = [...ui.methods.querySelectorAll("input:checked")].map((box) => box.value);
  return checked.length ? checked : [METHODS[0][0]];
}

function methodTitle(name) {
  return (METHODS.find(([method]) => method === name) || [name, name])[1];
}

// --- images ---------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function decodePicture(encoding, base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return createImageBitmap(new Blob([bytes], { type: `image/${encoding}` }));
}

function pixelsOf(bitmap) {
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

// The shipped examples: a click fetches the file from the service and adds it as a
// chosen or dropped file is added (the same path from there on).
function buildExamples() {
  ui.examples.hidden = !EXAMPLES.length;
  ui.exampleList.replaceChildren(...EXAMPLES.map(({ name, findings }) => {
    const entry = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.dataset.name = name;
    const dicom = /\.dcm$/i.test(name);
    const picture = document.createElement(dicom ? "span" : "img");
    picture.className = "example-picture";
    if (dicom) {
      picture.textContent = "DICOM";
      picture.setAttribute("aria-hidden", "true");
    } else {
      picture.src = `page/examples/${encodeURIComponent(name)}`;
      picture.alt = "";
    }
    const title = document.createElement("span");
    title.className = "example-name";
    // Breaks after "_" (and before the suffix) rather than inside a word.
    for (const [index, part] of name.replace(/\./, "\0.").split(/(?<=_)|\0/).entries()) {
      if (index) title.append(document.createElement("wbr"));
      title.append(part);
    }
    const holds = document.createElement("span");
    holds.className = "example-findings";
    holds.textContent = (dicom ? "12-bit CR radiograph: " : "") + findings.join(", ");
    button.append(picture, title, holds);
    button.setAttribute("aria-label", `Explain the example ${name} (${findings.join(", ")})`);
    button.addEventListener("click", () => addExample(name));
    entry.append(button);
    return entry;
  }));
}

async function addExample(name) {
  showNotice("");
  try {
    const response = await fetch(`page/examples/${encodeURIComponent(name)}`);
    if (!response.ok) throw new Error(`the service answered ${response.status}`);
    const file = new File([await response.blob()], name, {
      type: response.headers.get("Content-Type") || "",
    });
    const adding = addFiles([file]);
    const card = state.items[state.items.length - 1].card;
    card.scrollIntoView({ block: "nearest" }); // its progress, then its result
    await adding;
    if (card.getBoundingClientRect().top > 0.4 * window.innerHeight) {
      card.scrollIntoView({ block: "start" });
    }
  } catch (error) {
    showNotice(`The example ${name} could not be fetched: ${error.message}.`);
  }
}

async function addFiles(files) {
  const added = [];
  for (const file of files) {
    const card = ui.results.appendChild(
      document.getElementById("card-template").content.firstElementChild.cloneNode(true));
    const item = {
      id: state.nextId++, name: file.name, card, dataUrl: null, picture: null, dicom: null,
      target: chosenTarget(), generation: 0,
      frame: 0, // of a multi-frame file (the API needs one for multi-frame DICOM)
    };
    card.querySelector(".card-title").textContent = file.name;
    state.items.push(item);
    showStage(item, "reading");
    try {
      item.dataUrl = await readAsDataUrl(file);
      added.push(item);
    } catch (error) {
      showStage(item, "");
      card.querySelector(".card-error").textContent = `${file.name} could not be read: ${error.message}`;
    }
  }
  updateButtons();
  await explainItems(added);
}

// --- progress, per image --------------------------------------------------------

const STAGES = {
  reading: () => "Reading the file…",
  upload: (percent) => `Uploading… ${percent}%`,
  computing: () => "Computing (queued or running on the model)…",
  rendering: () => "Rendering…",
  waiting: () => "Waiting for the models to be listed…",
};

// Each stage also goes into data-stages (in order), which the page's tests read.
function showStage(item, stage, detail) {
  const line = item.card.querySelector(".card-progress");
  line.textContent = stage in STAGES ? STAGES[stage](detail) : stage;
  if (stage in STAGES) {
    const seen = (item.card.dataset.stages || "").split(" ").filter(Boolean);
    if (seen[seen.length - 1] !== stage) seen.push(stage);
    item.card.dataset.stages = seen.join(" ");
  }
}

// An error about "Image 0" (each card sends one image) names the file instead.
function errorText(item, error) {
  return describeError(error).replace(/\bImage 0\b/g, item.name);
}

function updateButtons() {
  ui.explain.disabled = !(state.model && state.items.some((item) => item.dataUrl));
  ui.useToken.disabled = ui.token.value.trim() === "" && state.token === "";
}

// --- explaining -----------------------------------------------------------------

function explainBody(item, method, include) {
  const body = {
    model: state.model.name,
    layer: ui.layer.value || null,
    method,
    images: [item.dataUrl],
    targets: [item.target],
    frame: item.frame,
    top_k: Math.max(1, Math.min(Number(ui.topK.value) || 5, state.model.num_classes)),
    heatmap: { format: "gray", size: "original" },
  };
  if (include) body.include = ["image", "dicom"];
  return body;
}

async function explainItems(items) {
  if (!items.length) return;
  if (!state.model) {
    ui.status.textContent = "The images will be explained once the models are listed (see above).";
    items.forEach((item) => showStage(item, "waiting"));
    return;
  }
  const started = performance.now();
  ui.status.textContent = `Explaining ${items.length} image(s)…`;
  const outcomes = await Promise.all(items.map(explainItem));
  const failed = outcomes.filter((ok) => !ok).length;
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  ui.status.textContent = failed
    ? `${failed} of ${items.length} image(s) failed (see below); ${seconds} s.`
    : `Explained ${items.length} image(s) in ${seconds} s.`;
}

async function explainItem(item) {
  const generation = ++item.generation;
  const methods = chosenMethods();
  const errorBox = item.card.querySelector(".card-error");
  errorBox.textContent = "";
  item.card.setAttribute("aria-busy", "true");
  const started = performance.now();
  const stage = (name, detail) => {
    if (generation === item.generation) showStage(item, name, detail);
  };
  try {
    // The first answer brings the picture (and DICOM fields) the others reuse.
    const first = await post("v1/explain", explainBody(item, methods[0], !item.picture), stage);
    if (generation !== item.generation) return true; // settings changed meanwhile
    stage("rendering");
    if (!item.picture) {
      const result = first.results[0];
      const bitmap = await decodePicture(result.image.encoding, result.image.data);
      item.picture = { width: bitmap.width, height: bitmap.height, pixels: pixelsOf(bitmap) };
      item.dicom = result.dicom;
    }
    const rest = await Promise.all(methods.slice(1).map(
      (method) => post("v1/explain", explainBody(item, method, false))));
    if (generation !== item.generation) return true;
    await showResults(item, [first, ...rest]);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    showStage(item, `Explained in ${seconds} s.`);
    return true;
  } catch (error) {
    if (generation === item.generation) {
      showStage(item, "");
      errorBox.textContent = errorText(item, error);
      item.card.querySelector(".figures").replaceChildren(item.card.querySelector(".original"));
      item.card.querySelector(".original").hidden = true;
      item.card.querySelector(".predictions-box").hidden = true;
    }
    return false;
  } finally {
    if (generation === item.generation) item.card.removeAttribute("aria-busy");
  }
}

async function showResults(item, answers) {
  showDicom(item);
  const figures = [];
  for (const answer of answers) {
    const result = answer.results[0];
    const explanation = result.explanations[0];
    const bitmap = await decodePicture(explanation.heatmap.encoding, explanation.heatmap.data);
    const rgba = pixelsOf(bitmap);
    const levels = new Uint8Array(rgba.length / 4);
    for (let i = 0; i < levels.length; i++) levels[i] = rgba[i * 4];
    figures.push(makeFigure(item, answer.method, answer.layer, explanation, levels));
  }
  const original = item.card.querySelector(".original");
  original.hidden = false;
  original.querySelector("canvas").setAttribute("aria-label", `${item.name}, without a heatmap`);
  item.card.querySelector(".figures").replaceChildren(original, ...figures.map((f) => f.element));
  item.figures = figures;
  drawOriginal(item);
  drawItem(item);
  showPredictions(item, answers[0].results[0], answers[0].results[0].explanations[0].target);
}

function makeFigure(item, method, layer, explanation, levels) {
  const element = document.getElementById("figure-template").content.firstElementChild
    .cloneNode(true);
  const canvas = element.querySelector("canvas");
  canvas.width = item.picture.width;
  canvas.height = item.picture.height;
  const { target, heatmap } = explanation;
  const score = `${(target.score * 100).toFixed(1)}%`;
  const empty = heatmap.raw_max === 0 ? " — the map is all zero: nothing in this layer "
    + "supports this class" : "";
  canvas.setAttribute("aria-label",
    `${methodTitle(method)} heatmap of ${target.label} over ${item.name}`);
  element.querySelector("figcaption").textContent =
    `${methodTitle(method)} · ${target.label} (${score}) · layer ${layer}${empty}`;
  element.dataset.method = method;
  element.dataset.target = target.label;
  element.querySelector(".download").addEventListener("click", () => download(item, canvas,
    method, target.label));
  element.querySelector(".download").setAttribute("aria-label",
    `Download the ${methodTitle(method)} overlay of ${target.label} for ${item.name} as PNG`);
  for (const button of element.querySelectorAll(".download-dicom")) {
    const kind = DICOM_OBJECTS[button.dataset.kind];
    button.hidden = !item.dicom; // a DICOM result is made from a DICOM source only
    button.setAttribute("aria-label", `Download the ${methodTitle(method)} ${kind.what} of `
      + `${target.label} for ${item.name} as ${kind.as}`);
    button.addEventListener("click", () => downloadDicom(item, method, target, kind));
  }
  return { element, canvas, levels };
}

function showPredictions(item, result, explained) {
  const list = item.card.querySelector(".predictions");
  list.replaceChildren(...result.predictions.map((prediction) => {
    const entry = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "prediction";
    button.setAttribute("aria-pressed", String(prediction.index === explained.index));
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = prediction.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(prediction.score * 100).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, prediction.score)) * 100}%`;
    bar.append(fill);
    button.append(label, score, bar);
    button.addEventListener("click", async () => {
      item.target = prediction.index;
      await explainItems([item]);
    });
    entry.append(button);
    return entry;
  }));
  item.card.querySelector(".predictions-box").hidden = false;
}

const DICOM_FIELDS = [
  ["PatientName", "Patient"], ["PatientID", "Patient ID"], ["PatientBirthDate", "Born"],
  ["PatientSex", "Sex"], ["StudyDate", "Study date"], ["StudyDescription", "Study"],
  ["SeriesDescription", "Series"], ["Modality", "Modality"], ["BodyPartExamined", "Body part"],
  ["ViewPosition", "View"], ["PhotometricInterpretation", "Photometric"],
  ["TransferSyntax", "Transfer syntax"],
];

// Dates (DA) as YYYY-MM-DD and person names (PN) as "FAMILY, Given", as viewers show them.
function dicomText(value) {
  if (/^\d{8}$/.test(value)) return `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}`;
  return value.includes("^") ? value.split("^").filter(Boolean).join(", ") : value;
}

// A multi-frame file: a frame chooser (1-based, as viewers count) that re-explains.
function showFrames(item) {
  const control = item.card.querySelector(".frame-control");
  const frames = item.dicom ? Number(item.dicom.NumberOfFrames || 1) : 1;
  control.hidden = frames < 2;
  if (frames < 2) return;
  const input = control.querySelector(".frame");
  input.max = String(frames);
  input.value = String(item.frame + 1);
  input.setAttribute("aria-label", `Frame of ${item.name}, 1 to ${frames}`);
  control.querySelector(".frame-count").textContent = `of ${frames}`;
  if (!input.dataset.wired) {
    input.dataset.wired = "yes";
    input.addEventListener("change", () => {
      const chosen = Math.round(Number(input.value));
      if (!(chosen >= 1 && chosen <= frames)) return;
      item.frame = chosen - 1;
      item.picture = null; // another frame is another picture
      explainItems([item]);
    });
  }
}

function showDicom(item) {
  showFrames(item);
  const list = item.card.querySelector(".dicom");
  if (!item.dicom) {
    list.hidden = true;
    return;
  }
  const rows = DICOM_FIELDS.filter(([key]) => item.dicom[key] != null)
    .map(([key, title]) => [title, dicomText(String(item.dicom[key]))]);
  const { Columns: width, Rows: height, NumberOfFrames: frames, window } = item.dicom;
  rows.push(["Size", `${width}×${height}`
    + (frames > 1 ? `, frame ${item.dicom.frame + 1} of ${frames}` : "")]);
  rows.push(["Window", window.source === "file"
    ? `centre ${window.center}, width ${window.width} (from the file)`
    : window.source === "voi_lut" ? "the file's VOI LUT" : "the frame's full range (none in the file)"]);
  list.replaceChildren(...rows.map(([title, value]) => {
    const group = document.createElement("div");
    const term = document.createElement("dt");
    term.textContent = title;
    const detail = document.createElement("dd");
    detail.textContent = value;
    group.append(term, detail);
    return group;
  }));
  list.hidden = false;
}

// --- drawing --------------------------------------------------------------------

// The service's overlay: colour at opacity × level / 255 over the image.
function drawItem(item) {
  if (!item.figures || !item.picture) return;
  const opacity = Number(ui.opacity.value) / 100;
  const alpha = new Float32Array(256);
  for (let level = 0; level < 256; level++) alpha[level] = (opacity * level) / 255;
  const base = item.picture.pixels;
  for (const { canvas, levels } of item.figures) {
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    const out = image.data;
    for (let i = 0, p = 0; i < levels.length; i++, p += 4) {
      const level = levels[i];
      const a = alpha[level];
      const keep = 1 - a;
      const colour = COLOURS[level];
      out[p] = base[p] * keep + colour[0] * a;
      out[p + 1] = base[p + 1] * keep + colour[1] * a;
      out[p + 2] = base[p + 2] * keep + colour[2] * a;
      out[p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
  }
}

let redrawPending = false;
function redrawAll() {
  ui.opacityValue.textContent = `${ui.opacity.value}%`;
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => {
    redrawPending = false;
    state.items.forEach(drawItem);
  });
}

function drawOriginal(item) {
  const canvas = item.card.querySelector(".original canvas");
  canvas.width = item.picture.width;
  canvas.height = item.picture.height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  image.data.set(item.picture.pixels);
  context.putImageData(image, 0, 0);
}

function saveFile(blob, name) {
  const link = document.createElement("a");
  link.download = name.replace(/[^\w.+-]+/g, "_");
  link.href = URL.createObjectURL(blob);
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// The DICOM objects the service makes of one explanation, each in a new series of the
// source's study, asked for when its button is pressed: the overlay as a Secondary
// Capture, where the map is at least 0.5 as a Segmentation, or an SR report of the class
// (its probability and where the map peaks).
const DICOM_OBJECTS = {
  sc: {
    what: "overlay", as: "a DICOM Secondary Capture", suffix: "", heatmap: "dicom-sc",
    object: (result) => result.explanations[0].heatmap,
  },
  seg: {
    what: "region", as: "a DICOM Segmentation", suffix: "-seg", heatmap: "dicom-seg",
    object: (result) => result.segmentation,
  },
  sr: {
    what: "report", as: "a DICOM SR", suffix: "-report", heatmap: "gray", report: "dicom-sr",
    object: (result) => result.report,
  },
};

async function downloadDicom(item, method, target, kind) {
  const errorBox = item.card.querySelector(".card-error");
  errorBox.textContent = "";
  const body = { ...explainBody(item, method, false), targets: [target.index] };
  body.heatmap = { format: kind.heatmap, size: "original" };
  if (kind.report) body.report = kind.report;
  try {
    const made = kind.object((await post("v1/explain", body)).results[0]);
    if (!made.data) {
      errorBox.textContent = `No DICOM ${kind.what} for ${item.name}: ${made.reason}`;
      return;
    }
    const bytes = Uint8Array.from(atob(made.data), (c) => c.charCodeAt(0));
    const stem = item.name.replace(/\.[^.]*$/, "");
    saveFile(new Blob([bytes], { type: "application/dicom" }),
      `${stem}-${method}-${target.label}${kind.suffix}.dcm`);
  } catch (error) {
    errorBox.textContent = errorText(item, error);
  }
}

function download(item, canvas, method, label) {
  canvas.toBlob((blob) => {
    const stem = item.name.replace(/\.[^.]*$/, "");
    saveFile(blob, `${stem}-${method}-${label}.png`);
  }, "image/png");
}

// --- wiring ---------------------------------------------------------------------

function chosenTarget() {
  return ui.target.value === "" ? null : Number(ui.target.value);
}

function reexplainAll({ resetTargets = false } = {}) {
  if (resetTargets) {
    for (const item of state.items) item.target = chosenTarget();
  }
  return explainItems(state.items.filter((item) => item.dataUrl));
}

// Enter in the token field uses the token (rather than submitting the form).
ui.token.addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    ui.useToken.click();
  }
});
ui.useToken.addEventListener("click", async () => {
  state.token = ui.token.value.trim();
  if (await loadModels()) {
    ui.status.textContent = "Connected.";
    await reexplainAll();
  }
});
ui.token.addEventListener("input", updateButtons);
ui.model.addEventListener("change", async () => {
  titleSelect(ui.model);
  if (await loadModel()) await reexplainAll();
});
ui.layer.addEventListener("change", () => {
  titleSelect(ui.layer);
  reexplainAll();
});
ui.target.addEventListener("change", () => {
  titleSelect(ui.target);
  reexplainAll({ resetTargets: true });
});
ui.topK.addEventListener("change", () => reexplainAll());
ui.methods.addEventListener("change", () => reexplainAll());
ui.opacity.addEventListener("input", redrawAll);
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  reexplainAll();
});
ui.files.addEventListener("change", () => {
  const files = [...ui.files.files];
  ui.files.value = "";
  addFiles(files);
});

// Dropping a file anywhere must not navigate away from the page.
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (event) => event.preventDefault());
}
ui.dropZone.addEventListener("dragover", () => ui.dropZone.classList.add("over"));
ui.dropZone.addEventListener("dragleave", () => ui.dropZone.classList.remove("over"));
ui.dropZone.addEventListener("drop", (event) => {
  ui.dropZone.classList.remove("over");
  if (event.dataTransfer && event.dataTransfer.files.length) addFiles([...event.dataTransfer.files]);
});

buildMethods();
buildExamples();
updateButtons();
loadModels();
