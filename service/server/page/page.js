// The page at /: a client of the public API only (v1/models, v1/explain), so it is
// also an example of how to call it. No framework, no build step, no CDN.
//
// Heatmaps come as 8-bit gray levels (heatmap.format "gray", at the image's own
// size) and are coloured here with the service's colour map (sent in the page), so
// the opacity slider redraws without asking the service again. The blend is the
// service's "overlay" formula: colour over the image at opacity × level, so cold
// areas keep the image and hot ones take the colour; at 60% it is that overlay.
//
// A volume model's maps come as float32 NIfTI files on the model input's grid, with the
// volume in 8 bits on that grid (include "image"): read here (gzip by the browser's
// DecompressionStream, NIfTI by a small reader below) and shown as three slices.
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
  const input = isVolumeModel(model)
    ? `${model.input_size.join("×")} voxels (a volume: NIfTI, or a DICOM series)`
    : `${model.input_size[1]}×${model.input_size[0]}`;
  ui.modelInfo.textContent = `${entry.arch}: ${model.num_classes} classes, ${kind}; input `
    + `${input}, ${model.channels} channel(s), on ${model.device}.`;
}

function describeLayer() {
  const layer = state.layers.get(ui.layer.value);
  if (!layer) {
    ui.layerInfo.textContent = "";
    return;
  }
  const layout = layer.layout ? `, ${layer.layout}` : "";
  ui.layerInfo.textContent = `${layer.name}: ${layer.kind}${layout}, ${layer.channels} channels `
    + `of ${grid(layer)}`
    + (layer.name === state.defaultLayer ? " (the model's default)." : ".");
}

// A layer's map for one input: H×W, a volume model's D×H×W.
function grid(layer) {
  return (layer.depth != null ? `${layer.depth}×` : "") + `${layer.height}×${layer.width}`;
}

