"""Use a classifier that finetune.py saved: from the command line, a web page, or a JSON API.

    python classify.py "WINNER! Claim your prize now" "See you at 6?"   # label + its probability
    python classify.py --file messages.txt --json                      # one text per line
    python classify.py --serve                                         # http://127.0.0.1:8000
    python classify.py --serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"   # on a network
    python classify.py --benchmark 200 --concurrency 8                 # HTTP load test: req/s, p50/p95/p99

The first part of this file is the classifier and its command line; the second, the service.
API: POST /api/classify {"text": "..."} -> {"label", "probabilities": {label: p, ...}, "tokens",
"truncated"} (plus "spam_probability" for a ham/spam model); {"texts": [...]} (at most 64) ->
{"results": [...]}. GET /healthz -> 200, the model's description and the dtype it answers in;
GET /metrics -> Prometheus text. With a token (--token or MINIGPT_TOKEN), /api/* and /metrics need `Authorization: Bearer <token>`.
"""

import argparse
import json
import os
import sys
import threading
import time
import unicodedata
from pathlib import Path

import torch

import finetune
import minigpt


# What --dtype int8 measured for classifying (docs/precision.md): auto's hint where it picks float32.
CLASSIFYING_IN_INT8 = ("on a 2-core AMD EPYC the service answered 91.7 messages/s against float32's 38.0; "
                       "labels as float32's for 298 of 300 SMS test messages, probabilities up to 0.12 away")


class Classifier:
    """A finetuned classifier, loaded once: texts in, each class's probability out.

    Classifying is finetune.py's: the same tokens, cut to the same length, read at the same
    position. It runs the book's way, the whole model over the padded texts
    (prefix_probabilities), so the verdict after every token comes with the answer.
    Forward passes are serialised: on a CPU one already uses every core, so two at once only
    make both slower.
    """

    def __init__(self, model_dir, device="cpu", dtype="float32", compile=False):
        self.model, self.recipe = finetune.load_classifier(model_dir, device)
        # Pass after pass allocates tensors of the same sizes: glibc keeps the freed ones for the
        # next (an inference engine keeps an arena for the same reason). 124M shape, 32 texts of
        # 30 tokens, int8, 2-core EPYC: 74-78 -> 91-101 texts/s (docs/precision.md).
        minigpt.set_malloc(keep_freed=True)
        # Inference only: the weights cast once (in bfloat16, faster than autocast), or int8 when asked.
        self.dtype = minigpt.inference_dtype(dtype, device, CLASSIFYING_IN_INT8)
        minigpt.cast_for_inference(self.model, self.dtype)
        if compile:  # --compile: the small operations fused by torch.compile (minigpt.compile_model)
            self.model = minigpt.compile_model(self.model)
            minigpt.compile_warm_up(self.model, device)
        self.device = device
        self.labels, self.pool = self.recipe["labels"], self.recipe["pool"]
        self.tokenizer, self.lock = minigpt.get_tokenizer(), threading.Lock()
        self.description = describe(model_dir, self.recipe, self.model.cfg, self.dtype)
        # The page's question and sample texts, saved by finetune.py (older classifiers: the SMS ones).
        self.title = self.recipe.get("title", "Is this SMS spam?")
        self.sample_texts = self.recipe.get("sample_texts", self.recipe.get("examples", []))

    def __call__(self, texts, explain=False):
        """Classify texts: one result per text, as the API gives them (in batches of 64 texts of
        similar length); with explain, each with its verdict after every token."""
        rows, lengths, counts = self.encode(texts)
        answers, steps = self.probabilities(rows, lengths, batch_size=64)
        return self.results(answers, counts, [r.tolist() for r in rows] if explain else None, steps)

    def encode(self, texts):
        """(rows, lengths, token counts): the texts as the model reads them (finetune.py's
        tokenization and cut), their real lengths, their token counts before the cut. Cheap, so
        the service's connection threads do it."""
        ids, counts = minigpt.encode(texts, self.tokenizer, self.recipe["max_length"])
        rows = finetune.model_inputs(ids, self.pool, self.recipe["max_length"])
        return rows, [len(i) for i in ids], counts

    def probabilities(self, rows, lengths, batch_size=None):
        """(answers, steps) of encoded texts: each text's class probabilities (a list), and its
        probabilities after each position it is read at, (positions, classes), whose last row
        is the answer. One forward pass for all texts, or passes of batch_size of similar length."""
        answers, steps = [None] * len(rows), [None] * len(rows)
        with self.lock, torch.inference_mode():  # the weights are in self.dtype already: no autocast
            for index, x, _ in finetune.Batches(rows, lengths, batch_size or max(len(rows), 1)):
                probs = prefix_probabilities(self.model, x.to(self.device), self.pool).cpu()  # (B, T, classes)
                for i, p in zip(index.tolist(), probs):
                    steps[i] = p[:len(rows[i])]  # the row's positions (for 'last', its padding too), (T_i, classes)
                    answers[i] = steps[i][-1].tolist()
        return answers, steps

    def results(self, answers, counts, explained=None, steps=None):
        """One result per text: the most likely label, the probabilities of the most likely labels
        (every label, up to finetune.SHOWN of them; in the model's order), the token count, and
        whether the text was cut to the model's max length. explained: the texts' token ids, to
        add each one's verdict after every token (`steps`, from probabilities())."""
        results = []
        for k, (p, n) in enumerate(zip(answers, counts)):
            result = {"label": self.labels[max(range(len(p)), key=p.__getitem__)],  # the first of equals
                      "probabilities": self.likely(p), "tokens": n, "truncated": n > self.recipe["max_length"]}
            if self.labels == ["ham", "spam"]:  # what clients of the spam-only API read
                result["spam_probability"] = result["probabilities"]["spam"]
            if explained is not None:
                result.update(self.explanation(explained[k], steps[k]))
            results.append(result)
        return results

    def likely(self, p):
        """{label: probability} of the SHOWN most likely classes, in the model's order, rounded."""
        top = sorted(range(len(p)), key=lambda i: -p[i])[:finetune.SHOWN]
        return {self.labels[i]: round(p[i], 6) for i in sorted(top)}

    def explanation(self, ids, steps):
        """"explanation": each token read, with the class probabilities had the text ended with
        it (the last is the answer); "changed_at": the token where the most likely class last
        changed, None if it never did."""
        text, starts = self.tokenizer.decode_with_offsets(ids)
        pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]  # a character goes to its first token
        best = steps.argmax(dim=1).tolist()
        changed = [t for t in range(1, len(best)) if best[t] != best[t - 1]]
        return {"explanation": [{"text": piece, "probabilities": self.likely(p.tolist())}
                                for piece, p in zip(pieces, steps)],
                "changed_at": changed[-1] if changed else None}


