"""Use a classifier that finetune.py saved: from the command line, a web page, or a JSON API.

    python classify.py "WINNER! Claim your prize now" "See you at 6?"   # label + its probability
    python classify.py --file messages.txt --json                      # one text per line
    python classify.py --serve                                         # http://127.0.0.1:8000
    python classify.py --benchmark 200                                 # API latency, p50 / p95

API: POST /api/classify {"text": "..."} -> {"label", "probabilities": {label: p, ...}, "tokens",
"truncated"} (plus "spam_probability" for a ham/spam model); {"texts": [...]} (at most 64) ->
{"results": [...]}. GET /healthz -> 200 and the model's description.
Only the standard library on top of numpy, torch and tiktoken.
"""

import argparse
import html
import http.server
import json
import re
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch

import finetune
import minigpt

MAX_BODY = 64 * 1024  # bytes
MAX_TEXTS = 64


class Classifier:
    """The finetuned model, loaded once. Calls are serialised: on a CPU, one forward pass already
    uses every core, so running two at once only makes both slower."""

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        self.model, self.meta = finetune.load_classifier(model_dir, device)
        self.model.to(dtype)  # inference only: weights cast once (in bfloat16, faster than autocast)
        self.dtype = dtype
        self.labels = self.meta["labels"]
        self.tokenizer, self.device, self.lock = minigpt.get_tokenizer(), device, threading.Lock()
        metrics = Path(model_dir) / "metrics.json"
        accuracy = json.loads(metrics.read_text()).get("test_accuracy") if metrics.exists() else None
        reads = {"last": "the last (padded) position", "last_real": "the last real token",
                 "mean": "the mean over all tokens"}[self.meta["pool"]]
        task = ("to tell spam from ham SMS" if self.labels == ["ham", "spam"] else
                f"to tell {', '.join(self.labels[:-1])} and {self.labels[-1]} apart")
        self.description = (f"A GPT ({self.model.cfg.n_layers} blocks, from {Path(self.meta['init']).name}) "
                            f"finetuned {task}. Trained: {self.meta['trainable']}; reads "
                            f"{reads}; up to {self.meta['max_length']} tokens"
                            + (f"; {accuracy:.1%} test accuracy." if accuracy is not None else "."))
        # The page's question and examples, saved by finetune.py (older classifiers: the SMS ones).
        self.title = self.meta.get("title", "Is this SMS spam?")
        self.examples = self.meta.get("examples", [])

    def __call__(self, texts):
        """One result per text: the most likely label, every label's probability, the token count,
        and whether the text was cut to the model's max length."""
        with self.lock, torch.inference_mode():
            probs, tokens, truncated = finetune.class_probabilities(self.model, self.meta, self.tokenizer,
                                                                    texts, self.device)
        results = []
        for p, n, cut in zip(probs, tokens, truncated):
            best = max(range(len(p)), key=p.__getitem__)  # the first of equals, as argmax
            result = {"label": self.labels[best], "probabilities": dict(zip(self.labels, (round(x, 6) for x in p))),
                      "tokens": n, "truncated": cut}
            if self.labels == ["ham", "spam"]:  # what clients of the spam-only API read
                result["spam_probability"] = result["probabilities"]["spam"]
            results.append(result)
        return results


