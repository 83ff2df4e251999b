"""Tests for minigpt.py, pretrain.py, finetune.py and classify.py. Run: pytest

Everything runs offline on tiny models. GPT-2 parity is checked against Hugging Face
`transformers` (a test-only dependency) on randomly initialised models it writes itself; without
it those tests skip and the rest run. Data files come from $MINIGPT_MIRROR (CI sets it to
../shared/data); tests that need one skip with a reason where it is missing.

Hermetic: every test writes under pytest's temporary folders. The data folder (minigpt.DATA_DIR,
and MINIGPT_DATA for the scripts run as subprocesses) points into one for the whole session.
"""

import argparse
import concurrent.futures
import contextlib
import copy
import csv
import hashlib
import http.client
import http.server
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
import weakref
import zipfile
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minigpt

HERE = Path(__file__).resolve().parent
TINY = minigpt.PRESETS["tiny"]
MIRROR = Path(os.environ.get("MINIGPT_MIRROR", HERE.parent / "shared" / "data"))
needs_mirror = pytest.mark.skipif(not (MIRROR / "the-verdict.txt").exists(),
                                  reason="no data mirror: set MINIGPT_MIRROR to a folder like ../shared/data")


@pytest.fixture(scope="session", autouse=True)
def session_data_dir(tmp_path_factory):
    """No test writes into the real data/ folder: downloads and splits go to a temporary one."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("data")
        mp.setattr(minigpt, "DATA_DIR", folder)
        mp.setenv("MINIGPT_DATA", str(folder))  # for the scripts the tests run as subprocesses
        yield folder


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fresh, empty data/ folder and no mirror, so a test sees only the files it makes."""
    monkeypatch.setattr(minigpt, "DATA_DIR", tmp_path / "data")
    monkeypatch.delenv("MINIGPT_MIRROR", raising=False)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return minigpt.get_tokenizer()


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return minigpt.GPT(replace(TINY, **changes)).eval()


# ---------------------------------------------------------------- the model

def test_shapes_and_parameter_counts():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, TINY.vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no time
        small = minigpt.GPT(minigpt.PRESETS["gpt2-small"])
    assert sum(p.numel() for p in small.parameters()) == 124_439_808  # the tied head is counted once
    assert small.lm_head.weight is small.wte.weight


def test_causal_a_later_token_never_changes_earlier_logits():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, TINY.vocab_size, (2, 7))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def book_attend(self, q, k, v, sees=None, causal=False):
    """CausalSelfAttention.attend's maths one step per line, as the book writes it."""
    if causal:
        sees = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()  # True = may see
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])    # (B, nh, Tq, Tk)
    if sees is not None:
        scores = scores.masked_fill(~sees, float("-inf"))        # exp(-inf) = 0: no weight on the future
    weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
    return weights @ v                                           # (B, nh, Tq, hs)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_explicit_attention_equals_the_fused_kernel_in_training(monkeypatch, dropout):
    """Same logits and same gradients; with dropout (random masks differ), the same in eval mode."""
    model = tiny_model(dropout=dropout).train(dropout == 0.0)
    idx = torch.randint(0, TINY.vocab_size, (3, 20))
    results = []
    for attend in (minigpt.CausalSelfAttention.attend, book_attend):
        monkeypatch.setattr(minigpt.CausalSelfAttention, "attend", attend)
        model.zero_grad()
        logits = model(idx)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused_logits, fused_grads), (explicit_logits, explicit_grads) = results
    torch.testing.assert_close(explicit_logits, fused_logits, atol=1e-5, rtol=0)
    for a, b in zip(explicit_grads, fused_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_explicit_attention_equals_the_fused_kernel_with_a_cache(monkeypatch):
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 7))
    outputs = {}
    for fused, attend in ((True, minigpt.CausalSelfAttention.attend), (False, book_attend)):
        monkeypatch.setattr(minigpt.CausalSelfAttention, "attend", attend)
        cache = minigpt.KVCache(TINY, 2, 20)
        with torch.no_grad():
            first = model(prompt, cache)                  # fills 7 positions (causal, no past)
            one = model(prompt[:, :1], cache)             # 1 new position: sees every key
            two = model(prompt[:, 1:2], cache)
            with pytest.raises(ValueError, match="2 new positions after 9 cached ones"):
                model(prompt[:, :2], cache)               # several after cached ones: one at a time
        outputs[fused] = (first, one, two, minigpt.generate(model, prompt, 12))
    for a, b in zip(outputs[True][:3], outputs[False][:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(outputs[True][3], outputs[False][3])
    with torch.no_grad():  # and the cached positions equal a plain forward pass over all 9 tokens
        full = model(torch.cat([prompt, prompt[:, :1], prompt[:, 1:2]], dim=1))
    torch.testing.assert_close(torch.cat(outputs[False][:3], dim=1), full, atol=1e-5, rtol=0)


def test_weight_decay_only_on_matrices_that_multiply():
    model = tiny_model()
    optimizer = minigpt.adamw(model, 1e-3, 0.1)
    decayed, plain = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters()
                                           if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "h.0.attn.c_attn.bias"} <= {names[i] for i in plain}
    assert len(decayed) + len(plain) == len(list(model.parameters()))  # every parameter once (the head is tied)


def test_context_longer_than_the_model_is_an_error():
    with pytest.raises(ValueError, match="context"):
        tiny_model()(torch.zeros(1, TINY.context_length + 1, dtype=torch.long))


# ---------------------------------------------------------------- precision (bfloat16)

BF16_TOLERANCE = 0.02  # |bf16 logits - float32 logits| / |float32 logits| (norms): bfloat16 rounds by 0.4 %


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("cpuinfo,native", [
    ("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile\n", True),        # Cooper Lake and later
    ("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\nflags : x\n", True),      # Sapphire Rapids (first line counts)
    ("flags : fpu sse avx2 avx512f avx512_vnni\n", False),                       # Cascade Lake: emulated, slow
    ("Features : fp asimd sve bf16 i8mm\n", True),                               # ARM with BF16 (Graviton3)
    ("Features : fp asimd\n", False),
    ("", False)])
def test_cpu_bfloat16_detection_from_cpuinfo(cpuinfo, native):
    found, reason = minigpt.cpu_bfloat16_flags(cpuinfo)
    assert found is native and reason


def test_dtype_choice_says_what_and_why(capsys, monkeypatch):
    assert minigpt.pick_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(minigpt, "native_bfloat16", lambda device: (True, "this CPU has amx_bf16"))
    assert minigpt.pick_dtype("auto", "cpu") == torch.bfloat16
    assert "dtype: bfloat16 (auto: this CPU has amx_bf16)" in capsys.readouterr().err
    monkeypatch.setattr(minigpt, "native_bfloat16", lambda device: (False, "no bfloat16 units"))
    assert minigpt.pick_dtype("auto", "cpu") == torch.float32
    assert minigpt.pick_dtype("bfloat16", "cpu") == torch.bfloat16  # asked for: allowed, with a warning
    err = capsys.readouterr().err
    assert "float32 (auto: no bfloat16 units)" in err and "slower than float32" in err


def test_float32_autocast_is_exactly_the_plain_model():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    batch = (idx[:, :-1], idx[:, 1:])
    with torch.no_grad():
        with minigpt.autocast("cpu", torch.float32):
            inside = model(idx)
        assert torch.equal(inside, model(idx))
        with minigpt.autocast("cpu", torch.float32):
            inside = model(batch[0], targets=batch[1])
        assert torch.equal(inside, model(batch[0], targets=batch[1]))


def test_bfloat16_logits_are_within_tolerance_of_float32():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 20))
    residual = []
    model.ln_f.register_forward_hook(lambda module, inputs, output: residual.append(inputs[0].dtype))
    with torch.no_grad():
        expected = model(idx)
        with minigpt.autocast("cpu", torch.bfloat16):  # training's path: float32 weights, bf16 matmuls
            mixed = model(idx)
        weights = copy.deepcopy(model).to(torch.bfloat16)(idx)  # inference's path: bf16 weights
    assert residual[:2] == [torch.float32, torch.float32]  # under autocast the residual stream stays float32
    assert relative_error(mixed, expected) < BF16_TOLERANCE
    assert weights.dtype == torch.bfloat16 and relative_error(weights, expected) < BF16_TOLERANCE
    assert 0 < relative_error(weights, expected)  # it really ran in bfloat16


def lm_loss(model, x, y, dtype):
    """The training loss, GPT.forward's, with the forward pass in dtype."""
    with minigpt.autocast("cpu", dtype):
        return model(x, targets=y)


def book_loss(model, x, y, dtype):
    """The book's calc_loss_batch: F.cross_entropy over the whole logits, the softmax in float32."""
    with minigpt.autocast("cpu", dtype):
        logits = model(x)                                                  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def test_bfloat16_training_keeps_float32_weights_gradients_and_optimizer_state():
    model = tiny_model().train()
    optimizer = minigpt.adamw(model, 1e-3, 0.1)
    batch = (torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss = lm_loss(model, *batch, torch.bfloat16)
    expected = lm_loss(model, *batch, torch.float32)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 0.02 * expected.item()
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim())


def test_bfloat16_generation_uses_a_bfloat16_cache_and_close_logits():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 7))
    fast = copy.deepcopy(model).to(torch.bfloat16)
    cache = minigpt.KVCache(TINY, 2, 10, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(fast(prompt, cache), model(prompt)) < BF16_TOLERANCE
    assert cache.k.dtype == torch.bfloat16 and cache.length == 7
    out = minigpt.generate(fast, prompt, 5)
    assert out.shape == (2, 12) and torch.equal(out[:, :7], prompt)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("new_tokens", [20, 90])  # 90: the window slides past the 64-token context
def test_kv_cache_generates_the_same_tokens(new_tokens):
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 7))
    cached = minigpt.generate(model, prompt, new_tokens, use_cache=True)
    plain = minigpt.generate(model, prompt, new_tokens, use_cache=False)
    assert cached.shape == (2, 7 + new_tokens)
    assert torch.equal(cached, plain)
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    sampled = [minigpt.generate(model, prompt, new_tokens, temperature=1.0, top_k=50, use_cache=c, generator=g)
               for c, g in ((True, g1), (False, g2))]
    assert torch.equal(*sampled)


def test_sampling_picks_only_top_k_tokens_and_is_seeded():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (1, 5))
    with torch.no_grad():
        allowed = set(torch.topk(model(prompt)[0, -1], 3).indices.tolist())
    seen = set()
    for seed in range(40):
        out = minigpt.generate(model, prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        seen.add(out[0, -1].item())
    assert seen <= allowed and len(seen) > 1  # random, yet never outside the top 3
    again = [minigpt.generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
             for _ in range(2)]
    assert torch.equal(*again)


def test_generation_stops_once_every_row_has_ended():
    model = tiny_model()
    steps = []

    def eot_for_one_row_per_step(module, inputs, logits):  # row 0 ends at step 0, row 1 at step 1
        row = len(steps)
        steps.append(row)
        if row < 2:
            logits = logits.clone()
            logits[row, -1, minigpt.EOT] = 1e4
        return logits

    model.lm_head.register_forward_hook(eot_for_one_row_per_step)
    out = minigpt.generate(model, torch.randint(0, TINY.vocab_size, (2, 4)), 10, eos_id=minigpt.EOT)
    assert out.shape == (2, 6) and out[0, 4] == minigpt.EOT and out[1, 5] == minigpt.EOT


def test_generation_stops_at_end_of_text():
    model = tiny_model()
    force_eot = lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([minigpt.EOT]), 1e4)
    model.lm_head.register_forward_hook(force_eot)
    out = minigpt.generate(model, torch.randint(0, TINY.vocab_size, (1, 4)), 10, eos_id=minigpt.EOT)
    assert out.shape == (1, 5) and out[0, -1] == minigpt.EOT


# ---------------------------------------------------------------- data and training

def test_encode_and_padded_dataset(tokenizer):
    ids, counts = minigpt.encode(["hi there", "a much longer message than that", "", "<|endoftext|>"], tokenizer, 5)
    assert counts == [2, 6, 0, 7] and [len(i) for i in ids] == [2, 5, 1, 5]  # "" reads as one <|endoftext|>
    assert ids[2] == [minigpt.EOT] and minigpt.EOT not in ids[3]              # the text, not the token
    rows = finetune.model_inputs(ids, "last", 6)  # the book's SpamDataset: padded with <|endoftext|>
    assert [r.dtype for r in rows] == [torch.long] * 4 and [len(r) for r in rows] == [6] * 4
    assert rows[0][:2].tolist() == ids[0] and rows[0][2:].tolist() == [minigpt.EOT] * 4
    assert [r.tolist() for r in finetune.model_inputs(ids, "last_real", 6)] == ids  # the real tokens only


