// The DistriNews classifier in the visitor's browser: the exported int8 model (model/onnx/
// model_quantized.onnx, written by `python -m experiments.export`) under onnxruntime-web's
// WebAssembly backend, and the checkpoint's own tokenizer.json read by @huggingface/tokenizers.
// Texts are truncated as the server truncates them (model/distrinews.json's max_length tokens,
// special tokens included), and each is classified alone, as one /predict request is.
//
// `make space` (docs/deploy.md) copies the pinned packages (deploy/static/package.json) into vendor/
// and the model into model/. window.distrinews exposes the same classifier to tests (see
// tests/server/test_static_space.py): ready (a Promise), classify(text), and timings (milliseconds
// since navigation: model downloaded, model and tokenizer loaded, first prediction; measured by
// python -m deploy.measure_page).
import * as ort from "./vendor/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

const $ = (id) => document.getElementById(id);
const timings = {};

ort.env.wasm.wasmPaths = new URL("./vendor/", location.href).href; // not a CDN: the copies beside the page
ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a Space does not set

async function fetchJson(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// The model's bytes, with the progress shown (its size is the page's download).
async function fetchModel(path, total) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  const chunks = [];
  let got = 0;
  for (const reader = r.body.getReader(); ; ) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    $("status").textContent = `Downloading the model: ${mb(got)} of ${mb(total)}…`;
  }
  const bytes = new Uint8Array(got);
  let at = 0;
  for (const c of chunks) bytes.set(c, (at += c.length) - c.length);
  return bytes;
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

// The tokenizer's ids for `text`, cut to `maxLength` tokens as the server's tokenizer cuts them
// (truncation=True, max_length): the text's own tokens are cut from the end, the special tokens
// that the post-processor adds around them ([CLS] ... [SEP]) are kept.
function encode(tokenizer, text, maxLength) {
  const full = tokenizer.encode(text).ids;
  if (full.length <= maxLength) return full;
  const body = tokenizer.encode(text, { add_special_tokens: false }).ids;
  const before = full.findIndex((_, i) => body.every((id, j) => full[i + j] === id));
  const after = full.length - before - body.length;
  return [...full.slice(0, before), ...body.slice(0, maxLength - before - after), ...full.slice(full.length - after)];
}

function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((z) => Math.exp(z - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

async function load() {
  const info = await fetchJson("model/distrinews.json");
  const [config, tokenizerJson, tokenizerConfig] = await Promise.all(
    ["config.json", "tokenizer.json", "tokenizer_config.json"].map((f) => fetchJson(`model/${f}`)),
  );
  const labels = Object.keys(config.id2label)
    .sort((a, b) => a - b)
    .map((i) => config.id2label[i]);
  $("labels").textContent = `${labels.slice(0, -1).join(", ")} or ${labels.at(-1)}`;
  const bytes = await fetchModel(`model/${info.onnx}`, info.bytes[info.onnx]);
  timings.downloaded_ms = performance.now();
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
  timings.loaded_ms = performance.now();
  $("status").textContent =
    `Model: ${info.model}, int8, ${mb(info.download_bytes)} downloaded (model and tokenizer); ` +
    `texts are cut to ${info.max_length} tokens. Ready.`;
  return { info, labels, session, tokenizer };
}

// One text's prediction, shaped as the server's POST /predict answer.
async function classify(model, text) {
  const ids = encode(model.tokenizer, text, model.info.max_length);
  const shape = [1, ids.length];
  const feeds = {
    input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), shape),
    attention_mask: new ort.Tensor("int64", new BigInt64Array(ids.length).fill(1n), shape),
  };
  const { logits } = await model.session.run(feeds);
  const p = softmax(Array.from(logits.data));
  const best = p.indexOf(Math.max(...p));
  if (timings.first_prediction_ms === undefined) timings.first_prediction_ms = performance.now();
  return {
    label: model.labels[best],
    label_id: best,
    confidence: p[best],
    probabilities: Object.fromEntries(model.labels.map((name, i) => [name, p[i]])),
    token_ids: ids,
  };
}

function show(prediction) {
  $("label").textContent = prediction.label;
  $("bars").textContent = "";
  for (const [name, p] of Object.entries(prediction.probabilities)) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = '<span class="name"></span><span class="bar"></span><span class="p"></span>';
    row.children[0].textContent = name;
    row.children[1].style.width = `${p * 20}rem`;
    row.children[2].textContent = `${(100 * p).toFixed(1)}%`;
    $("bars").appendChild(row);
  }
}

const ready = load();
window.distrinews = { ready, timings, classify: async (text) => classify(await ready, text) };

ready.then(
  (model) => {
    for (const text of model.info.examples) {
      const b = document.createElement("button");
      Object.assign(b, { type: "button", className: "ex", textContent: `${text.slice(0, 38)}…` });
      b.onclick = () => {
        $("text").value = text;
        $("form").requestSubmit();
      };
      $("examples").appendChild(b);
    }
    $("go").disabled = false;
    $("form").onsubmit = async (e) => {
      e.preventDefault();
      $("error").textContent = "";
      if (!$("text").value.trim()) {
        $("label").textContent = $("bars").textContent = "";
        $("error").textContent = "the text is empty: paste some news text";
        return;
      }
      show(await classify(model, $("text").value));
    };
  },
  (err) => {
    $("status").textContent = "";
    $("error").textContent = `The model could not be loaded: ${err.message || err}`;
  },
);