@torch.no_grad()
def prefix_probabilities(model, ids, pool="last_real"):
    """The classifier's verdict on every prefix of the texts: class probabilities (B, T, classes),
    row t after the first t + 1 positions, all from one forward pass.

    The head at every position of one pass of the whole model. In a causal model the hidden
    state at position t depends on positions 0..t only, so the head read at t is what the
    classifier would answer had the text ended there. For 'last_real' and 'last' that is the head
    at t itself; row lengths - 1 (for 'last', the padded row's last) is finetune.class_logits'
    answer (test_minigpt.py checks it). For 'mean' it is the running mean of the head's logits
    (the head is linear, so that is the head applied to the prefix's mean): row lengths - 1 is
    again the answer.
    """
    logits = model(ids).float()                                        # (B, T, classes)
    if pool == "mean":
        logits = logits.cumsum(1) / torch.arange(1, ids.shape[1] + 1, device=ids.device)[:, None]
    return torch.softmax(logits, dim=-1)


def describe(model_dir, recipe, cfg, dtype):
    """A sentence about the classifier and one saying the dtype it answers in, for the page and /healthz."""
    accuracy = saved_accuracy(Path(model_dir) / "metrics.json")
    labels = recipe["labels"]
    reads = {"last": "the last (padded) position", "last_real": "the last real token",
             "mean": "the mean over all tokens"}[recipe["pool"]]
    task = ("to tell spam from ham SMS" if labels == ["ham", "spam"] else
            f"to tell {', '.join(labels[:-1])} and {labels[-1]} apart" if len(labels) <= 6 else
            f"to tell {len(labels):,} classes apart")
    return (f"A GPT ({cfg.n_layers} blocks, from {Path(recipe['init']).name}) finetuned {task}. Trained: "
            f"{recipe['trainable']}; reads {reads}; up to {recipe['max_length']} tokens"
            + (f"; {accuracy:.1%} test accuracy." if accuracy is not None else ".") + f" It answers in {dtype}.")


def saved_accuracy(path):
    """The test accuracy finetune.py wrote to metrics.json, or None. It only feeds the description,
    so a missing file is no matter and a damaged one costs a warning, never the answers."""
    if not path.exists():
        return None
    try:
        accuracy = json.loads(path.read_text(encoding="utf-8"))["test_accuracy"]
        if type(accuracy) in (int, float) and 0 <= accuracy <= 1:
            return accuracy
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, not an object, no such key
        pass
    print(f"warning: {path} holds no test accuracy finetune.py could have written: left out of the "
          "description", file=sys.stderr)
    return None


def main(argv=None):
    args = parse_args(argv)
    texts = read_texts(args)
    t0 = time.time()
    device = minigpt.pick_device(args.device)
    classifier = Classifier(args.model, device, args.dtype, args.compile)
    print(f"loaded {args.model} in {time.time() - t0:.1f} s: {classifier.description}", file=sys.stderr)
    if texts:
        t0 = time.time()
        width = max(len(label) for label in classifier.labels)
        for text, r in zip(texts, classifier(texts, explain=args.explain)):
            print(json.dumps({"text": text, **r}) if args.json else
                  f"{r['label']:{width}}  {r['probabilities'][r['label']]:.3f}  {shown(text)}")
            if args.explain and not args.json:
                print("\n".join(explanation_lines(r, classifier.dtype)))
        seconds = time.time() - t0
        print(f"{len(texts)} text{'s' if len(texts) > 1 else ''} in {seconds:.2f} s "
              f"({len(texts) / seconds:.1f} texts/s, {classifier.dtype})", file=sys.stderr)
    if args.benchmark:
        benchmark(classifier, args.benchmark, args.concurrency, args.keep_alive)
    if args.serve:
        serve_from_command_line(classifier, args)


def explanation_lines(result, dtype):
    """The verdict token by token, for a terminal: each token (as shown() writes it), and the
    probability of the predicted class had the text ended there (computed in `dtype`), as a number
    and a bar; then where it last changed."""
    label = result["label"]
    lines = [f"  {'token':>5}  {'text':16}  {label} (in {dtype})"]
    for i, token in enumerate(result["explanation"]):
        p = token["probabilities"].get(label, 0.0)
        lines.append(f"  {i:>5}  {shown(token['text'])[:16]:16}  {p:.3f} {bar(p)}")
    t = result["changed_at"]
    if t is None:
        lines.append(f"  {label} from the first token on")
    else:
        then = result["explanation"][t]
        lines.append(f"  the most likely class last changed at token {t} (\"{shown(then['text'])}\"): "
                     f"to {max(then['probabilities'], key=then['probabilities'].get)}")
    return lines