function shape(layer) {
  return `${layer.channels}×${grid(layer)}`;
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
  showFileKinds();
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
  // A volume model's DICOM files are one series (one card); each other file is a card.
  for (const group of isVolumeModel(state.model) ? volumeInputs(files) : files.map((f) => [f])) {
    const card = ui.results.appendChild(
      document.getElementById("card-template").content.firstElementChild.cloneNode(true));
    const name = group.length > 1
      ? `${group[0].name} and ${group.length - 1} more (one series)` : group[0].name;
    const item = {
      id: state.nextId++, name, card, dataUrl: null, picture: null, dicom: null,
      target: chosenTarget(), generation: 0,
      frame: 0, // of a multi-frame file (the API needs one for multi-frame DICOM)
      series: null, // a series' files, as data URLs (sent as {"series": [...]})
    };
    card.querySelector(".card-title").textContent = name;
    state.items.push(item);
    showStage(item, "reading");
    try {
      const urls = await Promise.all(group.map(readAsDataUrl));
      item.series = urls.length > 1 ? urls : null;
      item.dataUrl = urls[0];
      added.push(item);
    } catch (error) {
      showStage(item, "");
      card.querySelector(".card-error").textContent = `${name} could not be read: ${error.message}`;
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
  return describeError(error).replace(/\b(Image 0|Volume 0|images\[0\])(?!\w)/g, item.name);
}

function updateButtons() {
  ui.explain.disabled = !(state.model && state.items.some((item) => item.dataUrl));
  ui.useToken.disabled = ui.token.value.trim() === "" && state.token === "";
}

// --- explaining -----------------------------------------------------------------

function explainBody(item, method, include) {
  if (isVolumeModel(state.model)) return volumeBody(item, method, include);
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
    if (!item.picture && isVolumeModel(state.model)) {
      item.picture = await volumePicture(first.results[0]);
    } else if (!item.picture) {
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
  if (item.picture.volume) {
    await showVolumeResults(item, answers);
    return;
  }
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

// The service's overlay: colour at opacity × level / 255 over the image, into ``out``
// (RGBA); ``base`` is the image as RGBA (``channels`` 4) or as gray levels (1).
function blend(out, base, channels, levels) {
  const opacity = Number(ui.opacity.value) / 100;
  const alpha = new Float32Array(256);
  for (let level = 0; level < 256; level++) alpha[level] = (opacity * level) / 255;
  const [g, b] = channels === 1 ? [0, 0] : [1, 2];
  for (let i = 0, p = 0, q = 0; i < levels.length; i++, p += 4, q += channels) {
    const level = levels[i];
    const a = alpha[level];
    const keep = 1 - a;
    const colour = COLOURS[level];
    out[p] = base[q] * keep + colour[0] * a;
    out[p + 1] = base[q + g] * keep + colour[1] * a;
    out[p + 2] = base[q + b] * keep + colour[2] * a;
    out[p + 3] = 255;
  }
}

function drawItem(item) {
  if (!item.figures || !item.picture) return;
  if (item.picture.volume) {
    item.figures.forEach(drawVolumeFigure);
    return;
  }
  for (const { canvas, levels } of item.figures) {
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    blend(image.data, item.picture.pixels, 4, levels);
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

// --- volumes --------------------------------------------------------------------
//
// A volume model (its input_size has three numbers) takes a NIfTI file, or the DICOM
// files of one series (sent as {"series": [...]}). Its maps are asked for as float32
// NIfTI files on the model input's grid, with the volume in 8 bits on the same grid
// (include "image"), and shown as three slices through a point, each coloured over the
// volume as the 2-D overlays are (blend above). The slices are shown as the service's
// own picture shows them (imaging/volume_pictures.py), as radiologists look at them:
// the grid turned to RAS+ by its affine's nearest axes, then axial and coronal with the
// patient's right on the viewer's left, anterior (axial) or superior (coronal) up, and
// sagittal with anterior on the left, superior up; voxels keep their size in mm.

const VIEW_SIDE = 320; // pixels on a view's longer side, as the service's picture
// Each view: the RAS axis it cuts across, and the axes its rows and columns run along
// (both drawn from the high end: anterior or superior at the top, right or anterior on
// the left).
const VIEWS = [
  { name: "axial", across: 2, rows: 1, columns: 0 },
  { name: "coronal", across: 1, rows: 2, columns: 0 },
  { name: "sagittal", across: 0, rows: 2, columns: 1 },
];
const NIFTI_TYPES = { 2: Uint8Array, 16: Float32Array }; // what the service writes

function isVolumeModel(model) {
  return Boolean(model && model.input_size.length === 3);
}

// The file chooser says what the chosen model takes; a 2-D model's is left as it was.
const IMAGE_FILES = {
  accept: ui.files.accept,
  label: document.querySelector('label[for="files"]').textContent,
  hint: ui.dropZone.querySelector(".hint").textContent,
};
const VOLUME_FILES = {
  accept: ".nii,.gz,.dcm,.dicom,application/dicom,application/gzip",
  label: "Choose a volume",
  hint: "or drop it here: a NIfTI file (.nii, .nii.gz), or the DICOM files of one series",
};

function showFileKinds() {
  const kind = isVolumeModel(state.model) ? VOLUME_FILES : IMAGE_FILES;
  ui.files.accept = kind.accept;
  document.querySelector('label[for="files"]').textContent = kind.label;
  ui.dropZone.querySelector(".hint").textContent = kind.hint;
}

// Each NIfTI file is a volume; the other files together are one series.
function volumeInputs(files) {
  const nifti = files.filter((file) => /\.nii(\.gz)?$/i.test(file.name));
  const others = files.filter((file) => !nifti.includes(file));
  return [...nifti.map((file) => [file]), ...(others.length ? [others] : [])];
}

function volumeBody(item, method, include) {
  const body = {
    model: state.model.name,
    layer: ui.layer.value || null,
    method,
    images: [item.series ? { series: item.series } : item.dataUrl],
    targets: [item.target],
    top_k: Math.max(1, Math.min(Number(ui.topK.value) || 5, state.model.num_classes)),
    heatmap: { format: "nifti", size: "input" },
  };
  if (include) body.include = ["image"];
  return body;
}

async function gunzip(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Response(stream).arrayBuffer();
}

// A NIfTI-1 file as the service writes it: one file (n+1), little-endian, uint8 or
// float32 voxels; ``values`` in the file's order (i fastest), ``dims`` (I, J, K).
function readNifti(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < 352 || view.getInt32(0, true) !== 348) {
    throw new Error("the map is not a little-endian NIfTI-1 file");
  }
  const dims = [1, 2, 3].map((axis) => view.getInt16(40 + 2 * axis, true));
  const code = view.getInt16(70, true);
  const Type = NIFTI_TYPES[code];
  if (!Type) throw new Error(`NIfTI datatype ${code} is not one this page reads`);
  const offset = Math.round(view.getFloat32(108, true));
  const end = offset + dims[0] * dims[1] * dims[2] * Type.BYTES_PER_ELEMENT;
  if (end > buffer.byteLength) throw new Error("the NIfTI file is shorter than its header says");
  return { dims, values: new Type(buffer.slice(offset, end)) };
}

// For each of R, A and S: the array axis nearest to it in the affine (voxel → mm,
// rows of four), whether it runs the other way, its length and its voxel size in mm.
function rasAxes(affine, dims) {
  const pairs = [];
  for (let axis = 0; axis < 3; axis++) {
    for (let world = 0; world < 3; world++) pairs.push([Math.abs(affine[world][axis]), axis, world]);
  }
  pairs.sort((a, b) => b[0] - a[0]);
  const axes = [];
  const taken = new Set();
  for (const [, axis, world] of pairs) {
    if (axes[world] || taken.has(axis)) continue;
    taken.add(axis);
    const column = [0, 1, 2].map((row) => affine[row][axis]);
    axes[world] = { axis, flip: column[world] < 0, size: dims[axis], mm: Math.hypot(...column) };
  }
  return axes;
}

// Where each RAS coordinate lands in the file's order: offsets[world][coordinate].
function rasGrid(affine, dims) {
  const axes = rasAxes(affine, dims);
  const strides = [1, dims[0], dims[0] * dims[1]];
  const offsets = axes.map(({ axis, flip, size }) => Int32Array.from({ length: size },
    (_, r) => strides[axis] * (flip ? size - 1 - r : r)));
  return { dims, axes, offsets, shape: axes.map((a) => a.size), mm: axes.map((a) => a.mm) };
}

// A map's values in [0, 1] as 8-bit levels, as the service's pictures round them.
function levelsOf(values) {
  const levels = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) levels[i] = Math.round(Math.min(1, Math.max(0, values[i])) * 255);
  return levels;
}

// The volume (include "image") on the maps' grid: its levels, and that grid in RAS+.
async function volumePicture(result) {
  const nifti = readNifti(await gunzip(result.image.data));
  const affine = result.explanations[0].heatmap.affine;
  return { volume: true, levels: nifti.values, grid: rasGrid(affine, nifti.dims) };
}

// One view's slice at ``position`` (RAS coordinates) of ``levels``, as shown.
function sliceOf(levels, grid, view, position) {
  const height = grid.shape[view.rows];
  const width = grid.shape[view.columns];
  const fixed = grid.offsets[view.across][position[view.across]];
  const rows = grid.offsets[view.rows];
  const columns = grid.offsets[view.columns];
  const out = new Uint8Array(width * height);
  for (let r = 0; r < height; r++) {
    const base = fixed + rows[height - 1 - r];
    for (let c = 0; c < width; c++) out[r * width + c] = levels[base + columns[width - 1 - c]];
  }
  return { width, height, levels: out };
}

async function showVolumeResults(item, answers) {
  const figures = [];
  for (const answer of answers) {
    const explanation = answer.results[0].explanations[0];
    const nifti = readNifti(await gunzip(explanation.heatmap.data));
    if (nifti.dims.join() !== item.picture.grid.dims.join()) {
      throw new Error("the map and the volume are not on one grid");
    }
    figures.push(makeVolumeFigure(item, answer, explanation, levelsOf(nifti.values)));
  }
  const original = item.card.querySelector(".original");
  original.hidden = true; // each view shows the volume under its map (opacity 0: alone)
  item.card.querySelector(".figures").replaceChildren(original, ...figures.map((f) => f.element));
  item.figures = figures;
  drawItem(item);
  showPredictions(item, answers[0].results[0], answers[0].results[0].explanations[0].target);
}

function makeVolumeFigure(item, answer, explanation, levels) {
  const { grid } = item.picture;
  // The peak's voxel of the input's grid, in RAS coordinates.
  const voxel = explanation.heatmap.peak.voxel;
  const position = grid.axes.map(({ axis, flip, size }) => (flip ? size - 1 - voxel[axis] : voxel[axis]));
  const figure = makeFigure(item, answer.method, answer.layer, explanation, levels);
  const { element } = figure;
  element.classList.add("volume");
  const views = document.createElement("div");
  views.className = "views";
  const shown = VIEWS.map((view) => volumeView(item, figure, view, position));
  views.append(...shown.map((one) => one.element));
  figure.canvas.replaceWith(views);
  const download = element.querySelector(".download");
  download.textContent = "Download map (.nii.gz)";
  download.setAttribute("aria-label", `Download the ${methodTitle(answer.method)} map of `
    + `${explanation.target.label} for ${item.name} as NIfTI`);
  download.replaceWith(download.cloneNode(true)); // without the 2-D overlay's listener
  element.querySelector(".download").addEventListener("click", () => {
    const bytes = Uint8Array.from(atob(explanation.heatmap.data), (c) => c.charCodeAt(0));
    const stem = item.name.replace(/(\.nii)?(\.gz)?$/i, "").replace(/\.[^.]*$/, "");
    saveFile(new Blob([bytes], { type: "application/gzip" }),
      `${stem}-${answer.method}-${explanation.target.label}.nii.gz`);
  });
  element.dataset.peak = position.join(",");
  const made = { element, levels, position, views: shown, item };
  wireVolumeFigure(made);
  return made;
}

function volumeView(item, figure, view, position) {
  const { grid } = item.picture;
  const element = document.createElement("div");
  element.className = "slice-view";
  element.dataset.view = view.name;
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  const height = grid.shape[view.rows] * grid.mm[view.rows];
  const width = grid.shape[view.columns] * grid.mm[view.columns];
  const scale = VIEW_SIDE / Math.max(height, width);
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  canvas.setAttribute("aria-label", `${view.name} slice of ${item.name}, `
    + `${figure.element.querySelector("figcaption").textContent}`);
  const label = document.createElement("label");
  const name = view.name[0].toUpperCase() + view.name.slice(1);
  const slider = document.createElement("input");
  Object.assign(slider, { type: "range", className: "slice", min: "0", step: "1" });
  slider.max = String(grid.shape[view.across] - 1);
  slider.value = String(position[view.across]);
  const count = document.createElement("output");
  label.append(`${name} slice `, slider, count);
  element.append(canvas, label);
  return { element, canvas, slider, count, view };
}

// Each slider moves its view's slice, and the cross where the others cut it.
function wireVolumeFigure(figure) {
  for (const { slider, view } of figure.views) {
    slider.addEventListener("input", () => {
      figure.position[view.across] = Number(slider.value);
      drawVolumeFigure(figure);
    });
  }
}

function drawVolumeFigure(figure) {
  const { grid, levels: base } = figure.item.picture;
  for (const { canvas, count, view } of figure.views) {
    const under = sliceOf(base, grid, view, figure.position);
    const heat = sliceOf(figure.levels, grid, view, figure.position);
    const native = document.createElement("canvas");
    native.width = heat.width;
    native.height = heat.height;
    const context = native.getContext("2d");
    const image = context.createImageData(heat.width, heat.height);
    blend(image.data, under.levels, 1, heat.levels);
    context.putImageData(image, 0, 0);
    const shown = canvas.getContext("2d");
    shown.imageSmoothingEnabled = true;
    shown.drawImage(native, 0, 0, canvas.width, canvas.height);
    // The point the three views share, at its voxel's centre.
    const row = (heat.height - 1 - figure.position[view.rows] + 0.5) * canvas.height / heat.height - 0.5;
    const column = (heat.width - 1 - figure.position[view.columns] + 0.5) * canvas.width / heat.width - 0.5;
    drawCross(shown, Math.round(row), Math.round(column), canvas);
    count.value = `${figure.position[view.across] + 1} of ${grid.shape[view.across]}`;
  }
}

// A thin cross open at its centre, so the voxel under it stays visible (as the service's).
function drawCross(context, row, column, canvas) {
  const arm = Math.max(4, Math.floor(Math.min(canvas.width, canvas.height) / 12));
  const gap = 3;
  context.fillStyle = "#ffffff";
  context.fillRect(column - arm, row, arm - gap + 1, 1);
  context.fillRect(column + gap, row, arm - gap + 1, 1);
  context.fillRect(column, row - arm, 1, arm - gap + 1);
  context.fillRect(column, row + gap, 1, arm - gap + 1);
  canvas.dataset.cross = `${row},${column}`;
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