# ----------------------------------------------------------------------------------------------
# The web page: one self-contained file (inline CSS and JS, nothing fetched from elsewhere).
# Its question, the examples and the labels come from the classifier; every class gets a bar.
# ----------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
 body { font: 16px/1.45 system-ui, sans-serif; max-width: 40rem; margin: 0 auto; padding: 1rem; color: #222; }
 h1 { font-size: 1.4rem; margin: .2rem 0; }
 #about { color: #666; font-size: .85rem; margin: 0 0 1rem; }
 textarea { width: 100%; box-sizing: border-box; min-height: 7rem; font: inherit; padding: .5rem; }
 button { font: inherit; padding: .45rem 1.1rem; margin: .5rem 0; cursor: pointer; }
 #verdict { margin: 1rem 0; padding: .8rem; border-radius: .4rem; display: none; background: #eef3fb; }
 #verdict.error { background: #eee; }
 #label { font-size: 1.3rem; font-weight: bold; overflow-wrap: anywhere; }
 .row { display: grid; grid-template-columns: minmax(4rem, 30%) 1fr 3.5rem; gap: .5rem; align-items: center;
        font-size: .9rem; margin-top: .3rem; }
 .row span { overflow-wrap: anywhere; } .row .p { text-align: right; }
 .bar { height: .7rem; background: #ddd; border-radius: .35rem; overflow: hidden; }
 .bar div { height: 100%; background: #7a8ba8; width: 0; } .row.top .bar div { background: #c0392b; }
 .examples button { display: block; width: 100%; text-align: left; font-size: .9rem; background: #f4f4f4;
                    border: 1px solid #ddd; border-radius: .3rem; margin: .3rem 0; }
</style></head>
<body>
<h1>{{title}}</h1>
<p id="about">{{about}}</p>
<textarea id="text" placeholder="Paste a text (Ctrl+Enter to classify)" autofocus></textarea>
<button id="go">Classify</button>
<div id="verdict"><div id="label"></div><div id="detail"></div><div id="bars"></div></div>
<div class="examples"><p>Or try one:</p>
{{examples}}</div>
<script>
const $ = id => document.getElementById(id);
async function classify() {
  const text = $("text").value, box = $("verdict");
  box.style.display = "block";
  $("bars").replaceChildren();
  try {
    const r = await fetch("/api/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify({text})});
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    box.className = "done"; box.dataset.label = data.label;
    $("label").textContent = data.label;
    $("detail").textContent = data.tokens + " tokens" + (data.truncated ? " (truncated: only the start was read)" : "");
    for (const [label, p] of Object.entries(data.probabilities)) {  // every class, in the model's order
      const row = document.createElement("div"), name = document.createElement("span"),
            bar = document.createElement("div"), fill = document.createElement("div"),
            value = document.createElement("span");
      row.className = "row" + (label === data.label ? " top" : ""); bar.className = "bar"; value.className = "p";
      name.textContent = label; value.textContent = (100 * p).toFixed(1) + " %";
      fill.style.width = (100 * p).toFixed(1) + "%";
      bar.append(fill); row.append(name, bar, value); $("bars").append(row);
    }
  } catch (e) {
    box.className = "error"; delete box.dataset.label;
    $("label").textContent = "Error"; $("detail").textContent = e.message;
  }
}
$("go").onclick = classify;
$("text").addEventListener("keydown", e => { if (e.key === "Enter" && e.ctrlKey) classify(); });
document.querySelectorAll(".examples button").forEach(b => b.onclick = () => {
  $("text").value = b.textContent; classify(); });
</script>
</body></html>
"""


def render_page(classifier):
    """The page with the classifier's question, description and examples, all HTML-escaped."""
    values = {"title": html.escape(classifier.title), "about": html.escape(classifier.description),
              "examples": "\n".join(f" <button>{html.escape(text)}</button>" for text in classifier.examples)}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], PAGE)  # one pass: inserted text is not re-read


class Handler(http.server.BaseHTTPRequestHandler):
    classifier = None  # set by make_server()
    routes = {"/": "GET", "/healthz": "GET", "/api/classify": "POST"}
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped

    def reply(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self.routes[self.route])
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer is the headers alone
            self.wfile.write(data)

    def check_route(self, method):
        """True if this path takes this method; else reply 404 or 405."""
        self.route = urllib.parse.urlsplit(self.path).path  # without ?query
        if self.route not in self.routes:
            self.reply(404, {"error": f"no such path: {self.route}"})
        elif self.routes[self.route] != method:
            self.reply(405, {"error": f"{self.route} takes {self.routes[self.route]}"})
        return self.routes.get(self.route) == method

    def do_GET(self):
        if not self.check_route("GET"):
            return
        if self.route == "/":
            self.reply(200, render_page(self.classifier), "text/html")
        else:
            self.reply(200, {"status": "ok", "model": self.classifier.description})

    def do_POST(self):
        if not self.check_route("POST"):
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return self.reply(400, {"error": "bad Content-Length"})
        try:
            if length > MAX_BODY:  # read (a bounded part of) it, so the client is able to see the answer
                self.rfile.read(min(length, 16 * MAX_BODY))
                return self.reply(413, {"error": f"request body over {MAX_BODY} bytes"})
            texts, batch = parse_request(self.rfile.read(length))
        except TimeoutError:
            return self.reply(408, {"error": "the request body did not arrive in time"})
        except ValueError as e:
            return self.reply(400, {"error": str(e)})
        try:
            results = self.classifier(texts)
        except Exception as e:  # a bug of ours: say so, and keep serving
            self.log_error("classifying failed: %r", e)
            return self.reply(500, {"error": "internal error while classifying"})
        self.reply(200, {"results": results} if batch else results[0])

    # HTTP/1.0 (the default here): one request per connection, so no state carries over.
    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = lambda self: self.check_route(self.command)

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def parse_request(body):
    """(texts, is_batch) from a JSON body, or ValueError with a message for the client."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not valid JSON: {e}") from e
    if not isinstance(request, dict) or ("text" in request) == ("texts" in request):
        raise ValueError('send {"text": "..."} or {"texts": ["...", ...]}')
    batch = "texts" in request
    texts = request["texts"] if batch else [request["text"]]
    if not isinstance(texts, list) or not texts:
        raise ValueError('"texts" must be a non-empty list')
    if len(texts) > MAX_TEXTS:
        raise ValueError(f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"each text must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError("text is empty")
    return texts, batch


def make_server(classifier, host="127.0.0.1", port=8000):
    """A threading HTTP server (port 0: any free port); call serve_forever() on it."""
    handler = type("BoundHandler", (Handler,), {"classifier": classifier})
    return http.server.ThreadingHTTPServer((host, port), handler)


def benchmark(classifier, n, text="Hey, are we still on for dinner tonight? I can pick you up at 7 if that "
                                  "works, or we meet at the place near the station"):
    """Latency of single-message API calls over HTTP on this machine: p50 and p95 in ms.
    The default message is a typical SMS of about 30 tokens."""
    server = make_server(classifier, port=0)
    server.RequestHandlerClass.log_message = lambda *args: None  # no line per request here
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/api/classify"
    body = json.dumps({"text": text}).encode()
    times = []
    for i in range(n + 5):  # the first few warm up
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})) as r:
            answer = json.load(r)
        if i >= 5:
            times.append(1000 * (time.perf_counter() - t0))
    server.shutdown()
    server.server_close()
    q = statistics.quantiles(times, n=100)
    print(f"{n} requests of one {answer['tokens']}-token message: p50 {q[49]:.1f} ms, p95 {q[94]:.1f} ms, "
          f"mean {statistics.mean(times):.1f} ms ({minigpt.dtype_name(classifier.dtype)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", help="messages to classify; '-' reads one per line from stdin")
    p.add_argument("--file", type=Path, help="read messages from this file, one per line")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--model", type=Path, default=Path("runs/spam-classifier"), help="folder finetune.py wrote")
    p.add_argument("--serve", action="store_true", help="serve the web page and the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--benchmark", type=int, metavar="N", help="time N API requests and print p50/p95")
    p.add_argument("--device", help="cpu, cuda, mps (default: the fastest available)")
    p.add_argument("--dtype", choices=minigpt.DTYPES, default="auto",
                   help="auto: bfloat16 where the device multiplies it natively, else float32")
    args = p.parse_args(argv)

    texts = []  # in the order given: each '-' stands for the lines of stdin, then --file's lines
    for t in args.texts:
        texts += sys.stdin.read().splitlines() if t == "-" else [t]
    if args.file:
        try:
            texts += args.file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            sys.exit(f"error: cannot read {args.file}: {e.strerror}")
    texts = [t for t in texts if t.strip()]
    if not (texts or args.serve or args.benchmark):
        p.error("give messages, '-', --file, --serve or --benchmark")
    if args.benchmark is not None and args.benchmark < 2:
        p.error("--benchmark needs at least 2 requests")
    try:
        t0 = time.time()
        device = minigpt.pick_device(args.device)
        classifier = Classifier(args.model, device, minigpt.pick_dtype(args.dtype, device))
    except minigpt.DataError as e:
        sys.exit(f"error: {e}")
    print(f"loaded {args.model} in {time.time() - t0:.1f} s: {classifier.description}", file=sys.stderr)
    if texts:
        t0 = time.time()
        width = max(len(label) for label in classifier.labels)
        for text, r in zip(texts, classifier(texts)):
            print(json.dumps({"text": text, **r}) if args.json else
                  f"{r['label']:{width}}  {r['probabilities'][r['label']]:.3f}  {text}")
        seconds = time.time() - t0
        print(f"{len(texts)} messages in {seconds:.2f} s ({len(texts) / seconds:.1f} messages/s, "
              f"{minigpt.dtype_name(classifier.dtype)})", file=sys.stderr)
    if args.benchmark:
        benchmark(classifier, args.benchmark)
    if args.serve:
        server = make_server(classifier, args.host, args.port)
        print(f"serving on http://{args.host}:{server.server_port} (Ctrl+C stops)", file=sys.stderr)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