def shown(text):
    """text for a terminal: control characters (newline, tab, NUL, escape, ...) written as \\n,
    \\t, \\x00, \\x1b, so that one text stays on one line and sends the terminal no commands."""
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" else c for c in text)


def bar(p, width=20):
    """p in [0, 1] as a bar of up to `width` characters, in eighths of a character."""
    eighths = round(p * width * 8)
    return "█" * (eighths // 8) + " ▏▎▍▌▋▊▉"[eighths % 8].strip()


def read_texts(args):
    """The texts to classify, in the order given: each '-' stands for the lines of stdin, then
    --file's lines; blank lines are no texts."""
    texts = []
    for t in args.texts:
        texts += sys.stdin.read().splitlines() if t == "-" else [t]
    if args.file:
        texts += minigpt.read_utf8(args.file).splitlines()
    return [t.removeprefix("\ufeff") for t in texts if t.strip()]  # a BOM piped in on stdin is not text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=minigpt.Help)
    p.add_argument("texts", nargs="*", help="texts to classify; '-' reads one per line from stdin")
    p.add_argument("--file", type=minigpt.existing_file, help="read texts from this file, one per line")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--explain", action="store_true",
                   help="with each text, the predicted class's probability after each of its tokens")
    p.add_argument("--model", type=Path, default=Path("runs/spam-classifier"), help="folder finetune.py wrote")
    p.add_argument("--serve", action="store_true", help="serve the web page and the API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network)")
    p.add_argument("--port", type=minigpt.number_type(int, 0, 65536), default=8000, help="0: any free port")
    p.add_argument("--token", help="require `Authorization: Bearer TOKEN` for /api/* and /metrics "
                                   "(default: the environment variable MINIGPT_TOKEN, if set)")
    p.add_argument("--max-batch", type=minigpt.positive_int, default=64, help="texts per forward pass")
    p.add_argument("--max-batch-tokens", type=minigpt.positive_int, default=16384,
                   help="texts x longest text's tokens per forward pass")
    p.add_argument("--max-queue", type=minigpt.positive_int, default=256,
                   help="texts waiting for the model; beyond it, 503 at once")
    p.add_argument("--max-connections", type=minigpt.positive_int, default=64, help="connections handled at once (a kept-alive one keeps its place while it waits)")
    p.add_argument("--shutdown-timeout", type=minigpt.nonnegative_float, default=30,
                   help="seconds to let requests in flight finish after SIGTERM or Ctrl+C")
    p.add_argument("--benchmark", type=minigpt.number_type(int, 2), metavar="N",
                   help="time N API requests over HTTP and print requests/s and p50/p95/p99")
    p.add_argument("--concurrency", type=minigpt.positive_int, default=1, help="clients at once in --benchmark")
    p.add_argument("--keep-alive", action="store_true",
                   help="in --benchmark, each client keeps its connection (default: a new one per request)")
    minigpt.add_device_flags(p, inference=True)
    p.add_argument("--compile", action="store_true", help="fuse the small operations with torch.compile: "
                   "int8 on a CPU answers about 15 %% more texts/s; needs a C++ compiler and a minute or two at start")
    args = p.parse_args(argv)
    args.token = args.token or os.environ.get("MINIGPT_TOKEN")  # after parsing: --help never shows its value
    if not (args.texts or args.file or args.serve or args.benchmark):
        p.error("give texts, '-', --file, --serve or --benchmark")
    return args


# ==============================================================================================
# The service: one model worker with dynamic batching, HTTP with limits, a token, metrics, the
# page. Connection threads read and check requests and tokenize them; one thread (the main
# thread, in serve()) owns the model and classifies everything waiting in one forward pass, so concurrent
# clients share the matrix products instead of queueing for them one by one. Only the standard
# library on top of numpy, torch and tiktoken.
# ==============================================================================================

import hmac
import html
import http.client
import http.server
import io
import ipaddress
import multiprocessing
import re
import signal
import socket
import statistics
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

MAX_BODY = 64 * 1024  # bytes in a request body
MAX_TEXTS = 64        # texts in one request


def serve_from_command_line(classifier, args):
    try:
        server = make_server(classifier, args.host, args.port, args.token, args.max_batch,
                             args.max_batch_tokens, args.max_queue, args.max_connections, worker_thread=False)
    except OSError as e:
        raise minigpt.DataError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    if not args.token and not is_loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and there is no --token: anyone "
              "who can reach it can use the API and read /metrics. Set --token (or MINIGPT_TOKEN), "
              "and put TLS in front (docs/service.md)", file=sys.stderr)
    print(f"serving on http://{args.host}:{server.server_port} (Ctrl+C stops)", file=sys.stderr)
    serve(server, args.shutdown_timeout)


def is_loopback(host):
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- dynamic batching: many requests, one model

class QueueFull(Exception):
    """As many texts as --max-queue are waiting already: the client should come back later (503)."""


class Job:
    """One request's texts on their way through the batcher."""

    def __init__(self, rows, lengths):
        self.rows, self.lengths = rows, lengths  # encoded texts and their lengths (Classifier.encode)
        self.done = threading.Event()    # set by the worker
        self.answers = self.steps = None  # per text: class probabilities, and after each token
        self.error = None


