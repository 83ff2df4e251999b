"""minigpt: a GPT you can read in one sitting.

This one file holds what the scripts share. Read it from the top: it follows the data, from text
to a trained model, and leaves the plumbing for last.

  1. tokens        text <-> GPT-2's token ids (tiktoken)
  2. the model     config, attention (the maths, in the fused kernel), MLP, block, the GPT
  3. generation    a key/value cache; greedy, temperature and top-k sampling
  4. data          texts as token ids, for classifying (pretrain.py cuts windows from token files)
  5. training      the loss, AdamW and its parameter groups, the learning rate
  6. checkpoints   save and load a model, with a digest that tells a damaged file
  7. loading       a model by name: GPT-2's weights (the map of their names), a folder, a checkpoint
  8. plumbing      device and dtype, SVG plots, files (atomic writes, model files, downloads),
                   command-line flags

`python minigpt.py --model gpt2-small --prompt "Every effort moves you"` generates text.
pretrain.py, finetune.py and classify.py build on the pieces below.

The names, beside those of Raschka's "Build a Large Language Model (From Scratch)" (the book) and
of Karpathy's nanoGPT. The modules are named as in OpenAI's GPT-2 checkpoint, so its weights load
by name (gpt2_tensors lists them):

  the book                        nanoGPT                    minigpt
  GPT_CONFIG_124M["emb_dim"] ...  GPTConfig.n_embd ...       GPTConfig.emb_dim, n_heads, n_layers,
                                                             context_length (nanoGPT: block_size)
  GPTModel                        GPT                        GPT
  tok_emb, pos_emb                wte, wpe                   wte, wpe
  trf_blocks                      transformer.h              h
  TransformerBlock: norm1, norm2  Block: ln_1, ln_2          Block: ln_1, ln_2
  MultiHeadAttention: W_query,    CausalSelfAttention:       CausalSelfAttention: c_attn (query,
    W_key, W_value, out_proj        c_attn, c_proj             key and value in one), c_proj
  FeedForward                     MLP: c_fc, c_proj          MLP: c_fc, c_proj
  final_norm, out_head            ln_f, lm_head              ln_f, lm_head
  generate_text_simple, generate  generate                   generate
  calc_loss_batch                 (in train.py)              GPT.forward(x, targets=y)
  train_model_simple              (train.py's loop)          pretrain.py's train() loop
  SpamDataset                     -                          finetune.model_inputs + Batches
  train_classifier_simple         -                          finetune.py's train() loop
  classify_review                 -                          classify.Classifier
  load_weights_into_gpt           GPT.from_pretrained        load_model

"The reference" in these files is the book's chapter 6, as a seed report ran it: GPT-2 124M with a
new 2-way head, the last block and the final LayerNorm trained, reading the last token, 5 epochs
of AdamW (lr 5e-5, weight decay 0.1, batch 8) on the SMS Spam Collection balanced to 747 + 747
messages and split 70/10/20: 95.67 % test accuracy.
"""

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


class DataError(RuntimeError):
    """A file or input could not be had or is not what it should be. The message says what to do;
    every script prints it as one `error: ...` line instead of a traceback."""


# ----------------------------------------------------------------------------------------------
# 1. Tokens: GPT-2 reads integers, not text. Its byte-pair encoding maps text to ids 0..50256;
#    id 50256 is <|endoftext|>, which we also use as padding.
# ----------------------------------------------------------------------------------------------

EOT = 50256


def get_tokenizer():
    """tiktoken's GPT-2 encoding. It downloads two small files once, then reads its cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        raise DataError(
            f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}: {e}).\n"
            "Offline? Put encoder.json and vocab.bpe in a tiktoken cache folder and point "
            "TIKTOKEN_CACHE_DIR at it (README, 'Running offline')"
        ) from e


# ----------------------------------------------------------------------------------------------
# 2. The model. Shapes: B batch, T positions, C = emb_dim channels, nh heads, hs = C // nh.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257     # GPT-2's BPE vocabulary
    context_length: int = 1024  # the most positions the model can see
    emb_dim: int = 768          # C
    n_heads: int = 12           # nh
    n_layers: int = 12          # transformer blocks
    dropout: float = 0.0        # GPT-2 trained with 0.1; we use 0 unless asked
    tied_head: bool = True      # the output layer reuses the token embedding (GPT-2 does)
    embedding_std: float = 0.02 # initial spread of the token and position embeddings (GPT-2: 0.02)

    def __post_init__(self):
        """Refuse shapes no model can have, with a message (a config.json or a flag may be wrong)."""
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            least = 0 if name == "n_layers" else 1  # no blocks: embeddings straight to the output layer
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, not {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads} "
                             "(each head takes emb_dim / n_heads channels)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be at least 0 and less than 1, not {self.dropout!r}")
        if not self.embedding_std > 0:
            raise ValueError(f"embedding_std must be positive, not {self.embedding_std!r}")


PRESETS = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),    # 124M parameters
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),   # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),      # 1558M
    # Small enough to pretrain on a laptop CPU in minutes. Most of its 7M parameters are the
    # 50257 x 128 token embedding, which is also the output layer.
    "mini": GPTConfig(context_length=128, emb_dim=128, n_layers=4, n_heads=4),
    # For tests only: 1.6M parameters, nearly all of them the token embedding.
    "tiny": GPTConfig(context_length=64, emb_dim=32, n_layers=2, n_heads=2),
}
OLD_PRESET_NAMES = {"verdict": "mini"}  # still accepted by --preset, and in saved classifiers


class Dense(nn.Module):
    """y = x @ weight + bias, with weight stored (in, out), as OpenAI stored GPT-2's.

    nn.Linear computes the same with weight stored (out, in). We keep GPT-2's layout because
    multiplying one token's vector by an (in, out) matrix is faster on the CPUs we measured
    (docs/precision.md), and generating text is exactly that, 48 times per token. For inference
    on a CPU, cast_for_inference hands the same product to oneDNN (PackedDense).
    """

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))  # initialised by GPT.__init__
        self.bias = nn.Parameter(torch.zeros(n_out))

    @property
    def shape(self):
        return tuple(self.weight.shape)  # (in, out)

    def weights(self):
        """(weight (in, out), bias): what the layer computes with (finetune.py's LoRA adds to it)."""
        return self.weight, self.bias

    def forward(self, x):
        return x @ self.weight + self.bias  # (..., in) -> (..., out)


class CausalSelfAttention(nn.Module):
    """Each position mixes in the values of the positions up to itself, per head (nh of them, on
    slices of hs = C // nh channels, side by side; c_proj mixes their outputs):
        weights = softmax(q kᵀ / √hs, the future masked out)   # (T, T), each row sums to 1
        output  = weights @ v                                  # (T, hs)"""

    def __init__(self, cfg, layer):
        super().__init__()
        self.c_attn = Dense(cfg.emb_dim, 3 * cfg.emb_dim)  # query, key and value in one matmul
        self.c_proj = Dense(cfg.emb_dim, cfg.emb_dim)      # mixes the heads' outputs
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.layer = layer                                 # which slot of a KVCache is ours

    def forward(self, x, cache=None):
        """x: (B, T, C) -> (B, T, C). With a KVCache, x holds the T positions after its `length`."""
        B, T, C = x.shape
        past = cache.length if cache is not None else 0       # positions already in the cache
        if past and T > 1:
            raise ValueError(f"{T} new positions after {past} cached ones: feed one at a time")
        q, k, v = self.heads(x)                               # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.append(self.layer, k, v)             # (B, nh, past + T, hs)
        # No past: position i sees keys 0..i, the lower triangle ("causal"). One new token after
        # the cached ones sees every key, so it needs no mask.
        y = self.attend(q, k, v, causal=past == 0)            # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                # (B, T, C): heads side by side again
        return self.c_proj(y)

    def heads(self, x):
        """Queries, keys and values of x (B, T, C), one slice of hs channels per head: (B, nh, T, hs) each."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)              # (B, T, C) each
        return [t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v)]

    def attend(self, q, k, v, sees=None, causal=False):
        """dropout(softmax(q kᵀ / √hs, masked)) @ v, (B, nh, Tq, hs), by PyTorch's fused kernel. q: (B, nh,
        Tq, hs); k, v: (B, nh, Tk, hs); sees: (B, nh, Tq, Tk), True where a query may see a key (the
        book's mask is its opposite, True where hidden); causal: tril(ones(T, T)) as sees."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else sees, is_causal=causal,
                                              dropout_p=self.dropout if self.training else 0.0)