def test_optimizer_steps_overfit_a_tiny_batch():
    torch.manual_seed(0)
    model = minigpt.GPT(TINY)
    x, y = torch.randint(0, 100, (4, 16)), torch.randint(0, 100, (4, 16))
    before = minigpt.lm_evaluate(model, [(x, y)])
    opt = minigpt.adamw(model, 3e-3, 0.0)
    losses = []
    for _ in range(40):  # pretrain.py's step, one micro-batch
        opt.zero_grad(set_to_none=True)
        loss = model(x, targets=y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert before > 10 and losses[0] == pytest.approx(before, rel=1e-5)
    assert minigpt.lm_evaluate(model, [(x, y)]) < 0.5 * before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(monkeypatch, dtype):
    """GPT.forward's loss against the book's (F.cross_entropy over the whole logits), chunks of 7 of 60
    positions: the loss and every gradient to 1e-6 in float32 (the order of sums differs), and
    within bfloat16's rounding (1 %, relative norm) in bfloat16. Without gradients, the loss."""
    model = tiny_model()
    x, y = torch.randint(0, TINY.vocab_size, (3, 20)), torch.randint(0, TINY.vocab_size, (3, 20))
    results = []
    monkeypatch.setattr(minigpt.ChunkedCrossEntropy, "chunk", 7)
    for loss_fn in (book_loss, lm_loss):
        model.zero_grad()
        loss = loss_fn(model, x, y, dtype)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (chunked, chunked_grads) = results
    if dtype == torch.float32:
        assert chunked == pytest.approx(plain, abs=1e-6)
        for a, b in zip(chunked_grads, plain_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    else:
        assert chunked == pytest.approx(plain, rel=1e-2)
        assert all(relative_error(a, b) < 1e-2 for a, b in zip(chunked_grads, plain_grads))
    with torch.no_grad():
        assert lm_loss(model, x, y, dtype).item() == pytest.approx(chunked, abs=1e-6)


def test_cosine_learning_rate_counts_steps_from_1():
    args = argparse.Namespace(lr=1.0, warmup=10)
    lrs = [pretrain.learning_rate(args, s, 100) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert pretrain.learning_rate(argparse.Namespace(lr=0.5, warmup=0), 7, 100) == 0.5  # --warmup 0: constant


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    minigpt.save_checkpoint(tmp_path / "m.pt", model, note="hi")
    loaded, ck = minigpt.load_checkpoint(tmp_path / "m.pt")
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert ck["note"] == "hi" and loaded.lm_head.weight is loaded.wte.weight
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    untied = tiny_model(tied_head=False, embedding_std=1.0)  # the book's pretraining model
    minigpt.save_checkpoint(tmp_path / "u.pt", untied)
    loaded = minigpt.load_checkpoint(tmp_path / "u.pt")[0]
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.lm_head.weight, untied.lm_head.weight) and loaded.wte.weight.std() > 0.5
    (tmp_path / "u.pt").unlink()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(minigpt.DataError, match="not a minigpt checkpoint"):
        minigpt.load_checkpoint(tmp_path / "bad.pt")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with minigpt.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_svg_plot_is_valid_xml(tmp_path):
    minigpt.svg_plot(tmp_path / "p.svg", {"train": ([0, 100, 200], [9.5, 5.0, 2.25]),
                                          "val <&>": ([0, 100, 200], [9.8, 6.0, float("nan")])},
                     "tokens seen", "loss", "a & b")
    root = ET.parse(tmp_path / "p.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "val <&>" in texts and "tokens seen" in texts


def test_tokenizer_failure_says_how_to_run_offline(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(minigpt.tiktoken, "get_encoding", offline)
    with pytest.raises(minigpt.DataError, match="TIKTOKEN_CACHE_DIR"):
        minigpt.get_tokenizer()


# ---------------------------------------------------------------- data files

def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_fetch_uses_the_mirror_and_refuses_a_wrong_checksum(data_dir, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "f.txt").write_bytes(b"hello")
    monkeypatch.setenv("MINIGPT_MIRROR", str(mirror))
    path = minigpt.fetch("f.txt", "http://127.0.0.1:9/f.txt", sha(b"hello"))
    assert path == data_dir / "f.txt" and path.read_bytes() == b"hello"
    (mirror / "g.txt").write_bytes(b"tampered")
    with pytest.raises(minigpt.DataError, match="wrong sha256"):
        minigpt.fetch("g.txt", "http://127.0.0.1:9/g.txt", sha(b"original"))
    assert not (data_dir / "g.txt").exists()


def test_fetch_offline_error_names_file_url_and_mirror(data_dir):
    with pytest.raises(minigpt.DataError) as e:
        minigpt.fetch("the-verdict.txt", "http://127.0.0.1:9/the-verdict.txt", sha(b"x"))
    for word in ("the-verdict.txt", "http://127.0.0.1:9/the-verdict.txt", "MINIGPT_MIRROR"):
        assert word in str(e.value)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload` at any path, honouring `Range: bytes=N-` as a real server does.
    With `cut_at`, the first answer announces every byte but closes after `cut_at`."""
    payload, ranges, cut_at = b"", [], None

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        type(self).ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        end, type(self).cut_at = self.cut_at or len(self.payload), None
        self.wfile.write(self.payload[start:end])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_download_resumes_a_partial_file_and_checks_it(data_dir, server):
    RangeHandler.payload, RangeHandler.ranges = bytes(range(256)) * 5000, []
    part = data_dir / "big.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(RangeHandler.payload[:300_000])  # an earlier download, cut off
    path = minigpt.fetch("big.bin", f"{server}/big.bin", sha(RangeHandler.payload))
    assert path.read_bytes() == RangeHandler.payload and not part.exists()
    assert RangeHandler.ranges == [300_000]  # only the missing bytes were asked for
    RangeHandler.ranges, RangeHandler.cut_at = [], 500_000  # the connection drops mid-file
    with pytest.raises(minigpt.DataError, match="stopped at 500,000 of 1,280,000 bytes"):
        minigpt.fetch("cut.bin", f"{server}/cut.bin", sha(RangeHandler.payload))
    assert (data_dir / "cut.bin.part").stat().st_size == 500_000  # kept, to resume from
    assert minigpt.fetch("cut.bin", f"{server}/cut.bin", sha(RangeHandler.payload)).read_bytes() == RangeHandler.payload
    assert RangeHandler.ranges == [0, 500_000]
    with pytest.raises(minigpt.DataError, match="wrong sha256"):
        minigpt.fetch("other.bin", f"{server}/other.bin", sha(b"something else"))
    assert not (data_dir / "other.bin").exists() and not (data_dir / "other.bin.part").exists()


# ---------------------------------------------------------------- GPT-2 weights

HF_TINY = minigpt.GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2)  # hf_gpt2()'s shape


def hf_gpt2(n_embd=32, n_layer=2, n_head=2, n_positions=64, seed=0):
    """A randomly initialised GPT-2 from `transformers`; the calling test skips where it is missing."""
    transformers = pytest.importorskip("transformers", exc_type=ImportError, reason="the parity tests need transformers "
                                                              "(pip install -r requirements-test.txt)")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions)
    return transformers.GPT2LMHeadModel(cfg).eval()


def assert_same_as_hf(hf, model, n_tokens=20):
    idx = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(idx).logits, model(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    prompt = idx[:1, :6]
    greedy = hf.generate(prompt, max_new_tokens=n_tokens, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    for use_cache in (True, False):
        assert torch.equal(minigpt.generate(model, prompt, n_tokens, use_cache=use_cache), greedy)
    return (got - expected).abs().max().item()


def test_loads_a_save_pretrained_folder_and_matches_transformers(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    assert_same_as_hf(hf, minigpt.load_model(tmp_path / "hf"))  # straight from the safetensors file
    cfg = minigpt.config_from_hf(tmp_path / "hf" / "config.json")
    out = minigpt.convert(tmp_path / "hf" / "model.safetensors", cfg, tmp_path / "converted")
    assert_same_as_hf(hf, minigpt.load_model(out))               # from the converted .npy files
    assert {p.name for p in out.iterdir()} >= {"config.json", "wte.weight.npy", "h.1.attn.c_attn.weight.npy"}


def hub_layout(hf, dtype=torch.float32):
    """The tensors of OpenAI's file on the Hub: no `transformer.` prefix, per-layer mask buffers."""
    tensors = {k.removeprefix("transformer."): v.to(dtype).contiguous() for k, v in hf.state_dict().items()
               if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reads_the_hub_layout_in_f32_f16_bf16(tmp_path, dtype):
    hf = hf_gpt2()
    save_file = pytest.importorskip("safetensors.torch").save_file  # an independent writer of the format
    save_file(hub_layout(hf, dtype), tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = dict(minigpt.gpt2_tensors(tmp_path / "model.safetensors"))
    assert "h.0.attn.bias" not in got and "h.0.attn.c_attn.bias" in got
    for name, value in hf.transformer.state_dict().items():
        expected = value.to(dtype).float()
        assert torch.equal(torch.from_numpy(got[name]), expected), name
    if dtype == torch.float32:
        minigpt.convert(tmp_path / "model.safetensors", HF_TINY, tmp_path / "c")
        assert_same_as_hf(hf, minigpt.load_model(tmp_path / "c"))


def test_truncated_or_corrupted_weights_are_refused(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    good = (tmp_path / "hf" / "model.safetensors").read_bytes()
    cfg = HF_TINY
    cases = {"truncated": good[:-1000], "header": good[:8] + b"{not json" + good[17:], "empty": b"",
             "wrong shape": None}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if data is None:  # a well-formed file of another model size
            hf_gpt2(n_embd=16).save_pretrained(tmp_path / "other")
            path = tmp_path / "other" / "model.safetensors"
        else:
            path.write_bytes(data)
        with pytest.raises(minigpt.DataError) as e:
            minigpt.convert(path, cfg, tmp_path / "out")
        assert str(path) in str(e.value) or "shape" in str(e.value), name
        assert not (tmp_path / "out").exists()  # nothing half-converted is left
    assert "truncated" in str(pytest.raises(minigpt.DataError, minigpt.convert, tmp_path / "truncated.safetensors",
                                            cfg, tmp_path / "out").value)


def test_gpt2_name_uses_the_mirror_then_converted_files(data_dir, tmp_path, monkeypatch):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    blob = (tmp_path / "hf" / "model.safetensors").read_bytes()
    mirror = tmp_path / "mirror"
    (mirror / "gpt2-tiny").mkdir(parents=True)
    (mirror / "gpt2-tiny" / "model.safetensors").write_bytes(blob)
    monkeypatch.setitem(minigpt.GPT2_FILES, "gpt2-tiny", ("none", "main", sha(blob)))
    monkeypatch.setitem(minigpt.PRESETS, "gpt2-tiny", HF_TINY)
    monkeypatch.setattr(minigpt, "HF_URL", "http://127.0.0.1:9/{repo}/{revision}")
    with pytest.raises(minigpt.DataError, match="MINIGPT_MIRROR"):  # no network, no mirror
        minigpt.load_model("gpt2-tiny")
    monkeypatch.setenv("MINIGPT_MIRROR", str(mirror))
    assert_same_as_hf(hf, minigpt.load_model("gpt2-tiny"))
    assert (data_dir / "gpt2" / "gpt2-tiny" / "config.json").exists()
    (data_dir / "gpt2-tiny" / "model.safetensors").unlink()  # later loads read only the converted files
    monkeypatch.delenv("MINIGPT_MIRROR")
    assert_same_as_hf(hf, minigpt.load_model("gpt2-tiny"))


@pytest.fixture(scope="module")
def hf_124m(tmp_path_factory):
    """(a random GPT-2 of the 124M shape from transformers, the folder its save_pretrained wrote)."""
    hf = hf_gpt2(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    folder = tmp_path_factory.mktemp("hf-124m")
    hf.save_pretrained(folder)
    return hf, folder


def test_gpt2_124m_shape_matches_transformers(hf_124m, tmp_path):
    hf, folder = hf_124m
    out = minigpt.convert(folder / "model.safetensors", minigpt.PRESETS["gpt2-small"], tmp_path / "c")
    model = minigpt.load_model(out)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert_same_as_hf(hf, model)


def test_the_default_dtype_generates_transformers_greedy_tokens_for_the_124m_shape(hf_124m, tokenizer, monkeypatch, capsys):
    hf, folder = hf_124m
    made, generate = [], minigpt.generate
    monkeypatch.setattr(minigpt, "generate", lambda *args, **kw: made.append(generate(*args, **kw)) or made[-1])
    minigpt.main(["--model", str(folder), "--prompt", "Every effort moves you", "--max-new-tokens", "20",
                  "--temperature", "0"])
    got = made[0][0]
    assert capsys.readouterr().out == tokenizer.decode(got.tolist()) + "\n"  # what it printed is what it made
    prompt = torch.tensor([tokenizer.encode("Every effort moves you")])
    greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))[0]
    differs = [t for t in range(min(len(got), len(greedy))) if got[t] != greedy[t]]
    if not differs or minigpt.pick_dtype("auto", "cpu") == torch.float32:
        assert torch.equal(got, greedy)
        return
    # bfloat16 moves these logits by up to 0.03 (largest |difference| from float32 on this path,
    # measured): the two may part only where transformers' top two tokens are closer than twice that.
    t = differs[0]
    with torch.no_grad():
        logits = hf(greedy[None, :t]).logits[0, -1]
    assert logits[greedy[t]] - logits[got[t]] < 0.06, f"token {t}: a clear winner was lost"


def test_command_line_generates_from_a_save_pretrained_folder(tmp_path):
    hf_gpt2().save_pretrained(tmp_path / "hf")
    run = subprocess.run([sys.executable, str(HERE / "minigpt.py"), "--model", str(tmp_path / "hf"),
                          "--prompt", "Every effort moves you", "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Every effort moves you") and "tokens/s" in run.stderr


def test_command_line_without_weights_or_network_says_what_to_do(data_dir, monkeypatch, capsys):
    monkeypatch.setattr(minigpt, "HF_URL", "http://127.0.0.1:9/{repo}/{revision}")
    with pytest.raises(minigpt.DataError) as e:
        minigpt.main(["--model", "gpt2-small", "--max-new-tokens", "1"])
    assert "gpt2-small/model.safetensors" in str(e.value) and "MINIGPT_MIRROR" in str(e.value)


REAL = minigpt.DATA_DIR / "gpt2" / "gpt2-small" / "config.json"


@pytest.mark.skipif(not REAL.exists(), reason="OpenAI's GPT-2 weights are not converted in data/gpt2/gpt2-small")
def test_real_gpt2_small_greedy_continuation(tokenizer):
    model = minigpt.load_model("gpt2-small")
    text = minigpt.complete(model, tokenizer, "Every effort moves you", 15)
    assert text == "Every effort moves you forward.\n\nThe first step is to understand the importance of your work"


# ---------------------------------------------------------------- pretrain.py

import pretrain  # noqa: E402  (here, next to the tests that use it)


@needs_mirror
def test_pretrain_runs_and_writes_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIGPT_MIRROR", str(MIRROR))
    pretrain.main(["--preset", "tiny", "--context-length", "32", "--epochs", "1", "--eval-every", "20",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000001): Train loss" in out and "Sample after epoch 1" in out and "tokens/s" in out
    model, _ = minigpt.load_checkpoint(tmp_path / "model.pt")
    assert model.cfg.context_length == 32
    ET.parse(tmp_path / "loss.svg")
    assert json.loads((tmp_path / "history.json").read_text())["train"]


def test_windows_shift_targets_share_steps_and_continue():
    ids = np.arange(100, dtype="<u2")
    x, y = pretrain.window_batch(ids, [3, 50], 4)
    assert x.tolist() == [[3, 4, 5, 6], [50, 51, 52, 53]] and y.tolist() == [[4, 5, 6, 7], [51, 52, 53, 54]]
    first = lambda batches: sorted(int(s) for x, _ in batches for s in x[:, 0])  # the windows' starts
    for how in ("random", "sliding"):
        # 2 processes x 2 micro-batches x 3 windows, or 1 process x 2 x 6: the same 12 windows a step.
        two = [pretrain.Windows(ids, 4, 3, 2, rank, 2, seed=0, how=how) for rank in (0, 1)]
        one = pretrain.Windows(ids, 4, 6, 2, 0, 1, seed=0, how=how)
        assert one.steps_per_epoch == two[0].steps_per_epoch == 2  # 24 side-by-side windows: 2 steps of 12
        for step in (1, 2):
            shares = [w.micro_batches(step) for w in two]
            assert len(shares[0]) == 2 and first(one.micro_batches(step)) == first(shares[0] + shares[1])
            assert first(shares[0]) != first(shares[1])  # each process its own share
        assert first(pretrain.Windows(ids, 4, 6, 2, 0, 1, seed=0, how=how).micro_batches(2)) == \
            first(one.micro_batches(2))  # step 2 alone, as after resuming at step 1: the same windows
    sliding = [s for step in (1, 2) for s in first(one.micro_batches(step))]
    assert sorted(sliding) == list(range(0, 96, 4))  # sliding (the last): each window once per epoch


def english(n_words, seed=0):
    """Made-up text with lines and paragraphs: sentences of common words."""
    rng = np.random.default_rng(seed)
    words = "the a man woman house sea ship book letter said walked saw old new long day night".split()
    lines = []
    for i in range(n_words // 8):
        sentence = " ".join(rng.choice(words, 8))
        lines.append(sentence.capitalize() + (".\n\n" if i % 5 == 4 else ".\n"))
    return "".join(lines)


def test_text_pieces_tokenize_exactly_like_the_whole_text(tmp_path, tokenizer):
    body = ("Chapter 1\n\n\n  Indented line.\n\tTabbed.\nA line ending in spaces   \nNext\n\n"
            "<|endoftext|>\nCafé, naïve—“quotes”.\n\n\nThe end\n") * 20
    book = tmp_path / "book.txt"
    book.write_bytes(("Project Gutenberg license header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
                      + body + "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicense footer\n")
                     .replace("\n", "\r\n").encode())
    pieces = list(pretrain.text_pieces(book, size=30))
    assert len(pieces) > 20 and "".join(pieces) == body  # header and footer gone, CRLF read as \n
    whole = tokenizer.encode(body, allowed_special={"<|endoftext|>"})
    assert [i for p in pieces for i in tokenizer.encode(p, allowed_special={"<|endoftext|>"})] == whole
    plain = tmp_path / "plain.txt"
    plain.write_text(body)  # no Gutenberg lines: all of it
    assert "".join(pretrain.text_pieces(plain, size=30)) == body


def test_token_files_split_every_document_and_are_reused(tmp_path, tokenizer, capsys):
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    texts = {"a.txt": english(400, 1), "more/b.txt": english(300, 2)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "notes.md").write_text("not a .txt file")
    args = ["--text", str(folder), "--prepare-only", "--context-length", "8"]
    assert pretrain.main(args) is None
    [out] = (minigpt.DATA_DIR / "tokens").glob("texts-*")
    meta = json.loads((out / "tokens.json").read_text())
    train = np.fromfile(out / "train.bin", dtype="<u2").tolist()
    validation = np.fromfile(out / "validation.bin", dtype="<u2").tolist()
    a, b = (tokenizer.encode(texts[name]) for name in ("a.txt", "more/b.txt"))
    ka, kb = int(0.9 * len(a)), int(0.9 * len(b))
    assert train == a[:ka] + [minigpt.EOT] + b[:kb]                 # documents joined with <|endoftext|>
    assert validation == a[ka:] + [minigpt.EOT] + b[kb:]            # the last 10 % of each document
    assert meta["train_tokens"] == len(train) and meta["validation_tokens"] == len(validation)
    assert [d["sha256"] for d in meta["documents"]] == [minigpt.sha256_of(folder / n) for n in texts]
    assert "Reusing" not in capsys.readouterr().out
    pretrain.main(args)
    assert f"Reusing the token files in {out}" in capsys.readouterr().out
    (folder / "a.txt").write_text(texts["a.txt"] + "Changed.\n")  # other sources: other files
    pretrain.main(args)
    assert len(list((minigpt.DATA_DIR / "tokens").glob("texts-*"))) == 2


def test_bad_text_gives_a_clear_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("Too short.\n")
    for given, message in ((tmp_path / "latin1.txt", "is not UTF-8 text"), (tmp_path / "empty", r"no \*\.txt files"),
                           (tmp_path / "missing.txt", "no such file"), (tmp_path / "short.txt", "too little text")):
        with pytest.raises(minigpt.DataError, match=message):
            pretrain.main(["--text", str(given), "--context-length", "8"])


@pytest.mark.parametrize("flags,words", [
    (["--context-length", "0"], "must be at least 1"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--grad-accum", "0"], "must be at least 1"),
    (["--max-steps", "-2"], "must be at least 1"),
    (["--epochs", "0"], "must be at least 1"),
    (["--dropout", "2"], "must be less than 1"),
    (["--lr", "0"], "must be greater than 0"),
    (["--warmup", "-1"], "must be at least 0"),
    (["--eval-every", "0"], "must be at least 1"),
    (["--out", "/etc/hostname"], "exists and is not a folder"),
    (["--out", "/proc/version/runs"], "cannot write into")])
def test_pretrain_refuses_bad_flags_before_any_work(capsys, flags, words):
    got, message = outcome(pretrain.main, flags, capsys)
    assert (got, words in message) == (2, True), message
    assert "Traceback" not in message


def test_flops_per_token_counts_the_output_layer_once_and_no_lookup_tables():
    tied = minigpt.GPT(TINY)
    flops, n = pretrain.flops_per_token(tied)
    assert n == sum(p.numel() for p in tied.parameters()) - TINY.context_length * TINY.emb_dim
    assert flops == 6 * n + 12 * TINY.n_layers * TINY.context_length * TINY.emb_dim
    untied = minigpt.GPT(replace(TINY, tied_head=False))
    assert pretrain.flops_per_token(untied)[1] == n  # its token table is looked up, its head multiplies


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "long.txt").write_text(english(2000))  # ~2,400 tokens: random windows, all in one epoch
    (folder / "short.txt").write_text(english(240))  # ~290 tokens: 3 steps per epoch of sliding windows
    return folder


def weights(path):
    return minigpt.load_checkpoint(path)[0].state_dict()


@pytest.mark.parametrize("windows,dtype", [("random", "bfloat16"), ("sliding", "float32")])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(small_corpus, tmp_path, monkeypatch, capsys, windows,
                                                             dtype):
    """Ctrl+C during step 2, --stop-at 4, then to the end (6 steps): bit for bit the same weights and
    losses as one run on this CPU; dropout and gradient accumulation on, so that every generator
    and the data position must be restored. The sessions after the first are resumed without
    --dtype: on any CPU, one of the two dtypes differs from what auto would pick, so a resumed run
    that did not keep its dtype fails here. Plain python runs no distributed code."""
    monkeypatch.setattr(torch.distributed, "init_process_group", None)  # calling it would fail
    text = small_corpus / ("long.txt" if windows == "random" else "short.txt")
    plan = ["--text", str(text), "--preset", "tiny", "--context-length", "16", "--batch-size", "2",
            "--grad-accum", "2", "--dropout", "0.1", "--max-steps", "6", "--windows", windows,
            "--eval-every", "2", "--eval-windows", "4"]
    assert pretrain.main(plan + ["--dtype", dtype, "--out", str(tmp_path / "whole")]) is None

    micro_batches = pretrain.Windows.micro_batches

    def ctrl_c_in_step_2(windows, step):  # called once per training step, before it runs
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return micro_batches(windows, step)

    out = ["--out", str(tmp_path / "sessions")]
    monkeypatch.setattr(pretrain.Windows, "micro_batches", ctrl_c_in_step_2)
    assert pretrain.main(plan + ["--dtype", dtype] + out) == 130
    monkeypatch.setattr(pretrain.Windows, "micro_batches", micro_batches)
    training = minigpt.load_checkpoint(tmp_path / "sessions" / "model.pt")[1]["training"]
    assert training["progress"]["step"] == 2 and training["args"]["dtype"] == dtype
    with pytest.raises(minigpt.DataError, match="trained with --lr 0.002, not 0.01"):
        pretrain.main(out + ["--resume", "--lr", "0.01"])
    other = {"bfloat16": "float32", "float32": "bfloat16"}[dtype]
    with pytest.raises(minigpt.DataError, match=f"trained with --dtype {dtype}, not {other}"):
        pretrain.main(out + ["--resume", "--dtype", other])
    assert pretrain.main(out + ["--resume", "--stop-at", "4", "--save-every", "3"]) is None
    log = capsys.readouterr().out
    assert f"Resuming {tmp_path / 'sessions' / 'model.pt'} after step 2 of 6 ({dtype})" in log
    assert "Saved step 3" in log and "Stopped after step 4 of 6" in log
    assert pretrain.main(out + ["--resume"]) is None
    assert "Final loss" in capsys.readouterr().out

    whole, resumed = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "sessions" / "model.pt")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    histories = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "sessions")]
    assert histories[0]["validation"] == histories[1]["validation"] and len(histories[0]["validation"]) == 4
    assert pretrain.main(out + ["--resume"]) is None
    assert "has finished all its 6 steps" in capsys.readouterr().out


def distributed_plan(small_corpus):
    return ["--text", str(small_corpus / "long.txt"), "--preset", "tiny", "--context-length", "16",
            "--max-steps", "4", "--windows", "random", "--eval-every", "2", "--eval-windows", "4",
            "--save-every", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def one_process(small_corpus, tmp_path_factory):
    """The reference for the torchrun tests: one process, 4 windows per step."""
    out = tmp_path_factory.mktemp("one")
    pretrain.main(distributed_plan(small_corpus) + ["--batch-size", "4", "--out", str(out)])
    return out


def assert_same_run(out, reference):
    """Two runs with the same global batch: the same losses and weights, to float tolerance."""
    expected, got = (json.loads((folder / "history.json").read_text()) for folder in (reference, out))
    assert got["validation"] == pytest.approx(expected["validation"], abs=1e-4)
    assert got["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-4)
    one, other = weights(reference / "model.pt"), weights(out / "model.pt")
    assert all(torch.allclose(other[name], one[name], atol=1e-4) for name in one)


def test_two_micro_batches_take_the_step_of_one_batch(small_corpus, one_process, tmp_path):
    """--grad-accum 2 of 2 windows against one batch of 4: the gradients are their mean, so the
    same losses and weights (pretrain.py's own loop, with its gradient clipping)."""
    pretrain.main(distributed_plan(small_corpus) + ["--batch-size", "2", "--grad-accum", "2",
                                                    "--out", str(tmp_path / "accum")])
    assert_same_run(tmp_path / "accum", one_process)


def test_torchrun_two_processes_match_one_process(small_corpus, one_process, tmp_path):
    """torchrun, 2 CPU processes (gloo, loopback only), 2 windows each per step, against one process
    with 4 windows per step, and with 2 micro-batches of 2: the same losses and weights to float
    tolerance. Both processes exit 0, with no deprecation warning; the checkpoint is saved once and loads in
    minigpt.py."""
    plan = distributed_plan(small_corpus)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "pretrain.py"), *plan, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FutureWarning" not in run.stderr, run.stderr[-3000:]
    assert "2 windows x 1 micro-batches x 2 process(es) = 4 windows" in run.stdout
    assert run.stdout.count("Final loss") == 1  # process 0 alone reports
    pretrain.main(plan + ["--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "accum")])
    for out in ("two", "accum"):
        assert_same_run(tmp_path / out, one_process)
    generated = subprocess.run([sys.executable, "minigpt.py", "--model", str(tmp_path / "two" / "model.pt"),
                                "--max-new-tokens", "5", "--prompt", "The sea"],
                               capture_output=True, text=True, timeout=60, cwd=HERE)
    assert generated.returncode == 0 and generated.stdout.startswith("The sea"), generated.stderr


def network_namespaces():
    """None if this machine can make network namespaces joined by a veth pair, else why not."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs Linux and root, for ip netns"
    name = f"minigpt-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        return "needs the ip command (Debian: apt-get install iproute2)"
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name])
    return None


@pytest.mark.skipif(network_namespaces() is not None, reason=str(network_namespaces()))
def test_torchrun_on_two_hosts_matches_one_process(small_corpus, one_process, tmp_path):
    """Two hosts: two network namespaces joined by a veth pair, addresses that exist only inside
    them, one process on each, started with the README's several-machines command. Both torchruns
    exit 0 and the run equals one process with the same global batch."""
    hosts = [f"minigpt-{os.getpid()}-{n}" for n in (0, 1)]
    addresses = ["10.213.47.1", "10.213.47.2"]
    links = [f"mg{os.getpid() % 100000}v{n}" for n in (0, 1)]  # interface names: at most 15 characters
    sh = lambda *command: subprocess.run(command, check=True, capture_output=True)
    nodes = []
    try:
        for host in hosts:
            sh("ip", "netns", "add", host)
        sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for host, link, address in zip(hosts, links, addresses):
            sh("ip", "link", "set", link, "netns", host)
            sh("ip", "-n", host, "addr", "add", f"{address}/30", "dev", link)
            sh("ip", "-n", host, "link", "set", link, "up")
            sh("ip", "-n", host, "link", "set", "lo", "up")
        for n, (host, link) in enumerate(zip(hosts, links)):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": link}
            command = ["ip", "netns", "exec", host, sys.executable, "-m", "torch.distributed.run",
                       "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=1", f"--master-addr={addresses[0]}",
                       "--master-port=29500", str(HERE / "pretrain.py"), *distributed_plan(small_corpus),
                       "--batch-size", "2", "--out", str(tmp_path / f"host{n}")]
            nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, cwd=HERE))
        outputs = [node.communicate(timeout=120) for node in nodes]
        for node, (stdout, stderr) in zip(nodes, outputs):
            assert node.returncode == 0, stderr[-3000:]
        assert "2 windows x 1 micro-batches x 2 process(es) = 4 windows" in outputs[0][0]
        assert not (tmp_path / "host1" / "model.pt").exists()  # process 0 alone saves
        assert_same_run(tmp_path / "host0", one_process)
    finally:
        for node in nodes:
            node.kill()
        for host in hosts:
            subprocess.run(["ip", "netns", "delete", host], capture_output=True)


# ---------------------------------------------------------------- finetune.py

import finetune  # noqa: E402  (here, next to the tests that use it)


def test_label_tab_lines_split_at_the_first_tab_and_keep_text_exact(tmp_path):
    path = tmp_path / "sms.txt"
    path.write_bytes('ham\t"Quoted" start, never closed\nspam\tWin £100\tnow \n\nham\t  spaces kept \n'.encode())
    assert finetune.read_examples(path) == [("ham", '"Quoted" start, never closed'), ("spam", "Win £100\tnow "),
                                            ("ham", "  spaces kept ")]  # the blank line is skipped
    path.write_bytes("\ufeffham\tfirst\r\nspam\tsecond\r\n".encode())  # Notepad: a BOM and CRLF
    assert finetune.read_examples(path) == [("ham", "first"), ("spam", "second")]


def test_csv_and_tsv_with_a_header_quotes_and_newlines(tmp_path):
    csv_file = tmp_path / "tickets.csv"
    csv_file.write_text('id,body,team\n1,"Refund, please",billing\n2,"Line one\nline ""two""",support\n'
                        '\n3,plain,sales\n', encoding="utf-8")
    assert finetune.read_examples(csv_file, "body", "team") == [
        ("billing", "Refund, please"), ("support", 'Line one\nline "two"'), ("sales", "plain")]
    tsv_file = tmp_path / "reviews.tsv"
    tsv_file.write_text('label\ttext\npos\t"great" film\nneg\tdull\n', encoding="utf-8")  # no quoting in TSV
    assert finetune.read_examples(tsv_file) == [("pos", '"great" film'), ("neg", "dull")]


@pytest.mark.parametrize("name,content,message", [
    ("a.txt", b"ham\tfine\nspam no tab here\n", "a.txt, line 2: expected 'label<TAB>text'"),
    ("a.txt", b"ham\tfine\nham\t\xff\xfe\n", "a.txt, line 2: not UTF-8"),
    ("a.txt", b"ham\tfine\nspam\t   \n", "a.txt, line 2: the text is empty"),
    ("a.txt", b"ham\tfine\n\tno label\n", "a.txt, line 2: the label is empty"),
    ("a.txt", b"ham\tone\nham\ttwo\n", "every example has the label 'ham'"),
    ("a.txt", b"", "is empty"),
    ("a.csv", b"message,label\nhi,a\n", "line 1: no column 'text'"),
    ("a.csv", b"text,label\n\"a\nb\",x\n,y\n", "a.csv, line 4: the text is empty"),  # record 2 starts on line 4
    ("a.csv", b"text,label\nonly one field\n", "line 2: 1 fields, but the header has 2"),
    ("a.csv", b"text,label\n", "has a header but no examples"),
    ("a.csv", b'text,label\n"never closed,a\n', "not valid CSV")])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(minigpt.DataError, match=re.escape(message)):
        finetune.read_examples(path)


def test_missing_and_folder_data_files_are_clear_errors(tmp_path):
    with pytest.raises(minigpt.DataError, match="cannot read"):
        finetune.read_examples(tmp_path / "nope.csv")
    with pytest.raises(minigpt.DataError, match="is a folder"):
        finetune.read_examples(tmp_path)


def synthetic_messages(n_ham=60, n_spam=20, seed=0):
    rng = np.random.default_rng(seed)
    ham_words = "see you at lunch later ok thanks love home dinner tomorrow".split()
    spam_words = "WIN cash PRIZE claim now call 0800 FREE txt urgent".split()
    return ([("ham", " ".join(rng.choice(ham_words, 6))) for _ in range(n_ham)] +
            [("spam", " ".join(rng.choice(spam_words, 6))) for _ in range(n_spam)])


def test_balance_and_split_are_deterministic():
    messages = synthetic_messages() + [("ham", "dup"), ("ham", "dup")]
    a, b = (finetune.balanced_split(messages, seed=1) for _ in range(2))
    assert a == b and a != finetune.balanced_split(messages, seed=2)
    assert [len(a[k]) for k in ("train", "validation", "test", "unseen")] == [28, 4, 8, 42]
    balanced = a["train"] + a["validation"] + a["test"]
    assert sum(label == "spam" for label, _ in balanced) == 20
    assert sorted(balanced + a["unseen"]) == sorted(messages)  # every message used exactly once
    assert len(finetune.balanced_split(list(dict.fromkeys(messages)), seed=1)["unseen"]) == 41


def test_stratified_split_keeps_each_class_in_proportion():
    examples = [(label, f"{label} {i}") for label, n in (("a", 500), ("b", 300), ("c", 30)) for i in range(n)]
    splits = finetune.stratified_split(examples, seed=3)
    for name, share in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        counts = Counter(label for label, _ in splits[name])
        for label, n in (("a", 500), ("b", 300), ("c", 30)):
            assert abs(counts[label] - share * n) <= 1, (name, label)
    assert splits["unseen"] == [] and sorted(sum((splits[k] for k in finetune.SPLITS), [])) == sorted(examples)
    with pytest.raises(minigpt.DataError, match="class 'c' has 9 examples: too few to appear in the validation"):
        few = examples[:800] + examples[800:809]
        finetune.check_every_class_in_every_split(finetune.stratified_split(few, seed=3), few, False)


@needs_mirror
def test_the_real_collection_parses_to_the_published_counts():
    messages = finetune.read_examples(MIRROR / "SMSSpamCollection")
    assert len(messages) == 5574 and sum(label == "spam" for label, _ in messages) == 747
    # Lines 5,082-5,084: an unclosed quote that makes CSV readers merge three messages into one.
    assert messages[5081][1].startswith('"Keep ur problems') and messages[5081][1].endswith("SD..")
    assert messages[5082] == ("ham", "Yeah, give me a call if you've got a minute")
    assert messages[5083][1].startswith('"HI BABE') and messages[5083][1].endswith('CALL U"')
    splits = finetune.balanced_split(messages, seed=123)
    assert [len(splits[k]) for k in ("train", "validation", "test", "unseen")] == [1045, 149, 300, 4080]
    # The very same splits as before labels became general (this digest was computed with that
    # code, finetune.split_sms at commit 43ab457): same figures for `python finetune.py`.
    digest = hashlib.sha256(json.dumps([splits[k] for k in ("train", "validation", "test")]).encode()).hexdigest()
    assert digest == "7bdb7a83c47f25505c7bd81bd67128f40c02694dd79ee74a7f2b0a3c02a1b6fd"


@needs_mirror
def test_passages_come_from_six_sources(monkeypatch):
    monkeypatch.setenv("MINIGPT_MIRROR", str(MIRROR))
    examples = finetune.passages(per_class=50, seed=1)
    counts = Counter(label for label, _ in examples)
    assert sorted(counts) == ["middlemarch", "moby-dick", "pride-and-prejudice", "shakespeare", "the-verdict",
                              "war-and-peace"] and set(counts.values()) == {50}
    assert all(80 <= len(text) <= 400 and "Gutenberg" not in text and "\n" not in text for _, text in examples)
    assert examples == finetune.passages(per_class=50, seed=1)


def test_baselines_majority_and_character_trigrams():
    train = [("a", "the cat sat on the mat")] * 3 + [("b", "zzqx vvqz xxzq")] * 2
    test = [("a", "a cat on a mat"), ("b", "qzzx zvvq"), ("a", "the hat")]
    assert finetune.baselines(train, test, ["a", "b"]) == {"majority": 2 / 3, "char_3gram_centroid": 1.0}


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def tiny_base(trainable, seed=0, cfg=TINY):
    """The tiny random base model finetune.py starts from for `trainable` (NF4 layers for qlora)."""
    return finetune.base_model(dict(init="random", config=asdict(cfg), seed=seed, trainable=trainable), "cpu")


@pytest.mark.parametrize("trainable", finetune.TRAINABLE)
def test_each_trainable_choice_trains_exactly_its_parameters(trainable):
    model = finetune.make_classifier(tiny_base(trainable), trainable, 2, 16, 16)
    names = trainable_names(model)
    head = {"lm_head.weight", "lm_head.bias"}
    ln_f = {"ln_f.weight", "ln_f.bias"}
    last = {n for n, _ in model.named_parameters() if n.startswith("h.1.")}
    adapters = {f"h.{i}.{m}.{ab}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                for ab in "AB"}
    expected = {"head": head, "last_block": head | last | ln_f,
                "last_two_blocks": {n for n, _ in model.named_parameters() if n.startswith(("h.", "ln_f", "lm_head"))},
                "all": {n for n, _ in model.named_parameters()},
                "lora": head | ln_f | adapters, "qlora": head | ln_f | adapters}
    assert names == expected[trainable]
    assert all(isinstance(m.dense, finetune.NF4Dense) == (trainable == "qlora")
               for m in model.modules() if isinstance(m, finetune.LoRA))
    assert model.lm_head.weight.shape == (2, TINY.emb_dim) and model.wte.weight.shape[0] == TINY.vocab_size


def test_one_position_block_equals_the_full_block():
    model = tiny_model()
    x = model.embed(torch.randint(0, TINY.vocab_size, (3, 12)))
    positions = torch.tensor([0, 5, 11])
    with torch.no_grad():
        full = model.h[0](x)[torch.arange(3), positions]
        one = finetune.block_at(model.h[0], x, positions)
    torch.testing.assert_close(one, full, atol=1e-6, rtol=0)


def test_metrics_against_hand_counted_values():
    # true:      0 0 0 0 1 1 1 2 2 2
    # predicted: 0 0 1 2 1 1 0 2 2 1
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])
    m = finetune.classification_metrics(labels, predicted, 3)
    assert m["confusion"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx([2 / 3, 2 / 4, 2 / 3])   # column sums 3, 4, 3
    assert m["recall"] == pytest.approx([2 / 4, 2 / 3, 2 / 3])      # row sums 4, 3, 3
    f1 = [2 * p * r / (p + r) for p, r in ((2 / 3, 1 / 2), (1 / 2, 2 / 3), (2 / 3, 2 / 3))]
    assert m["f1"] == pytest.approx(f1) and m["macro_f1"] == pytest.approx(sum(f1) / 3)
    never_called = finetune.classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    assert never_called["precision"] == [0.5, 0.0] and never_called["f1"][1] == 0.0


def test_lora_starts_as_an_exact_no_op():
    plain = finetune.make_classifier(tiny_model(), "head", 2, 16, 16)
    lora = finetune.make_classifier(tiny_model(), "lora", 2, 4, 8)
    lora.lm_head.load_state_dict(plain.lm_head.state_dict())
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    with torch.no_grad():
        assert torch.equal(finetune.class_logits(lora, ids, lengths, "last_real"),
                           finetune.class_logits(plain, ids, lengths, "last_real"))
        lora.h[0].attn.c_attn.B.fill_(0.1)  # once B moves, the output moves
        assert not torch.equal(finetune.class_logits(lora, ids, lengths, "last_real"),
                               finetune.class_logits(plain, ids, lengths, "last_real"))


NF4_VALUES = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]  # as printed in QLoRA's reference code


def test_nf4_code_values_are_qloras_exactly():
    assert finetune.NF4.dtype == torch.float32 and finetune.NF4.tolist() == NF4_VALUES
    # Their construction: quantiles of N(0, 1), 8 for the positive side and 7 for the negative side,
    # from 0.5 up to the offset halfway between 1 - 1/(2*15) and 1 - 1/(2*16), plus 0, scaled to [-1, 1].
    offset = (1 - 1 / 30 + 1 - 1 / 32) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    torch.testing.assert_close(values / values.abs().max(), finetune.NF4.double(), atol=2e-7, rtol=0)
    # Two codes per byte, the first in the high 4 bits: a byte's row of NF4_PAIRS is its two values.
    assert finetune.NF4_PAIRS[0x3C].tolist() == [NF4_VALUES[3], NF4_VALUES[12]]


def unpacked_codes(q):
    return torch.stack((q["codes"] >> 4, q["codes"] & 15), dim=1).flatten().long()


@pytest.mark.parametrize("shape", [(256, 1024), (100, 77)])  # whole groups of 256 blocks; a part-filled one
def test_nf4_error_is_at_most_half_the_gap_to_the_neighbouring_code_value(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = finetune.nf4_quantize(w)
    n = w.numel()
    blocks = torch.nn.functional.pad(w.flatten(), (0, -n % 64)).view(-1, 64)
    absmax = blocks.abs().amax(dim=1)                                  # (nb,) the true scales
    codes = unpacked_codes(q)[:n]
    scaled = w.flatten() / absmax.repeat_interleave(64)[:n]            # in [-1, 1]
    nf4 = finetune.NF4
    # Half the gap to the neighbouring code value on the weight's side (1 and -1 have one side only).
    lower = torch.cat([torch.tensor([-1.0]), (nf4[1:] + nf4[:-1]) / 2])[codes]
    upper = torch.cat([(nf4[1:] + nf4[:-1]) / 2, torch.tensor([1.0])])[codes]
    assert ((scaled >= lower - 1e-6) & (scaled <= upper + 1e-6)).all()
    assert torch.equal(codes, (scaled[:, None] - nf4).abs().argmin(dim=1))  # so: the nearest code value
    # Double quantization: each scale within half an 8-bit step of its group's largest |scale - mean|.
    nb = len(absmax)
    step = q["scale_scales"].repeat_interleave(256)[:nb] / 127
    scales = q["scale_codes"][:nb] * step + q["scale_mean"]
    assert ((scales - absmax).abs() <= step / 2 + 1e-7).all()
    assert q["scale_codes"].abs().max() == 127 and (absmax.mean() - q["scale_mean"]).abs() < 1e-9
    # Together: each weight within half its gap times the true scale, plus its code value times the
    # scale's error.
    got = finetune.nf4_dequantize(q, shape).flatten()
    half_gap = torch.maximum(nf4[codes] - lower, upper - nf4[codes])
    scale_error = (scales - absmax).abs().repeat_interleave(64)[:n]
    bound = half_gap * absmax.repeat_interleave(64)[:n] + nf4[codes].abs() * scale_error
    assert ((got - w.flatten()).abs() <= bound + 1e-7).all()
    assert (got - w.flatten()).abs().max() > 0 and got.dtype == torch.float32


def test_nf4_packs_4_127_bits_per_weight():
    w = torch.randn(1024, 1024)
    q = finetune.nf4_quantize(w)
    n = w.numel()
    nbytes = sum(t.numel() * t.element_size() for t in q.values())
    assert nbytes == n // 2 + n // 64 + 4 * n // (64 * 256) + 4     # codes, scale codes, scale scales, mean
    assert round(8 * nbytes / n, 3) == 4.127                         # 4 + 8/64 + 32/16384 (+ 32/n)
    assert [q[k].dtype for k in ("codes", "scale_codes", "scale_scales", "scale_mean")] == \
        [torch.uint8, torch.int8, torch.float32, torch.float32]
    layer = finetune.NF4Dense(1024, 1024)  # the layer's buffers are sized for exactly these parts
    assert {k: t.shape for k, t in layer.named_buffers()} == {k: t.shape for k, t in q.items()}
    model = torch.nn.Sequential(layer)
    assert finetune.model_bytes(model) == (nbytes, 1024 * 4)          # NF4 parts; the float32 bias


def test_random_base_streamed_tensor_by_tensor_is_gpt_init():
    torch.manual_seed(3)
    streamed = dict(finetune.random_tensors(TINY))
    after_stream = torch.rand(3)
    torch.manual_seed(3)
    expected = minigpt.GPT(TINY).state_dict()
    after_init = torch.rand(3)
    del expected["lm_head.weight"]  # tied: wte.weight
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    assert torch.equal(after_stream, after_init)  # the same draws: the new head and adapters match too


def copy_to_plain(qlora, plain):
    """Give a lora classifier the qlora classifier's dequantized weights, adapters and head."""
    for name, m in qlora.named_modules():
        if isinstance(m, finetune.NF4Dense):
            plain.get_submodule(name).weight.data = m.dequantize()
    plain.load_state_dict({k: v for k, v in qlora.state_dict().items() if k in plain.state_dict()}, strict=False)


def test_fresh_qlora_model_equals_the_model_with_dequantized_weights():
    qlora = finetune.make_classifier(tiny_base("qlora"), "qlora", 2, 4, 8)
    plain = finetune.make_classifier(tiny_base("lora"), "lora", 2, 4, 8)
    copy_to_plain(qlora, plain)
    assert (qlora.h[0].attn.c_attn.B == 0).all()
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    for pool in finetune.POOLS:
        with torch.no_grad():
            assert torch.equal(finetune.class_logits(qlora, ids, lengths, pool), finetune.class_logits(plain, ids, lengths, pool))
    # Trained, the adapters move: the output and the gradients stay those of the dequantized model
    # (through NF4Matmul's own backward and the blocks' recomputation).
    for model in (qlora, plain):
        model.h[1].mlp.c_fc.B.data.fill_(0.1)
        model.train()
        finetune.class_logits(model, ids, lengths, "last_real").square().sum().backward()
    assert isinstance(qlora.h[0], finetune.CheckpointedBlock) and type(plain.h[0]) is minigpt.Block
    plain_parameters = dict(plain.named_parameters())
    assert trainable_names(qlora) == trainable_names(plain)
    for name in trainable_names(qlora):
        torch.testing.assert_close(qlora.get_parameter(name).grad, plain_parameters[name].grad, rtol=1e-5,
                                   atol=1e-6, msg=name)
    # Block 0's gradients come back through block 1's NF4 layers; A trains once its B is not zero.
    assert qlora.h[0].attn.c_attn.B.grad.abs().sum() > 0 and qlora.h[1].mlp.c_fc.A.grad.abs().sum() > 0


def test_qlora_in_bfloat16_dequantizes_to_bfloat16_and_trains_float32_adapters():
    model = finetune.make_classifier(tiny_base("qlora"), "qlora", 2, 16, 16)
    model.h[0].attn.c_attn.B.data.normal_(0, 0.1)
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    with torch.no_grad():
        expected = finetune.class_logits(model, ids, lengths, "last_real")
    with minigpt.autocast("cpu", torch.bfloat16):
        assert finetune.compute_dtype(torch.zeros(1)) == torch.bfloat16
        got = finetune.class_logits(model.train(), ids, lengths, "last_real")
    assert relative_error(got.detach(), expected) < BF16_TOLERANCE
    got.float().sum().backward()
    assert model.h[0].attn.c_attn.A.grad.dtype == torch.float32 and model.h[0].attn.c_attn.A.grad.abs().sum() > 0


def write_folder(model, folder):
    """A converted-model folder (config.json + one .npy per parameter), as minigpt.convert writes."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(asdict(model.cfg)))
    for name, p in model.state_dict().items():
        np.save(folder / f"{name}.npy", p.numpy())


def test_qlora_quantizes_each_weight_as_it_streams_from_npy_files(tmp_path):
    write_folder(tiny_model(seed=4), tmp_path / "base")
    cfg, tensors = minigpt.model_tensors(tmp_path / "base")
    seen = []  # weak references to the Dense weights read so far

    def watched(tensors):
        for name, a in tensors:
            a = torch.as_tensor(a)
            # Every weight matrix read before the previous one has been quantized and let go.
            assert all(ref() is None for ref in seen[:-1]), name
            if name.endswith(("attn.c_attn.weight", "c_proj.weight", "mlp.c_fc.weight")):
                seen.append(weakref.ref(a))
            yield name, a

    model = finetune.load_nf4(cfg, watched(tensors), "cpu")
    assert len(seen) == 4 * TINY.n_layers
    plain = minigpt.load_model(tmp_path / "base")
    for name, m in model.named_modules():
        if isinstance(m, finetune.NF4Dense):
            q = finetune.nf4_quantize(plain.get_submodule(name).weight)
            assert all(torch.equal(getattr(m, k), q[k]) for k in q), name
            assert torch.equal(m.bias, plain.get_submodule(name).bias)
    assert torch.equal(model.wte.weight, plain.wte.weight) and model.lm_head.weight is model.wte.weight
    float32_bytes = sum(4 * m.weight.numel() for m in plain.modules() if isinstance(m, minigpt.Dense))
    assert finetune.model_bytes(model)[0] < float32_bytes / 6  # not 7.8: tiny layers fill a quarter of a group


TEXTS = ["hello there", "WIN a free prize now, call 0800 123", "ok", "see you at lunch tomorrow then"]


def padded(ids):
    """(ids (N, T), lengths (N,)): lists of token ids padded on the right with <|endoftext|> to the
    longest, as the book's SpamDataset pads them."""
    longest = max(len(i) for i in ids)
    return torch.tensor([i + [minigpt.EOT] * (longest - len(i)) for i in ids]), torch.tensor([len(i) for i in ids])


def book_classifier(model, ids, lengths, pool):
    """The book's classifier: the whole model over the padded ids (B, T), its head read at the
    last position ('last'), the last real token ('last_real') or the mean of the real ones."""
    logits = model(ids)                                               # (B, T, classes)
    if pool == "mean":
        real = torch.arange(ids.shape[1]) < lengths[:, None]          # (B, T)
        return (logits * real[..., None]).sum(1) / lengths[:, None]
    return logits[torch.arange(len(ids)), lengths - 1 if pool == "last_real" else ids.shape[1] - 1]


@pytest.mark.parametrize("pool", finetune.POOLS)
@pytest.mark.parametrize("trainable", ["head", "last_block", "last_two_blocks", "lora"])
def test_the_fast_path_gives_the_book_classifiers_logits_and_loss(tokenizer, pool, trainable):
    """The book's classifier (the whole model over padded ids, read at one position) against
    class_logits: the frozen blocks' cached output, the last block at the read position only,
    and batches of similar length padded to their own longest."""
    torch.manual_seed(0)
    model = finetune.make_classifier(minigpt.GPT(replace(TINY, n_layers=3)).eval(), trainable, 2, 16, 16)
    ids, _ = minigpt.encode(TEXTS, tokenizer)
    padded_ids, lengths = padded(ids)
    labels = torch.tensor([0, 1, 0, 0])
    frozen = finetune.frozen_blocks(model, trainable)
    rows = finetune.model_inputs(ids, pool, padded_ids.shape[1])
    if frozen:
        rows = finetune.frozen_features(model, rows, frozen, "cpu", batch_size=3)
    with torch.no_grad():
        plain = book_classifier(model, padded_ids, lengths, pool)
        fast = finetune.class_logits(model, torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths,
                                    pool, frozen)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    loss = lambda logits: torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss(fast) == pytest.approx(loss(plain), abs=1e-5)
    probs = finetune.predict(model, finetune.Batches(rows, lengths, 3), pool, frozen)  # in batches of 3
    torch.testing.assert_close(probs, torch.softmax(plain, dim=-1), atol=1e-6, rtol=0)
    assert not probs.requires_grad  # measuring keeps no autograd graph, even while training is on


def test_bfloat16_frozen_blocks_and_cache_give_the_float32_logits(tokenizer):
    torch.manual_seed(0)
    model = finetune.make_classifier(minigpt.GPT(replace(TINY, n_layers=3)).eval(), "last_block", 2, 16, 16)
    ids, _ = minigpt.encode(TEXTS[:3], tokenizer)
    padded_ids, lengths = padded(ids)
    with torch.no_grad():
        expected = book_classifier(model, padded_ids, lengths, "last_real")
    frozen = finetune.frozen_blocks(model, "last_block")
    model.h[:frozen].to(torch.bfloat16)  # as finetune.py does in bfloat16: the frozen blocks cast once
    features = finetune.frozen_features(model, finetune.model_inputs(ids, "last_real", None), frozen, "cpu")
    assert features[0].dtype == torch.bfloat16  # stored in half the memory
    x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    with torch.no_grad(), minigpt.autocast("cpu", torch.bfloat16):
        got = finetune.class_logits(model, x, lengths, "last_real", frozen)
    assert relative_error(got, expected) < BF16_TOLERANCE


def test_padding_does_not_change_last_real_or_mean(tokenizer):
    model = finetune.make_classifier(tiny_model(), "last_block", 2, 16, 16)
    ids = torch.tensor(tokenizer.encode("free prize call now"))
    short = ids[None]
    padded = torch.cat([ids, torch.full((9,), minigpt.EOT)])[None]
    n = torch.tensor([len(ids)])
    with torch.no_grad():
        for pool in ("last_real", "mean"):
            for logits in (book_classifier, finetune.class_logits):
                torch.testing.assert_close(logits(model, padded, n, pool), logits(model, short, n, pool),
                                           atol=1e-6, rtol=0)


def write_messages(path, messages):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in messages), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny classifier finetuned end to end on a trivially separable synthetic set:
    (its folder, the model as finetuning left it in memory, meta)."""
    tmp = tmp_path_factory.mktemp("classifier")
    data = write_messages(tmp / "sms.txt", synthetic_messages(200, 100))
    model, meta = finetune.main(["--data", str(data), "--balance", "--init", "random", "--preset", "tiny",
                                 "--trainable", "all", "--lr", "1e-3", "--epochs", "3", "--unseen", "all",
                                 "--out", str(tmp / "out")])
    return tmp / "out", model, meta


@pytest.fixture(scope="module")
def tiny_classifier(tiny_run):
    return tiny_run[0]


def test_finetune_end_to_end_learns_a_separable_set(tiny_classifier):
    metrics = json.loads((tiny_classifier / "metrics.json").read_text())
    for key in ("train_accuracy", "validation_accuracy", "test_accuracy", "precision", "recall", "f1",
                "unseen_ham_false_positive_rate", "train_seconds"):
        assert 0 <= metrics[key] <= 1 or key == "train_seconds", key
    assert metrics["test_accuracy"] >= 0.9 and metrics["unseen_ham_false_positive_rate"] <= 0.1
    for plot in ("loss.svg", "accuracy.svg"):
        ET.parse(tiny_classifier / plot)


def probabilities(model, recipe, tokenizer, texts):
    """(class probabilities, token counts) of texts, read as finetune.py reads them."""
    ids, counts = minigpt.encode(texts, tokenizer, recipe["max_length"])
    rows = finetune.model_inputs(ids, recipe["pool"], recipe["max_length"])
    batches = finetune.Batches(rows, [len(i) for i in ids], 64)
    return finetune.predict(model, batches, recipe["pool"], 0).tolist(), counts


def test_saved_classifier_reloads_to_the_trained_models_predictions(tiny_run, tokenizer):
    folder, trained, trained_recipe = tiny_run
    texts = ["WIN cash PRIZE claim now", "see you at lunch later", "call me"]
    expected, _ = probabilities(trained, trained_recipe, tokenizer, texts)
    model, recipe = finetune.load_classifier(folder)
    probs, tokens = probabilities(model, recipe, tokenizer, texts)
    assert probs == expected and probs[0][1] > 0.5 > probs[1][1]  # [ham, spam] per text
    assert tokens == [len(tokenizer.encode(t)) for t in texts]


def test_qlora_finetune_learns_a_separable_set_and_reloads_to_identical_predictions(tmp_path, tokenizer):
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(200, 100))
    out = tmp_path / "out"
    trained, meta = finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable",
                                   "qlora", "--lr", "3e-3", "--epochs", "3", "--unseen", "0", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9 and metrics["trainable"] == "qlora"
    assert "unseen_accuracy" not in metrics  # --unseen 0: nothing measured
    saved = torch.load(out / "classifier.pt", weights_only=True)["state"]
    assert set(saved) == trainable_names(trained) and {"ln_f.weight", "lm_head.weight"} <= set(saved)
    assert all(name.endswith((".A", ".B")) or name.startswith(("ln_f.", "lm_head.")) for name in saved)
    model, meta = finetune.load_classifier(out)
    assert isinstance(model.h[0].mlp.c_fc.dense, finetune.NF4Dense)
    texts = ["WIN cash PRIZE claim now", "see you at lunch later", "call me", "FREE txt urgent 0800"]
    expected, _ = probabilities(trained, meta, tokenizer, texts)
    probs, _ = probabilities(model, meta, tokenizer, texts)
    assert probs == expected and probs[0][1] > 0.5 > probs[1][1]  # [ham, spam] per text


def test_max_steps_stops_finetuning_early(tmp_path, capsys):
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(60, 30))
    finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable", "lora",
                   "--max-steps", "3", "--unseen", "0", "--out", str(tmp_path / "out")])
    assert "24 examples seen" in capsys.readouterr().out  # 3 steps of batch 8 (an epoch has 7)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["max_steps"] == 3
    for bad in (["--max-steps", "0"], ["--unseen", "-1"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(bad)


@pytest.mark.parametrize("trainable,pool", [("last_block", "last_real"), ("lora", "mean"),
                                            ("last_two_blocks", "last")])
def test_finetune_saves_only_what_changed_and_reloads(tmp_path, trainable, pool, tokenizer):
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(40, 20))
    out = tmp_path / "out"
    finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable", trainable,
                   "--pool", pool, "--epochs", "1", "--out", str(out)])
    saved = torch.load(out / "classifier.pt", weights_only=True)["state"]
    model, meta = finetune.load_classifier(out)
    assert set(saved) == trainable_names(model)
    assert meta["pool"] == pool and meta["trainable"] == trainable


def three_topics(n_per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    words = {"billing": "invoice refund charge payment card bill".split(),
             "support": "error crash login broken password reset".split(),
             "sales": "price quote demo discount licence trial".split()}
    return [(label, " ".join(rng.choice(w, 5))) for label, w in words.items() for _ in range(n_per_class)]


@pytest.fixture(scope="module")
def three_class_classifier(tmp_path_factory):
    """A tiny 3-class classifier finetuned from a CSV file with its own column names."""
    tmp = tmp_path_factory.mktemp("three")
    with open(tmp / "tickets.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body", "team"])
        writer.writerows((i, text, label) for i, (label, text) in enumerate(three_topics()))
    finetune.main(["--data", str(tmp / "tickets.csv"), "--text-column", "body", "--label-column", "team",
                   "--init", "random", "--preset", "tiny", "--trainable", "all", "--lr", "2e-3", "--epochs", "4",
                   "--out", str(tmp / "out")])
    return tmp / "out"


def test_three_class_finetune_learns_and_reports_every_class(three_class_classifier):
    metrics = json.loads((three_class_classifier / "metrics.json").read_text())
    assert metrics["classes"] == ["billing", "sales", "support"]  # sorted
    assert metrics["test_accuracy"] >= 0.9 and metrics["macro_f1"] >= 0.9
    assert len(metrics["confusion"]) == 3 and sum(map(sum, metrics["confusion"])) == 24  # 20 % of 120
    assert set(metrics["per_class"]) == {"billing", "sales", "support"} and "precision" not in metrics
    assert metrics["baselines"]["majority"] == pytest.approx(1 / 3)
    for name, n in (("train", 84), ("validation", 12), ("test", 24)):  # the splits were written, stratified
        with open(three_class_classifier / f"{name}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]
        assert len(rows) == n and Counter(label for label, _ in rows) == {c: n // 3 for c in metrics["classes"]}


def test_own_validation_and_test_files(tmp_path, capsys):
    examples = three_topics(30)
    files = {}
    for name, part in (("train", examples[::3] + examples[1::3]), ("validation", examples[2::6]),
                       ("test", examples[5::6])):
        files[name] = write_messages(tmp_path / f"{name}.txt", part)
    finetune.main(["--data", str(files["train"]), "--validation-data", str(files["validation"]),
                   "--test-data", str(files["test"]), "--init", "random", "--preset", "tiny", "--trainable", "head",
                   "--epochs", "1", "--out", str(tmp_path / "out")])
    assert "validation: 15 (5 billing, 5 sales, 5 support)" in capsys.readouterr().out
    write_messages(files["test"], [("billing", "x"), ("unheard-of", "y")])
    with pytest.raises(minigpt.DataError, match="label 'unheard-of' never occurs in the training data"):
        finetune.main(["--data", str(files["train"]), "--validation-data", str(files["validation"]),
                       "--test-data", str(files["test"]), "--init", "random", "--preset", "tiny", "--out",
                       str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # argparse: one without the other
        finetune.parse_args(["--data", str(files["train"]), "--test-data", str(files["test"])])


def test_classifier_refuses_a_base_checkpoint_that_changed(tmp_path):
    minigpt.save_checkpoint(tmp_path / "base.pt", tiny_model(seed=1))
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(40, 20))
    finetune.main(["--data", str(data), "--init", str(tmp_path / "base.pt"), "--trainable", "head",
                   "--epochs", "1", "--out", str(tmp_path / "out")])
    finetune.load_classifier(tmp_path / "out")
    minigpt.save_checkpoint(tmp_path / "base.pt", tiny_model(seed=2))  # retrained: same shapes, new weights
    with pytest.raises(minigpt.DataError, match="changed since"):
        finetune.load_classifier(tmp_path / "out")


def test_missing_or_broken_classifier_says_to_run_finetune(tmp_path):
    with pytest.raises(minigpt.DataError, match="run finetune.py first"):
        finetune.load_classifier(tmp_path)
    (tmp_path / "classifier.pt").write_bytes(b"half a file")
    with pytest.raises(minigpt.DataError, match="run finetune.py again"):
        finetune.load_classifier(tmp_path)


# ---------------------------------------------------------------- classify.py

import classify  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402


def test_command_line_classifies_texts_files_and_stdin(tiny_classifier, tmp_path):
    messages = tmp_path / "m.txt"
    messages.write_text("WIN cash PRIZE claim now\n\nsee you at lunch later\n", encoding="utf-8")
    run = lambda *a, **kw: subprocess.run([sys.executable, str(HERE / "classify.py"), "--model",
                                           str(tiny_classifier), *a], capture_output=True, text=True,
                                          timeout=120, **kw)
    plain = run("FREE txt urgent call 0800 now", "love you, home for dinner tomorrow")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("spam") and lines[1].startswith("ham") and "texts/s" in plain.stderr
    as_json = run("--file", str(messages), "--json", "-", input="ok thanks\n")
    results = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["label"] for r in results] == ["ham", "spam", "ham"]  # stdin ('-'), then the file
    assert results[0]["text"] == "ok thanks" and set(results[0]) >= {"spam_probability", "tokens", "truncated"}
    missing = run("hello", "--model", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "run finetune.py" in missing.stderr
    assert run("--file", str(tmp_path / "nope.txt")).returncode != 0


def test_inference_matches_what_finetune_measured(tiny_classifier, tokenizer):
    """classify.py must give a message the probability finetune.py's cached evaluation gave it."""
    model, recipe = finetune.load_classifier(tiny_classifier)
    texts = [t for _, t in synthetic_messages(30, 30, seed=5)]
    ids, _ = minigpt.encode(texts, tokenizer, recipe["max_length"])
    frozen = finetune.frozen_blocks(model, "last_block")  # evaluate through a cached prefix
    features = finetune.frozen_features(model, finetune.model_inputs(ids, recipe["pool"], recipe["max_length"]),
                                        frozen, "cpu")
    cached = finetune.predict(model, finetune.Batches(features, [len(i) for i in ids], 64), recipe["pool"], frozen)
    served = torch.tensor([r["spam_probability"] for r in classify.Classifier(tiny_classifier)(texts)])
    torch.testing.assert_close(served, cached[:, 1], atol=1e-5, rtol=0)


def test_bfloat16_classifier_gives_float32_probabilities_within_tolerance(tiny_classifier):
    texts = [t for _, t in synthetic_messages(10, 10, seed=7)]
    plain = [r["spam_probability"] for r in classify.Classifier(tiny_classifier)(texts)]
    fast = classify.Classifier(tiny_classifier, dtype="bfloat16")
    assert fast.model.wte.weight.dtype == fast.model.lm_head.packed.dtype == torch.bfloat16
    got = [r["spam_probability"] for r in fast(texts)]
    assert max(abs(a - b) for a, b in zip(got, plain)) < BF16_TOLERANCE


@pytest.fixture(scope="module")
def server_url(tiny_classifier):
    server = classify.make_server(classify.Classifier(tiny_classifier), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def call(url, body=None, method=None, headers=None):
    """(status, parsed JSON or text) of one HTTP request; error statuses are returned, not raised."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers or {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, raw, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, (json.loads(raw) if raw and kind.startswith("application/json") else raw.decode())


def test_api_classifies_one_text_or_many(server_url):
    status, r = call(f"{server_url}/api/classify", {"text": "WIN cash PRIZE claim now"})
    assert status == 200 and r["label"] == "spam" and 0.5 < r["spam_probability"] <= 1
    assert r["tokens"] == 6 and r["truncated"] is False
    status, r = call(f"{server_url}/api/classify", {"texts": ["see you at lunch", "FREE txt " * 40]})
    assert status == 200 and [x["label"] for x in r["results"]] == ["ham", "spam"]
    assert r["results"][1]["truncated"] is True  # longer than the model's max length
    status, health = call(f"{server_url}/healthz?verbose=1")
    assert status == 200 and health["status"] == "ok" and "random" in health["model"]
    assert health["dtype"] == "float32" and health["model"].endswith("It answers in float32.")  # the page says it too
    status, r = call(f"{server_url}/api/classify", {"text": "see you <|endoftext|> later"})
    assert status == 200 and r["tokens"] == len(finetune.minigpt.get_tokenizer().encode(
        "see you <|endoftext|> later", disallowed_special=()))  # plain text, not a special token


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), ({"nothing": 1}, 400), ({"text": 5}, 400), ({"text": "   "}, 400),
    ({"texts": []}, 400), ({"texts": ["a"] * 65}, 400), ({"texts": ["ok", None]}, 400),
    ([1, 2], 400), ({"text": "a", "texts": ["b"]}, 400), (b"\xff\xfe", 400), (b"x" * (64 * 1024 + 1), 413)])
def test_api_rejects_bad_input_with_a_json_error(server_url, body, status):
    got, r = call(f"{server_url}/api/classify", body)
    assert got == status and isinstance(r["error"], str) and r["error"]
    assert call(f"{server_url}/healthz")[0] == 200  # the server lives on


def test_unknown_paths_and_wrong_methods(server_url):
    assert call(f"{server_url}/nope")[0] == 404
    assert call(f"{server_url}/../etc/passwd")[0] == 404
    assert call(f"{server_url}/api/classify")[0] == 405          # GET
    assert call(f"{server_url}/", b"{}")[0] == 405               # POST
    assert call(f"{server_url}/api/classify", b"{}", method="PUT")[0] == 405
    assert call(f"{server_url}/healthz", method="HEAD")[0] == 405
    status, page = call(f"{server_url}/")
    assert status == 200 and "<textarea" in page and "http" not in page.split("<body>")[1]  # nothing external


def test_fifty_concurrent_requests(server_url):
    texts = [f"WIN cash PRIZE {i}" if i % 2 else f"see you at lunch {i}" for i in range(50)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: call(f"{server_url}/api/classify", {"text": t}), texts))
    assert all(status == 200 for status, _ in answers)
    alone = [call(f"{server_url}/api/classify", {"text": t})[1] for t in texts[:4]]
    assert [a for _, a in answers[:4]] == alone  # the same answer as when asked one at a time


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: apt-get install chromium (.ci/run does)")
def test_web_page_in_a_real_browser(server_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 390, "height": 800})  # a phone-sized screen
        page.goto(server_url)
        page.fill("#text", "WIN cash PRIZE claim now call 0800")
        page.click("#go")
        page.wait_for_selector('#answer[data-label="spam"]')
        assert page.inner_text("#label") == "spam" and "tokens" in page.inner_text("#detail")
        assert page.locator("#bars .row").count() == 2 and "spam" in page.inner_text("#bars .row.top")
        page.fill("#text", "see you at lunch later")
        page.press("#text", "Control+Enter")
        page.wait_for_selector('#answer[data-label="ham"]')
        assert page.title() == "Is this spam?" and page.locator(".samples button").count() == 4
        # The verdict token by token: every token shaded, its value on hover, the last one the answer.
        spans = page.locator("#tokens span")
        assert spans.count() == 5 and "had the text ended here" in spans.first.get_attribute("title")
        assert all(spans.nth(i).evaluate("s => s.style.background").startswith("rgba") for i in range(5))
        shown = float(page.inner_text("#bars .row.top .p").removesuffix(" %"))
        assert abs(100 * float(spans.last.get_attribute("data-p")) - shown) < 0.051
        assert "the last token's value is the answer" in page.inner_text("#why")
        page.fill("#text", "")  # empty: the API's error, and the page goes on
        page.click("#go")
        page.wait_for_selector("#answer.error")
        assert "empty" in page.inner_text("#detail") and spans.count() == 0
        page.fill("#text", "WIN cash " * 400)  # far longer than the model reads
        page.click("#go")
        page.wait_for_selector('#answer.done')
        assert "truncated" in page.inner_text("#detail") and 0 < spans.count() <= 64
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_three_label_api_cli_and_page(three_class_classifier, tmp_path):
    classifier = classify.Classifier(three_class_classifier)
    server = classify.make_server(classifier, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        status, r = call(f"{url}/api/classify", {"text": "invoice refund charge payment card"})
        assert status == 200 and r["label"] == "billing" and "spam_probability" not in r
        assert list(r["probabilities"]) == ["billing", "sales", "support"]
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        cli = subprocess.run([sys.executable, str(HERE / "classify.py"), "--model", str(three_class_classifier),
                              "error crash login broken"], capture_output=True, text=True, timeout=120)
        label, probability, text = cli.stdout.split(None, 2)
        assert cli.returncode == 0 and label == "support" and 0.5 < float(probability) <= 1
        if not CHROMIUM.exists():
            pytest.skip("no browser: apt-get install chromium (.ci/run does)")
        sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 390, "height": 800})
            page.goto(url)
            assert page.title() == "Which is it: billing, sales, support?"
            assert page.locator(".samples button").count() == 6  # two short training texts per class
            page.fill("#text", "price quote demo discount licence")
            page.click("#go")
            page.wait_for_selector('#answer[data-label="sales"]')
            assert page.locator("#bars .row").count() == 3 and "sales" in page.inner_text("#bars .row.top")
            page.screenshot(path=str(tmp_path / "three.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def running(classifier, **options):
    """A server for `classifier` on a free port, in this process: (base URL, server)."""
    server = classify.make_server(classifier, port=0, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server
    finally:
        server.shutdown()
        server.server_close()


def raw_request(url, data, timeout=10, then=b""):
    """Send bytes on a fresh connection (then, after a moment, `then`); the whole answer as bytes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if then:
            time.sleep(0.3)
            s.sendall(then)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def status_of(answer):
    return int(answer.split(b" ", 2)[1])


def json_body(answer):
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


@pytest.fixture(scope="module")
def quiet_classifier(tiny_classifier):
    return classify.Classifier(tiny_classifier)


def test_a_stalled_or_trickled_request_gets_408_and_the_server_goes_on(quiet_classifier, monkeypatch):
    monkeypatch.setattr(classify.Handler, "timeout", 1)  # 30 s in real use: for the whole request
    with running(quiet_classifier) as (url, server):
        stalled = raw_request(url, b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\": ")
        assert status_of(stalled) == 408 and "did not arrive" in json_body(stalled)["error"]
        host, port = url.removeprefix("http://").split(":")
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a byte every 0.3 s: each read is
            s.sendall(b"POST /api/classify HTTP/1.0\r\nContent-Length: 30\r\n\r\n")  # quick, the whole is not
            answer = b""
            for byte in b'{"text": "trickle, trickle"}':
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.3)
                s.setblocking(False)
                try:
                    answer += s.recv(1000)
                except BlockingIOError:
                    pass
                s.setblocking(True)
                if answer:
                    break
        assert status_of(answer) == 408 and time.monotonic() - t0 < 3
        assert call(f"{url}/healthz")[0] == 200


@pytest.mark.parametrize("request_bytes,status,words", [
    (b"POST /api/classify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    (b"POST /api/classify HTTP/1.0\r\n\r\n", 411, "Content-Length"),
    (b"POST /api/classify HTTP/1.0\r\nContent-Length: +16\r\n\r\n{\"text\": \"hi!\"}", 400, "bad Content-Length"),
    (b"POST /api/classify HTTP/1.0\r\nContent-Length: 1_6\r\n\r\n{\"text\": \"hi!\"}", 400, "bad Content-Length"),
    (b"POST /api/classify HTTP/1.0\r\nContent-Length: 16\r\nContent-Length: 16\r\n\r\n{\"text\": \"hi!\"}", 400,
     "bad Content-Length"),
    (b"TRACE / HTTP/1.0\r\n\r\n", 405, "TRACE"),
    (b"CONNECT example.com:443 HTTP/1.0\r\n\r\n", 405, "CONNECT"),
    (b"BREW /api/classify HTTP/1.0\r\n\r\n", 405, "BREW"),
    (b"GARBAGE\r\n\r\n", 400, "")])
def test_protocol_errors_get_a_json_answer(server_url, request_bytes, status, words):
    answer = raw_request(server_url, request_bytes)
    assert status_of(answer) == status and b"application/json" in answer.split(b"\r\n\r\n")[0]
    assert words in json_body(answer)["error"]


def test_nested_json_is_a_400_not_a_dropped_connection(server_url):
    status, r = call(f"{server_url}/api/classify", ("[" * 1000 + "]" * 1000).encode())
    assert status == 400 and "nested too deeply" in r["error"]
    status, r = call(f"{server_url}/api/classify", ('{"text": ' + "[" * 100000 + "]" * 100000 + "}").encode())
    assert status in (400, 413)


def test_over_limit_bodies_get_413_at_once_and_cleanly(server_url):
    big = 2 * 1024 * 1024
    head = f"POST /api/classify HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {big}\r\n\r\n".encode()
    answer = raw_request(server_url, head + b"x" * big)  # a client that sends it all, then reads (curl)
    assert status_of(answer) == 413 and b"Connection: close" in answer
    t0 = time.monotonic()
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # says 10 GB, sends none of it
        s.sendall(head.replace(str(big).encode(), b"10000000000"))
        assert status_of(s.recv(65536)) == 413 and time.monotonic() - t0 < 2


def test_a_burst_of_200_connections_is_answered(server_url):
    body = json.dumps({"text": "see you at lunch"}).encode()
    request = b"POST /api/classify HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    host, port = server_url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(200):  # all 200 connect at once, before the server has answered any
        s = socket.socket()
        s.settimeout(60)
        s.connect_ex((host, int(port)))
        sockets.append(s)
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(50) as pool:
        def send_and_read(s):
            try:
                s.sendall(request)
                s.settimeout(max(0.1, deadline - time.monotonic()))
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                return status_of(answer)
            except OSError as e:
                return repr(e)
            finally:
                s.close()
        statuses = list(pool.map(send_and_read, sockets))
    assert statuses.count(200) == 200, Counter(statuses)


def test_client_disconnects_leave_no_traceback(quiet_classifier, capfd):
    with running(quiet_classifier) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        for data in (b"POST /api/classify HTTP/1.0\r\nContent-Length: 50\r\n\r\n{\"te", b"GET / HTTP/1.0\r\n"):
            s = socket.create_connection((host, int(port)))
            s.sendall(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            s.close()
        time.sleep(0.3)
        assert call(f"{url}/healthz")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_token_guards_the_api_and_metrics_but_not_health(quiet_classifier):
    with running(quiet_classifier, token="s3cret") as (url, server):
        status, r = call(f"{url}/api/classify", {"text": "hi"})
        assert status == 401 and "token" in r["error"]
        request = urllib.request.Request(f"{url}/api/classify", b"{}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Content-Type": "application/json", "Authorization": "Bearer s3creT"}
        assert call(f"{url}/api/classify", {"text": "hi"}, headers=wrong)[0] == 401
        right = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
        status, r = call(f"{url}/api/classify", {"text": "see you at lunch"}, headers=right)
        assert status == 200 and r["label"] == "ham"
        assert call(f"{url}/metrics")[0] == 401 and call(f"{url}/metrics", headers=right)[0] == 200
        assert call(f"{url}/healthz")[0] == 200 and call(f"{url}/")[0] == 200  # for load balancers; the page asks


def test_a_request_is_counted_before_its_answer_is_sent(quiet_classifier, monkeypatch):
    """The handler's work after the answer (here slowed by half a second) cannot hide a request
    from a scrape that its client sends as soon as it has the answer."""
    after_answer = classify.Handler.end_request
    monkeypatch.setattr(classify.Handler, "end_request", lambda self: (time.sleep(0.5), after_answer(self)))
    with running(quiet_classifier) as (url, _):
        assert call(f"{url}/nope")[0] == 404
        status, text = call(f"{url}/metrics")
    assert status == 200 and 'minigpt_requests_total{path="other",status="404"} 1' in text


def slow(classifier, seconds):
    """The same classifier, but every forward pass takes at least `seconds` (to make a queue)."""
    slow_one = copy.copy(classifier)
    slow_one.probabilities = lambda rows, lengths, batch_size=None: (
        time.sleep(seconds), classifier.probabilities(rows, lengths, batch_size))[1]
    return slow_one


def test_a_full_queue_answers_503_with_retry_after_at_once(quiet_classifier):
    with running(slow(quiet_classifier, 1.0), max_queue=2) as (url, server):
        def post(text):
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/api/classify",
                                                                   json.dumps({"text": text}).encode()), timeout=30) as r:
                    return r.status, None, time.monotonic() - t0
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("Retry-After"), time.monotonic() - t0
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(post, "the worker takes this one at once")
            time.sleep(0.3)
            answers = list(pool.map(post, [f"text {i}" for i in range(7)]))
        assert first.result()[0] == 200
        statuses = [status for status, _, _ in answers]
        assert statuses.count(200) == 2 and statuses.count(503) == 5  # two fit in the queue
        assert all(retry == "1" and seconds < 0.5 for status, retry, seconds in answers if status == 503)


def test_batched_answers_equal_one_at_a_time_and_metrics_count_them(quiet_classifier):
    prometheus = pytest.importorskip("prometheus_client.parser", reason="pip install -r requirements-test.txt")
    texts = [t for _, t in synthetic_messages(12, 12, seed=3)] + ["WIN " * 40, "ok"]
    alone = [quiet_classifier([t])[0] for t in texts]  # one by one, without a server
    with running(slow(quiet_classifier, 0.2)) as (url, server):
        with ThreadPoolExecutor(len(texts)) as pool:
            crowd = list(pool.map(lambda t: call(f"{url}/api/classify", {"text": t}), texts))
        assert all(status == 200 for status, _ in crowd)
        for one, (_, together) in zip(alone, crowd):
            assert one["label"] == together["label"]
            for label in one["probabilities"]:
                assert together["probabilities"][label] == pytest.approx(one["probabilities"][label], abs=1e-5)
        families = {f.name: f for f in prometheus.text_string_to_metric_families(call(f"{url}/metrics")[1])}
        requests = {(s.labels["path"], s.labels["status"]): s.value for s in families["minigpt_requests"].samples
                    if s.name == "minigpt_requests_total"}
        assert requests[("/api/classify", "200")] == len(texts)
        batches = {s.name: s.value for s in families["minigpt_batch_texts"].samples if "le" not in s.labels}
        assert batches["minigpt_batch_texts_sum"] == len(texts) and batches["minigpt_batch_texts_count"] < len(texts)
        assert families["minigpt_texts_classified"].samples[0].value == len(texts)
        call(f"{url}/nope")
        again = {f.name: f for f in prometheus.text_string_to_metric_families(call(f"{url}/metrics")[1])}
        assert any(s.labels.get("path") == "other" and s.labels.get("status") == "404" and s.value == 1
                   for s in again["minigpt_requests"].samples)


def start_service(classifier_dir, *options):
    """`classify.py --serve` as its own process on a free port: (process, base URL)."""
    process = subprocess.Popen([sys.executable, str(HERE / "classify.py"), "--model", str(classifier_dir), "--serve",
                                "--port", "0", *options], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("serving on "):
            return process, line.split()[2]
    raise AssertionError(f"the server did not start: {process.wait()}")


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tiny_classifier):
    process, url = start_service(tiny_classifier)
    try:
        body = json.dumps({"text": "see you at lunch"}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(b"POST /api/classify HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
            time.sleep(0.5)  # the request is in flight: half its body has come
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(body[5:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert status_of(answer) == 200 and json_body(answer)["label"] == "ham"
        assert process.wait(timeout=20) == 0
        log = process.stderr.read()
        assert "SIGTERM: no new connections" in log and "stopped" in log
        assert "POST /api/classify 200" in log  # the access-log line of the finished request
    finally:
        process.kill()


def test_the_page_asks_for_the_token_once(tiny_classifier, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no browser: apt-get install chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
    with running(classify.Classifier(tiny_classifier), token="page-token") as (url, server), \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        page.goto(url)
        page.fill("#text", "WIN cash PRIZE claim now call 0800")
        page.click("#go")
        page.wait_for_selector("#auth:not([hidden])")  # a 401: the page asks
        page.fill("#token", "page-token")
        page.click("#auth button")
        page.wait_for_selector('#answer[data-label="spam"]')
        page.fill("#text", "see you at lunch later")
        page.click("#go")
        page.wait_for_selector('#answer[data-label="ham"]')  # no second question
        assert page.locator("#auth").is_hidden()
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0 and "page-token" not in page.content()
        browser.close()


# ---------------------------------------------------------------- bad input: one clear line, nothing lost

def outcome(main, argv, capsys):
    """(exit code, what the user reads) of a script's main as its `if __name__ == "__main__"` runs it:
    argparse's usage errors exit 2, a DataError is printed as `error: ...` and exits 1."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except minigpt.DataError as e:
        return 1, f"error: {e}"
    return 0, capsys.readouterr().err


@pytest.fixture
def bad_inputs(tmp_path):
    """Files a careless user might pass."""
    sms = write_messages(tmp_path / "sms.txt", synthetic_messages(30, 15))
    (tmp_path / "empty.txt").write_bytes(b"")
    write_messages(tmp_path / "one-class.txt", [("ham", "a"), ("ham", "b")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return tmp_path, sms


@pytest.mark.parametrize("flags,code,words", [
    (["--out", "/etc/hostname"], 2, "exists and is not a folder"),
    (["--out", "/etc/hostname/x"], 2, "cannot write into"),
    (["--out", "/proc/version/runs"], 2, "cannot write into"),
    (["--data", "{tmp}/nope.txt"], 1, "cannot read"),
    (["--data", "{tmp}"], 1, "is a folder"),
    (["--data", "{tmp}/empty.txt"], 1, "is empty"),
    (["--data", "{tmp}/one-class.txt"], 1, "at least 2 classes"),
    (["--data", "{tmp}/latin1.txt"], 1, "line 1: not UTF-8"),
    (["--batch-size", "0"], 2, "must be at least 1"),
    (["--eval-every", "0"], 2, "must be at least 1"),
    (["--lora-rank", "0"], 2, "must be at least 1"),
    (["--max-length", "-5"], 2, "must be at least 1"),
    (["--max-length", "0"], 2, "must be at least 1"),
    (["--lr", "-1"], 2, "must be greater than 0"),
    (["--lr", "nan"], 2, "not a finite number"),
    (["--epochs", "0"], 2, "must be at least 1"),
    (["--epochs", "-1"], 2, "must be at least 1"),
    (["--unseen", "-3"], 2, "must be at least 0"),
    (["--unlabelled", "{tmp}"], 2, "is a folder: give the name of a file to write"),
    (["--unlabelled", "/etc/hostname/texts.txt"], 2, "cannot write into"),
    (["--device", "bogus"], 1, "not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], 1, "CUDA")])
def test_finetune_refuses_bad_input_before_any_work(bad_inputs, capsys, flags, code, words):
    tmp, sms = bad_inputs
    flags = [f.format(tmp=tmp) for f in flags]
    base = ["--data", str(sms), "--init", "random", "--preset", "tiny", "--epochs", "1", "--out", str(tmp / "out")]
    got, message = outcome(finetune.main, base + flags, capsys)
    assert (got, words in message) == (code, True), message
    assert "Traceback" not in message
    assert not (tmp / "out" / "classifier.pt").exists()  # nothing was trained, nothing written


def test_classify_refuses_bad_input(tiny_classifier, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    model = ["--model", str(tiny_classifier)]
    assert outcome(classify.main, model + ["--file", str(tmp_path / "latin1.txt")], capsys)[1].startswith(
        f"error: {tmp_path / 'latin1.txt'}, line 2: not UTF-8")
    assert outcome(classify.main, model + ["--file", str(tmp_path)], capsys)[0] == 2  # a folder
    assert "must be less than 65536" in outcome(classify.main, model + ["--serve", "--port", "70000"], capsys)[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, message = outcome(classify.main, model + ["--serve", "--port", str(taken.getsockname()[1])], capsys)
    assert code == 1 and "cannot listen on 127.0.0.1" in message
    assert "not a device" in outcome(classify.main, model + ["hi", "--device", "bogus"], capsys)[1]
    (tmp_path / "bom.txt").write_bytes("\ufeffWIN cash PRIZE claim now\r\nsee you at lunch\r\n".encode())
    classify.main(model + ["--json", "--file", str(tmp_path / "bom.txt")])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["WIN cash PRIZE claim now", "see you at lunch"]


def test_a_classifier_whose_base_checkpoint_is_gone_says_so(tmp_path, capsys):
    minigpt.save_checkpoint(tmp_path / "base.pt", tiny_model(seed=1))
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(40, 20))
    finetune.main(["--data", str(data), "--init", str(tmp_path / "base.pt"), "--trainable", "head",
                   "--epochs", "1", "--out", str(tmp_path / "out")])
    (tmp_path / "base.pt").unlink()
    code, message = outcome(classify.main, ["--model", str(tmp_path / "out"), "hello"], capsys)
    assert code == 1 and "base model" in message and "is missing" in message


@pytest.mark.parametrize("damage,words", [
    (lambda d: (d / "wte.weight.npy").write_bytes((d / "wte.weight.npy").read_bytes()[:1000]), "not a readable .npy"),
    (lambda d: np.save(d / "wte.weight.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True),
     "not a readable .npy"),
    (lambda d: np.save(d / "wpe.weight.npy", np.load(d / "wpe.weight.npy").astype(np.float64)), "float64"),
    (lambda d: np.save(d / "wpe.weight.npy", np.load(d / "wpe.weight.npy").astype(np.int64)), "int64"),
    (lambda d: (d / "config.json").write_text("{not json"), "not a minigpt model config"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "n_head": 2})), "unexpected keyword argument 'n_head'"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "n_heads": 5})), "not divisible by n_heads 5"),
])
def test_a_damaged_model_folder_is_a_clear_error(tmp_path, capsys, damage, words):
    folder = tmp_path / "model"
    folder.mkdir()
    model = tiny_model()
    for name, p in model.named_parameters():
        np.save(folder / f"{name}.npy", p.detach().numpy())
    (folder / "config.json").write_text(json.dumps(minigpt.asdict(model.cfg)))
    assert outcome(minigpt.main, ["--model", str(folder), "--max-new-tokens", "2"], capsys)[0] == 0
    damage(folder)
    code, message = outcome(minigpt.main, ["--model", str(folder), "--max-new-tokens", "2"], capsys)
    assert code == 1 and words in message and "Traceback" not in message


def test_scripts_print_one_error_line_not_a_traceback(tmp_path):
    """The `__main__` wrappers, as a user runs them."""
    for script, args in (("finetune.py", ["--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]),
                         ("minigpt.py", ["--model", str(tmp_path), "--device", "cpu"]),
                         ("classify.py", ["--model", str(tmp_path), "hello"])):
        run = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=120)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 1 and last.startswith("error: ") and "Traceback" not in run.stderr, run.stderr


# ---------------------------------------------------------------- faults: they cost nothing

def test_help_and_logs_never_show_the_token(quiet_classifier, monkeypatch, capfd):
    monkeypatch.setenv("MINIGPT_TOKEN", "s3cr3t-from-env")
    with pytest.raises(SystemExit):
        classify.main(["--help"])
    shown = capfd.readouterr().out
    assert "MINIGPT_TOKEN" in shown and "s3cr3t" not in shown and "(default: None)" not in shown
    with running(quiet_classifier, token="s3cr3t-right") as (url, server):
        for given in ("s3cr3t-wrong", "s3cr3t-right"):
            call(f"{url}/api/classify", {"text": "hi"}, headers={"Authorization": f"Bearer {given}"})
        raw_request(url, b"GET /metrics?token=s3cr3t-query HTTP/1.0\r\nAuthorization: Bearer s3cr3t-x\r\n\r\n")
    log = capfd.readouterr().err
    assert "POST /api/classify 401" in log and "POST /api/classify 200" in log and "s3cr3t" not in log


def finetune_command(data, out, *flags):
    return [sys.executable, str(HERE / "finetune.py"), "--data", str(data), "--init", "random", "--preset", "tiny",
            "--trainable", "head", "--unseen", "0", "--out", str(out), *flags]


def only_line(run):
    """The one `error:` line a failed script prints last to stderr (no traceback)."""
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert sum(line.startswith("error") for line in lines) == 1, run.stderr[-3000:]
    return lines[-1]


@contextlib.contextmanager
def small_disk(folder, size):
    """A tmpfs of `size` (e.g. "2m") mounted on `folder`, for the length of the block."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)])


def test_a_full_disk_is_one_error_line_and_leaves_nothing_half_written(tmp_path, small_corpus):
    with small_disk(tmp_path / "disk", "2m") as disk:  # the tiny model's checkpoint is 6.5 MB
        run = subprocess.run([sys.executable, str(HERE / "pretrain.py"), "--text", str(small_corpus / "long.txt"),
                              "--preset", "tiny", "--context-length", "16", "--max-steps", "2",
                              "--out", str(disk / "run")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1
        assert only_line(run) == f"error: cannot write {disk / 'run' / 'model.pt'}: No space left on device"
        assert list(disk.iterdir()) == []  # no model.pt, no temporary file, no folder
    messages = [(label, f"{text} {i} " + "pad " * 40) for i, (label, text) in enumerate(synthetic_messages(150, 150))]
    data = write_messages(tmp_path / "sms.txt", messages)
    with small_disk(tmp_path / "small", "48k") as disk:  # room for the classifier and its metrics, not the splits
        (disk / "out").mkdir()
        (disk / "out" / "metrics.json").write_text('{"from": "an earlier run"}')
        run = subprocess.run(finetune_command(data, disk / "out", "--epochs", "1"), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 1 and re.fullmatch(r"error: cannot write .*: No space left on device",
                                                    only_line(run))
        assert [p.name for p in disk.iterdir()] == ["out"]  # the earlier run's folder, as it was
        assert [p.name for p in (disk / "out").iterdir()] == ["metrics.json"]
        assert json.loads((disk / "out" / "metrics.json").read_text()) == {"from": "an earlier run"}


def test_a_failed_run_leaves_no_folders_behind(tmp_path, capsys):
    (tmp_path / "header-only.csv").write_text("label,text\n")
    out = tmp_path / "new" / "runs" / "out"
    got, message = outcome(finetune.main, ["--data", str(tmp_path / "header-only.csv"), "--out", str(out)], capsys)
    assert got == 1 and "has a header but no examples" in message
    assert list(tmp_path.iterdir()) == [tmp_path / "header-only.csv"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")  # a folder finetune.py did not write
    got, message = outcome(finetune.main, ["--data", str(tmp_path / "header-only.csv"), "--out",
                                           str(tmp_path / "mine")], capsys)
    assert got == 1 and "holds files finetune.py did not write (notes.txt)" in message


def flip_bytes_in_a_tensor(path, n=64):
    """Flip n bytes in the middle of the largest tensor of a torch.save file (a zip archive whose
    tensors are stored uncompressed, one member each)."""
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(data)


def test_damaged_checkpoints_and_classifiers_are_refused(small_corpus, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(["--text", str(small_corpus / "long.txt"), "--preset", "tiny", "--context-length", "16",
                   "--max-steps", "4", "--stop-at", "2", "--out", str(out)])
    assert minigpt.load_checkpoint(out / "model.pt")  # whole: it loads
    flip_bytes_in_a_tensor(out / "model.pt")
    with pytest.raises(minigpt.DataError, match="model.pt is damaged: its contents do not match the sha256"):
        pretrain.main(["--out", str(out), "--resume"])
    copy = tmp_path / "classifier"
    shutil.copytree(tiny_classifier, copy)
    flip_bytes_in_a_tensor(copy / "classifier.pt")
    with pytest.raises(minigpt.DataError, match="classifier.pt is damaged.*run finetune.py again"):
        finetune.load_classifier(copy)


def wait_for(process, words):
    """Read the process's stdout until a line holds `words`."""
    for line in process.stdout:
        if words in line:
            return
    raise AssertionError(f"{words!r} never came: {process.wait()} {process.stderr.read()[-2000:]}")


def finetuning(tmp_path):
    """(data file, a long finetune.py run on it into tmp_path/out, once it is training)."""
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(200, 100))
    process = subprocess.Popen(finetune_command(data, tmp_path / "out", "--epochs", "500"), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(process, "Before finetuning")
    return data, process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_finetune_keeps_nothing_and_says_so(tmp_path, signum):
    data, process = finetuning(tmp_path)
    try:
        process.send_signal(signum)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "interrupted: nothing was saved; --out is as it was" and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [data]  # no --out, no temporary folder


@pytest.mark.parametrize("script", ["classify.py", "minigpt.py"])
def test_ctrl_c_in_classify_and_minigpt_is_one_line(tiny_classifier, tmp_path, script):
    (tmp_path / "texts.txt").write_text("see you at lunch\n" * 300_000)  # seconds of work for the tiny model
    args = {"classify.py": ["--model", str(tiny_classifier), "--file", str(tmp_path / "texts.txt")],
            "minigpt.py": ["--model", "random", "--preset", "tiny", "--max-new-tokens", "1000000"]}[script]
    process = subprocess.Popen([sys.executable, str(HERE / script), *args, "--dtype", "float32"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in process.stderr:
            if line.startswith("loaded"):
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == 130 and stderr.strip() == "interrupted: nothing was saved", stderr


def test_finetuning_an_unfinished_base_warns(small_corpus, tmp_path, capsys):
    pretrain.main(["--text", str(small_corpus / "long.txt"), "--preset", "tiny", "--context-length", "16",
                   "--max-steps", "6", "--stop-at", "2", "--out", str(tmp_path / "base")])
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(30, 30))
    finetune.main(["--data", str(data), "--init", str(tmp_path / "base" / "model.pt"), "--trainable", "head",
                   "--epochs", "1", "--unseen", "0", "--out", str(tmp_path / "out")])
    assert (f"warning: {tmp_path / 'base' / 'model.pt'} is an unfinished pretrain.py run (stopped after step 2 of 6)"
            in capsys.readouterr().err)


def test_a_second_finetune_on_the_same_out_is_refused(tmp_path, capsys):
    data, first = finetuning(tmp_path)
    try:
        got, message = outcome(finetune.main, ["--data", str(data), "--out", str(tmp_path / "out")], capsys)
        assert got == 1 and f"another run is writing {tmp_path / 'out'} now" in message
    finally:
        first.kill()
        first.wait()
    finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable", "head", "--epochs",
                   "1", "--unseen", "0", "--out", str(tmp_path / "out")])  # the killed run's folder is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sms.txt"]


def many_labels(path, n_labels, per_label=10):
    """A label<TAB>text file with n_labels labels (long names) and per_label texts each."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta kappa omega sigma theta".split()
    rows = [(f"label-number-{i:05d}", f"{' '.join(rng.choice(words, 5))} {i}") for i in range(n_labels)
            for _ in range(per_label)]
    return write_messages(path, rows)


def test_a_thousand_classes_stay_one_screen_and_linear_in_memory(tmp_path, tokenizer):
    data = many_labels(tmp_path / "labels.txt", finetune.MAX_CLASSES)
    # The peak memory of the run itself (VmHWM: not counting the test process it was forked from).
    peak = "import runpy, sys; sys.argv = sys.argv[1:]\ntry: runpy.run_path(sys.argv[0], run_name='__main__')\n" \
           "finally: print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)"
    run = subprocess.run([sys.executable, "-c", peak, *finetune_command(data, tmp_path / "out", "--epochs", "1",
                                                                        "--max-steps", "5")[1:]],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # Dense 3-gram centroids alone would take 1,000 x 2^18 x 8 bytes = 2.1 GB (twice, normalising).
    assert int(run.stderr.split()[-1]) * 1024 < 1e9, f"{run.stderr.split()[-1]} kB peak"
    stdout = run.stdout
    assert len(stdout) < 12_000 and max(len(line) for line in stdout.splitlines()) < 200, stdout
    assert "... and 980 less frequent classes" in stdout and "among the 10 most frequent classes" in stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 1000 and "confusion" not in metrics
    assert sum(n for _, _, n in metrics["confusion_cells"]) == 2000  # one cell per test example at most
    assert (tmp_path / "out" / "metrics.json").stat().st_size < 300_000  # about 200 bytes a class
    classifier = classify.Classifier(tmp_path / "out")
    assert classifier.title == "Which of 1,000 classes is it?" and len(classifier.sample_texts) <= 6
    assert len(classify.render_page(classifier)) < 20_000 and len(classifier.description) < 300
    answers = classifier(["alpha beta gamma delta kappa 7", "omega"])
    assert all(len(a["probabilities"]) == finetune.SHOWN for a in answers) and len(json.dumps(answers)) < 3_000


def test_more_labels_than_supported_are_refused_in_one_line(tmp_path, capsys):
    data = many_labels(tmp_path / "labels.txt", finetune.MAX_CLASSES + 1, per_label=1)
    got, message = outcome(finetune.main, ["--data", str(data), "--out", str(tmp_path / "out")], capsys)
    assert got == 1 and "1,001 different labels; finetune.py supports at most 1,000 classes" in message
    assert len(message) < 300 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the documentation

DOCS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
SCRIPTS = ("minigpt.py", "pretrain.py", "finetune.py", "classify.py")


@pytest.fixture(scope="module")
def helps():
    """Each script's --help text."""
    return {script: subprocess.run([sys.executable, str(HERE / script), "--help"], capture_output=True, text=True,
                                   timeout=60, cwd=HERE).stdout for script in SCRIPTS}


def test_every_flag_the_docs_mention_is_in_the_scripts_help(helps):
    """On a line that runs a script, each flag after the script's name must be in that script's
    --help (flags before it are another program's: torchrun's, say); a flag on a line that names
    no script, in one of them."""
    missing = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            parts = re.split(r"\b(minigpt\.py|pretrain\.py|finetune\.py|classify\.py)\b", line)
            segments = [(SCRIPTS, parts[0])] if len(parts) == 1 else list(zip(parts[1::2], parts[2::2]))
            if re.match(r"\s*(\$ )?(torchrun|curl|pip)\b", line):  # another program's flags, up to a script
                segments = segments[1:] if len(parts) == 1 else segments
            for scripts, text in segments:
                scripts = scripts if isinstance(scripts, tuple) else (scripts,)
                for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)):
                    if not any(re.search(rf"{flag}\b", helps[s]) for s in scripts):
                        missing.append(f"{doc.name}:{number} {flag} ({', '.join(scripts)})")
    assert not missing, missing


@pytest.mark.parametrize("function, flags", [
    ("pretrain.learning_rate", ("--lr", "--warmup")),
    ("finetune.balanced_split", ("--split-seed",)),
    ("finetune.class_logits", ("--pool",)),
    ("finetune.make_classifier", ("--lora-rank", "--lora-alpha")),
])
def test_defaults_quoted_where_they_are_used_are_the_parsers(function, flags):
    """A docstring that gives a flag's default ("--lr 2e-3") gives the one its parser has."""
    module, name = function.split(".")
    module = {"pretrain": pretrain, "finetune": finetune}[module]
    defaults = vars(module.parse_args([]))
    for flag in flags:
        default = defaults[flag[2:].replace("-", "_")]
        quoted = [value for value in re.findall(rf"{flag} ([^\s,;:)]*[^\s,;:).])", getattr(module, name).__doc__)
                  if value == default or value[0].isdigit()]  # "--lr 2e-3", not "--lr throughout"
        assert quoted and all(type(default)(v) == default for v in quoted), (function, flag, quoted, default)


def test_every_help_shows_its_defaults(helps):
    for script, text in helps.items():
        assert "(default: None)" not in text and text.count("(default:") >= 5, script



# ---------------------------------------------------------------- the verdict token by token

@pytest.mark.parametrize("pool", finetune.POOLS)
def test_prefix_probabilities_are_the_verdict_on_each_prefix(tokenizer, pool):
    """Row t is what the classifier answers for the text's first t + 1 tokens; the row it reads
    (the last real one, the padded end for 'last') is its answer, to 1e-6."""
    torch.manual_seed(0)
    model = finetune.make_classifier(minigpt.GPT(replace(TINY, n_layers=3)).eval(), "last_block", 2, 16, 16)
    ids, _ = minigpt.encode(TEXTS, tokenizer)
    padded_ids, lengths = padded(ids)
    steps = classify.prefix_probabilities(model, padded_ids, pool)                     # (B, T, classes)
    with torch.no_grad():
        answer = torch.softmax(book_classifier(model, padded_ids, lengths, pool), dim=-1)
    read = lengths - 1 if pool != "last" else torch.full_like(lengths, padded_ids.shape[1] - 1)
    torch.testing.assert_close(steps[torch.arange(len(ids)), read], answer, atol=1e-6, rtol=0)
    if pool != "last":  # and any shorter prefix: the answer for the text cut there
        cut = torch.tensor([ids[1][:3]])
        with torch.no_grad():
            short = torch.softmax(book_classifier(model, cut, torch.tensor([3]), pool), dim=-1)[0]
        torch.testing.assert_close(steps[1, 2], short, atol=1e-6, rtol=0)


def test_explain_on_the_command_line_ends_in_the_answer(tiny_classifier, capsys):
    text = "WIN cash PRIZE claim now, call 0800"
    run = lambda *flags: classify.main(["--model", str(tiny_classifier), "--dtype", "float32", *flags, text])
    run("--json")
    plain = json.loads(capsys.readouterr().out)
    run("--json", "--explain")
    explained = json.loads(capsys.readouterr().out)
    assert explained["probabilities"] == plain["probabilities"]  # explaining changes no answer
    tokens = explained["explanation"]
    assert "".join(t["text"] for t in tokens) == text and len(tokens) == plain["tokens"]
    assert tokens[-1]["probabilities"] == plain["probabilities"]
    best = [max(t["probabilities"], key=t["probabilities"].get) for t in tokens]
    changed = [i for i in range(1, len(best)) if best[i] != best[i - 1]]
    assert explained["changed_at"] == (changed[-1] if changed else None)
    run("--explain")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam") and len(lines) == 2 + len(tokens) + 1
    last = lines[-2].split()
    assert float(last[-2]) == round(plain["probabilities"]["spam"], 3) and "█" in last[-1]


def test_explained_and_plain_requests_in_one_batch_each_get_their_answer(quiet_classifier):
    texts = [t for _, t in synthetic_messages(8, 8, seed=4)]
    alone = quiet_classifier(texts)
    with running(slow(quiet_classifier, 0.3)) as (url, server):
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda k: call(f"{url}/api/classify", {"text": texts[k], "explain": k % 2 == 0}),
                                    range(len(texts))))
        _, metrics = call(f"{url}/metrics")
    passes = int(re.search(r"^minigpt_batch_texts_count (\d+)", metrics, re.MULTILINE).group(1))
    assert passes < len(texts)  # explained and plain requests rode together
    for k, ((status, answer), one) in enumerate(zip(answers, alone)):
        assert status == 200 and answer["label"] == one["label"]
        assert answer["probabilities"] == pytest.approx(one["probabilities"], abs=1e-6)
        assert ("explanation" in answer) == (k % 2 == 0)
        if k % 2 == 0:
            assert answer["explanation"][-1]["probabilities"] == answer["probabilities"]


# ---------------------------------------------------------------- pretraining that pays off

def test_minutes_plan_the_schedule_to_end_on_time(small_corpus, tmp_path, capsys):
    """--minutes 0.05: three seconds of training steps, re-planned as the run goes; the run ends
    when they are spent, finished, with the learning rate at the cosine's end."""
    pretrain.main(["--text", str(small_corpus / "long.txt"), "--preset", "tiny", "--context-length", "16",
                   "--minutes", "0.05", "--warmup", "5", "--eval-every", "1000", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    history = json.loads((tmp_path / "history.json").read_text())
    per_step = history["seconds"] / history["steps"]
    assert history["steps"] > 20 and 3.0 - 2 * per_step <= history["seconds"] <= 3.0 + 2 * per_step
    last_lr = float(re.findall(r"lr ([0-9.e+-]+)", out)[-1])
    assert last_lr < 0.05 * 2e-3  # the cosine has reached its end
    _, checkpoint = minigpt.load_checkpoint(tmp_path / "model.pt")
    assert "optimizer" not in checkpoint and checkpoint["training"]["total_steps"] == history["steps"]
    assert "3 minutes" not in out and "0.05 minutes of training" in out


def test_resume_takes_the_same_flags_given_again(small_corpus, tmp_path):
    plan = ["--text", str(small_corpus / "long.txt"), "--preset", "tiny", "--context-length", "16",
            "--max-steps", "4", "--eval-every", "1000", "--out", str(tmp_path)]
    pretrain.main(plan + ["--stop-at", "2"])
    pretrain.main(plan + ["--resume"])  # --text as given, the checkpoint holds it resolved
    assert json.loads((tmp_path / "history.json").read_text())["steps"] == 4


def test_init_goes_on_from_a_pretrained_model(small_corpus, tmp_path, capsys):
    plan = ["--preset", "tiny", "--context-length", "16", "--max-steps", "2", "--eval-every", "1000"]
    pretrain.main(["--text", str(small_corpus / "long.txt"), *plan, "--out", str(tmp_path / "base")])
    base = weights(tmp_path / "base" / "model.pt")
    pretrain.main(["--text", str(small_corpus / "short.txt"), "--init", str(tmp_path / "base" / "model.pt"),
                   "--context-length", "16", "--max-steps", "1", "--warmup", "0", "--lr", "1e-12",
                   "--out", str(tmp_path / "more")])
    more = weights(tmp_path / "more" / "model.pt")
    assert all(torch.allclose(more[name], base[name], atol=1e-6) for name in base)  # a step of 1e-12 from it
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--init", "x.pt", "--preset", "tiny"])
    assert "the model's shape comes from --init" in capsys.readouterr().err


def test_a_setting_changes_only_the_flags_not_given():
    """Each flag's default is the default run's; a setting changes some of them; a flag given wins;
    args.given holds exactly what the command line says."""
    args = pretrain.parse_args([])
    assert (args.setting, args.clip, args.eval_windows, args.lr, args.model) == ("default", 1.0, 10, 2e-3, {})
    assert args.given == {}
    args = pretrain.parse_args(["--setting", "ch5", "--clip", "0.5"])
    assert (args.lr, args.clip, args.preset, args.model["tied_head"]) == (4e-4, 0.5, "gpt2-small", False)
    assert args.given == {"setting": "ch5", "clip": 0.5}
    args = pretrain.parse_args(["--corpus", "books"])
    assert (args.setting, args.eval_windows, args.epochs, args.max_steps) == ("corpus", 40, None, 1200)
    assert pretrain.parse_args(["--setting", "book"]).setting == "ch5"  # the older name
    args = pretrain.parse_args(["--text", "a.txt", "--resume"])
    assert args.corpus is None and args.setting == "default" and set(args.given) == {"text", "resume"}


def test_unlabelled_text_leaves_out_every_text_that_is_measured(tmp_path, capsys):
    messages = synthetic_messages(200, 60, seed=9)
    messages += [messages[0], messages[-1], ("spam", messages[0][1])]  # duplicates, one with another label
    data = write_messages(tmp_path / "sms.txt", messages)
    flags = ["--data", str(data), "--balance", "--unseen", "40", "--split-seed", "5", "--out", str(tmp_path / "out")]
    finetune.main(flags + ["--unlabelled", str(tmp_path / "unlabelled.txt")])
    assert "Wrote" in capsys.readouterr().out and not (tmp_path / "out").exists()
    written = (tmp_path / "unlabelled.txt").read_text().splitlines()
    splits, _ = finetune.load_splits(finetune.parse_args(flags))
    measured = {text for name in ("validation", "test", "unseen") for _, text in splits[name]}
    assert len(splits["unseen"]) == 40 and measured and not measured & set(written)
    assert set(written) == {text for _, text in messages} - measured  # everything else
    finetune.main(flags + ["--init", "random", "--preset", "tiny", "--trainable", "head", "--epochs", "1",
                           "--seed", "1"])  # --seed moves the head and the batches, not the split
    for name in ("validation", "test"):
        with open(tmp_path / "out" / f"{name}.csv", encoding="utf-8") as f:
            assert not {row["text"] for row in csv.DictReader(f)} & set(written)


# ---------------------------------------------------------------- int8, the dtype auto picks, the service's speed

def test_int8_weights_and_activations_are_within_half_a_step():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 48) * torch.linspace(0.1, 3, 48), torch.randn(48)  # columns of different sizes
    layer = minigpt.Int8Dense(weight, bias)
    back = layer.weight_q.float() * layer.scale
    assert layer.weight_q.dtype == torch.int8 and (back - weight).abs().le(layer.scale / 2 + 1e-7).all()
    assert layer.weight_q.abs().max() == 127  # every column uses its whole range
    x = torch.randn(5, 64) * torch.tensor([0.01, 1, 10, 100, 1000])[:, None]  # tokens of very different sizes
    exact = x @ weight + bias
    got = layer(x)
    # Each product x_i w_ij is off by at most half an x-step times |w| plus half a w-step times |x|.
    x_step = x.abs().amax(dim=1, keepdim=True) / 127
    half_w = layer.scale / 2                                                           # (48,)
    bound = (x.abs().sum(1, keepdim=True) * half_w + x_step / 2 * weight.abs().sum(0)
             + 64 * x_step / 2 * half_w)                                               # (5, 48)
    assert (got - exact).abs().le(bound + 1e-4).all()
    assert relative_error(got, exact) < 0.02


def test_int8_products_on_packed_weights_are_torchs_int_mm():
    """Where oneDNN's int8 product runs (pack_int8), its answers are the plain torch._int_mm path's."""
    torch.manual_seed(0)
    layer = minigpt.Int8Dense(torch.randn(64, 48), torch.randn(48), gelu=True)
    if layer.packed is None:
        pytest.skip("this CPU runs torch._int_mm only (pack_int8)")
    x = torch.randn(2, 5, 64) * torch.tensor([0.01, 1, 10, 100, 1000])[:, None]
    packed = layer(x)
    layer.packed = None  # the plain path, as on a GPU
    torch.testing.assert_close(packed, layer(x), atol=1e-5, rtol=1e-6)


def test_head_logits_are_the_plain_product_in_every_dtype():
    h, weight = torch.randn(50, 16), torch.randn(300, 16)
    torch.testing.assert_close(minigpt.head_logits(h, weight), h @ weight.T, atol=1e-5, rtol=0)  # oneDNN's, on a CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert minigpt.head_logits(h, weight).dtype == torch.bfloat16  # autocast's product, not float32's


def test_gelu_by_sigmoid_is_gpt2s_tanh_gelu():
    y = torch.linspace(-12, 12, 10001, dtype=torch.float64)
    expected = torch.nn.functional.gelu(y, approximate="tanh")
    torch.testing.assert_close(minigpt.gelu_by_sigmoid_(y.clone()), expected, atol=1e-12, rtol=0)
    y = y.float()
    assert minigpt.gelu_by_sigmoid_(y) is y  # in place


def test_int8_model_logits_are_within_tolerance_of_float32(tiny_classifier):
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 20))
    with torch.no_grad():
        expected = model(idx)
        got = minigpt.to_int8(copy.deepcopy(model))(idx)
    assert 0 < relative_error(got, expected) < 0.05
    texts = [t for _, t in synthetic_messages(10, 10, seed=7)]
    plain = classify.Classifier(tiny_classifier)(texts)
    int8 = classify.Classifier(tiny_classifier, dtype="int8")(texts)
    mlp = classify.Classifier(tiny_classifier, dtype="int8").model.h[0].mlp
    assert isinstance(mlp.c_fc, minigpt.Int8Dense) and mlp.c_fc.gelu and isinstance(mlp.gelu, torch.nn.Identity)
    assert max(abs(a["spam_probability"] - b["spam_probability"]) for a, b in zip(plain, int8)) < 0.05


@pytest.fixture
def inductor_in_tmp(tmp_path, monkeypatch):
    """torch.compile's files (Inductor's C++ and its cache) go to the test's folder, not /tmp/torchinductor_<user>;
    its precompiled headers, whose folder is fixed when torch._inductor loads, are not made."""
    import torch._inductor.config
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor.config, "cpp_cache_precompile_headers", False)


def test_compiled_classifier_answers_as_the_eager_one_and_compiles_only_at_start(tiny_classifier, inductor_in_tmp):
    """--compile (minigpt.compile_model): eager int8's answers, for one text and many, of one token
    and of many; every program compiled by compile_warm_up, none after it."""
    try:
        compiled = classify.Classifier(tiny_classifier, dtype="int8", compile=True)
    except minigpt.DataError as e:
        pytest.skip(str(e))
    eager = classify.Classifier(tiny_classifier, dtype="int8")
    texts = [t for _, t in synthetic_messages(9, 10, seed=3)] + ["ok"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new program would raise
        for batch in (texts, texts[:1], texts[-1:], texts[-2:], texts[:5]):
            rows, lengths, _ = eager.encode(batch)
            got, expected = compiled.probabilities(rows, lengths)[0], eager.probabilities(rows, lengths)[0]
            assert np.abs(np.array(got) - np.array(expected)).max() < 0.02
    assert isinstance(compiled.model.h[0].mlp.c_fc, minigpt.Int8Dense)  # the compiled model is the int8 one


def test_compile_without_a_cpp_compiler_is_a_one_line_error(monkeypatch):
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "no-such-c++-compiler"))
    with pytest.raises(minigpt.DataError, match="--compile needs a C[+][+] compiler"):
        minigpt.compile_model(tiny_model())


def fail_if_timed(monkeypatch):
    """Every timing function of minigpt fails: what runs after this decides nothing by the clock."""
    def timer(*args, **kwargs):
        raise AssertionError("a dtype was chosen by timing")
    monkeypatch.setattr(minigpt, "timed", timer)
    monkeypatch.setattr(minigpt, "best_time", timer)


@pytest.mark.parametrize("native,units,expected,hint", [
    (True, ["avx512_vnni"], "bfloat16", False), (False, [], "float32", False), (False, ["amx_int8", "avx512_vnni"], "float32", True)])
def test_auto_for_inference_is_the_hardware_rule_and_int8_only_a_hint(monkeypatch, capsys, native, units, expected, hint):
    fail_if_timed(monkeypatch)
    monkeypatch.setattr(minigpt, "native_bfloat16", lambda device: (native, "the reason"))
    monkeypatch.setattr(minigpt, "int8_units", lambda device: units)
    assert minigpt.inference_dtype("auto", "cpu", "it was 2x faster") == expected
    said = capsys.readouterr().err.splitlines()
    assert said[0] == f"dtype: {expected} (auto: the reason)"
    assert said[1:] == ([f"hint: --dtype int8 uses this CPU's {' and '.join(units)}: it was 2x faster "
                         "(docs/precision.md)"] if hint else [])
    assert minigpt.inference_dtype("float32", "cpu", "x") == "float32"  # asked for: no hint
    assert minigpt.inference_dtype("int8", "cpu", "x") == "int8"
    assert capsys.readouterr().err.splitlines() == ["dtype: int8 (as asked)"]


def test_packed_float_layers_give_the_plain_models_answers():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(idx)
        packed = minigpt.cast_for_inference(copy.deepcopy(model), "float32")
        assert isinstance(packed.h[0].mlp.c_fc, minigpt.PackedDense) and isinstance(packed.h[0].mlp.gelu, torch.nn.Identity)
        torch.testing.assert_close(packed(idx), expected, atol=1e-5, rtol=0)  # the same products, in another order
        assert relative_error(minigpt.cast_for_inference(copy.deepcopy(model), "bfloat16")(idx), expected) < 0.02
        assert torch.equal(minigpt.generate(packed, idx[:1, :4], 10), minigpt.generate(model, idx[:1, :4], 10))


BENCHMARK = os.environ.get("MINIGPT_BENCHMARK") == "1"  # the 124M shape, timed; else the tiny one, checked


def test_inference_speed_beside_onnx_runtime_and_transformers(tmp_path, capsys, inductor_in_tmp):
    """minigpt's classifying path (classify.prefix_probabilities on a cast_for_inference model, a
    2-way head) beside ONNX Runtime on the same model (exported by torch.onnx; int8 by its
    quantize_dynamic) and transformers' GPT-2 in bfloat16: one text of 30 tokens, and 32. With
    MINIGPT_BENCHMARK=1 (the 124M shape, about 8 minutes) it times each engine in a process of
    its own, best of 5, in 3 rounds, and prints the table and minigpt's ratios; otherwise it runs
    the same steps on the tiny shape, in this process, and checks that ONNX Runtime gives
    minigpt's answers, so the benchmark keeps working."""
    pytest.importorskip("onnxruntime", exc_type=ImportError,
                        reason="the benchmark needs onnxruntime (pip install -r requirements-test.txt)")
    pytest.importorskip("onnxscript", exc_type=ImportError, reason="torch.onnx.export needs onnxscript")
    pytest.importorskip("transformers", exc_type=ImportError, reason="the benchmark needs transformers")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    preset = "gpt2-small" if BENCHMARK else "tiny"
    model = benchmark_model(preset)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    lone, batch = benchmark_ids(preset)
    torch.onnx.export(model, (lone,), dynamo=True, dynamic_shapes=({0: "texts", 1: "tokens"},),
                      input_names=["ids"]).save(tmp_path / "float32.onnx")
    quantize_dynamic(tmp_path / "float32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    with torch.inference_mode():
        expected = classify.prefix_probabilities(minigpt.cast_for_inference(model, "float32"), batch)
        torch.testing.assert_close(benchmark_engine("ONNX Runtime", "float32", tmp_path, preset)(batch), expected,
                                   atol=1e-4, rtol=0)  # the same model
        assert (benchmark_engine("ONNX Runtime", "int8", tmp_path, preset)(batch) - expected).abs().max() < 0.1
    engines = [("ONNX Runtime", "float32"), ("ONNX Runtime", "int8"), ("minigpt", "float32"),
               ("minigpt", "bfloat16"), ("minigpt", "int8"), ("minigpt --compile", "int8"), ("transformers", "bfloat16")]
    seconds = {}
    # A process per engine: ONNX Runtime's idle threads, kept in this process, slowed torch's next
    # run (minigpt int8, one text: 16.3-17.4 ms before a session ran, 18.5-26.3 after).
    spawn = multiprocessing.get_context("spawn")
    for _ in range(3 if BENCHMARK else 1):  # rounds: drift of the machine's speed hits every engine alike
        for engine, dtype in engines:
            if BENCHMARK:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    times = pool.submit(engine_seconds, engine, dtype, tmp_path, preset, 5).result()
            else:
                times = engine_seconds(engine, dtype, tmp_path, preset, 1)
            for shape, t in times.items():
                seconds[(engine, dtype), shape] = min(t, seconds.get(((engine, dtype), shape), t))
    if BENCHMARK:
        with capsys.disabled():
            print_speed_table(seconds)


def benchmark_model(preset):
    """The benchmark's classifier: GPT-2's shape `preset`, random weights (seed 0), a 2-way head."""
    minigpt.set_malloc(keep_freed=True)  # as classify.Classifier does
    torch.manual_seed(0)
    model = minigpt.GPT(minigpt.PRESETS[preset])
    finetune.make_classifier(model, "last_block", 2, 16, 16)
    return model.eval()


def benchmark_ids(preset):
    """One text of 30 token ids (1, 30), and 32 texts (32, 30): the same in every process."""
    g = torch.Generator().manual_seed(1)
    vocab = minigpt.PRESETS[preset].vocab_size
    return torch.randint(0, vocab, (1, 30), generator=g), torch.randint(0, vocab, (32, 30), generator=g)


def benchmark_engine(engine, dtype, folder, preset):
    """ids (B, T) -> what one engine computes in one dtype: class probabilities (B, T, 2) (for
    transformers, its logits (B, 2), for speed only), built from `folder` (minigpt's state in
    model.pt, ONNX Runtime's model in float32.onnx and int8.onnx)."""
    if engine == "ONNX Runtime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the cores torch uses
        session = ort.InferenceSession(str(folder / f"{dtype}.onnx"), options, providers=["CPUExecutionProvider"])
        return lambda ids: numpy_softmax(session.run(None, {"ids": ids.numpy()})[0])
    if engine.startswith("minigpt"):
        model = benchmark_model(preset)
        model.load_state_dict(torch.load(folder / "model.pt"))
        model = minigpt.cast_for_inference(model, dtype)
        if engine == "minigpt --compile":  # as classify.py --compile: every program compiled here
            model = minigpt.compile_model(model)
            minigpt.compile_warm_up(model, "cpu")
        return lambda ids: classify.prefix_probabilities(model, ids)
    import transformers
    cfg = minigpt.PRESETS[preset]
    hf = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_embd=cfg.emb_dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_positions=cfg.context_length, num_labels=2,
        pad_token_id=0, attn_implementation="sdpa")).to(torch.bfloat16).eval()  # its own random weights: speed only
    return lambda ids: hf(ids).logits


def engine_seconds(engine, dtype, folder, preset, repeats):
    """{"lone": seconds, "batch": seconds} of one engine (benchmark_engine), best of `repeats`."""
    run = benchmark_engine(engine, dtype, folder, preset)
    with torch.inference_mode():
        return {shape: minigpt.best_time(lambda: run(ids), repeats)
                for shape, ids in zip(("lone", "batch"), benchmark_ids(preset))}


def numpy_softmax(logits):
    """softmax over the last axis, as a tensor, in numpy: ONNX Runtime's pipeline stays free of torch
    operations, whose waking thread pool slowed its next run (11.4-12.1 -> 15.2-20.0 ms for one text)."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return torch.from_numpy(e / e.sum(-1, keepdims=True))


def print_speed_table(seconds):
    """The benchmark's table, then minigpt's ratios: lone, the other engine's time over minigpt's;
    batch, minigpt's texts/s over the other's (above 1: minigpt is faster)."""
    print(f"\n{'engine, dtype':28} {'1 x 30 tokens':>14} {'32 x 30 tokens':>16}")
    for (engine, dtype), shape in seconds:
        if shape == "lone":
            print(f"{engine + ', ' + dtype:28} {1000 * seconds[(engine, dtype), 'lone']:11.1f} ms "
                  f"{32 / seconds[(engine, dtype), 'batch']:10.1f} texts/s")
    for ours, dtype, other in (("minigpt", "float32", "ONNX Runtime"), ("minigpt", "int8", "ONNX Runtime"),
                               ("minigpt --compile", "int8", "ONNX Runtime"), ("minigpt", "bfloat16", "transformers")):
        ratios = [seconds[(other, dtype), shape] / seconds[(ours, dtype), shape] for shape in ("lone", "batch")]
        print(f"{ours} {dtype} over {other} {dtype}: lone {ratios[0]:.2f}, batch {ratios[1]:.2f}")


def test_int8_units_are_read_from_cpuinfo():
    assert minigpt.cpu_flags("flags : fpu avx512f avx512_vnni amx_int8\n", minigpt.INT8_UNITS) == ["amx_int8", "avx512_vnni"]
    assert minigpt.cpu_flags("Features : fp asimd asimddp i8mm\n", minigpt.INT8_UNITS) == ["asimddp", "i8mm"]
    assert minigpt.cpu_flags("flags : fpu avx2\n", minigpt.INT8_UNITS) == []
    assert minigpt.int8_units(torch.device("meta")) == []


def test_default_dtype_times_nothing_in_generating_and_classifying(tiny_classifier, monkeypatch, capsys):
    fail_if_timed(monkeypatch)
    minigpt.main(["--model", "random", "--preset", "tiny", "--max-new-tokens", "3"])
    rule = minigpt.dtype_name(minigpt.pick_dtype("auto", "cpu"))
    assert f"tokens/s, {rule})" in capsys.readouterr().err
    assert classify.Classifier(tiny_classifier, dtype="auto").dtype == rule
    classify.main(["--model", str(tiny_classifier), "--explain", "WIN cash now"])
    out = capsys.readouterr().out
    assert f"spam (in {rule})" in out or f"ham (in {rule})" in out  # --explain says which dtype answered


def test_the_batcher_waits_for_the_clients_it_answered_but_briefly():
    """Closed-loop clients (each sends again once answered) ride in full passes, not in two
    alternating halves; a request on a quiet server waits at most a tenth of the last pass."""
    class Slow:  # a pass takes 50 ms, whatever it holds
        sizes = []

        def probabilities(self, rows, lengths):
            self.sizes.append(len(rows))
            time.sleep(0.05)
            return [[1.0]] * len(rows), [[]] * len(rows)

    batcher = classify.Batcher(Slow(), max_batch=64)
    def client():
        for _ in range(6):
            batcher.submit([[1, 2]], [2])
    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(Slow.sizes) == 48
    assert len(Slow.sizes) <= 9, Slow.sizes  # about 6 passes of 8; two halves would take about 12
    time.sleep(0.1)  # quiet: the clients are gone
    start = time.monotonic()
    batcher.submit([[1, 2]], [2])
    assert time.monotonic() - start < 0.05 + 0.04  # the pass, plus at most 5 ms of waiting (and slack)
    batcher.stop()


def test_kept_alive_connections_carry_many_requests(quiet_classifier, monkeypatch, capfd):
    monkeypatch.setattr(classify.Handler, "keep_alive", 0.5)
    with running(quiet_classifier) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        for text in ("see you at lunch", "WIN cash PRIZE claim now"):
            connection.request("POST", "/api/classify", json.dumps({"text": text}), {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and response.version == 11 and "label" in json.loads(response.read())
        first = connection.sock  # one socket carried both
        time.sleep(1.0)          # idle past keep_alive: the server closes it
        assert first.recv(1) == b""
        connection.close()
    assert capfd.readouterr().err.count("POST /api/classify 200") == 2


def test_answers_without_reading_a_body_keep_the_connection_usable(quiet_classifier, capfd):
    with running(quiet_classifier) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        body, sock = json.dumps({"text": "hello"}), None
        for method, path, status in (("PUT", "/api/classify", 405), ("GET", "/healthz", 200), ("POST", "/nope", 404),
                                     ("POST", "/healthz", 405), ("DELETE", "/", 405), ("GET", "/nope", 404)):
            connection.request(method, path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == status and not response.will_close, (method, path)
            response.read()
            sock = sock or connection.sock
            assert connection.sock is sock  # the same connection carries every request
        connection.request("POST", "/api/classify", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and "label" in json.loads(response.read()) and connection.sock is sock
        # A body too big to read: the answer says the connection closes, and the client's next
        # request goes on a new connection without an error.
        connection.request("GET", "/healthz", b"x" * (classify.MAX_BODY + 1))
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") == "close" and response.will_close
        response.read()
        connection.request("POST", "/api/classify", body, {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
    capfd.readouterr()


def test_writing_a_file_onto_a_folder_is_one_clear_error(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(minigpt.DataError, match=r"cannot write .*folder: Is a directory"):
        minigpt.write_text(tmp_path / "folder", "text")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("damage", ["{junk", "", "[1, 2]", '{"test_accuracy": "x"}', '{"test_accuracy": 7}', "\xff"])
def test_a_damaged_metrics_file_costs_a_warning_not_the_answers(tiny_classifier, tmp_path, capsys, damage):
    folder = tmp_path / "classifier"
    shutil.copytree(tiny_classifier, folder)
    expected = classify.Classifier(folder)(["WIN cash now"])
    (folder / "metrics.json").write_bytes(damage.encode("latin-1"))
    classify.main(["--model", str(folder), "--json", "--dtype", "float32", "WIN cash now"])
    out, err = capsys.readouterr()
    assert json.loads(out)["probabilities"] == expected[0]["probabilities"]
    assert f"warning: {folder / 'metrics.json'} holds no test accuracy" in err and "test accuracy." not in err


def test_explain_shows_control_characters_escaped(tiny_classifier, capsys):
    classify.main(["--model", str(tiny_classifier), "--explain", "a\x00b\x1b[31m\tc"])
    out = capsys.readouterr().out
    assert "\x00" not in out and "\x1b" not in out and "\t" not in out
    assert out.splitlines()[0].endswith("a\\x00b\\x1b[31m\\tc")  # the verdict line, escaped as the rows are
    assert classify.shown("é\u00a0\n") == "é\u00a0\\n"  # printable characters stay as they are


def test_benchmark_prints_the_model_alone_beside_the_service(tiny_classifier, capsys):
    classifier = classify.Classifier(tiny_classifier)
    classify.benchmark(classifier, 20, concurrency=4, keep_alive=True)
    out = capsys.readouterr().out
    assert re.search(r"20 requests, 4 concurrent clients, kept-alive connections, float32: [\d.]+ messages/s, "
                     r"[\d.]+ texts a forward pass \(\d+% of the model alone's [\d.]+ messages/s on the same passes; "
                     r"[\d.]+ messages/s on passes of 4\); "
                     r"latency p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms; 0 errors", out)
    classify.benchmark(classifier, 6)
    assert re.search(r"6 requests, 1 concurrent clients, a new connection each, float32: [\d.]+ messages/s, "
                     r"1.0 texts a forward pass \(p50 [\d.]+x the model alone's [\d.]+ ms\)", capsys.readouterr().out)