class Batcher:
    """Requests put their encoded texts in a bounded queue and wait; one thread, the worker, owns
    the model and, whenever it is free, takes everything waiting (oldest first, up to max_batch texts
    and max_tokens padded tokens) and classifies it in one forward pass. A request on an idle
    server is classified at once; under load the requests that arrive during one forward pass
    ride together in the next. Clients that wait for their answer before sending again would
    split into two alternating halves (while one half's pass runs, the other's requests arrive),
    so after a pass the worker waits for as many texts as it just answered, but never longer than
    a tenth of that pass: with 32 such clients the passes hold about 29 texts instead of 15, and
    the service answers 61 messages/s instead of 53 (the median of 5 runs of `classify.py
    --benchmark 400 --concurrency 32`, bfloat16, 2 cores). The answers are the same as one at a
    time: each text is padded on the right, and its real positions never see the padding.

    The worker is a thread of its own (worker_thread), or the caller's thread, which then calls
    run(): serve() gives it the main thread. PyTorch is fastest when one thread runs all its
    work: once a second thread has run operations too, both ran up to 2x slower here (each keeps
    a team of OpenMP threads, and the idle team's spinning takes cores from the busy one), and
    the main thread has loaded and measured the model already.
    """

    def __init__(self, classifier, max_batch=64, max_tokens=16384, max_queue=256, metrics=None, worker_thread=True):
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_tokens = max_tokens  # texts x the longest text's tokens: the padded batch's size
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting = []             # jobs, oldest first
        self.queued = 0               # texts in self.waiting
        self.stopping = False
        self.last_seconds, self.expected = 0.0, 0  # the last pass's time; texts to wait for before the next
        self.changed = threading.Condition()
        self.worker = threading.Thread(target=self.run, name="model", daemon=True) if worker_thread else None
        if self.worker is not None:
            self.worker.start()

    def submit(self, rows, lengths):
        """(answers, steps) of encoded texts (see Classifier.probabilities), once the worker has
        run them. QueueFull at once if they do not fit in the queue."""
        job = Job(rows, lengths)
        with self.changed:
            if self.stopping or self.queued + len(rows) > self.max_queue:
                raise QueueFull(f"the server is busy ({self.queued} texts waiting); try again shortly")
            self.waiting.append(job)
            self.queued += len(rows)
            self.changed.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answers, job.steps

    def take(self):
        """The jobs for the next forward pass (the oldest always fits, even alone over a limit)."""
        jobs, texts, longest = [], 0, 0
        while self.waiting:
            job = self.waiting[0]
            more = texts + len(job.rows)
            longer = max(longest, *(len(row) for row in job.rows))
            if jobs and (more > self.max_batch or more * longer > self.max_tokens):
                break
            jobs.append(self.waiting.pop(0))
            texts, longest = more, longer
        self.queued -= texts
        return jobs

    def run(self):
        while True:
            with self.changed:
                while not self.waiting and not self.stopping:
                    self.changed.wait()
                # The clients the last pass answered send their next texts at once: wait for them, up
                # to a tenth of that pass's time, so that a busy server's passes stay full.
                deadline = time.monotonic() + self.last_seconds / 10
                while self.queued < self.expected and not self.stopping and time.monotonic() < deadline:
                    self.changed.wait(deadline - time.monotonic())
                if not self.waiting:
                    return  # stopping, and nothing is left to do
                jobs = self.take()
            began = time.monotonic()
            rows = [row for job in jobs for row in job.rows]
            try:
                answers, steps = self.classifier.probabilities(rows, [n for job in jobs for n in job.lengths])
            except Exception as e:  # a bug of ours: every waiting request gets a 500, the worker goes on
                for job in jobs:
                    job.error = e
            else:
                start = 0
                for job in jobs:
                    job.answers, job.steps = answers[start:start + len(job.rows)], steps[start:start + len(job.rows)]
                    start += len(job.rows)
                if self.metrics is not None:
                    self.metrics.observe_batch(len(rows))
            with self.changed:
                self.last_seconds = time.monotonic() - began
                self.expected = min(self.max_batch, self.queued + len(rows))  # those waiting + those answered
            for job in jobs:
                job.done.set()

    def stop(self):
        """Finish what is queued, then end the worker."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.worker is not None:
            self.worker.join()


# ---------------------------------------------------------------- metrics for /metrics, in Prometheus's text
# format (version 0.0.4), written by hand: after `# HELP` and `# TYPE` lines, one
# `name{label="value"} number` line per series. A histogram is cumulative buckets
# (`name_bucket{le="x"}`: observations <= x, the last le="+Inf"), `_sum`, `_count`.

class Histogram:
    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # observations in (previous bound, bound]; summed when written
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name):
        lines, cumulative = [], 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                        f"{name}_count {self.count}"]


class Metrics:
    """What the server counts. Every method is safe to call from any thread."""

    def __init__(self, paths):
        self.paths = paths                 # the label values for `path` (others count as "other")
        self.lock = threading.Lock()
        self.requests = {}                 # (path, status) -> requests answered
        self.latency = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.texts = 0

    def observe_request(self, path, status, seconds, texts):
        path = path if path in self.paths else "other"  # bounded: no series per random URL
        with self.lock:
            self.requests[path, status] = self.requests.get((path, status), 0) + 1
            self.latency.observe(seconds)
            self.texts += texts if status == 200 else 0

    def observe_batch(self, texts):
        with self.lock:
            self.batch.observe(texts)

    def text(self, queued):
        """The Prometheus text; queued: texts waiting for the model now."""
        with self.lock:
            lines = ["# HELP minigpt_requests_total HTTP requests answered, by path and status.",
                     "# TYPE minigpt_requests_total counter"]
            lines += [f'minigpt_requests_total{{path="{path}",status="{status}"}} {n}'
                      for (path, status), n in sorted(self.requests.items())]
            lines += ["# HELP minigpt_request_duration_seconds Time from connection to answer.",
                      "# TYPE minigpt_request_duration_seconds histogram",
                      *self.latency.lines("minigpt_request_duration_seconds"),
                      "# HELP minigpt_batch_texts Texts per forward pass of the model.",
                      "# TYPE minigpt_batch_texts histogram",
                      *self.batch.lines("minigpt_batch_texts"),
                      "# HELP minigpt_queue_texts Texts waiting for the model now.",
                      "# TYPE minigpt_queue_texts gauge",
                      f"minigpt_queue_texts {queued}",
                      "# HELP minigpt_texts_classified_total Texts classified and answered.",
                      "# TYPE minigpt_texts_classified_total counter",
                      f"minigpt_texts_classified_total {self.texts}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the web page: one self-contained file
# (inline CSS and JS, nothing fetched from elsewhere). Its question, the sample texts and the
# labels come from the classifier; every class gets a bar.

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
 #answer { margin: 1rem 0; padding: .8rem; border-radius: .4rem; display: none; background: #eef3fb; }
 #answer.error { background: #eee; }
 #auth { margin: .5rem 0; } #auth input { font: inherit; padding: .3rem; }
 #label { font-size: 1.3rem; font-weight: bold; overflow-wrap: anywhere; }
 #tokens { margin-top: .7rem; line-height: 1.9; overflow-wrap: anywhere; }
 #tokens span { white-space: pre-wrap; border-radius: .2rem; }
 #why { color: #555; font-size: .85rem; margin: .3rem 0 0; }
 .row { display: grid; grid-template-columns: minmax(4rem, 30%) 1fr 3.5rem; gap: .5rem; align-items: center;
        font-size: .9rem; margin-top: .3rem; }
 .row span { overflow-wrap: anywhere; } .row .p { text-align: right; }
 .bar { height: .7rem; background: #ddd; border-radius: .35rem; overflow: hidden; }
 .bar div { height: 100%; background: #7a8ba8; width: 0; } .row.top .bar div { background: #c0392b; }
 .samples button { display: block; width: 100%; text-align: left; font-size: .9rem; background: #f4f4f4;
                    border: 1px solid #ddd; border-radius: .3rem; margin: .3rem 0; }
</style></head>
<body>
<h1>{{title}}</h1>
<p id="about">{{about}}</p>
<textarea id="text" placeholder="Paste a text (Ctrl+Enter to classify)" autofocus></textarea>
<button id="go">Classify</button>
<form id="auth" hidden><label>This server needs its access token:
 <input id="token" type="password" autocomplete="off"></label> <button>Use it</button></form>
<div id="answer"><div id="label"></div><div id="detail"></div><div id="bars"></div>
<div id="tokens"></div><p id="why"></p></div>
<div class="samples"><p>Or try one:</p>
{{samples}}</div>
<script>
const $ = id => document.getElementById(id);
let token = null;  // the server's access token, if it has one: asked once, kept in this page's memory only
function askToken() {
  return new Promise(resolve => {
    $("auth").hidden = false; $("token").focus();
    $("auth").onsubmit = e => { e.preventDefault(); $("auth").hidden = true; resolve($("token").value); };
  });
}
async function post(text) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers.Authorization = "Bearer " + token;
  return fetch("/api/classify", {method: "POST", headers, body: JSON.stringify({text, explain: true})});
}
async function classify() {
  const text = $("text").value, box = $("answer");
  $("bars").replaceChildren(); $("tokens").replaceChildren(); $("why").textContent = "";
  try {
    let r = await post(text);
    if (r.status === 401) {  // no token yet, or a wrong one: ask (again), then retry once
      token = await askToken();
      r = await post(text);
      if (r.status === 401) token = null;
    }
    box.style.display = "block";
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
    for (const t of data.explanation) {  // the verdict after each token: shaded by its probability
      const p = t.probabilities[data.label] ?? 0, span = document.createElement("span");
      span.textContent = t.text; span.dataset.p = p;
      span.title = data.label + ": " + (100 * p).toFixed(1) + " % had the text ended here";
      span.style.background = "rgba(192, 57, 43, " + (0.85 * p).toFixed(3) + ")";
      $("tokens").append(span);
    }
    $("why").textContent = "Each token is shaded by how likely \u201c" + data.label + "\u201d was had the text " +
      "ended there (hover for the value); the last token's value is the answer.";
  } catch (e) {
    box.style.display = "block"; box.className = "error"; delete box.dataset.label;
    $("label").textContent = "Error"; $("detail").textContent = e.message;
  }
}
$("go").onclick = classify;
$("text").addEventListener("keydown", e => { if (e.key === "Enter" && e.ctrlKey) classify(); });
document.querySelectorAll(".samples button").forEach(b => b.onclick = () => {
  $("text").value = b.textContent; classify(); });
</script>
</body></html>
"""