class MLP(nn.Module):
    """Per position: widen to 4C, bend with GELU (GPT-2's tanh approximation), project back to C."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Dense(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")  # a module, so that inference can fold it into c_fc
        self.c_proj = Dense(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).
    The residual sums let each block add a correction instead of rewriting x.
    Dropout (p = cfg.dropout, only in training mode) acts on each correction before it is added
    (self.drop), and inside attention on its weights (attend's dropout_p)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.drop(self.attn(self.ln_1(x), cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)       # token id -> vector
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)   # position -> vector
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tied_head:  # as in GPT-2: reading and writing tokens share one table
            self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2's initialisation (see init_parameter)
            init_parameter(name, p, cfg)

    def embed(self, idx, past=0):
        """Token ids (B, T) at positions past..past+T-1 -> (B, T, C), C = cfg.emb_dim: what the token is plus where."""
        if past + idx.shape[1] > self.cfg.context_length:
            raise ValueError(f"{past + idx.shape[1]} positions, but the context is {self.cfg.context_length}")
        positions = torch.arange(past, past + idx.shape[1], device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(positions))                   # (B, T, C)

    def forward(self, idx, cache=None, targets=None):
        """Token ids (B, T) -> logits (B, T, vocab_size), or given targets (B, T) the loss (here, so
        that DistributedDataParallel sees it all). With a KVCache, idx holds only the new positions."""
        x = self.embed(idx, cache.length if cache is not None else 0)  # (B, T, C)
        for block in self.h:
            x = block(x, cache)                                        # (B, T, C)
        if cache is not None:
            cache.length += idx.shape[1]                               # every layer holds the T new positions
        x = self.ln_f(x)                                               # (B, T, C)
        if targets is None:
            return self.lm_head(x)                                     # (B, T, vocab_size)
        # The book's F.cross_entropy(logits.flatten(0, 1), targets.flatten()): -log p(target) at every
        # one of the B·T positions, averaged; a chunk of positions at a time (ChunkedCrossEntropy).
        return ChunkedCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                         torch.is_grad_enabled())      # (B·T, C), (vocab, C), (B·T,)


def init_parameter(name, p, cfg):
    """GPT-2's initialisation of the parameter `name` (as GPT.named_parameters() calls it), in place.

    N(0, 0.02), zero biases, LayerNorm gains 1; the layers that write into the residual stream are
    scaled down by sqrt(2 * n_layers) so the sum of 2 * n_layers corrections stays O(1). By name,
    so that a big model can also be initialised one tensor at a time (finetune.py's QLoRA does).
    """
    if name.endswith("bias"):
        nn.init.zeros_(p)
    elif "ln_" in name:
        nn.init.ones_(p)
    elif name in ("wte.weight", "wpe.weight"):
        nn.init.normal_(p, 0.0, cfg.embedding_std)
    else:
        std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("c_proj.weight") else 0.02
        nn.init.normal_(p, 0.0, std)
    return p


# ----------------------------------------------------------------------------------------------
# 3. Generation: repeatedly append the next token. Greedy takes the most likely one; sampling
#    draws from softmax(logits / temperature), optionally among the top_k most likely only. The
#    key/value cache that makes each new token cost one position comes first.
# ----------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every position seen so far, for every layer: token t+1 needs those of
    positions 0..t, so with the cache each new token costs one position, not t + 1."""

    def __init__(self, cfg, batch_size, max_len, device=None, dtype=torch.float32):
        hs = cfg.emb_dim // cfg.n_heads
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions every layer holds (GPT.forward adds the new ones after its blocks)

    def append(self, layer, k, v):
        """Store the (B, nh, T, hs) keys and values of T new positions; return all, (B, nh, length + T, hs)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end], self.v[layer, :, :, self.length:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None,
             use_cache=True, generator=None):
    """idx: (B, T) prompt ids -> (B, T + up to max_new_tokens) ids; stops once every row has made
    `eos_id`. The model sees the last context_length tokens; once that window slides, positions
    shift, so the cache is rebuilt from the window: the tokens are those of the cache-free path."""
    ctx = model.cfg.context_length
    cache = None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,): produced eos_id
    with eval_mode(model):
        for _ in range(max_new_tokens):
            if cache is not None and cache.length < ctx:  # the cache holds every earlier position
                logits = model(idx[:, -1:], cache)          # (B, 1, vocab): the newest token only
            else:  # first step, the window slid, or no cache: the whole cropped window, filling a new cache
                window = idx[:, -ctx:]
                cache = KVCache(model.cfg, idx.shape[0], min(ctx, window.shape[1] + max_new_tokens),
                                idx.device, model.wte.weight.dtype) if use_cache else None
                logits = model(window, cache)               # (B, T, vocab)
            next_id = next_token(logits[:, -1, :].float(), temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None:
                finished |= next_id[:, 0] == eos_id
                if finished.all():
                    break
    return idx


def next_token(logits, temperature, top_k, generator):
    """(B, 1) ids from the last position's logits (B, vocab_size): the most likely (temperature 0)
    or a draw from softmax(logits / temperature), among the top_k most likely if given."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1): k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def complete(model, tokenizer, prompt, max_new_tokens, **kwargs):
    """Text in, text out: the prompt followed by its continuation."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})], device=device)
    return tokenizer.decode(generate(model, idx, max_new_tokens, **kwargs)[0].tolist())


# ----------------------------------------------------------------------------------------------
# 4. Data for classifying: texts as token ids (finetune.py pads them into batches).
# ----------------------------------------------------------------------------------------------

def encode(texts, tokenizer, max_length=None):
    """(ids, token counts): each text as a list of token ids, cut to max_length, and how many
    tokens it had before the cut. Text that spells "<|endoftext|>" is just text here (no special
    tokens from user input); an empty text reads as one <|endoftext|>."""
    ids = [tokenizer.encode(t, disallowed_special=()) for t in texts]
    counts = [len(i) for i in ids]
    return [i[:max_length] or [EOT] for i in ids], counts


# ----------------------------------------------------------------------------------------------
# 5. Training. The loops themselves are in pretrain.py and finetune.py, where they can be seen;
#    here are their pieces.
# ----------------------------------------------------------------------------------------------

class ChunkedCrossEntropy(torch.autograd.Function):
    """The book's F.cross_entropy(h @ weightᵀ, targets), h: (N, C), weight: (vocab, C), targets: (N,),
    a chunk of positions at a time, so that the (N, vocab) logits never exist whole: each chunk's
    gradients are taken while its logits exist, and backward only scales them. Batch 32: 1.8x the
    tokens/s in float32, 1.4x in bfloat16, in half the memory (docs/pretraining-pays-off.md)."""

    chunk = 1024  # positions at a time: at most 1024 x 50,257 float32 logits (206 MB) exist at once

    @staticmethod
    def forward(ctx, h, weight, targets, grads):  # grads: False when only the loss is wanted
        ctx.n, total, chunk = len(h), 0.0, ChunkedCrossEntropy.chunk
        if grads:
            ctx.grad_h, ctx.grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, ctx.n, chunk):
            hc, t = h[i:i + chunk], targets[i:i + chunk]                         # (n, C), (n,)
            log_p = torch.log_softmax(head_logits(hc, weight).float(), dim=-1)   # (n, vocab): hc @ weightᵀ
            total += F.nll_loss(log_p, t, reduction="sum")                       # the sum of -log p(target)
            if grads:  # of the sum: d/d logits = softmax - one_hot(t), in place of log_p
                g = log_p.exp_()
                g[torch.arange(len(t), device=t.device), t] -= 1
                ctx.grad_h[i:i + len(t)] = g @ weight                            # (n, C)
                ctx.grad_w += (g.T @ hc).float()                                 # (vocab, C)
        return total / ctx.n                                                     # the mean over the N positions

    @staticmethod
    def backward(ctx, grad_loss):  # the mean's gradients are 1 / N of the sum's
        return ctx.grad_h * (grad_loss / ctx.n), ctx.grad_w * (grad_loss / ctx.n), None, None


@torch.no_grad()
def lm_evaluate(model, batches, dtype=torch.float32):
    """Mean next-token cross-entropy per window over batches of (x, y) (GPT.forward's loss), in eval
    mode (no dropout). Each batch's mean is weighted by its size, so the result does not depend on
    how windows were batched."""
    total = 0.0
    windows = 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for x, y in batches:
            with autocast(device, dtype):
                loss = model(x.to(device), targets=y.to(device))
            total += loss.item() * len(x)
            windows += len(x)
    return total / max(windows, 1)


def adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW over the parameters that train, in two groups.

    Weight decay pulls weights towards zero a little at every step. As in GPT-2 and nanoGPT it
    goes only on the 2-D weight matrices that multiply (Dense layers, heads, LoRA's A and B): not
    on biases and LayerNorm gains, which shift and scale rather than mix, and not on embeddings
    (a token's row only gets gradient when the token occurs, so decay would mostly shrink the
    rows of rare tokens). A tied output layer is the token embedding, so it is not decayed either.
    fused=True does the whole update in one kernel: much faster than the default on a CPU.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each parameter once, even when tied
        if p.requires_grad:
            (decay if p.dim() == 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


# ----------------------------------------------------------------------------------------------
# 6. Checkpoints: torch.save of a dict, with a sha256 of its contents, so that a damaged file is
#    refused instead of trained on.
# ----------------------------------------------------------------------------------------------

def save_pt(path, content):
    """torch.save of a dict, with its digest, atomically: the file is whole or absent."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk is an OSError
        torch.save({**content, "sha256": digest(content).hexdigest()}, f)


def digest(value, h=None):
    """The sha256 of everything in a checkpoint: its nested dicts and lists, every tensor's dtype,
    shape and bytes, every other value's repr, in a fixed order. Saved with the checkpoint, it
    tells a damaged file (a flipped bit on a disk, a bad copy) from a good one when it is loaded."""
    h = hashlib.sha256() if h is None else h
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}|".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}:".encode())
            digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"list {len(value)}|".encode())
        for item in value:
            digest(item, h)
    else:
        h.update(f"{value!r}|".encode())
    return h


