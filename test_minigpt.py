"""Tests for minigpt.py, pretrain.py, finetune.py and classify.py. Run: pytest

Everything runs offline on tiny models. GPT-2 parity is checked against Hugging Face
`transformers` (a test-only dependency) on randomly initialised models it writes itself.
Data files come from $MINIGPT_MIRROR (CI sets it to ../shared/data); tests that need one skip
with a reason where it is missing.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import replace
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


def test_one_position_path_equals_the_full_block():
    model = tiny_model()
    x = model.embed(torch.randint(0, TINY.vocab_size, (3, 12)))
    only = torch.tensor([0, 5, 11])
    with torch.no_grad():
        full = model.h[0](x)[torch.arange(3), only]
        one = model.h[0](x, only=only)[:, 0]
    torch.testing.assert_close(one, full, atol=1e-6, rtol=0)


def test_context_longer_than_the_model_is_an_error():
    with pytest.raises(ValueError, match="context"):
        tiny_model()(torch.zeros(1, TINY.context_length + 1, dtype=torch.long))


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
    history = minigpt.train(model, opt, loss, [batch], [batch], epochs=40, eval_every=10, eval_batches=1,
                            count=lambda b: b[0].numel())
    assert history["seen"][-1] == 31 * 64 and history["train_loss"][0] > 10
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert "Ep 1 (Step 000000): Train loss" in capsys.readouterr().out


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
    """Serves `payload` at any path, honouring `Range: bytes=N-` as a real server does."""
    payload, ranges = b"", []

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        type(self).ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

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
    with pytest.raises(minigpt.DataError, match="wrong sha256"):
        minigpt.fetch("other.bin", f"{server}/other.bin", sha(b"something else"))
    assert not (data_dir / "other.bin").exists() and not (data_dir / "other.bin.part").exists()


# ---------------------------------------------------------------- GPT-2 weights

transformers = pytest.importorskip("transformers")
HF_TINY = minigpt.GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2)  # hf_gpt2()'s shape


def hf_gpt2(n_embd=32, n_layer=2, n_head=2, n_positions=64, seed=0):
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
    from safetensors.torch import save_file  # an independent writer of the format
    hf = hf_gpt2()
    save_file(hub_layout(hf, dtype), tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = dict(minigpt.gpt2_tensors(tmp_path / "model.safetensors"))
    assert "h.0.attn.bias" not in got and "h.0.attn.c_attn.bias" in got
    for name, value in hf.transformer.state_dict().items():
        expected = value.to(dtype).float()
        if name.endswith(minigpt.TRANSPOSED):
            expected = expected.T
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
    with pytest.raises(SystemExit) as e:
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
    assert json.loads((tmp_path / "history.json").read_text())["train_loss"]