def render_page(classifier):
    """The page with the classifier's question, description and sample texts, all HTML-escaped."""
    values = {"title": html.escape(classifier.title), "about": html.escape(classifier.description),
              "samples": "\n".join(f" <button>{html.escape(text)}</button>" for text in classifier.sample_texts)}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], PAGE)  # one pass: inserted text is not re-read


# ---------------------------------------------------------------- HTTP/1.1: requests one after another on a connection,
# read within a deadline, checked, answered in JSON.

class RequestError(Exception):
    """A request we answer with an error status and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class DeadlineReader(io.RawIOBase):
    """A socket's input that ends at a deadline. Each read may wait only for the time left, so a
    client that trickles its request (a byte every few seconds) cannot hold a thread beyond it."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline  # time.monotonic() value

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def parse_request(body):
    """(texts, is_batch, explain) from a JSON body, or ValueError with a message for the client."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not valid JSON: {e}") from e
    except RecursionError:  # [[[[...]]]] nested a thousand deep: the parser would recurse as deep
        raise ValueError("body is nested too deeply") from None
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
    explain = request.get("explain", False)
    if not isinstance(explain, bool):
        raise ValueError('"explain" must be true or false')
    return texts, batch, explain


class Handler(http.server.BaseHTTPRequestHandler):
    batcher = metrics = token = None  # set by make_server()
    routes = {"/": "GET", "/healthz": "GET", "/metrics": "GET", "/api/classify": "POST"}
    protected = ("/api/", "/metrics")  # need the token, when the server has one
    timeout = 30  # seconds for a whole request (line, headers, body) to arrive
    keep_alive = 5  # seconds a connection may wait idle for its next request
    protocol_version = "HTTP/1.1"  # one connection may carry many requests, one after the other
    # An answer goes out as two writes, headers and body. With Nagle's algorithm on, the body waits
    # for the client to acknowledge the headers, and clients delay acknowledgements by up to 40 ms.
    disable_nagle_algorithm = True
    access_log = True  # one line per request on stderr
    server_version = "minigpt"
    sys_version = ""

    def setup(self):
        super().setup()
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, time.monotonic() + self.timeout))
        self.answered = 0  # requests answered on this connection

    def handle(self):
        try:
            while not self.answered or self.next_request_comes():
                self.start_request()
                self.handle_one_request()
                self.end_request()
                if self.close_connection:
                    break
        except (ConnectionError, TimeoutError):  # the client left or stalled: nobody to answer, no traceback
            self.close_connection = True

    def next_request_comes(self):
        """True once the first byte of the connection's next request has come; False if the
        client closed it, or left it idle for keep_alive seconds."""
        self.rfile.raw.deadline = time.monotonic() + self.keep_alive
        try:
            return bool(self.rfile.peek(1))
        except (ConnectionError, TimeoutError):
            return False

    def start_request(self):
        self.started = time.monotonic()
        self.rfile.raw.deadline = self.started + self.timeout
        self.close_connection = True  # until the request line says otherwise (HTTP/1.1, no "close")
        self.headers = None
        self.route = None    # the path without ?query, once the request line is read
        self.status = None   # the status we answered
        self.seconds = None  # from the request's start to its answer, once answered
        self.texts = 0       # texts in the request, for the metrics and the access log
        self.body_read = False

    def end_request(self):
        """What is left of a body too big to read is dropped (reply() has said Connection: close);
        the request is logged (one access-log line)."""
        self.drain_unread_body()
        self.answered += 1
        if self.status is not None and self.access_log:
            sys.stderr.write(f"{self.client_address[0]} {self.command} {self.route} {self.status} "
                             f"{1000 * self.seconds:.1f} ms {self.texts} texts\n")

    def skip_small_body(self):
        """Read and drop the body of a request answered without it (a 404, 405, 401 on a request
        with a body), if it is a plain Content-Length of at most MAX_BODY bytes: the next request
        on the connection starts after it. True if the connection can carry a next request."""
        lengths = (self.headers.get_all("Content-Length") or ["0"]) if self.headers is not None else ["0"]
        if self.body_read or lengths == ["0"]:
            return True
        if "Transfer-Encoding" in self.headers or len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0]) \
                or int(lengths[0]) > MAX_BODY:
            return False  # where the next request would start is unknown, or too far
        self.body_read = True
        try:
            return len(self.rfile.read(int(lengths[0]))) == int(lengths[0])
        except TimeoutError:
            return False

    def drain_unread_body(self):
        """Read and drop the body of a request we answered without reading it (a 413, or one
        skip_small_body would not read), up to 64 MiB and for at most a second. Closing a socket
        with unread input makes the kernel send a reset, which can destroy our answer before the
        client has read it."""
        length = self.headers.get("Content-Length", "") if self.headers is not None else ""
        if self.body_read or not length.isdigit() or int(length) == 0:
            return
        left = min(int(length), 64 << 20)
        self.rfile.raw.deadline = time.monotonic() + 1.0
        try:
            while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
                left -= len(chunk)
        except TimeoutError:
            pass

    def finish(self):
        try:
            super().finish()
        except ConnectionError:
            pass

    def log_request(self, code="-", size="-"):
        pass  # end_request() writes the access line, with the time and the texts

    def log_message(self, fmt, *args):  # the base class's own notes (e.g. a timed-out request line)
        sys.stderr.write(f"{self.client_address[0]} {fmt % args}\n")

    def reply(self, status, body, content_type="application/json", headers=()):
        """The answer; with `Connection: close` whenever the connection ends after it, so that a
        client never sends its next request into a closed connection."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        if not self.skip_small_body():
            self.close_connection = True
        self.status = status
        # Counted before the answer leaves: a client that has its answer finds it in /metrics.
        self.seconds = time.monotonic() - self.started
        self.metrics.observe_request(self.route, self.status, self.seconds, self.texts)
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer is the headers alone
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (a bad request line, headers too long, ...) as JSON too; a
        method nothing here takes (TRACE, CONNECT, ...) is a 405, not its HTML 501."""
        self.route = urllib.parse.urlsplit(self.path).path if getattr(self, "path", None) else None
        if self.request_version == "HTTP/0.9":  # what the base class assumes of a garbled request line;
            self.request_version = "HTTP/1.0"   # 0.9 answers have no status line, and nobody speaks it
        if code == 501:
            return self.method_not_allowed()
        self.close_connection = True
        self.reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def method_not_allowed(self):
        allow = self.routes.get(self.route, ", ".join(sorted(set(self.routes.values()))))
        self.reply(405, {"error": f"{self.route} does not take {self.command}; it takes {allow}"},
                   headers=[("Allow", allow)])

    def allowed(self, method):
        """True if this request may go on; else it has been answered (404, 405 or 401)."""
        self.route = urllib.parse.urlsplit(self.path).path  # without ?query
        if self.route not in self.routes:
            self.reply(404, {"error": f"no such path: {self.route}"})
        elif self.routes[self.route] != method:
            self.method_not_allowed()
        elif self.token and self.route.startswith(self.protected) and not self.has_token():
            self.reply(401, {"error": "this server needs its token: send Authorization: Bearer <token>"},
                       headers=[("WWW-Authenticate", 'Bearer realm="minigpt"')])
        else:
            return True
        return False

    def has_token(self):
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # compare_digest takes as long for a wrong first character as for a wrong last one, so the
        # time of an answer tells an attacker nothing about how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def do_GET(self):
        if not self.allowed("GET"):
            return
        classifier = self.batcher.classifier
        if self.route == "/":
            self.reply(200, self.page, "text/html")
        elif self.route == "/healthz":
            self.reply(200, {"status": "ok", "model": classifier.description, "dtype": classifier.dtype})
        else:
            self.reply(200, self.metrics.text(self.batcher.queued), "text/plain; version=0.0.4")

    def do_POST(self):
        if not self.allowed("POST"):
            return
        try:
            texts, batch, explain = parse_request(self.read_body())
        except RequestError as e:  # the body is not where its headers said: the connection cannot go on
            self.close_connection = True
            return self.reply(e.status, {"error": str(e)})
        except ValueError as e:
            return self.reply(400, {"error": str(e)})
        self.texts = len(texts)
        classifier = self.batcher.classifier
        rows, lengths, counts = classifier.encode(texts)
        try:
            answers, steps = self.batcher.submit(rows, lengths)
        except QueueFull as e:
            return self.reply(503, {"error": str(e)}, headers=[("Retry-After", "1")])
        except Exception as e:  # a bug of ours: say so, and keep serving
            self.log_error("classifying failed: %r", e)
            return self.reply(500, {"error": "internal error while classifying"})
        results = classifier.results(answers, counts, [r.tolist() for r in rows] if explain else None, steps)
        self.reply(200, {"results": results} if batch else results[0])

    def read_body(self):
        """The request's body, read within the request's deadline; RequestError if we will not."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise RequestError(411, "a POST needs a Content-Length")
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0]):  # not +29, 2_9, -1 or 1e3
            raise RequestError(400, f"bad Content-Length: {', '.join(lengths)}")
        length = int(lengths[0])
        if length > MAX_BODY:  # answered at once, unread (drain_unread_body takes care of the rest)
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        self.body_read = True
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, "the request body did not arrive in time") from None
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of {length} bytes")
        self.connection.settimeout(self.timeout)  # reading is over: writing the answer gets the full time
        return body