def load_pt(path, device="cpu", what="a minigpt checkpoint", remedy="use another copy, or train again"):
    """The dict save_pt wrote, checked against its digest; a DataError that ends in `remedy` if
    it is not `what` or is damaged. weights_only=True: loading a file never runs code from it."""
    try:
        content = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not {what} ({type(e).__name__}: {reason}); {remedy}") from e
    expected = content.pop("sha256", None) if isinstance(content, dict) else None
    if expected is not None and digest(content).hexdigest() != expected:
        raise DataError(f"{path} is damaged: its contents do not match the sha256 saved with them; {remedy}")
    return content


def save_checkpoint(path, model, **extra):
    """config + weights (+ anything in extra), written atomically with a digest."""
    save_pt(path, {"config": asdict(model.cfg), "model": model.state_dict(), **extra})


def read_checkpoint(path, device="cpu"):
    """(config, checkpoint dict)."""
    ck = load_pt(path, device)
    try:
        return GPTConfig(**ck["config"]), ck
    except Exception as e:
        raise DataError(f"{path} is not a minigpt checkpoint ({type(e).__name__}: {e})") from e


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict)."""
    cfg, ck = read_checkpoint(path, device)
    return load_weights(cfg, ck["model"].items(), device), ck


# ----------------------------------------------------------------------------------------------
# 7. Loading a model: GPT-2's weights (OpenAI's, published by Hugging Face as one model.safetensors
#    file per size, converted once to one .npy file per parameter), a folder, or a checkpoint.
#    The names in OpenAI's file are minigpt's own (gpt2_tensors has the map); the files
#    themselves are read in the plumbing section ("model files").
# ----------------------------------------------------------------------------------------------

def load_model(spec, device="cpu", **config_changes):
    """A GPT from `spec`: a GPT-2 name (gpt2-small, ...), a converted folder (config.json + .npy),
    a folder written by transformers' save_pretrained (config.json + model.safetensors), or a
    checkpoint written by pretrain.py (.pt). config_changes: e.g. dropout=0.1 (pretrain.py --init)."""
    cfg, tensors = model_tensors(spec, device)
    return load_weights(replace(cfg, **config_changes), tensors, device)


def model_tensors(spec, device="cpu"):
    """(config, (name, array) pairs) of the model `spec` names (see load_model). From files of
    .npy or safetensors the arrays are read one at a time, as the pairs are asked for."""
    path = gpt2_dir(spec) if spec in GPT2_FILES else Path(spec)
    if path.is_file():  # a checkpoint written by pretrain.py (save_checkpoint)
        cfg, ck = read_checkpoint(path, device)
        warn_if_unfinished(path, ck)
        return cfg, ck["model"].items()
    if (path / "model.safetensors").exists():  # transformers' save_pretrained: OpenAI's names
        return config_from_hf(path / "config.json"), gpt2_tensors(path / "model.safetensors")
    if (path / "config.json").exists():  # converted (gpt2_dir): one <minigpt name>.npy per parameter
        return read_config(path / "config.json"), ((p.stem, read_npy(p)) for p in path.glob("*.npy"))
    raise DataError(f"{spec}: not a GPT-2 name ({', '.join(GPT2_FILES)}), a model folder or a checkpoint file")


def gpt2_tensors(path):
    """Yield (minigpt name, float32 array) from a GPT-2 safetensors file. The names are OpenAI's;
    minigpt's modules have the same names, and Dense keeps OpenAI's (in, out) layout, so nothing
    is transposed. Per block N, and beside them the book's load_weights_into_gpt:

      in the file (OpenAI's names)     minigpt            shape     the book
      [transformer.]wte.weight         wte.weight         (V, C)    tok_emb.weight
      [transformer.]wpe.weight         wpe.weight         (ctx, C)  pos_emb.weight
      h.N.ln_1.weight, .bias           h.N.ln_1.*         (C,)      trf_blocks[N].norm1.scale, .shift
      h.N.attn.c_attn.weight, .bias    h.N.attn.c_attn.*  (C, 3C)   att.W_query, W_key, W_value: split in 3, transposed
      h.N.attn.c_proj.weight, .bias    h.N.attn.c_proj.*  (C, C)    att.out_proj (transposed)
      h.N.ln_2.weight, .bias           h.N.ln_2.*         (C,)      norm2.scale, .shift
      h.N.mlp.c_fc.weight, .bias       h.N.mlp.c_fc.*     (C, 4C)   ff.layers[0] (transposed)
      h.N.mlp.c_proj.weight, .bias     h.N.mlp.c_proj.*   (4C, C)   ff.layers[2] (transposed)
      ln_f.weight, .bias               ln_f.*             (C,)      final_norm.scale, .shift
      lm_head.weight (some files)      skipped: wte.weight (V, C)   out_head, a copy of wte
      h.N.attn.bias, .masked_bias      skipped: the causal mask (the attention masks by itself)

    The prefix `transformer.` is in files written by today's transformers' save_pretrained, the
    masks (1, 1, 1024, 1024) in OpenAI's file on the Hub. load_weights checks every shape.
    """
    for name, a in read_safetensors(path):
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # not c_attn.bias
            continue
        yield name, a


def load_weights(cfg, tensors, device="cpu", model=None):
    """Build a GPT from (name, array) pairs, checking that every parameter comes once, with its
    shape (the table in gpt2_tensors). The model is built on the meta device: no memory until
    each array becomes its parameter. model: a GPT already built on "meta" to fill instead
    (finetune.py's QLoRA passes one whose layers hold buffers, filled and checked the same way).
    """
    if model is None:
        with torch.device("meta"):
            model = GPT(cfg)
    # Every parameter and buffer by name; a tied lm_head is not listed (it is wte.weight).
    expected = {name: t.shape for name, t in (*model.named_parameters(), *model.named_buffers())}
    state = {}
    for name, a in tensors:
        if name == "lm_head.weight" and cfg.tied_head:  # it is wte.weight (some files store it anyway)
            continue
        if name not in expected:
            raise DataError(f"unexpected tensor {name} {tuple(a.shape)}")
        if tuple(a.shape) != tuple(expected[name]):
            raise DataError(f"tensor {name} has shape {tuple(a.shape)}, expected {tuple(expected[name])}")
        state[name] = torch.as_tensor(a, device=device)  # shares a CPU array's memory: no copy
    if missing := sorted(expected.keys() - state.keys()):
        raise DataError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if cfg.tied_head:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tied_head:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the parameters: tie them again
    return model.eval()


# ==============================================================================================
# 8. Plumbing: everything the sections above need but do not teach.
# ==============================================================================================

import argparse
import copy
import ctypes
import errno
import http.client
import secrets
import shutil
import signal
import urllib.error
import urllib.request
import zipfile
from xml.sax.saxutils import escape

try:
    import fcntl  # folder locks (atomic_folder); Windows has none
except ImportError:
    fcntl = None

HERE = Path(__file__).resolve().parent
# Downloads, token files and converted weights live here (git-ignored); MINIGPT_DATA moves them.
DATA_DIR = Path(os.environ.get("MINIGPT_DATA") or HERE / "data")

# ---------------------------------------------------------------- where the numbers run

def head_logits(h, weight):
    """h @ weightᵀ, (n, C) x (vocab, C) -> (n, vocab); in float32 on a CPU by oneDNN (MKL rearranges
    the weight on every call): pretraining in float32, 2-core EPYC, 2,166-2,299 -> 2,448-2,711 tokens/s
    (docs/precision.md)."""
    if (h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available()):
        return torch.ops.mkldnn._linear_pointwise(h, weight, None, "none", [], "")
    return h @ weight.T


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the block (no dropout), then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pick_device(name=None):
    """The fastest device here (CUDA, then Apple's MPS, then the CPU), unless one is named."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DataError(f"--device {name}: not a device; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"--device {name}: CUDA is not available here (no NVIDIA GPU, or a CPU-only "
                            f"build of torch {torch.__version__}); use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DataError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise DataError(f"--device {name}: minigpt runs on cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = ("auto", "float32", "bfloat16")  # the choices of --dtype for training
INFERENCE_DTYPES = (*DTYPES, "int8")      # and for inference (classify.py, generating)


def native_bfloat16(device):
    """(True if `device` multiplies bfloat16 matrices in hardware, the reason in words).

    CPUs: x86 needs AMX-BF16 or AVX512-BF16 (Intel since Cooper Lake and Sapphire Rapids, AMD
    since Zen 4), ARM the BF16 extension (e.g. AWS Graviton3); Linux lists them in /proc/cpuinfo.
    Without them PyTorch emulates bfloat16, several times slower than float32.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has bfloat16 units"
        return False, f"{name} has no bfloat16 units"
    if device.type != "cpu":
        return False, f"bfloat16 is not measured on {device.type} here"
    if (cpuinfo := read_cpuinfo()) is None:
        return False, "cannot read /proc/cpuinfo to tell whether this CPU has bfloat16 units"
    return cpu_bfloat16_flags(cpuinfo)


def read_cpuinfo():
    """The text of /proc/cpuinfo (Linux), or None where there is none to read."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


BFLOAT16_UNITS = {"amx_bf16", "avx512_bf16", "bf16"}  # x86's AMX and AVX512 flags; ARM's
INT8_UNITS = {"amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp"}  # int8 dot products: x86's, ARM's


def cpu_flags(cpuinfo, units):
    """Those of `units` that the text of /proc/cpuinfo lists for its first CPU, sorted."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 says flags, ARM says Features
            return sorted(set(value.split()) & units)
    return []


def cpu_bfloat16_flags(cpuinfo):
    """The CPU half of native_bfloat16, from the text of /proc/cpuinfo."""
    found = cpu_flags(cpuinfo, BFLOAT16_UNITS)
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has no bfloat16 units: none of amx_bf16, avx512_bf16, bf16 in /proc/cpuinfo"


def int8_units(device):
    """The CPU's int8 dot-product units that torch's int8 products use (VNNI, AMX-INT8; ARM's dot
    product and I8MM), as /proc/cpuinfo names them; none for other devices."""
    return cpu_flags(read_cpuinfo() or "", INT8_UNITS) if device.type == "cpu" else []


def pick_dtype(name, device):
    """torch.float32 or torch.bfloat16 for `--dtype name` on `device`; says which, and why, once.

    Why bfloat16: it is the top 16 bits of a float32, so it keeps float32's 8 exponent bits and
    its range (1e-38 to 3e38). Gradients neither overflow nor vanish, and unlike float16 (5
    exponent bits) it needs no loss scaling. What it costs: 8 bits of mantissa instead of 24,
    about 3 significant digits (each number rounded by up to 0.4 %). Hence the split: weights,
    gradients and AdamW's state stay float32, and only the matrix products (where the hardware
    is 2-4x faster and the rounding averages out over long sums) run in bfloat16; losses and
    softmaxes are computed in float32.
    """
    device = torch.device(device)
    if name == "auto":
        native, reason = native_bfloat16(device)
        dtype = torch.bfloat16 if native else torch.float32
        print(f"dtype: {dtype_name(dtype)} (auto: {reason})", file=sys.stderr)
        return dtype
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and not (native := native_bfloat16(device))[0]:
        print(f"dtype: bfloat16 as asked, but {native[1]}: expect it to be slower than float32",
              file=sys.stderr)
    return dtype


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def autocast(device, dtype):
    """Mixed precision for a forward pass: float32 weights, matrix products in `dtype`.

    torch.autocast casts the inputs of each matmul, attention and linear layer to bfloat16 as it
    runs and leaves everything else (sums, LayerNorm's statistics, GELU) in float32; the residual
    stream stays float32. For float32 it does nothing at all, so --dtype float32 is exactly the
    plain model. It re-casts the weights on every call, so for inference on small inputs a model
    whose weights were cast to bfloat16 once (model.to(torch.bfloat16)) is faster.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Int8Dense(nn.Module):
    """y = x @ W + b for inference, with W in 8-bit integers and x turned into 8-bit integers as
    it comes: y ≈ (x_q @ W_q) * (s_x * s_w) + b, the product summed exactly in int32.

    W_q: each output column of W divided by s_w = its largest |weight| / 127 and rounded; x_q:
    each token's row of x divided by s_x = its largest |value| / 127 and rounded. Why a scale per
    column and per row, not one for the matrix: a product's error is at most half a step of
    each scale, and a step is set by the largest number it covers. Transformer activations have
    a few large channels and tokens of very different sizes; one scale for everything would make
    the step of every small row as coarse as the largest row needs. Per row and per column, each
    keeps the step its own numbers need, and since y[i, j] depends only on row i of x and
    column j of W, the two scales factor out of the integer sum exactly.
    weight: (in, out), float; bias: (out,) or None; gelu: the MLP's GELU applied to y, in place.
    """

    def __init__(self, weight, bias, gelu=False):
        super().__init__()
        weight = weight.detach().float()
        self.register_buffer("scale", weight.abs().amax(dim=0).clamp_min(1e-12) / 127)     # (out,)
        self.register_buffer("weight_q", torch.round(weight / self.scale).to(torch.int8))  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.gelu = gelu
        # W_q rearranged for oneDNN's product on an x86 CPU, else None. weight_q stays: the plain
        # product's operand (integer_sums), and W_q as a reader (and a test) can look at it.
        self.packed = pack_int8(self.weight_q)
        self.zero_points = torch.zeros(1, dtype=torch.long)  # W_q's, for oneDNN: none, its steps are symmetric

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()                             # (N, in)
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12) / 127  # (N, 1): each token's own
        x_q = rows.div(x_scale).round_().to(torch.int8)                       # (N, in), in [-127, 127]
        y = self.integer_sums(x_q)                                            # (N, out): (x_q @ W_q) * s_w
        y = y.mul_(x_scale)                                                   # in place: no new (N, out) tensor
        y = y if self.bias is None else y.add_(self.bias)
        y = gelu_by_sigmoid_(y) if self.gelu else y
        return y.reshape(*x.shape[:-1], -1)

    def integer_sums(self, x_q):
        """(x_q @ W_q) * s_w, (N, out) float32, from x_q (N, in) int8: the exact int32 sums, each
        column times its scale."""
        if self.packed is None:
            return torch._int_mm(x_q, self.weight_q).float().mul_(self.scale)
        # oneDNN's fast int8 product takes unsigned activations and a zero point: x_q + 128, in
        # [1, 255], with 128 as zero. x_q's bytes read as uint8, plus 128 (wrapping), are exactly
        # that, at 40 % of the cost of converting floats to uint8 (111 against 275 µs for 960 rows).
        # It multiplies the sums by s_w as it writes them, on W_q rearranged once (pack_int8).
        x_u = x_q.view(torch.uint8).add_(128)
        return torch.ops.onednn.qlinear_pointwise(x_u, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                                  1.0, 0, torch.float32, "none", [], "")


def pack_int8(weight_q):
    """W_q (in, out) int8 rearranged once into the blocks oneDNN's int8 product reads, on an x86
    CPU (AVX2 or AVX-512: elsewhere oneDNN's int8 product may have no fast kernel); else None.
    torch._int_mm rearranges W_q on every call: the 124M shape's 48 products, weights not in
    cache, 2-core EPYC, take 11.7 -> 8.9 ms at 30 rows and 314 -> 220 ms at 960; the classifier,
    three pairs of processes, one text 17.9 -> 16.0 ms, 32 texts 105 -> 110 texts/s."""
    if (weight_q.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")):
        return None
    return torch.ops.onednn.qlinear_prepack(weight_q.T.contiguous(), None)  # (out, in), blocked


def gelu_by_sigmoid_(y):
    """GPT-2's GELU, y · ½(1 + tanh u) with u = √(2/π)(y + 0.044715 y³), in place, written as
    y · sigmoid(2u): the same function, since ½(1 + tanh u) = sigmoid(2u). PyTorch's sigmoid
    kernel is 3x faster than its tanh on a CPU: for the (960, 3072) activations of 32 texts of
    30 tokens, 2-core EPYC, 2.44 -> 1.37 ms, and 106.4 -> 112.2 texts/s in int8 (docs/precision.md)."""
    c = 2 * math.sqrt(2 / math.pi)
    s = y * y                                          # (N, 4C)
    s.mul_(0.044715 * c).add_(c).mul_(y).sigmoid_()    # sigmoid(2u)
    return y.mul_(s)


DENSE_LAYERS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))  # in each Block


def dense_layers(block):
    """(module, name) of each Dense layer of a block: the attention's two, the MLP's two."""
    return [(getattr(block, part), name) for part, name in DENSE_LAYERS]


def products(model):
    """(parent, name, weight (in, out), bias (out,) or None) of every matrix product of the model:
    each Dense layer of every block (with what finetune.py added to it: LoRA, NF4, merged into one
    matrix by weights()) and the output layer, for inference to replace."""
    for block in model.h:
        for parent, name in dense_layers(block):
            yield parent, name, *getattr(parent, name).weights()
    yield model, "lm_head", model.lm_head.weight.T, model.lm_head.bias  # nn.Linear keeps (out, in)


def to_int8(model):
    """The model for inference in int8, in place: every product (products()) becomes Int8Dense
    (replace_products); embeddings and LayerNorms stay float32."""
    return replace_products(model, Int8Dense)


def replace_products(model, layer):
    """Every product (products()) replaced by layer(weight, bias, gelu), in place; each MLP's GELU
    moves into its c_fc (gelu=True), the layer that computes its input, to be applied there in
    place: one (rows, 4C) tensor fewer."""
    for parent, name, weight, bias in list(products(model)):
        setattr(parent, name, layer(weight, bias, gelu=name == "c_fc"))  # c_fc: the MLP's first
    for block in model.h:
        block.mlp.gelu = nn.Identity()
    return model


class PackedDense(nn.Module):
    """y = x @ W + b for inference on a CPU, by oneDNN's matrix product on W packed once, with the
    MLP's GELU folded in where `gelu` is set.

    `x @ W` goes to MKL, which rearranges W into the blocks its kernel reads on every call; for
    the few rows of a classifier's text that costs as much as the product itself. oneDNN's
    product takes W rearranged once, here, and applies GELU to each output as it writes it (one
    pass over the (rows, 4C) activations fewer). Measured side by side on the 124M shape, 2-core
    EPYC (`python minigpt.py --model random --compare-dtypes`): float32 forward pass of 4 tokens
    79-84 -> 25-31 ms, decoding 22.5-25 -> 34-37 tokens/s; bfloat16 decoding 30-41 -> 60 tokens/s
    (docs/precision.md).
    weight: (in, out), bias: (out,) or None, in the dtype the product runs in.
    """

    def __init__(self, weight, bias, gelu=False):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().T.contiguous(), None)  # (out, in), blocked
        self.bias = None if bias is None else bias.detach()
        self.post_op, self.algorithm = ("gelu", "tanh") if gelu else ("none", "")

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.post_op, [], self.algorithm)  # (..., in) -> (..., out)


