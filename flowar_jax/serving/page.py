"""The demo page: a form, a POST to /grid, the PNG shown below it.

Query parameters prefill the form (`?classes=1,2&per_class=2&cfg=3&seed=0`) and `&run=1` requests a grid on
load. After each answer the page writes what it got into #status (and data-* attributes): the HTTP status,
the PNG's size in pixels and its SHA-256, so a headless browser's DOM shows the outcome.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>flowar_jax demo</title>
<style>
  body { font-family: sans-serif; margin: 2em; max-width: 60em; }
  label { display: inline-block; margin: 0 1.5em 0.8em 0; }
  input[type=text] { width: 14em; }
  input[type=number] { width: 6em; }
  #status { margin: 1em 0; color: #444; }
  #status.error { color: #b00; }
  img { image-rendering: pixelated; max-width: 100%; border: 1px solid #ccc; }
</style>
</head>
<body>
<h1>flowar_jax: class-conditional samples</h1>
<p id="about">loading ...</p>
<form id="form">
  <label>classes <input type="text" id="classes" value="0,1,2,3"></label>
  <label>per class <input type="number" id="per_class" value="2" min="1"></label>
  <label>cfg <select id="cfg"></select></label>
  <label>seed <input type="number" id="seed" value="0" min="0"></label>
  <button type="submit" id="generate">Generate</button>
</form>
<div id="status" data-state="idle">idle</div>
<img id="grid" alt="">
<script>
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function report(state, text, extra) {
  const s = $("status");
  s.textContent = text;
  s.className = state === "error" ? "error" : "";
  s.dataset.state = state;
  for (const [k, v] of Object.entries(extra || {})) s.dataset[k] = v;
}

async function sha256(buffer) {
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function generate(event) {
  if (event) event.preventDefault();
  const classes = $("classes").value.split(",").map((s) => s.trim()).filter((s) => s).map(Number);
  const body = {classes, per_class: Number($("per_class").value), cfg: Number($("cfg").value),
                seed: Number($("seed").value)};
  $("generate").disabled = true;
  report("waiting", "sampling " + classes.length * body.per_class + " images (requests are served in turn) ...");
  const start = performance.now();
  try {
    const response = await fetch("/grid", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
    if (!response.ok) {
      report("error", response.status + ": " + (await response.text()).trim(), {http: response.status});
      return;
    }
    const buffer = await response.arrayBuffer();
    const img = $("grid");
    img.src = URL.createObjectURL(new Blob([buffer], {type: "image/png"}));
    await img.decode();
    const seconds = ((performance.now() - start) / 1000).toFixed(1);
    report("done", "grid " + img.naturalWidth + "x" + img.naturalHeight + " in " + seconds + " s",
           {http: response.status, width: img.naturalWidth, height: img.naturalHeight, sha256: await sha256(buffer)});
  } catch (e) {
    report("error", "request failed: " + e);
  } finally {
    $("generate").disabled = false;
  }
}

async function init() {
  const info = await (await fetch("/info")).json();
  $("about").textContent = info.num_classes + " classes, " + info.image_size + " px images, at most " +
                           info.max_samples + " images per grid, " + info.num_steps + " ODE steps per scale.";
  for (const c of info.cfg_choices) {
    const option = document.createElement("option");
    option.value = c;
    option.textContent = c;
    option.selected = c === info.default_cfg;
    $("cfg").appendChild(option);
  }
  for (const key of ["classes", "per_class", "cfg", "seed"]) {
    if (params.has(key)) $(key).value = params.get(key);
  }
  $("form").addEventListener("submit", generate);
  if (params.get("run") === "1") await generate();
}

init().catch((e) => report("error", "could not load /info: " + e));
</script>
</body>
</html>
"""