class Server(http.server.ThreadingHTTPServer):
    """The standard library's threading HTTP server, bounded and stoppable: at most
    max_connections connections are handled at once, each in its own thread (a kept-alive one
    holds its place between its requests); more wait in the kernel's listen backlog, sized for a
    burst; and it can wait for the open connections before it closes (graceful shutdown)."""

    def __init__(self, address, handler, batcher, max_connections=64):
        self.request_queue_size = max(128, 4 * max_connections)  # the listen backlog (default: 5)
        self.batcher = batcher
        self.slots = threading.BoundedSemaphore(max_connections)
        self.active = 0
        self.idle = threading.Condition()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.slots.acquire()  # at the limit, the accept loop waits here; new connections queue in the backlog
        with self.idle:
            self.active += 1
        threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True).start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.idle:
                self.active -= 1
                self.idle.notify_all()
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client leaving is no error
            super().handle_error(request, client_address)

    def wait_idle(self, timeout):
        """Wait until no connection is open (True) or `timeout` seconds pass (False): requests in
        flight finish, and kept-alive connections close after at most Handler.keep_alive idle."""
        with self.idle:
            return self.idle.wait_for(lambda: self.active == 0, timeout)

    def server_close(self):
        super().server_close()
        self.batcher.stop()


def make_server(classifier, host="127.0.0.1", port=8000, token=None, max_batch=64, max_tokens=16384,
                max_queue=256, max_connections=64, worker_thread=True):
    """The service (port 0: any free port); call serve_forever() on it, or use serve() (then
    worker_thread=False: the main thread runs the model)."""
    metrics = Metrics(Handler.routes)
    batcher = Batcher(classifier, max_batch, max_tokens, max_queue, metrics, worker_thread)
    handler = type("BoundHandler", (Handler,), {"batcher": batcher, "metrics": metrics, "token": token,
                                                "page": render_page(classifier)})  # the page never changes
    try:
        return Server((host, port), handler, batcher, max_connections)
    except OSError:
        batcher.stop()
        raise