def pack_for_cpu(model, dtype):
    """Every product (products()) as PackedDense in `dtype`, in place (replace_products)."""
    dtype = getattr(torch, dtype)
    return replace_products(model, lambda weight, bias, gelu: PackedDense(
        weight.to(dtype), None if bias is None else bias.to(dtype), gelu))


def cast_for_inference(model, dtype):
    """The model in `dtype` ("float32", "bfloat16" or "int8") for inference, in place. The float
    dtypes cast the parameters, then on a CPU pack the products' weights for oneDNN (PackedDense);
    other devices run the model as it is. int8's layers pack their own (Int8Dense, pack_int8)."""
    if dtype == "int8":
        return to_int8(model)
    cast_parameters(model, dtype)
    if model.wte.weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        pack_for_cpu(model, dtype)
    return model


def compile_model(model):
    """The model (cast_for_inference's) compiled by torch.compile for this CPU: Inductor traces
    the forward pass and writes C++ loops that fuse the small operations between the matrix
    products (int8's quantize and rescale of each input, the bias, GELU, LayerNorm's statistics)
    into a few passes, in place of eager PyTorch's 1,100 or so calls a pass, each its own trip
    through Python and the dispatcher. The products stay oneDNN's. 124M shape, 2-core EPYC, int8,
    each in a process of its own, two runs (docs/precision.md): one text of 30 tokens 9.2-9.5 ->
    6.8-7.6 ms, 32 texts 199-212 -> 236-242 texts/s, the service at 32 clients 164-168 -> 192-198
    messages/s. float32 and bfloat16 passes are nearly all products: no gain beyond the noise.
    What it costs: a C++ compiler, and 10-30 s of compiling for each kind of input
    (compile_warm_up), at start.
    """
    import torch._inductor.config
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception as e:  # Inductor's own check: none of $CXX, g++ (clang++ on macOS) runs
        raise DataError(f"--compile needs a C++ compiler ({e}): install g++ or clang++, or set CXX") from None
    # Freezing: the weights become constants of the compiled code, which Inductor's lowering of
    # oneDNN's int8 product (qlinear_pointwise on packed weights) requires. A setting of the
    # process: every model it compiles after this is frozen too (inference only, as here).
    torch._inductor.config.freezing = True
    return torch.compile(model)


