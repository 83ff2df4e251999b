"""Tests for minigpt.py, pretrain.py, finetune.py and classify.py. Run: pytest

Everything runs offline on tiny models. GPT-2 parity is checked against Hugging Face
`transformers` (a test-only dependency) on randomly initialised models it writes itself; without
it those tests skip and the rest run. Data files come from $MINIGPT_MIRROR (CI sets it to
../shared/data); tests that need one skip with a reason where it is missing.

Hermetic: every test writes under pytest's temporary folders. The data folder (minigpt.DATA_DIR,
and MINIGPT_DATA for the scripts run as subprocesses) points into one for the whole session.
"""

import copy
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_explicit_attention_equals_the_fused_kernel_in_training(monkeypatch, dropout):
    """Same logits and same gradients; with dropout (random masks differ), the same in eval mode."""
    model = tiny_model(dropout=dropout).train(dropout == 0.0)
    idx = torch.randint(0, TINY.vocab_size, (3, 20))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(minigpt.CausalSelfAttention, "fused", fused)
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
    for fused in (True, False):
        monkeypatch.setattr(minigpt.CausalSelfAttention, "fused", fused)
        cache = minigpt.KVCache(TINY, 2, 20)
        with torch.no_grad():
            first = model(prompt, cache)                  # fills 7 positions (causal, no past)
            several = model(prompt[:, :3], cache)         # 3 new positions after 7: a mask with past
            one = model(prompt[:, :1], cache)             # 1 new position: sees every key
        outputs[fused] = (first, several, one, minigpt.generate(model, prompt, 12))
    for a, b in zip(outputs[True][:3], outputs[False][:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(outputs[True][3], outputs[False][3])
    with torch.no_grad():  # and the cached positions equal a plain forward pass over all 11 tokens
        full = model(torch.cat([prompt, prompt[:, :3], prompt[:, :1]], dim=1))
    torch.testing.assert_close(torch.cat(outputs[False][:3], dim=1), full, atol=1e-5, rtol=0)


def test_causal_mask_with_and_without_past():
    assert minigpt.causal_mask(3, 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert minigpt.causal_mask(2, 2).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_weight_decay_only_on_matrices_that_multiply():
    model = tiny_model()
    optimizer = minigpt.adamw(model, 1e-3, 0.1, "cpu")
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
        assert minigpt.lm_loss(model, batch, "cpu", torch.float32).item() == \
            torch.nn.functional.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()).item()


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


def test_bfloat16_training_keeps_float32_weights_gradients_and_optimizer_state():
    model = tiny_model().train()
    optimizer = minigpt.adamw(model, 1e-3, 0.1, "cpu")
    batch = (torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    loss = minigpt.lm_loss(model, batch, "cpu", torch.bfloat16)
    expected = minigpt.lm_loss(model, batch, "cpu", torch.float32)
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

def test_window_dataset_inputs_and_shifted_targets():
    ds = minigpt.WindowDataset(list(range(10)), max_length=4, stride=3)
    assert len(ds) == 2
    x, y = ds[1]
    assert x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]


def test_padded_dataset(tokenizer):
    ds = minigpt.PaddedDataset(["hi there", "a much longer message than that", ""], [0, 1, 0], tokenizer, 5)
    assert ds.ids.shape == (3, 5)
    assert ds.lengths.tolist() == [2, 5, 1] and ds.truncated.tolist() == [False, True, False]
    assert ds.ids[0, 2:].tolist() == [minigpt.EOT] * 3
    assert minigpt.PaddedDataset(["a b c", "a"], [0, 1], tokenizer).max_length == 3


def test_loss_falls_when_overfitting_a_tiny_batch(capsys):
    torch.manual_seed(0)
    model = minigpt.GPT(TINY)
    batch = (torch.randint(0, 100, (4, 16)), torch.randint(0, 100, (4, 16)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = lambda b: minigpt.lm_loss(model, b, "cpu")
    history = minigpt.train(model, opt, loss, [batch], epochs=40, eval_every=10, eval_sets={"train": [batch]},
                            count=lambda b: b[0].numel())
    assert history["seen"][-1] == 31 * 64 and history["train"][0] > 10
    assert history["train"][-1] < 0.5 * history["train"][0]
    assert "Ep 1 (Step 000000): Train loss" in capsys.readouterr().out


def test_training_stops_after_max_steps_within_an_epoch():
    torch.manual_seed(0)
    model = minigpt.GPT(TINY)
    batches = [(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))) for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ends = []
    history = minigpt.train(model, opt, lambda b: minigpt.lm_loss(model, b, "cpu"), batches, epochs=3,
                            eval_every=1, eval_sets={}, count=lambda b: 1, on_epoch_end=ends.append, max_steps=6)
    assert history["step"] == [0, 1, 2, 3, 4, 5] and history["seen"][-1] == 6
    assert ends == [1]  # epoch 1 ended (4 steps); epoch 2 stopped after its second step


def test_cosine_learning_rate():
    lrs = [minigpt.cosine_lr(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


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


def test_gpt2_124m_shape_matches_transformers(tmp_path):
    hf = hf_gpt2(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    hf.save_pretrained(tmp_path / "hf")
    out = minigpt.convert(tmp_path / "hf" / "model.safetensors", minigpt.PRESETS["gpt2-small"], tmp_path / "c")
    model = minigpt.load_model(out)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert_same_as_hf(hf, model)


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

@needs_mirror
def test_pretrain_runs_and_writes_its_files(tmp_path, monkeypatch, capsys):
    import pretrain
    monkeypatch.setenv("MINIGPT_MIRROR", str(MIRROR))
    pretrain.main(["--preset", "tiny", "--context-length", "32", "--epochs", "1", "--eval-every", "20",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in out and "Sample after epoch 1" in out and "tokens/s" in out
    model, _ = minigpt.load_checkpoint(tmp_path / "model.pt")
    assert model.cfg.context_length == 32
    ET.parse(tmp_path / "loss.svg")
    assert json.loads((tmp_path / "history.json").read_text())["train"]


# ---------------------------------------------------------------- finetune.py

import finetune  # noqa: E402  (here, next to the tests that use it)


def test_read_sms_splits_at_the_first_tab_and_keeps_text_exact(tmp_path):
    path = tmp_path / "sms.txt"
    path.write_bytes('ham\t"Quoted" start, never closed\nspam\tWin £100\tnow \nham\t  spaces kept \n'.encode())
    assert finetune.read_sms(path) == [("ham", '"Quoted" start, never closed'), ("spam", "Win £100\tnow "),
                                       ("ham", "  spaces kept ")]
    path.write_bytes(b"ham\tfine\nspam no tab here\n")
    with pytest.raises(minigpt.DataError, match="line 2"):
        finetune.read_sms(path)
    path.write_bytes(b"ham\tfine\nham\t\xff\xfe\n")
    with pytest.raises(minigpt.DataError, match="line 2: not UTF-8"):
        finetune.read_sms(path)


def synthetic_messages(n_ham=60, n_spam=20, seed=0):
    rng = np.random.default_rng(seed)
    ham_words = "see you at lunch later ok thanks love home dinner tomorrow".split()
    spam_words = "WIN cash PRIZE claim now call 0800 FREE txt urgent".split()
    return ([("ham", " ".join(rng.choice(ham_words, 6))) for _ in range(n_ham)] +
            [("spam", " ".join(rng.choice(spam_words, 6))) for _ in range(n_spam)])


def test_balance_and_split_are_deterministic():
    messages = synthetic_messages() + [("ham", "dup"), ("ham", "dup")]
    a, b = finetune.split_sms(messages, seed=1), finetune.split_sms(messages, seed=1)
    assert a == b and a != finetune.split_sms(messages, seed=2)
    assert [len(a[k]) for k in ("train", "validation", "test", "unseen_ham")] == [28, 4, 8, 42]
    balanced = a["train"] + a["validation"] + a["test"]
    assert sum(label == "spam" for label, _ in balanced) == 20
    assert sorted(balanced + a["unseen_ham"]) == sorted(messages)  # every message used exactly once
    assert len(finetune.split_sms(messages, seed=1, dedupe=True)["unseen_ham"]) == 41


@needs_mirror
def test_the_real_collection_parses_to_the_published_counts():
    messages = finetune.read_sms(MIRROR / "SMSSpamCollection")
    assert len(messages) == 5574 and sum(label == "spam" for label, _ in messages) == 747
    # Lines 5,082-5,084: an unclosed quote that makes CSV readers merge three messages into one.
    assert messages[5081][1].startswith('"Keep ur problems') and messages[5081][1].endswith("SD..")
    assert messages[5082] == ("ham", "Yeah, give me a call if you've got a minute")
    assert messages[5083][1].startswith('"HI BABE') and messages[5083][1].endswith('CALL U"')
    splits = finetune.split_sms(messages, seed=123)
    assert [len(splits[k]) for k in ("train", "validation", "test", "unseen_ham")] == [1045, 149, 300, 4080]


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def tiny_base(trainable, seed=0, cfg=TINY):
    """The tiny random base model finetune.py starts from for `trainable` (NF4 layers for qlora)."""
    return finetune.base_model(dict(init="random", config=asdict(cfg), seed=seed, trainable=trainable), "cpu")


@pytest.mark.parametrize("trainable", finetune.TRAINABLE)
def test_each_trainable_choice_trains_exactly_its_parameters(trainable):
    model = finetune.make_classifier(tiny_base(trainable), trainable)
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
    plain = finetune.make_classifier(tiny_model(), "head")
    lora = finetune.make_classifier(tiny_model(), "lora", lora_rank=4, lora_alpha=8)
    lora.lm_head.load_state_dict(plain.lm_head.state_dict())
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    with torch.no_grad():
        assert torch.equal(finetune.classify(lora, ids, lengths, "last_real"),
                           finetune.classify(plain, ids, lengths, "last_real"))
        lora.h[0].attn.c_attn.B.fill_(0.1)  # once B moves, the output moves
        assert not torch.equal(finetune.classify(lora, ids, lengths, "last_real"),
                               finetune.classify(plain, ids, lengths, "last_real"))


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
    qlora = finetune.make_classifier(tiny_base("qlora"), "qlora", lora_rank=4, lora_alpha=8)
    plain = finetune.make_classifier(tiny_base("lora"), "lora", lora_rank=4, lora_alpha=8)
    copy_to_plain(qlora, plain)
    assert (qlora.h[0].attn.c_attn.B == 0).all()
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    for pool in finetune.POOLS:
        with torch.no_grad():
            assert torch.equal(finetune.classify(qlora, ids, lengths, pool), finetune.classify(plain, ids, lengths, pool))
    # Trained, the adapters move: the output and the gradients stay those of the dequantized model
    # (through NF4Matmul's own backward and the blocks' recomputation).
    for model in (qlora, plain):
        model.h[1].mlp.c_fc.B.data.fill_(0.1)
        model.train()
        finetune.classify(model, ids, lengths, "last_real").square().sum().backward()
    assert qlora.recompute_blocks and not plain.recompute_blocks
    plain_parameters = dict(plain.named_parameters())
    assert trainable_names(qlora) == trainable_names(plain)
    for name in trainable_names(qlora):
        torch.testing.assert_close(qlora.get_parameter(name).grad, plain_parameters[name].grad, rtol=1e-5,
                                   atol=1e-6, msg=name)
    # Block 0's gradients come back through block 1's NF4 layers; A trains once its B is not zero.
    assert qlora.h[0].attn.c_attn.B.grad.abs().sum() > 0 and qlora.h[1].mlp.c_fc.A.grad.abs().sum() > 0


def test_qlora_in_bfloat16_dequantizes_to_bfloat16_and_trains_float32_adapters():
    model = finetune.make_classifier(tiny_base("qlora"), "qlora")
    model.h[0].attn.c_attn.B.data.normal_(0, 0.1)
    ids, lengths = torch.randint(0, TINY.vocab_size, (3, 10)), torch.tensor([10, 4, 7])
    with torch.no_grad():
        expected = finetune.classify(model, ids, lengths, "last_real")
    with minigpt.autocast("cpu", torch.bfloat16):
        assert finetune.compute_dtype(torch.zeros(1)) == torch.bfloat16
        got = finetune.classify(model.train(), ids, lengths, "last_real")
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
    cfg, tensors = minigpt.model_tensors(tmp_path / "base", dropout=0.0)
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


@pytest.mark.parametrize("pool", finetune.POOLS)
@pytest.mark.parametrize("trainable", ["head", "last_block", "last_two_blocks"])
def test_cached_frozen_blocks_give_the_full_forward_logits_and_loss(tokenizer, pool, trainable):
    torch.manual_seed(0)
    model = finetune.make_classifier(minigpt.GPT(replace(TINY, n_layers=3)).eval(), trainable)
    texts = ["hello there", "WIN a free prize now, call 0800 123", "ok", "see you at lunch tomorrow then"]
    data = minigpt.PaddedDataset(texts, [0, 1, 0, 0], tokenizer)
    lengths = torch.full_like(data.lengths, data.max_length) if pool == "last" else data.lengths
    frozen = finetune.frozen_blocks(model, trainable)
    features = finetune.frozen_features(model, finetune.examples_of(data, pool), frozen, "cpu", batch_size=3)
    x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    with torch.no_grad():
        full = finetune.classify(model, data.ids, lengths, pool)
        cached = finetune.classify(model, x, lengths, pool, frozen)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    loss = lambda logits: torch.nn.functional.cross_entropy(logits, data.labels).item()
    assert loss(cached) == pytest.approx(loss(full), abs=1e-5)


def test_bfloat16_frozen_blocks_and_cache_give_the_float32_logits(tokenizer):
    torch.manual_seed(0)
    model = finetune.make_classifier(minigpt.GPT(replace(TINY, n_layers=3)).eval(), "last_block")
    data = minigpt.PaddedDataset(["hello there", "WIN a free prize now, call 0800 123", "ok"], [0, 1, 0], tokenizer)
    with torch.no_grad():
        expected = finetune.classify(model, data.ids, data.lengths, "last_real")
    frozen = finetune.frozen_blocks(model, "last_block")
    model.h[:frozen].to(torch.bfloat16)  # as finetune.py does in bfloat16: the frozen blocks cast once
    features = finetune.frozen_features(model, finetune.examples_of(data, "last_real"), frozen, "cpu")
    assert features[0].dtype == torch.bfloat16  # stored in half the memory
    x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    with torch.no_grad(), minigpt.autocast("cpu", torch.bfloat16):
        got = finetune.classify(model, x, data.lengths, "last_real", frozen)
    assert relative_error(got, expected) < BF16_TOLERANCE


def test_padding_does_not_change_last_real_or_mean(tokenizer):
    model = finetune.make_classifier(tiny_model(), "last_block")
    ids = torch.tensor(tokenizer.encode("free prize call now"))
    short = ids[None]
    padded = torch.cat([ids, torch.full((9,), minigpt.EOT)])[None]
    n = torch.tensor([len(ids)])
    with torch.no_grad():
        for pool in ("last_real", "mean"):
            torch.testing.assert_close(finetune.classify(model, padded, n, pool),
                                       finetune.classify(model, short, n, pool), atol=1e-6, rtol=0)


def write_messages(path, messages):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in messages), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny classifier finetuned end to end on a trivially separable synthetic set:
    (its folder, the model as finetuning left it in memory, meta)."""
    tmp = tmp_path_factory.mktemp("classifier")
    data = write_messages(tmp / "sms.txt", synthetic_messages(200, 100))
    model, meta = finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable", "all",
                                 "--lr", "1e-3", "--epochs", "3", "--unseen-ham", "all", "--out", str(tmp / "out")])
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


def test_saved_classifier_reloads_to_the_trained_models_predictions(tiny_run, tokenizer):
    folder, trained, trained_meta = tiny_run
    texts = ["WIN cash PRIZE claim now", "see you at lunch later", "call me"]
    expected, _, _ = finetune.spam_probabilities(trained, trained_meta, tokenizer, texts)
    model, meta = finetune.load_classifier(folder)
    probs, tokens, truncated = finetune.spam_probabilities(model, meta, tokenizer, texts)
    assert probs == expected and probs[0] > 0.5 > probs[1]
    assert tokens == [len(tokenizer.encode(t)) for t in texts] and truncated == [False] * 3


def test_qlora_finetune_learns_a_separable_set_and_reloads_to_identical_predictions(tmp_path, tokenizer):
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(200, 100))
    out = tmp_path / "out"
    trained, meta = finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable",
                                   "qlora", "--lr", "3e-3", "--epochs", "3", "--unseen-ham", "0", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9 and metrics["trainable"] == "qlora"
    assert metrics["unseen_ham_count"] == 0 and metrics["unseen_ham_false_positive_rate"] is None
    saved = torch.load(out / "classifier.pt", weights_only=True)["state"]
    assert set(saved) == trainable_names(trained) and {"ln_f.weight", "lm_head.weight"} <= set(saved)
    assert all(name.endswith((".A", ".B")) or name.startswith(("ln_f.", "lm_head.")) for name in saved)
    model, meta = finetune.load_classifier(out)
    assert isinstance(model.h[0].mlp.c_fc.dense, finetune.NF4Dense)
    texts = ["WIN cash PRIZE claim now", "see you at lunch later", "call me", "FREE txt urgent 0800"]
    expected, _, _ = finetune.spam_probabilities(trained, meta, tokenizer, texts)
    probs, _, _ = finetune.spam_probabilities(model, meta, tokenizer, texts)
    assert probs == expected and probs[0] > 0.5 > probs[1]


def test_max_steps_stops_finetuning_early(tmp_path, capsys):
    data = write_messages(tmp_path / "sms.txt", synthetic_messages(60, 30))
    finetune.main(["--data", str(data), "--init", "random", "--preset", "tiny", "--trainable", "lora",
                   "--max-steps", "3", "--unseen-ham", "0", "--out", str(tmp_path / "out")])
    assert "24 examples seen" in capsys.readouterr().out  # 3 steps of batch 8 (an epoch has 7)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["max_steps"] == 3
    for bad in (["--max-steps", "0"], ["--unseen-ham", "-1"]):
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
    assert lines[0].startswith("spam") and lines[1].startswith("ham") and "messages/s" in plain.stderr
    as_json = run("--file", str(messages), "--json", "-", input="ok thanks\n")
    results = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["label"] for r in results] == ["ham", "spam", "ham"]  # stdin ('-'), then the file
    assert results[0]["text"] == "ok thanks" and set(results[0]) >= {"spam_probability", "tokens", "truncated"}
    missing = run("hello", "--model", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "run finetune.py" in missing.stderr
    assert run("--file", str(tmp_path / "nope.txt")).returncode != 0


def test_inference_matches_what_finetune_measured(tiny_classifier, tokenizer):
    """classify.py must give a message the probability finetune.py's cached evaluation gave it."""
    model, meta = finetune.load_classifier(tiny_classifier)
    texts = [t for _, t in synthetic_messages(30, 30, seed=5)]
    data = minigpt.PaddedDataset(texts, [0] * len(texts), tokenizer, meta["max_length"])
    frozen = finetune.frozen_blocks(model, "last_block")  # evaluate through a cached prefix
    features = finetune.frozen_features(model, finetune.examples_of(data, meta["pool"]), frozen, "cpu")
    _, cached = finetune.predict(model, finetune.Batches(features, torch.arange(len(texts)), 64, shuffle=False),
                                 meta["pool"], frozen, "cpu")
    cached = cached[:, 1]  # spam
    order = np.argsort(data.lengths.numpy(), kind="stable")
    served = torch.tensor([r["spam_probability"] for r in classify.Classifier(tiny_classifier)(texts)])
    torch.testing.assert_close(served[order], cached, atol=1e-5, rtol=0)


def test_bfloat16_classifier_gives_float32_probabilities_within_tolerance(tiny_classifier):
    texts = [t for _, t in synthetic_messages(10, 10, seed=7)]
    plain = [r["spam_probability"] for r in classify.Classifier(tiny_classifier)(texts)]
    fast = classify.Classifier(tiny_classifier, dtype=torch.bfloat16)
    assert fast.model.lm_head.weight.dtype == torch.bfloat16
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
        page.wait_for_selector("#verdict.spam")
        assert page.inner_text("#label") == "Spam" and "spam probability" in page.inner_text("#detail")
        page.fill("#text", "see you at lunch later")
        page.press("#text", "Control+Enter")
        page.wait_for_selector("#verdict.ham")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_a_stalled_request_gets_408_and_the_server_goes_on(tiny_classifier):
    import socket
    server = classify.make_server(classify.Classifier(tiny_classifier), port=0)
    server.RequestHandlerClass.timeout = 1  # 30 s in real use
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        s.sendall(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\": ")
        assert s.recv(1000).startswith(b"HTTP/1.0 408")  # the other 90 bytes never came
    assert call(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 200
    server.shutdown()
    server.server_close()