def serve(server, shutdown_timeout=30):
    """Serve until SIGTERM or Ctrl+C; then stop accepting, let the requests in flight finish (up
    to shutdown_timeout seconds), and return. Connections are accepted in a thread; this, the
    main thread, runs the model (a server made with worker_thread=False)."""
    def stop(signum, frame):
        print(f"{signal.Signals(signum).name}: no new connections; finishing the requests in flight",
              file=sys.stderr)
        threading.Thread(target=finish, daemon=True).start()  # the main thread goes on serving meanwhile

    def finish():
        server.shutdown()  # serve_forever returns: no new connections
        if not server.wait_idle(shutdown_timeout):
            print(f"{server.active} connections still open after {shutdown_timeout} s; stopping anyway",
                  file=sys.stderr)
        server.server_close()  # and the model's worker: its run() returns once nothing is queued

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.batcher.run()
    print("stopped", file=sys.stderr)


# ---------------------------------------------------------------- a load test: N requests from C concurrent
# clients over HTTP on 127.0.0.1.

BENCHMARK_TEXT = ("Hey, are we still on for dinner tonight? I can pick you up at 7 if that works, or we meet at "
                  "the place near the station")  # a typical SMS of about 30 tokens


def benchmark(classifier, n, concurrency=1, keep_alive=False, limit=300, text=BENCHMARK_TEXT):
    """The service against its ceiling, side by side. The service on a free local port is sent n
    single-text requests by `concurrency` clients at once (each on a new connection, as most
    clients do, or on kept-alive ones), stopping after `limit` seconds; the clients run in a
    process of their own, so they do not take the server's Python lock (they do share this
    machine's cores with it). Then the model alone (the same Classifier, no HTTP) runs the very
    forward passes the service ran, the same number of texts in each: the rate the service
    would have with no time lost around the model; and, beside it, the rate of passes of
    `concurrency` texts: the service's rate were every pass full (Batcher waits for the clients
    it answered, so that passes stay nearly full)."""
    recording = Recording(classifier)
    server = make_server(recording, port=0, max_connections=max(64, concurrency), worker_thread=False)
    server.RequestHandlerClass.access_log = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spawn = multiprocessing.get_context("spawn")  # a fresh process: no copy of this one's threads
    stop = lambda _: threading.Thread(target=server_stop, args=(server,)).start()  # when the clients are done
    with spawn.Pool(1) as pool:  # the clients' process
        result = pool.apply_async(clients, (server.server_port, text, n, concurrency, keep_alive, limit),
                                  callback=stop, error_callback=stop)
        server.batcher.run()  # this, the main thread, runs the model, as in serve()
        done, seconds = result.get()
    times = sorted(ms for ok, ms in done if ok)
    errors = len(done) - len(times)
    if len(times) < 2:
        raise minigpt.DataError(f"the benchmark got {len(times)} answers and {errors} errors")
    q = statistics.quantiles(times, n=100)
    rate = len(times) / seconds
    passes, texts = [], 0
    for k in reversed(recording.sizes):  # the passes of the measured requests: the last ones
        if texts >= len(done):
            break
        passes, texts = [k] + passes, texts + k
    rows, lengths, _ = classifier.encode([text] * max(*passes, concurrency))
    alone = lambda k: minigpt.timed(lambda: classifier.probabilities(rows[:k], lengths[:k]))  # seconds, k texts
    if concurrency == 1:
        one = statistics.median(alone(1) for _ in range(21))
        versus = f"p50 {q[49] / (1000 * one):.2f}x the model alone's {1000 * one:.1f} ms"
    else:
        ceiling = sum(passes) / sum(alone(k) for k in passes)  # messages/s
        full = minigpt.best_time(lambda: classifier.probabilities(rows[:concurrency], lengths[:concurrency]), 3)
        versus = (f"{rate / ceiling:.0%} of the model alone's {ceiling:.1f} messages/s on the same passes; "
                  f"{concurrency / full:.1f} messages/s on passes of {concurrency}")
    print(f"{len(done)} requests, {concurrency} concurrent clients, "
          f"{'kept-alive connections' if keep_alive else 'a new connection each'}, {classifier.dtype}: "
          f"{rate:.1f} messages/s, {sum(passes) / len(passes):.1f} texts a forward pass ({versus}); "
          f"latency p50 {q[49]:.1f} ms, p95 {q[94]:.1f} ms, p99 {q[98]:.1f} ms; {errors} errors")