def compile_warm_up(model, device):
    """Compile every program the model can need before the first real input arrives: one for
    any number of texts and tokens above 1 (marked dynamic, else each new size compiles again),
    and one each for a lone text, a text of one token, and both (torch.compile specialises on
    sizes of 1), in inference mode as classifying runs."""
    with torch.inference_mode():
        for shape in ((2, 3), (1, 3), (2, 1), (1, 1)):  # (texts, tokens)
            ids = torch.zeros(shape, dtype=torch.long, device=device)
            for dim in (0, 1):
                if shape[dim] > 1:
                    torch._dynamo.mark_dynamic(ids, dim)
            model(ids)


def cast_parameters(module, dtype):
    for p in module.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    return module


def best_time(fn, repeats=5):
    """The fastest of `repeats` runs of fn(), in seconds, after one to warm up."""
    fn()
    return min(timed(fn) for _ in range(repeats))


def timed(fn):
    """The seconds one run of fn() takes."""
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU runs on after the call returns
    return time.perf_counter() - t0


def inference_dtype(name, device, int8_gain):
    """The dtype for inference: `name`, and for auto the rule training follows (pick_dtype:
    bfloat16 where the device multiplies it natively, else float32), so a command gives the same
    answer on every run of a machine; nothing is timed. int8 changes the answers a little, so it
    runs only when asked. Where auto is float32 and the CPU has int8 dot-product units, int8 is
    faster (with bfloat16 units it is not, or barely: docs/precision.md), and auto says once what
    int8 measured on this path (`int8_gain`) so a user can choose it."""
    if name == "int8":
        print("dtype: int8 (as asked)", file=sys.stderr)
        return name
    device = torch.device(device)
    dtype = dtype_name(pick_dtype(name, device))
    if name == "auto" and dtype == "float32" and (units := int8_units(device)):
        print(f"hint: --dtype int8 uses this CPU's {' and '.join(units)}: {int8_gain} (docs/precision.md)",
              file=sys.stderr)
    return dtype


