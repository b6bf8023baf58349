"""The HTML the server sends: the page people use (`GET /`) and the API docs (`GET /docs`).

Both work offline: the page is one self-contained document (inline CSS and JavaScript, no
fonts or scripts from a CDN); the docs page loads Swagger UI from the `swagger-ui-bundle` package,
served by this server under /docs/static.
"""

from __future__ import annotations

import html
import json

EXAMPLES = [
    "The central bank raised interest rates for the third time this year as inflation stayed high.",
    "The striker scored twice in the final minutes and the champions kept their unbeaten run.",
    "Rebels and government forces agreed to a ceasefire after talks in the capital.",
    "A new chip design doubles battery life for phones, the company said at its developer conference.",
]


def index_page(labels: list[str], model: str) -> str:
    """The classification page: a text box, a button, the predicted class and one bar per class."""
    examples = "".join(
        f'<button type="button" class="ex" data-text="{html.escape(t, quote=True)}">{html.escape(t[:38])}…</button>'
        for t in EXAMPLES
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>DistriNews: classify news</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
textarea {{ width: 100%; min-height: 7rem; font: inherit; padding: .5rem; box-sizing: border-box; }}
button {{ font: inherit; padding: .4rem .9rem; margin: .3rem .3rem 0 0; cursor: pointer; }}
.ex {{ font-size: .85rem; background: #f3f3f3; border: 1px solid #ccc; border-radius: 4px; }}
#label {{ font-size: 1.6rem; font-weight: 600; margin: 1rem 0 .5rem; }}
.row {{ display: flex; align-items: center; margin: .25rem 0; }}
.name {{ width: 6rem; }} .bar {{ height: 1.1rem; background: #4a78c2; margin-right: .5rem; }}
#error {{ color: #b00; }} footer {{ margin-top: 2rem; font-size: .85rem; color: #666; }}
</style></head>
<body>
<h1>Which kind of news is it?</h1>
<p>Paste a headline or a short article; the model ({html.escape(model)}) says whether it is
{html.escape(", ".join(labels[:-1]))} or {html.escape(labels[-1])} news.</p>
<form id="form"><textarea id="text" name="text" placeholder="Paste news text here"></textarea>
<div><button id="go" type="submit">Classify</button></div>
<div>Try: {examples}</div></form>
<div id="label" aria-live="polite"></div><div id="bars"></div><div id="error" role="alert"></div>
<footer>API: <a href="/docs">/docs</a> · <a href="/openapi.json">/openapi.json</a> · <a href="/info">/info</a></footer>
<script>
const form = document.getElementById("form"), text = document.getElementById("text");
const label = document.getElementById("label"), bars = document.getElementById("bars");
const error = document.getElementById("error");
for (const b of document.querySelectorAll(".ex"))
  b.onclick = () => {{ text.value = b.dataset.text; form.requestSubmit(); }};
form.onsubmit = async (e) => {{
  e.preventDefault(); error.textContent = ""; label.textContent = "…"; bars.textContent = "";
  try {{
    const r = await fetch("/predict", {{method: "POST", headers: {{"content-type": "application/json"}},
                                        body: JSON.stringify({{text: text.value}})}});
    const body = await r.json();
    if (!r.ok) {{ label.textContent = ""; error.textContent = body.error || ("error " + r.status); return; }}
    label.textContent = body.label;
    for (const [name, p] of Object.entries(body.probabilities)) {{
      const row = document.createElement("div"); row.className = "row";
      row.innerHTML = '<span class="name"></span><span class="bar"></span><span class="p"></span>';
      row.children[0].textContent = name; row.children[1].style.width = (p * 20) + "rem";
      row.children[2].textContent = (100 * p).toFixed(1) + "%"; bars.appendChild(row);
    }}
  }} catch (err) {{ label.textContent = ""; error.textContent = "the server did not answer: " + err; }}
}};
</script></body></html>"""


def docs_page(title: str) -> str:
    """Swagger UI for /openapi.json, from the swagger-ui-bundle package's files (served under /docs/static)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({json.dumps({"url": "/openapi.json", "dom_id": "#swagger-ui"})});</script>
</body></html>"""