class Recording:
    """A classifier that records how many texts each forward pass held (for the benchmark)."""

    def __init__(self, classifier):
        self.classifier, self.sizes = classifier, []

    def __getattr__(self, name):
        return getattr(self.classifier, name)

    def probabilities(self, rows, lengths, batch_size=None):
        self.sizes.append(len(rows))
        return self.classifier.probabilities(rows, lengths, batch_size)


def server_stop(server):
    server.shutdown()
    server.server_close()


def clients(port, text, n, concurrency, keep_alive, limit):
    """(for each request (answered with 200, milliseconds), seconds in all): n requests from
    `concurrency` threads, after a warm-up of two each. Runs in the benchmark's client process."""
    body = json.dumps({"text": text}).encode()
    deadline = time.monotonic() + limit
    kept = threading.local()  # each client thread's own connection, with keep_alive

    def request(_):
        if time.monotonic() > deadline:
            return None
        t0 = time.perf_counter()
        connection = getattr(kept, "connection", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", "/api/classify", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            ok = response.status == 200 and "label" in json.loads(response.read())
        except (OSError, ValueError, http.client.HTTPException):
            ok = False
            connection.close()
            connection = None
        if keep_alive:
            kept.connection = connection
        elif connection is not None:
            connection.close()
        return ok, 1000 * (time.perf_counter() - t0)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(request, range(min(n, 2 * concurrency))))  # warm up
        t0 = time.perf_counter()
        done = [r for r in pool.map(request, range(n)) if r is not None]
        return done, time.perf_counter() - t0


if __name__ == "__main__":
    minigpt.run_script(main, "nothing was saved")