def set_malloc(keep_freed):
    """How glibc's malloc (Linux) treats big freed blocks; elsewhere this does nothing.

    keep_freed=True (pretraining, classifying): keep them for the next step or pass. By default
    glibc hands big freed blocks back to the kernel (a block mapped on its own, or the free top of
    its heap), and the next allocation of that size must be given fresh zeroed pages. A training
    step or a forward pass allocates the same big tensors again and again (the small model's
    logits for 8 windows of 128 positions are 206 MB; the 124M shape's MLP activations for 32 texts
    of 30 tokens, 12 MB). Kept, the process holds its peak memory until it exits, and the steps
    and passes run faster (docs/pretraining.md, docs/precision.md).
    keep_freed=False (QLoRA): give blocks of 1 MB or more back at once. Its heap fills with holes
    between blocks that stay (GPT-2 XL in 4 bits held 1 GB of freed memory after one forward
    pass); unmapped at once, the peak memory is lower, for some time spent mapping fresh pages.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    if keep_freed:
        libc.mallopt(-4, 0)          # M_MMAP_MAX: no allocation gets a mapping of its own...
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ...and the heap is not given back as it shrinks
    else:
        libc.mallopt(-3, 1 << 20)    # M_MMAP_THRESHOLD: blocks of 1 MB and more are mapped on their own


# ---------------------------------------------------------------- plots

def svg_plot(path, series, xlabel, ylabel, title="", integer_x=False):
    """Write a line chart as a standalone SVG file (any browser opens it). series: {label: (xs,
    ys)}; the legend sits right of the plot, outside it. integer_x: ticks on whole numbers only."""
    W, H = 760, 400                            # the picture, in pixels
    left, right, top, bottom = 80, 150, 40, 55  # margins around the plot area (the legend is on the right)
    xs = [x for s in series.values() for x in s[0]] or [0]
    ys = [y for s in series.values() for y in s[1] if math.isfinite(y)] or [0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    sy = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(left + W - right) / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for x in ticks(x0, x1, integer_x):
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{H - bottom}" stroke="#eee"/>'
                   f'<text x="{sx(x):.1f}" y="{H - bottom + 16}" text-anchor="middle">{tick_label(x)}</text>')
    for y in ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    out += [f'<rect x="{left}" y="{top}" width="{W - left - right}" height="{H - top - bottom}" '
            'fill="none" stroke="black"/>',
            f'<text x="{(left + W - right) / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text transform="translate(16 {(top + H - bottom) / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(ylabel)}</text>']
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    for i, (label, (sxs, sys_)) in enumerate(series.items()):
        color = colors[i % len(colors)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(sxs, sys_) if math.isfinite(y))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        ly = top + 12 + 18 * i
        out.append(f'<line x1="{W - right + 12}" x2="{W - right + 36}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"/>'
                   f'<text x="{W - right + 42}" y="{ly + 4}">{escape(label)}</text>')
    write_text(path, "\n".join(out + ["</svg>\n"]))


def ticks(lo, hi, integer=False):
    """Four to eight round numbers between lo and hi (1, 2 or 5 times a power of ten apart; at
    least 1 apart if integer)."""
    raw = (hi - lo) / 8
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
               if m * 10 ** math.floor(math.log10(raw)) >= raw)
    step = max(step, 1) if integer else step
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def tick_label(x):
    """1,000,000 rather than 1e+06; 0.25 as it is."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:g}"


# ---------------------------------------------------------------- files: written whole or not at all

def temporary_name(path):
    """A hidden, unique name beside `path` (same folder, so a rename onto `path` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def make_folders(folder):
    """Create `folder` and its missing parents; return the ones created, deepest first."""
    made = []
    folder = Path(folder)
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for f in reversed(made):
        f.mkdir()
    return made


def remove_empty(folders):
    """Remove those of `folders` that are empty, in order (deepest first): what a failed write made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            break


# What only a write can fail with: a full disk or quota, a read-only file system, a file too big.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EISDIR, errno.ENOTDIR)


def write_error(path, e):
    """A DataError naming `path` and the reason if the exception e is a failed write, else e.
    (torch.save raises a RuntimeError of its own while it handles the OSError of a write.)"""
    cause = e.__context__ if type(e) is RuntimeError else e
    if isinstance(cause, OSError) and cause.errno in WRITE_ERRORS:
        return DataError(f"cannot write {path}: {cause.strerror}")
    return e


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    If the block fails, the temporary file and the folders made for it are removed, and `path`
    is as it was. A failed write (a full disk, a read-only folder) becomes a DataError naming `path`.
    """
    path = Path(path)
    made = []
    tmp = temporary_name(path)
    try:
        made = make_folders(path.parent)
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave it empty
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one file system
    except Exception as e:
        raise write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not path.exists():
            remove_empty(made)


@contextlib.contextmanager
def atomic_folder(path, replace_existing=True, exclusive=False):
    """Yield a new, empty temporary folder beside `path` to write a folder of outputs into.

    When the block succeeds, the folder becomes `path`, whole. A `path` that exists already is
    replaced (replace_existing), or kept: then it holds the same content, written meanwhile by
    another process, and ours is dropped. When the block fails (an error, Ctrl+C, a full disk),
    the folder is removed and `path` stays as it was; a failed write becomes a DataError.
    exclusive: while the block runs, the folder is locked, and a second process that asks for
    the same `path` is refused; folders left by killed processes are removed. (No locks on Windows.)
    """
    path = Path(path)
    made = []
    tmp = temporary_name(path)
    lock = None
    try:
        made = make_folders(path.parent)
        tmp.mkdir()
        if exclusive and fcntl is not None:
            lock = os.open(tmp, os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refuse_if_locked(path, tmp)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:  # on disk before the rename (see atomic_path)
                    os.fsync(f.fileno())
        if not path.exists():
            os.replace(tmp, path)
        elif replace_existing:
            old = temporary_name(path)
            os.replace(path, old)  # aside, then ours in its place: `path` is only ever whole
            os.replace(tmp, path)
            shutil.rmtree(old)
    except Exception as e:
        raise write_error(path, e) from e
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            remove_empty(made)


def refuse_if_locked(path, mine):
    """A DataError if another process holds the lock of a temporary folder for `path`; remove the
    ones nobody holds (a run that was killed left them)."""
    for other in path.parent.glob(f".{path.name}.*.tmp"):
        if other == mine or not other.is_dir():
            continue
        fd = os.open(other, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another run is writing {path} now (its folder {other.name} is locked); "
                            "wait for it to finish, or give another --out") from None
        finally:
            os.close(fd)
        shutil.rmtree(other, ignore_errors=True)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_utf8(path):
    """The text of a UTF-8 file (a byte-order mark, which Notepad writes, is not text), or a
    DataError naming the file, and the line where the bytes stop being UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 ({e.reason}); save the file as UTF-8") from e


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Progress:
    """One progress line on stderr. In a terminal it is rewritten in place (\\r) at most twice a
    second; in a log file only the final line is written, so a log never holds half lines."""

    def __init__(self):
        self.terminal = sys.stderr.isatty()
        self.start = time.time()
        self.shown = 0.0  # when the line was last written

    def show(self, text):
        if self.terminal and time.time() - self.shown > 0.5:
            self.shown = time.time()
            print(f"\r{text} ", end="", file=sys.stderr, flush=True)

    def done(self, text):
        print(f"\r{text}" if self.terminal else text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model files: checkpoints and GPT-2's

# The GPT-2 files: OpenAI's weights on Hugging Face's Hub (or a mirror), converted once to .npy.
HF_URL = "https://huggingface.co/openai-community/{repo}/resolve/{revision}/model.safetensors"
# Model name -> (Hugging Face repo, revision, sha256). Only gpt2-small's revision and digest are
# pinned (published). For the others we take the current file ("main") and check what can be
# checked without a published digest: that the file is complete (its size equals the header
# plus every tensor's bytes) and that every tensor has the shape the preset demands.
GPT2_FILES = {
    "gpt2-small": ("gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e",
                   "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    "gpt2-medium": ("gpt2-medium", "main", None),
    "gpt2-large": ("gpt2-large", "main", None),
    "gpt2-xl": ("gpt2-xl", "main", None),
}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: see below


def gpt2_dir(name):
    """data/gpt2/<name>/ with converted weights: downloaded (or mirrored) and converted if needed.
    The mirror holds `$MINIGPT_MIRROR/<name>/model.safetensors`."""
    out = DATA_DIR / "gpt2" / name
    if not (out / "config.json").exists():
        repo, revision, sha = GPT2_FILES[name]
        path = fetch(f"{name}/model.safetensors", HF_URL.format(repo=repo, revision=revision), sha)
        print(f"converting {path} to {out}", file=sys.stderr)
        convert(path, PRESETS[name], out)
    return out


def convert(safetensors_path, cfg, out_dir):
    """Write the converted model to out_dir: config.json plus one <name>.npy per parameter.

    Why one .npy per parameter: the format is numpy's own (no pickle, safe to load), each file
    loads with one read straight into the array that becomes the parameter, and a reader can
    inspect any tensor with np.load. The folder is written beside out_dir and renamed into place.
    """
    def save(tensors, folder):
        for name, a in tensors:
            np.save(folder / f"{name}.npy", a)
            yield name, a

    with atomic_folder(out_dir, exclusive=True) as tmp:  # loading onto "meta" checks every name and shape
        load_weights(cfg, save(gpt2_tensors(safetensors_path), tmp), device="meta")  # as they stream past
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return Path(out_dir)


def read_safetensors(path):
    """Yield (name, float32 array) for each tensor of a .safetensors file.

    Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (plus an optional "__metadata__"), then the raw little-endian
    tensor bytes, offsets counted from the end of the header. The file is memory-mapped, so
    only the tensor being converted is in memory.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise DataError(f"{path} is not a safetensors file (or is truncated)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise DataError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if end != size:
        raise DataError(f"{path} is {size:,} bytes but its header describes {end:,}: "
                        "truncated or corrupted; delete it and download it again")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, t in header.items():
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise DataError(f"{path}: tensor {name} has dtype {t['dtype']}; we read {list(SAFETENSORS_DTYPES)}")
        begin, stop = t["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[t["dtype"]])
        if stop - begin != math.prod(t["shape"]) * dtype.itemsize:
            raise DataError(f"{path}: tensor {name} has {stop - begin} bytes for shape {t['shape']}: corrupted")
        a = data[begin:stop].view(dtype).reshape(t["shape"])
        if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32's bits
            a = (a.astype(np.uint32) << 16).view(np.float32)
        yield name, a.astype(np.float32)


def config_from_hf(path):
    """A GPTConfig from a Hugging Face GPT-2 config.json (the head count is not in the weights)."""
    try:
        c = json.loads(Path(path).read_text(encoding="utf-8"))
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise DataError(f"{path}: activation {c['activation_function']}, but minigpt uses tanh GELU")
        return GPTConfig(vocab_size=c["vocab_size"], context_length=c["n_positions"],
                         emb_dim=c["n_embd"], n_heads=c["n_head"], n_layers=c["n_layer"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{path}: not a GPT-2 config.json ({type(e).__name__}: {e})") from e


def read_config(path):
    """The GPTConfig of a converted folder's config.json, or a DataError that says what is wrong."""
    try:
        return GPTConfig(**json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:  # not JSON, not an object, an unknown key, an impossible shape
        raise DataError(f"{path}: not a minigpt model config ({e})") from e


def read_npy(path):
    """One converted parameter as a float32 array. The .npy format is a small header (dtype, shape)
    and the raw numbers; np.load refuses pickled Python objects (they could run code) by default."""
    try:
        a = np.load(path)
    except (ValueError, OSError, EOFError) as e:  # truncated, pickled, or not a .npy file at all
        raise DataError(f"{path}: not a readable .npy file ({e}); convert the model again") from e
    if a.dtype != np.float32:
        raise DataError(f"{path} holds {a.dtype} numbers; converted weights are float32 (convert the model again)")
    return a


def warn_if_unfinished(path, ck):
    """A warning on stderr if the checkpoint is an unfinished pretrain.py run (only those keep
    their optimizer)."""
    if "optimizer" in ck:
        training = ck["training"]
        of = f" of {training['total_steps']:,}" if "total_steps" in training else ""
        step = (training.get("progress") or training["state"])["step"]  # "state" in older files
        print(f"warning: {path} is an unfinished pretrain.py run (stopped after step {step:,}{of}); "
              "its weights are used as they are", file=sys.stderr)


# ---------------------------------------------------------------- public texts and downloads

# The public texts pretrain.py trains on (and finetune.py's passages example reads): each a list
# of (file name in data/ and in MINIGPT_MIRROR, public URL, sha256).
CORPORA = {
    "verdict": [("the-verdict.txt",
                 "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
                 "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f")],
    "shakespeare": [("tinyshakespeare.txt",
                     "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                     "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")],
    "books": [("books/middlemarch.txt",
               "https://raw.githubusercontent.com/GITenberg/Middlemarch_145/master/145.txt",
               "f499b77eb0e4e34edc3bae6b968e3241c8327384631bd26e8eec76b726915a7d"),
              ("books/war-and-peace.txt",
               "https://raw.githubusercontent.com/GITenberg/War-and-Peace_2600/master/2600.txt",
               "31b5d23be25fe9ad27eca1e78f9f449ae2e17adf07ce62238a79425c53a96646"),
              ("books/moby-dick.txt",
               "https://raw.githubusercontent.com/GITenberg/Moby-Dick--Or-The-Whale_2701/master/2701.txt",
               "f17ab08e0ad8c6e43d1e85e3cdae4e1b617ae35069cee7db8dcd457c87b1ec76"),
              ("books/pride-and-prejudice.txt",
               "https://raw.githubusercontent.com/GITenberg/Pride-and-Prejudice_1342/master/1342.txt",
               "441e778a4297bfc944dc254810e8ded3134cfb0e36d73eef6bb312b4ffd74d6a")],
}


def gutenberg_body(path):
    """(first, end): the line numbers of the book between Project Gutenberg's "*** START OF ..." and
    "*** END OF ..." lines (also written "***START OF"), so that its license header and footer are
    not read as the book. Where a line is missing: from the start, or to the end (end None)."""
    first, end = 0, None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if line.startswith(("*** START OF", "***START OF")) and not first:
                first = number + 1
            elif line.startswith(("*** END OF", "***END OF")):
                end = number
                break
    return first, end


def fetch(name, url, sha256, archive_sha256=None):
    """Return the local path of the public file `name`, whose sha256 must be `sha256` (None: no
    published digest; the caller checks the file's structure instead).

    Looks, in order, at data/<name>; at $MINIGPT_MIRROR/<name> (a folder of files by name, for
    offline machines and CI), which it copies into data/; at `url`, which it downloads. When
    `archive_sha256` is given, `url` is a zip archive (checked against that hash) holding `name`.
    """
    dest = DATA_DIR / name
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        print(f"{dest} has the wrong sha256; fetching it again", file=sys.stderr)
    mirror = os.environ.get("MINIGPT_MIRROR")
    if mirror and (Path(mirror) / name).exists():
        source = Path(mirror) / name
        if sha256 is not None and sha256_of(source) != sha256:
            raise DataError(f"{source} (from MINIGPT_MIRROR) has the wrong sha256: expected {sha256}")
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
        return dest
    if archive_sha256 is None:
        download(url, dest, sha256, name)
    else:
        try:
            archive = fetch(Path(name).parent / Path(url).name, url, archive_sha256)
        except DataError as e:
            raise DataError(f"{e}\n(The mirror may also hold '{name}' itself instead of the archive.)") from e
        with zipfile.ZipFile(archive) as z, atomic_path(dest) as tmp:
            with z.open(Path(name).name) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            if sha256_of(tmp) != sha256:
                raise DataError(f"{Path(name).name} inside {archive} has the wrong sha256")
    return dest


def download(url, dest, sha256, name):
    """Download `url` to `dest` with a progress line, resuming a partial `.part` file (HTTP Range)."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored Range: start from zero
                have = 0
            length = response.headers.get("Content-Length")  # of what is left; servers may omit it
            total = have + int(length) if length else 0
            done = copy_with_progress(response, part, have, total, name)
        if total and done != total:  # the server closed early: keep the .part to resume from
            raise DataError(f"download of {name} from {url} stopped at {done:,} of {total:,} bytes; "
                            "run again to resume")
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left after `have` bytes, so the .part is complete
            raise DataError(f"could not download {name} from {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # our disk, not the network
            raise DataError(f"cannot write {part}: {e.strerror} (what arrived is kept: run again to resume)") from e
        mirror = os.environ.get("MINIGPT_MIRROR")
        where = (f"It is not in MINIGPT_MIRROR ({mirror}) as '{name}' either" if mirror else
                 f"Offline? Put the file in a folder as '{name}' and set MINIGPT_MIRROR to that folder")
        raise DataError(f"could not download {name} from {url} ({getattr(e, 'reason', e)}).\n{where}") from e
    if sha256 is not None and sha256_of(part) != sha256:
        part.unlink()
        raise DataError(f"{name} downloaded from {url} has the wrong sha256 (expected {sha256}); "
                        "the partial file was removed, run again to retry")
    os.replace(part, dest)


def copy_with_progress(response, part, have, total, name):
    """Append the response's bytes to `part` (which holds `have` bytes), with a progress line;
    returns the bytes now on disk."""
    progress = Progress()
    done = have
    with open(part, "ab" if have else "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            rate = (done - have) / max(time.time() - progress.start, 1e-9)
            progress.show(f"{name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, "
                          f"ETA {(total - done) / rate if total and rate else 0:.0f} s")
    progress.done(f"{name}: {done / 1e6:.1f} MB in {time.time() - progress.start:.1f} s")
    return done


# ---------------------------------------------------------------- command-line flags, checked as they are read
# Every script checks its flags when it reads them, so a run either stops in its first second
# with one clear line, or is able to finish and save.

class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default after its help, unless the help says it in words; the
    description and epilog as they are written."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_device_flags(p, dtype="auto", inference=False):
    """--device and --dtype, the same in every script (dtype: --dtype's default; inference: int8 too)."""
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the fastest here: CUDA, then MPS, "
                                    "then the CPU)")
    if inference:
        p.add_argument("--dtype", choices=INFERENCE_DTYPES, default=dtype,
                       help="auto: bfloat16 where the device multiplies it natively, else float32; int8 only when asked")
    else:
        p.add_argument("--dtype", choices=DTYPES, default=dtype,
                       help="auto: bfloat16 where the device multiplies it natively, else float32")


def number_type(kind, low, high=None, low_open=False):
    """An argparse type: a finite `kind` (int or float) with low <= x (low < x if low_open) and,
    if high is given, x < high. Plain digits only: no '1_000', no 'nan'."""
    def parse(text):
        try:
            if "_" in text:
                raise ValueError
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'greater than' if low_open else 'at least'} {low}")
        if high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"{text} must be less than {high}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number_type(int, 1)
nonnegative_int = number_type(int, 0)
positive_float = number_type(float, 0, low_open=True)
nonnegative_float = number_type(float, 0)
fraction = number_type(float, 0, 1)  # a probability such as dropout: 0 <= p < 1


def output_folder(text):
    """An argparse type: a folder we can write into (it is made only when there is something to
    write). Checked before any work, so that a run never trains for an hour and then fails to save."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
    return writable(path)


def output_file(text):
    """An argparse type: a file we can write (a new one, or one to replace; not a folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give the name of a file to write")
    writable(path.parent)
    return path


def writable(path):
    """`path` if files can be written where it is or would be made, else an argparse error."""
    existing = path
    while not existing.exists():  # the nearest folder that exists: where the first new one would go
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        test = existing / f".write-test-{os.getpid()}"  # really write (read-only disks, permissions); one
        test.write_bytes(b"")                           # name per process, as torchrun starts several
        test.unlink()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {path}: {e.strerror or e}")
    return path


def existing_file(text):
    """An argparse type: a file that exists and is a file (not a folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return path


def preset_name(text):
    """An argparse type: a name of PRESETS (or an older name of one)."""
    name = OLD_PRESET_NAMES.get(text, text)
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PRESETS)}")
    return name


def run_script(main, interrupted):
    """Run a script's main() as every script ends: its return value, if an int, is the exit status; a
    DataError is one `error: ...` line (exit status 1); Ctrl+C or SIGTERM is one line that says
    what was kept (`interrupted`; exit status 130). Never a traceback for any of them."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl+C
    try:
        status = main()
        sys.exit(status if isinstance(status, int) else 0)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)


# ==============================================================================================
# Command line: generate text with any model load_model understands.
# ==============================================================================================

def compare_dtypes(model, prompt, new_tokens):
    """The same weights in each inference dtype: how far their logits are from float32's, how fast
    a forward pass over the prompt runs, and how fast decoding runs: the slope between 20 and 20 +
    new_tokens greedy tokens with the KV cache, so the prompt's own pass is left out (best of 3)."""
    with torch.inference_mode():
        expected = model(prompt).float()
    for dtype in ("float32", "bfloat16", "int8"):
        copied = cast_for_inference(copy.deepcopy(model), dtype)
        with torch.inference_mode():
            error = ((copied(prompt).float() - expected).norm() / expected.norm()).item()
        forward = best_time(lambda: generate(copied, prompt, 1), 3)
        short = best_time(lambda: generate(copied, prompt, 20), 3)
        long = best_time(lambda: generate(copied, prompt, 20 + new_tokens), 3)
        print(f"{dtype:8}: forward of {prompt.shape[1]} tokens {1000 * forward:.1f} ms; decoding "
              f"{new_tokens / (long - short):.1f} tokens/s; logits differ from float32 by {error:.1e} (relative)")


# What --dtype int8 measured for generating (docs/precision.md): auto's hint where it picks float32.
GENERATING_IN_INT8 = ("on a 2-core AMD EPYC it decoded 66.5 tokens/s against float32's 37.1; its greedy "
                      "text leaves float32's within a few tokens")


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a GPT (GPT-2 weights or a minigpt checkpoint).",
                                formatter_class=Help)
    p.add_argument("--model", default="gpt2-small",
                   help=f"{', '.join(GPT2_FILES)}, a converted or save_pretrained folder, a .pt checkpoint, "
                        "or random (random weights of --preset's shape: for timing)")
    p.add_argument("--preset", default="gpt2-small", type=preset_name, help="the shape for --model random")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=positive_int, default=25)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (always the most likely token)")
    p.add_argument("--top-k", type=positive_int, help="sample only among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-cache", action="store_true", help="recompute every position for every token")
    add_device_flags(p, inference=True)
    p.add_argument("--compare-dtypes", action="store_true",
                   help="run the prompt and --max-new-tokens in float32, bfloat16 and int8: speed and logit difference")
    args = p.parse_args(argv)
    if not args.prompt:
        p.error("--prompt is empty: give the model some text to continue")
    device = pick_device(args.device)
    t0 = time.time()
    if args.model == "random":
        torch.manual_seed(args.seed)
        model = GPT(PRESETS[args.preset]).to(device).eval()
    else:
        model = load_model(args.model, device)
    print(f"loaded {args.model} in {time.time() - t0:.1f} s", file=sys.stderr)
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})], device=device)
    if args.compare_dtypes:
        return compare_dtypes(model, prompt, args.max_new_tokens)
    dtype = inference_dtype(args.dtype, device, GENERATING_IN_INT8)
    cast_for_inference(model, dtype)  # generating only: the weights themselves in dtype, no autocast
    gen = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   eos_id=EOT, use_cache=not args.no_cache, generator=gen)
    seconds = time.time() - t0
    n = out.shape[1] - prompt.shape[1]
    print(tokenizer.decode(out[0].tolist()))
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s, {dtype})", file=sys.stderr)


if __name__ == "__main__":
    run_script(main, "nothing was saved")
