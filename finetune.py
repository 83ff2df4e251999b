"""Finetune GPT-2 into a text classifier: SMS spam, or your own labels.

A pretrained GPT already turns text into useful features: the hidden state at a position sums up
everything up to it. To classify, we replace the 50,257-way next-token head with a small one
(one output per class: ham and spam, or your labels), read it at one position, and train only a
little of the model ("parameter-efficient"): by default the new head, the last transformer block
and the final LayerNorm, as the book's chapter 6 does (the reference).

The classifier is class_logits (section 1): the book's model(x) read at one position. Its two
savings are steps inside it: the frozen blocks never change, so their output for a message is
computed once (frozen_features) and reused in every epoch, and the last block runs only at the
position the head reads (block_at).

--trainable lora trains low-rank adapters on every layer of every block instead, and qlora does
the same on a base whose frozen layers are stored in 4 bits (NF4, from QLoRA, section 8): GPT-2
XL's 1.5 billion parameters then take 1.2 GB of memory instead of 6.2 GB.

    python finetune.py                                   # GPT-2 124M, last block, 5 epochs, SMS spam
    python finetune.py --init random                     # same work, random weights (offline)
    python finetune.py --init runs/pretrain/model.pt --trainable all
    python finetune.py --data tickets.csv --text-column body --label-column team   # your labels
    python finetune.py --data passages --init random     # which of six texts a passage is from
    python finetune.py --init random --preset gpt2-xl --trainable qlora --max-steps 20 --unseen 0

Data: UCI's SMS Spam Collection by default, balanced to 747 ham + 747 spam, split 70/10/20;
or a CSV/TSV file with a header, or `label<TAB>text` lines, with any labels, split stratified.
Writes classifier.pt (only what finetuning changed), metrics.json, plots and the splits to --out.
"""

import argparse
import csv
import io
import itertools
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import minigpt

TRAINABLE = ("head", "last_block", "last_two_blocks", "all", "lora", "qlora")
POOLS = ("last", "last_real", "mean")


# ----------------------------------------------------------------------------------------------
# 1. The classifier, the book's way: GPT-2 with a new head, read at one position.
# ----------------------------------------------------------------------------------------------

def make_classifier(model, trainable, n_classes, lora_rank, lora_alpha):
    """In place: lm_head (the book's out_head) becomes Linear(C, classes); only `trainable` parts
    train. qlora's model has NF4Dense layers (load_nf4); --lora-rank 16 and --lora-alpha 16."""
    model.lm_head = nn.Linear(model.cfg.emb_dim, n_classes).to(model.wte.weight.device)  # untied, new
    model.requires_grad_(trainable == "all")                 # all: everything trains; else frozen, then:
    if trainable in ("last_block", "last_two_blocks"):       # the top one or two blocks train
        model.h[frozen_blocks(model, trainable):].requires_grad_(True)
    if trainable in ("lora", "qlora"):                       # every Dense layer of every block: a LoRA
        for block in model.h:                                # shapes (in, out)
            block.attn.c_attn = LoRA(block.attn.c_attn, lora_rank, lora_alpha)  # (C, 3C): q, k, v
            block.attn.c_proj = LoRA(block.attn.c_proj, lora_rank, lora_alpha)  # (C, C)
            block.mlp.c_fc = LoRA(block.mlp.c_fc, lora_rank, lora_alpha)        # (C, 4C)
            block.mlp.c_proj = LoRA(block.mlp.c_proj, lora_rank, lora_alpha)    # (4C, C)
    if trainable != "head":                                  # all but head: the final LayerNorm trains
        model.ln_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)                       # the new head always trains
    return model


class LoRA(nn.Module):
    """A frozen Dense layer plus a trainable low-rank update (LoRA, Hu et al. 2021): y = dense(x) +
    (alpha / rank) (x @ A) @ B = x @ (W + (alpha / rank) A @ B) + bias. B starts at zero: at first
    the layer is the old one. rank * (in + out) numbers train instead of in * out."""

    def __init__(self, dense, rank, alpha):
        super().__init__()
        self.dense = dense
        n_in, n_out = dense.shape                             # (in, out): GPT-2's layout (minigpt.Dense)
        self.A = nn.Parameter(torch.empty(n_in, rank).uniform_(-n_in ** -0.5, n_in ** -0.5))  # (in, rank)
        self.B = nn.Parameter(torch.zeros(rank, n_out))                                       # (rank, out)
        self.scale = alpha / rank

    def forward(self, x):
        return self.dense(x) + self.scale * ((x @ self.A) @ self.B)  # (..., in) -> (..., out)

    def weights(self):
        """(W + (alpha / rank) A @ B, bias): the one matrix inference multiplies by (minigpt.products)."""
        weight, bias = self.dense.weights()
        return weight + self.scale * (self.A @ self.B), bias


def class_logits(model, x, lengths, pool, frozen=0, dtype=torch.float32):
    """Class logits (B, classes) of texts padded on the right. x: token ids (B, T), or the frozen blocks
    h[:frozen]'s output (B, T, C) (frozen_features); lengths: (B,) real tokens. pool (--pool last_real
    by default): 'last_real' reads the last real token, the one position that has seen the whole text;
    'last' the padded row's last (the book's model(x)[:, -1]); 'mean' the mean over the real ones."""
    device = model.lm_head.weight.device
    x, lengths = x.to(device), lengths.to(device)
    with minigpt.autocast(device, dtype):
        if frozen == 0:
            x = model.embed(x)                                 # (B, T, C)
        else:  # cached features may be stored in bfloat16; go on in the trainable part's own dtype
            x = x.to(model.ln_f.weight.dtype)
        blocks = model.h[frozen:]
        if pool == "mean":  # every position is read
            for block in blocks:
                x = block(x)                                   # (B, T, C)
            real = torch.arange(x.shape[1], device=device) < lengths[:, None]  # (B, T): the real positions
            return model.lm_head((model.ln_f(x) * real[..., None]).sum(1) / lengths[:, None])
        positions = lengths - 1 if pool == "last_real" else torch.full_like(lengths, x.shape[1] - 1)  # (B,)
        for block in blocks[:-1]:
            x = block(x)                                       # (B, T, C)
        # The head reads one position, so the last block runs only there: about a third of its work.
        x = block_at(blocks[-1], x, positions) if len(blocks) else x[torch.arange(len(x), device=device), positions]
        return model.lm_head(model.ln_f(x))                    # (B, classes)


def block_at(block, x, positions):
    """What block(x) gives at one position per row, (B, C), for a fraction of the work.

    The last block needs the keys and values of every position up to the one read (attention
    looks back), but the query, the attention, c_proj and the MLP only at that position. It runs
    the block's own attention (heads, attend) with one query per row.
    x: (B, T, C); positions: (B,) the position to compute in each row.
    """
    B, T, C = x.shape
    rows = torch.arange(B, device=x.device)
    q, k, v = block.attn.heads(block.ln_1(x))                  # (B, nh, T, hs) each
    q = q[rows, :, positions].unsqueeze(2)                     # (B, nh, 1, hs): the one query per row
    sees = torch.arange(T, device=x.device) <= positions[:, None]  # (B, T): keys up to the position
    y = block.attn.attend(q, k, v, sees[:, None, None, :])     # (B, nh, 1, hs)
    x = x[rows, positions] + block.drop(block.attn.c_proj(y.reshape(B, C)))  # (B, C)
    return x + block.drop(block.mlp(block.ln_2(x)))            # (B, C)


def model_inputs(ids, pool, max_length):
    """One tensor of token ids per text, as the classifier reads it: its real tokens; for pool
    'last', the book's SpamDataset: right-padded with <|endoftext|> to max_length, the padding
    that 'last' reads."""
    if pool == "last":
        ids = [i + [minigpt.EOT] * (max_length - len(i)) for i in ids]
    return [torch.tensor(i, dtype=torch.long) for i in ids]


# ----------------------------------------------------------------------------------------------
# 2. Batches: texts of similar length together, padded only to their own longest, so little work
#    goes to padding; and the frozen blocks' output for each text, computed once.
# ----------------------------------------------------------------------------------------------

class Batches:
    """Re-iterable batches (index, x, lengths) of rows: index (B,) says which rows, x is the rows
    padded with zeros to the batch's longest ((B, T) token ids or (B, T, C) features), lengths (B,)
    their real lengths. The filler after a row's last real position is never read (attention is
    causal; 'mean' masks it), so its value does not matter. Rows of similar length go together;
    shuffled anew on every pass if `shuffle`."""

    def __init__(self, rows, lengths, batch_size, shuffle=False, seed=0, drop_last=False):
        self.rows, self.lengths = rows, torch.as_tensor(lengths)
        self.sizes = np.array([len(r) for r in rows])  # what sorting by length sorts by
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        n = len(self.rows) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        b = self.batch_size
        if self.shuffle:  # random order; then within each run of 16 batches, by length
            order = self.rng.permutation(len(self.rows))
            runs = [order[i:i + 16 * b] for i in range(0, len(order), 16 * b)]
            order = np.concatenate([r[np.argsort(self.sizes[r], kind="stable")] for r in runs])
        else:
            order = np.argsort(self.sizes, kind="stable")
        batches = [order[i:i + b] for i in range(0, len(order), b)]
        if self.drop_last and len(batches[-1]) < b:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        for index in batches:
            x = nn.utils.rnn.pad_sequence([self.rows[i] for i in index], batch_first=True)
            yield torch.as_tensor(index), x, self.lengths[index]


@torch.no_grad()
def frozen_features(model, rows, frozen, device, batch_size=64):
    """The output of blocks h[:frozen] for each row of token ids, (T_i, C) each, computed once."""
    features = [None] * len(rows)
    for index, x, lengths in Batches(rows, [len(r) for r in rows], batch_size):
        x = model.embed(x.to(device)).to(model.h[0].ln_1.weight.dtype)  # the frozen blocks' dtype
        for block in model.h[:frozen]:
            x = block(x)                                       # (B, T, C)
        for i, row, n in zip(index.tolist(), x.cpu(), lengths.tolist()):
            features[i] = row[:n].clone()                      # (T_i, C)
    return features


# ----------------------------------------------------------------------------------------------
# 3. Data: read every example exactly, split (stratified, or balanced as for the SMS data).
#    Examples are (label, text) pairs; the classes are the labels, sorted, and a class's index
#    in that list is its id (for the SMS data: 0 ham, 1 spam).
# ----------------------------------------------------------------------------------------------

SMS = ("SMSSpamCollection", "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
       "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d")
SMS_ZIP_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"
SPLITS = ("train", "validation", "test")
MAX_CLASSES = 1000  # supported; beyond it, most classes would have too few examples to learn or to measure
SHOWN = 20          # classes in a printed table, an API answer or the page: the most frequent or most likely
# The second worked example: passages from six public-domain texts, labelled by source: the
# corpora of pretrain.py (minigpt.CORPORA). (label, (file name, public URL, sha256)), by label.
PASSAGE_SOURCES = sorted((Path(file[0]).stem.removeprefix("tiny"), file)
                         for name in ("books", "shakespeare", "verdict") for file in minigpt.CORPORA[name])


def read_examples(path, text_column="text", label_column="label"):
    """[(label, text)] from a data file, by its extension:

    .csv, .tsv: a header row naming the columns, then one example per row (stdlib csv; a CSV
                field may be quoted and hold commas, quotes and newlines; a TSV has no quoting).
    otherwise:  `label<TAB>text` lines without a header, split at the first TAB, no quote
                handling (the SMS collection's format: 54 of its messages begin with '"', and CSV
                readers that treat it as a quote merge lines and strip quotes).
    UTF-8, with or without a byte-order mark. Any problem is a DataError naming file and line.
    """
    path = Path(path)
    if path.is_dir():
        raise minigpt.DataError(f"{path} is a folder; give a data file (.csv, .tsv or label<TAB>text lines)")
    text = minigpt.read_utf8(path)
    if not text.strip():
        raise minigpt.DataError(f"{path} is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        examples = read_table(path, text, suffix, text_column, label_column)
    else:
        examples = read_label_tab(path, text)
    if len({label for label, _ in examples}) < 2:
        raise minigpt.DataError(f"{path}: every example has the label {examples[0][0]!r}; "
                                "a classifier needs at least 2 classes")
    return examples


def read_label_tab(path, text):
    """Examples from `label<TAB>text` lines; blank lines are skipped."""
    examples = []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        label, tab, message = line.partition("\t")
        if not tab:
            raise minigpt.DataError(f"{path}, line {number}: expected 'label<TAB>text', got {line[:60]!r} "
                                    "(a .csv or .tsv file needs that extension and a header row)")
        examples.append(checked_example(path, number, label, message))
    return examples


def read_table(path, text, suffix, text_column, label_column):
    """Examples from a CSV or TSV file with a header row."""
    dialect = dict(delimiter=",") if suffix == ".csv" else dict(delimiter="\t", quoting=csv.QUOTE_NONE)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, **dialect)
    try:
        header = next(reader)
        columns = {name.strip(): i for i, name in enumerate(header)}
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise minigpt.DataError(f"{path}, line 1: no column {' or '.join(map(repr, missing))}; the header has "
                                    f"{', '.join(map(repr, header))} (choose with --text-column, --label-column)")
        examples = []
        start = reader.line_num + 1  # the line a row starts on (a quoted field may span several)
        for row in reader:
            if row:  # a blank line is no example
                if len(row) < len(header):
                    raise minigpt.DataError(f"{path}, line {start}: {len(row)} fields, but the header has "
                                            f"{len(header)}")
                examples.append(checked_example(path, start, row[columns[label_column]], row[columns[text_column]]))
            start = reader.line_num + 1
    except csv.Error as e:
        raise minigpt.DataError(f"{path}, line {reader.line_num}: not valid {suffix[1:].upper()} ({e})") from e
    if not examples:
        raise minigpt.DataError(f"{path} has a header but no examples")
    return examples


def checked_example(path, line, label, text):
    """(label, text), or a DataError that says what is wrong with this line."""
    label = label.strip()  # a label is a name: surrounding spaces are not part of it
    if not label:
        raise minigpt.DataError(f"{path}, line {line}: the label is empty")
    if not text.strip():
        raise minigpt.DataError(f"{path}, line {line}: the text is empty")
    return label, text


def passages(seed, per_class=600):
    """The second worked example: [(source, passage)], passages of 2-3 sentences from six texts.

    Sources: four Project Gutenberg novels, Shakespeare's plays (tinyshakespeare) and "The
    Verdict", fetched as any data file (public URL + sha256, or MINIGPT_MIRROR). Gutenberg's
    license header and footer are left out (minigpt.gutenberg_body). Each text is split into
    paragraphs at blank lines; lines that only name a speaker ("ROMEO:") and line breaks
    inside a paragraph are dropped; each paragraph is cut into sentences after . ! or ? followed by
    a space and a capital letter or quote. Consecutive sentences of a paragraph make passages of
    2 or 3 sentences (at random), kept when 80-400 characters long; then at most `per_class`
    passages per source are drawn at random. "The Verdict" is short: its class is smaller.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for name, file in PASSAGE_SOURCES:
        path = minigpt.fetch(*file)
        first, end = minigpt.gutenberg_body(path)
        text = "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[first:end])
        found = []
        for paragraph in re.split(r"\n\s*\n", text):
            lines = [line for line in paragraph.splitlines() if not re.fullmatch(r"[A-Z][A-Za-z ]*:\s*", line)]
            sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", " ".join(" ".join(lines).split()))
            i = 0
            while i + 2 <= len(sentences):
                n = int(rng.integers(2, 4))  # 2 or 3 sentences
                passage = " ".join(sentences[i:i + n])
                if 80 <= len(passage) <= 400:
                    found.append(passage)
                i += n
        for i in sorted(rng.permutation(len(found))[:per_class]):
            examples.append((name, found[i]))
    return examples


def write_csv(path, examples):
    with minigpt.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows(examples)


def check_every_class_in_every_split(splits, examples, balance):
    """A DataError naming the first class that some split lacks."""
    classes = sorted({label for label, _ in examples})
    for name in SPLITS:
        present = {label for label, _ in splits[name]}
        if absent := [c for c in classes if c not in present]:
            counts = Counter(label for label, _ in examples)
            raise minigpt.DataError(
                f"class {absent[0]!r} has {counts[absent[0]]} examples{' after balancing' if balance else ''}: "
                f"too few to appear in the {name} split (70/10/20 needs at least 10 of each class). "
                "Add examples, or give your own --validation-data and --test-data")


def read_data(args):
    """The examples of --data: a named data set or a file."""
    if args.data == "sms":
        return read_examples(minigpt.fetch(*SMS, archive_sha256=SMS_ZIP_SHA256))
    if args.data == "passages":
        return passages(args.split_seed)
    return read_examples(args.data, args.text_column, args.label_column)


def balanced_split(examples, seed):
    """The book's create_balanced_dataset and random_split (--balance: on for the SMS data): every
    class sampled down to the size of the smallest, the kept examples shuffled together and cut
    70/10/20 (cut_70_10_20), with np.random.default_rng(seed) (--split-seed 123 by default). The
    SMS data's 747 spam + 747 of its 4,825 ham = 1,494 become 1,045 / 149 / 300. "unseen" holds
    what sampling left out: real examples, never trained on (for the SMS data: ham, for a
    false-positive rate). Returns {"train", "validation", "test", "unseen"}: lists of (label, text)."""
    rng = np.random.default_rng(seed)
    classes = by_class(examples)                  # {label: [its examples, in file order]}, labels sorted
    smallest = min(len(members) for members in classes.values())
    kept, unseen = [], []
    for members in classes.values():              # only a larger class is sampled
        order = rng.permutation(len(members)) if len(members) > smallest else range(smallest)
        kept += [members[i] for i in order[:smallest]]
        unseen += [members[i] for i in order[smallest:]]
    kept = [kept[i] for i in rng.permutation(len(kept))]  # the classes shuffled together
    return dict(zip(SPLITS, cut_70_10_20(kept)), unseen=unseen)


def by_class(examples):
    """{label: [its examples, in file order]}, labels sorted."""
    members = {}
    for example in examples:
        members.setdefault(example[0], []).append(example)
    return dict(sorted(members.items()))


def cut_70_10_20(items):
    """The first 70 % (int() rounds down), the next 10 %, the rest."""
    n_train = int(0.7 * len(items))
    n_validation = int(0.1 * len(items))
    return items[:n_train], items[n_train:n_train + n_validation], items[n_train + n_validation:]


def stratified_split(examples, seed):
    """Without --balance: each class shuffled and cut 70/10/20 on its own, so each split has the
    classes in the proportions of the whole file; then each split shuffled. "unseen" is empty."""
    rng = np.random.default_rng(seed)
    splits = {name: [] for name in SPLITS}
    for members in by_class(examples).values():
        members = [members[i] for i in rng.permutation(len(members))]
        for name, part in zip(SPLITS, cut_70_10_20(members)):
            splits[name] += part
    splits = {name: [part[i] for i in rng.permutation(len(part))] for name, part in splits.items()}
    splits["unseen"] = []
    return splits


# ----------------------------------------------------------------------------------------------
# 4. Training and measuring. The loop is the book's train_classifier_simple.
# ----------------------------------------------------------------------------------------------

def train(model, batches, labels, frozen, args, dtype):
    """AdamW on the trainable parameters (float32, the forward pass in dtype) over shuffled
    batches for --epochs (or --max-steps); steps are counted from 1. The loss every --eval-every
    steps, the accuracies after every epoch. Returns (loss history, accuracies, seconds, examples)."""
    optimizer = minigpt.adamw(model, args.lr, args.weight_decay)
    history = {"seen": [], "train": [], "validation": []}
    accuracies = {"epoch": [], "train": [], "validation": []}
    total = min(args.epochs * len(batches["train_shuffled"]), args.max_steps or math.inf)
    step = seen = 0
    start = time.time()
    model.train()  # dropout layers on, with p = 0: base_model (build_model's, load_classifier's) sets dropout 0.0
    for epoch in range(1, args.epochs + 1):
        for index, x, lengths in batches["train_shuffled"]:
            optimizer.zero_grad(set_to_none=True)
            logits = class_logits(model, x, lengths, args.pool, frozen, dtype)  # (B, classes)
            F.cross_entropy(logits.float(), labels["train"][index].to(logits.device)).backward()
            optimizer.step()  # no clipping, as in the book's loop
            step += 1
            seen += len(index)
            if (step - 1) % args.eval_every == 0 or step == total:
                record_losses(model, batches, labels, history, seen, epoch, step, args, frozen, dtype)
            if step == total:
                break
        if step % len(batches["train_shuffled"]):  # --max-steps ended the run within an epoch
            break
        accuracies["epoch"].append(epoch)
        for name in ("train", "validation"):  # every text of the split once, in length order
            accuracies[name].append(accuracy(model, batches[name], labels[name], args.pool, frozen, dtype))
        print(f"Training accuracy: {accuracies['train'][-1]:.2%} | "
              f"Validation accuracy: {accuracies['validation'][-1]:.2%}")
        if step == total:
            break
    seconds = time.time() - start
    print(f"Trained in {seconds:.1f} s ({seen / seconds:,.1f} examples/s, {seen} examples seen, "
          f"{minigpt.dtype_name(dtype)})")
    return history, accuracies, seconds, seen


@torch.no_grad()
def predict(model, batches, pool, frozen, dtype=torch.float32):
    """Class probabilities (N, classes) of every row of `batches`, in the rows' own order, in eval
    mode (no dropout); the softmax in float32."""
    probs = None
    with minigpt.eval_mode(model):  # model.eval() inside, then the mode it was in
        for index, x, lengths in batches:
            p = torch.softmax(class_logits(model, x, lengths, pool, frozen, dtype).float(), dim=-1).cpu()
            probs = torch.zeros(len(batches.rows), p.shape[1]) if probs is None else probs
            probs[index] = p
    return probs


def accuracy(model, batches, labels, pool, frozen, dtype=torch.float32):
    """The book's calc_accuracy_loader: the share of a split's texts (every one once) whose most
    likely class is their label; labels: (N,), in the rows' order."""
    return (predict(model, batches, pool, frozen, dtype).argmax(dim=1) == labels).sum().item() / len(labels)


def record_losses(model, batches, labels, history, seen, epoch, step, args, frozen, dtype):
    """The mean loss on at most 5 batches of training and of validation texts, kept in history
    and printed."""
    losses = {"train": mean_loss(model, itertools.islice(batches["train_sample"], 5), labels["train"],
                                 args.pool, frozen, dtype),
              "validation": mean_loss(model, itertools.islice(batches["validation"], 5), labels["validation"],
                                      args.pool, frozen, dtype)}
    for key, value in {"seen": seen, **losses}.items():
        history[key].append(value)
    print(f"Ep {epoch} (Step {step:06d}): Train loss {losses['train']:.3f}, "
          f"Validation loss {losses['validation']:.3f}")


@torch.no_grad()
def mean_loss(model, batches, labels, pool, frozen, dtype):
    """Mean cross-entropy per example over `batches`, in eval mode (no dropout)."""
    total, examples = 0.0, 0
    with minigpt.eval_mode(model):
        for index, x, lengths in batches:
            logits = class_logits(model, x, lengths, pool, frozen, dtype)
            total += F.cross_entropy(logits.float(), labels[index].to(logits.device)).item() * len(index)
            examples += len(index)
    return total / max(examples, 1)


def classification_metrics(labels, predicted, n_classes):
    """Accuracy, the confusion matrix and per-class precision, recall and F1.

    The confusion matrix counts, for true class i and predicted class j, the examples of i
    predicted as j. It is kept as its non-zero cells, [i, j, count] ("confusion_cells": at most
    one per example, however many classes), and as the whole matrix ("confusion", rows: true
    class) for up to SHOWN classes. For class c: precision = right calls of c / all calls of c,
    recall = right calls of c / all true c, F1 = their harmonic mean; 0 where nothing was there
    to divide by. actual[c]: the examples of class c.
    """
    cells, counts = torch.unique(labels * n_classes + predicted, return_counts=True)  # (i, j) as i * n + j
    cells = [[cell // n_classes, cell % n_classes, n] for cell, n in zip(cells.tolist(), counts.tolist())]
    right = torch.bincount(labels[labels == predicted], minlength=n_classes)
    called = torch.bincount(predicted, minlength=n_classes)  # how often each class was predicted
    actual = torch.bincount(labels, minlength=n_classes)     # how often each class is the truth
    precision = (right / called.clamp(min=1)).tolist()
    recall = (right / actual.clamp(min=1)).tolist()
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    metrics = {"accuracy": right.sum().item() / max(len(labels), 1), "confusion_cells": cells,
               "actual": actual.tolist(), "precision": precision, "recall": recall, "f1": f1,
               "macro_f1": sum(f1) / n_classes}
    if n_classes <= SHOWN:
        metrics["confusion"] = confusion_matrix(cells, range(n_classes))
    return metrics


def confusion_matrix(cells, classes):
    """The rows and columns of `classes` (class ids) of the confusion matrix given by its cells."""
    at = {c: k for k, c in enumerate(classes)}
    matrix = [[0] * len(at) for _ in at]
    for i, j, n in cells:
        if i in at and j in at:
            matrix[at[i]][at[j]] = n
    return matrix


def metrics_table(metrics, classes):
    """Per-class precision, recall and F1, then the confusion matrix, as lines of text: every class
    up to SHOWN classes; beyond, the SHOWN most frequent (and the confusion among the 10 most
    frequent), so that the table fits on a screen whatever the number of classes."""
    frequent = sorted(range(len(classes)), key=lambda i: -metrics["actual"][i])  # stable: ties in class order
    shown = sorted(frequent[:SHOWN])
    names = [classes[i][:40] for i in range(len(classes))]  # long names cut, to keep the lines short
    width = max(8, *(len(names[i]) for i in shown))
    lines = [f"  {'':{width}}  precision  recall      F1  examples"]
    for i in shown:
        lines.append(f"  {names[i]:{width}}  {metrics['precision'][i]:9.1%}  {metrics['recall'][i]:6.1%}  "
                     f"{metrics['f1'][i]:6.1%}  {metrics['actual'][i]:8}")
    if len(classes) > SHOWN:
        lines.append(f"  ... and {len(classes) - SHOWN:,} less frequent classes (all of them: metrics.json)")
    among = sorted(frequent[:10]) if len(classes) > SHOWN else shown
    short = max(len(names[i]) for i in among) <= 8  # long names: number the columns instead
    heads = [names[i] if short else f"({k + 1})" for k, i in enumerate(among)]
    rows = [names[i] if short else f"({k + 1}) {names[i]}" for k, i in enumerate(among)]
    which = "" if among == list(range(len(classes))) else f" among the {len(among)} most frequent classes"
    lines.append(f"  confusion{which} (rows: true class, columns: predicted{'' if short else ', in the same order'}):")
    cell = max(5, *(len(h) for h in heads))
    width = max(len(r) for r in rows)
    lines.append(f"  {'':{width}}  " + " ".join(f"{h:>{cell}}" for h in heads))
    for name, row in zip(rows, confusion_matrix(metrics["confusion_cells"], among)):
        lines.append(f"  {name:{width}}  " + " ".join(f"{n:>{cell}}" for n in row))
    return lines


def counts_text(counts, order):
    """'70 ham, 70 spam': the count of each class in `order`, on part of one line."""
    return fit([f"{counts[c]:,} {c}" for c in order])


def fit(items, width=80):
    """The items joined with commas, as many as fit in `width` characters, then how many there
    are: part of one line, whatever their number."""
    shown = 1
    while shown < len(items) and len(", ".join(items[:shown + 1])) <= width:
        shown += 1
    return ", ".join(items[:shown]) + (f", ... ({len(items):,} classes)" if shown < len(items) else "")


def baselines(train, test, classes):
    """Test accuracy of two classical methods, so the GPT has something to beat.

    majority: always answer the class most common in training.
    character 3-grams: each text becomes the counts of its byte triples (b"the", b"he ", ...),
    scaled to length 1; each class's centroid is the mean of its training texts' vectors; a test
    text gets the class whose centroid points most nearly its way (largest dot product). Triples
    are hashed into 2^18 buckets, so nothing is stored per distinct triple. The centroids are
    sparse, (bucket, class, weight) entries sorted by bucket: their memory grows with the
    training text, not with classes x buckets (1,000 dense centroids would take 2 GB).
    """
    majority = Counter(label for label, _ in train).most_common(1)[0][0]
    buckets = 1 << 18
    n = len(classes)
    index = {c: i for i, c in enumerate(classes)}

    def triples(text):  # (bucket ids, counts / norm) of one text
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        ids, counts = np.unique((b[:-2] << 16 | b[1:-1] << 8 | b[2:]) % buckets, return_counts=True)
        return ids, counts / max(np.linalg.norm(counts), 1e-12)

    pieces = [(ids, np.full(len(ids), index[label]), w) for label, text in train for ids, w in [triples(text)]]
    bucket, cls, weight = (np.concatenate(p) for p in zip(*pieces))
    keys, inverse = np.unique(bucket * n + cls, return_inverse=True)  # one entry per (bucket, class), by bucket
    weight = np.bincount(inverse, weights=weight)                     # the sums of the class's texts
    bucket, cls = keys // n, keys % n
    weight /= np.maximum(np.sqrt(np.bincount(cls, weights=weight ** 2, minlength=n)), 1e-12)[cls]  # length 1
    first = np.searchsorted(bucket, np.arange(buckets + 1))           # bucket b's entries: first[b]:first[b + 1]
    right = 0
    for label, text in test:
        ids, w = triples(text)
        count = first[ids + 1] - first[ids]                           # entries of each of the text's buckets
        at = np.repeat(first[ids] - np.cumsum(count) + count, count) + np.arange(count.sum())  # their positions
        scores = np.bincount(cls[at], weights=weight[at] * np.repeat(w, count), minlength=n)  # (classes,)
        right += classes[int(np.argmax(scores))] == label
    return {"majority": sum(label == majority for label, _ in test) / len(test),
            "char_3gram_centroid": right / len(test)}


# ----------------------------------------------------------------------------------------------
# 5. Saving and loading: only what finetuning changed, plus the recipe that rebuilds the rest.
# ----------------------------------------------------------------------------------------------

def load_classifier(out, device="cpu"):
    """(model, recipe) from a folder written by save_outputs (its classifier.pt)."""
    path = Path(out) / "classifier.pt"
    if not path.exists():
        raise minigpt.DataError(f"no classifier at {path}: run finetune.py first (--out {out})")
    saved = minigpt.load_pt(path, device, "a classifier saved by finetune.py", "run finetune.py again")
    try:
        recipe, state = saved.get("recipe") or saved["meta"], saved["state"]  # "meta" in older files
    except (KeyError, TypeError, AttributeError) as e:
        raise minigpt.DataError(f"{path} is not a classifier saved by finetune.py (no {e}); "
                                "run finetune.py again") from e
    model = make_classifier(base_model(recipe, device), recipe["trainable"], len(recipe["labels"]),
                            recipe["lora_rank"], recipe["lora_alpha"])
    try:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    except RuntimeError as e:  # a shape differs
        raise minigpt.DataError(f"{path} does not fit its base model ({str(e).splitlines()[1].strip()}); "
                                "run finetune.py again") from e
    if unexpected:
        raise minigpt.DataError(f"{path} holds parameters this model lacks: {unexpected[:3]}")
    return model.eval(), recipe


def base_model(recipe, device):
    """The model finetuning started from, before its head was replaced. Dropout is off while
    finetuning (the book's drop_rate 0.0): set here, for every init. For qlora, its blocks' Dense
    layers are NF4, quantized as the weights stream in (see load_nf4)."""
    if recipe["init"] == "random":  # no file: the same random weights again, from the seed
        torch.manual_seed(recipe["seed"])
        cfg, tensors = minigpt.GPTConfig(**recipe["config"]), None
    else:
        check_base_file(recipe)
        cfg, tensors = minigpt.model_tensors(recipe["init"], device)
    cfg = replace(cfg, dropout=0.0)
    if recipe["trainable"] == "qlora":
        return load_nf4(cfg, random_tensors(cfg) if tensors is None else tensors, device)
    return minigpt.GPT(cfg).to(device) if tensors is None else minigpt.load_weights(cfg, tensors, device)


def check_base_file(recipe):
    """A DataError if the checkpoint a classifier was trained on is gone or has changed since."""
    if recipe.get("init_sha256") and not Path(recipe["init"]).is_file():
        raise minigpt.DataError(f"this classifier's base model {recipe['init']} is missing; put it back, "
                                "or run finetune.py again")
    if recipe.get("init_sha256") and minigpt.sha256_of(recipe["init"]) != recipe["init_sha256"]:
        raise minigpt.DataError(f"{recipe['init']} changed since this classifier was trained on it; "
                                "run finetune.py again")


def save_outputs(out, model, recipe, splits, metrics, history, accuracies):
    """Step 6, save: every file of the run (OUTPUTS), into the folder `out`."""
    # classifier.pt, megabytes, not the whole model: {"recipe": how load_classifier rebuilds the
    # model (init, init_sha256, config, seed, trainable, pool, labels by id, lora_rank, lora_alpha:
    # build_model's; max_length, title, sample_texts: main's), "state": the parameters that
    # trained, by name (last_block: h.<last>.*, ln_f.*, lm_head.*; the rest comes back from init),
    # "sha256": the digest of both, which save_pt adds and load_pt checks}.
    state = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    minigpt.save_pt(out / "classifier.pt", {"recipe": recipe, "state": state})
    minigpt.write_text(out / "metrics.json", json.dumps(metrics, indent=1))  # evaluate's figures
    plot_training(out, history, accuracies)  # loss.svg, accuracy.svg
    for name in SPLITS:  # train.csv, validation.csv, test.csv: label, text
        write_csv(out / f"{name}.csv", splits[name])


OUTPUTS = ("classifier.pt", "metrics.json", "loss.svg", "accuracy.svg", *(f"{name}.csv" for name in SPLITS))


def plot_training(out, history, accuracies):
    """loss.svg (train's loss history) and accuracy.svg (its per-epoch accuracies), into `out`."""
    minigpt.svg_plot(out / "loss.svg", {"train": (history["seen"], history["train"]),
                                        "validation": (history["seen"], history["validation"])},
                     "examples seen", "cross-entropy loss", "Finetuning: loss")
    minigpt.svg_plot(out / "accuracy.svg", {name: (accuracies["epoch"], [100 * a for a in accuracies[name]])
                                            for name in ("train", "validation")},
                     "epoch", "accuracy (%)", "Finetuning: accuracy", integer_x=True)


# ----------------------------------------------------------------------------------------------
# 6. The run, step by step: data, model, batches, training, measuring, saving.
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """The run. Returns the finetuned model (its frozen blocks in the run's dtype) and its recipe."""
    args = parse_args(argv)
    started = time.time()
    check_output(args.out)
    if args.unlabelled:  # only the data is read: no model
        examples = read_data(args)
        return write_unlabelled(args, load_splits(args, examples)[0], examples)
    if args.trainable == "qlora":
        minigpt.set_malloc(keep_freed=False)  # a 4-bit base is there to save memory: the allocator should too
    torch.manual_seed(args.seed)
    device = minigpt.pick_device(args.device)
    dtype = minigpt.pick_dtype(args.dtype, device)
    tokenizer = minigpt.get_tokenizer()
    # The outputs go to a folder beside --out that becomes --out once all of them are written: a
    # run that fails or is stopped leaves --out as it was. A second run on the same --out meanwhile
    # is refused.
    with minigpt.atomic_folder(args.out, exclusive=True) as out:
        splits, classes = load_splits(args)                                                  # 1. data
        model, recipe = build_model(args, device, classes)                                   # 2. model
        batches, labels, frozen, max_length = make_batches(model, classes, splits, tokenizer, args, device,
                                                           dtype)                             # 3. batches
        title, sample_texts = page_text(args, splits, classes)
        recipe.update(title=title, sample_texts=sample_texts, max_length=max_length)   # the recipe, complete
        print("Before finetuning: " + ", ".join(
            f"{name} {accuracy(model, batches[name], labels[name], args.pool, frozen, dtype):.2%}"
            for name in SPLITS))
        history, accuracies, seconds, seen = train(model, batches, labels, frozen, args, dtype)  # 4. train
        metrics = evaluate(model, splits, classes, batches, labels, frozen, accuracies, args, dtype)  # 5.
        metrics.update(train_seconds=seconds, wall_seconds=time.time() - started,
                       examples_per_second=seen / seconds, epochs=args.epochs, max_steps=args.max_steps,
                       init=args.init, trainable=args.trainable, pool=args.pool, dtype=minigpt.dtype_name(dtype),
                       seed=args.seed, split_seed=args.split_seed)
        save_outputs(out, model, recipe, splits, metrics, history, accuracies)               # 6. save
    print(f"Saved {args.out}/classifier.pt, metrics.json, loss.svg, accuracy.svg and the splits "
          f"(train.csv, validation.csv, test.csv); wall time {time.time() - started:.1f} s")
    return model.eval(), recipe


def load_splits(args, examples=None):
    """Step 1, data: read the examples (unless given: read_data's), check them, split them.
    Nothing is written yet (see save_outputs): bad data costs nothing."""
    examples = read_data(args) if examples is None else examples
    counts = count_labels(examples, args.data)
    if args.dedupe:
        examples = list(dict.fromkeys(examples))  # the first of each exact duplicate, in order
    if args.validation_data:  # the user's own splits: --data is all training data
        splits = own_splits(args, examples, counts)
    else:
        split = balanced_split if args.balance else stratified_split
        splits = split(examples, args.split_seed)
        check_every_class_in_every_split(splits, examples, args.balance)
    classes = sorted({label for label, _ in splits["train"]})
    if args.unseen != "all":  # a sample of --unseen of what balancing left out
        pick = np.random.default_rng(args.split_seed).permutation(len(splits["unseen"]))[:args.unseen]
        splits["unseen"] = [splits["unseen"][i] for i in sorted(pick)]
    print_splits(splits, classes, args)
    return splits, classes


def count_labels(examples, data):
    """{label: examples}, printed; a DataError past MAX_CLASSES labels."""
    counts = Counter(label for label, _ in examples)
    if len(counts) > MAX_CLASSES:
        raise minigpt.DataError(f"{data}: {len(counts):,} different labels; finetune.py supports at most "
                                f"{MAX_CLASSES:,} classes (merge rare labels, into 'other' say)")
    print(f"{len(examples):,} examples: {counts_text(counts, sorted(counts))}")
    return counts


def print_splits(splits, classes, args):
    """The classes, each split's size and class counts, and how many texts also occur in train."""
    print(f"classes (in this order): {fit(classes)}; {'balanced, then split' if args.balance else 'stratified split'}")
    train_texts = {text for _, text in splits["train"]}
    for name in SPLITS:
        part = Counter(label for label, _ in splits[name])
        overlap = "" if name == "train" else \
            f", {sum(text in train_texts for _, text in splits[name])} texts also in train"
        print(f"  {name}: {len(splits[name])} ({counts_text(part, classes)}){overlap}")
    if splits["unseen"]:
        part = Counter(label for label, _ in splits["unseen"])
        print(f"  unseen: {len(splits['unseen'])} of the examples balancing left out ({counts_text(part, sorted(part))})")


def write_unlabelled(args, splits, examples):
    """Text to pretrain on without leaking what is measured: every text of the examples except those
    in validation, test and the unseen sample (compared as text, so a duplicate of a test
    message is left out too), one per line, in the file's order."""
    held_out = {text for name in ("validation", "test", "unseen") for _, text in splits[name]}
    texts = [" ".join(text.split()) for _, text in examples if text not in held_out]
    minigpt.write_text(args.unlabelled, "".join(f"{text}\n" for text in texts))
    print(f"Wrote {len(texts):,} texts to {args.unlabelled}, leaving out the {len(held_out):,} texts of "
          f"validation, test and the unseen sample (split seed {args.split_seed})")


def own_splits(args, examples, counts):
    """--validation-data and --test-data: the user's own splits; --data is all training data."""
    splits = {"train": examples, "unseen": []}
    if args.balance:  # balanced as balanced_split balances, and all of it trains
        parts = balanced_split(examples, args.split_seed)
        splits = {"train": parts["train"] + parts["validation"] + parts["test"], "unseen": parts["unseen"]}
    for name, path in (("validation", args.validation_data), ("test", args.test_data)):
        splits[name] = read_examples(path, args.text_column, args.label_column)
        if unknown := sorted({label for label, _ in splits[name]} - counts.keys()):
            raise minigpt.DataError(f"{path}: label {unknown[0]!r} never occurs in the training data {args.data}")
    return splits


def page_text(args, splits, classes):
    """The web page's question and sample texts (saved with the classifier, for classify.py):
    short texts from the training data, each class in turn, two each for up to three classes."""
    title = args.title or {"sms": "Is this SMS spam?", "passages": "Which book is this passage from?"}.get(args.data)
    if title is None and classes == ["ham", "spam"]:
        title = "Is this spam?"
    elif title is None and len(classes) == 2:
        title = f"{' or '.join(classes)}?"
    elif title is None:
        title = f"Which is it: {', '.join(classes)}?" if len(classes) <= 6 else f"Which of {len(classes):,} classes is it?"
    shown = classes[:6]  # at most six sample texts
    short = {c: [text for label, text in splits["train"] if label == c and len(text) <= 160][:2] for c in shown}
    per_class = 2 if len(classes) <= 3 else 1
    return title[:200], [short[c][i] for i in range(per_class) for c in shown if i < len(short[c])]


def build_model(args, device, classes):
    """Step 2, model: the base GPT (random, GPT-2 or a checkpoint) with its new head, and its
    recipe, everything needed to rebuild it later (see load_classifier)."""
    if args.init == "random":
        recipe = dict(init="random", config=asdict(minigpt.PRESETS[args.preset]))
    else:
        recipe = dict(init=args.init if args.init in minigpt.GPT2_FILES else str(Path(args.init).resolve()))
    recipe.update(seed=args.seed, trainable=args.trainable, pool=args.pool, labels=classes,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    t0 = time.time()
    model = base_model(recipe, device)
    recipe["config"] = asdict(model.cfg)
    if Path(recipe["init"]).is_file():  # a checkpoint may be overwritten later: remember which one this was
        recipe["init_sha256"] = minigpt.sha256_of(recipe["init"])
    make_classifier(model, args.trainable, len(classes), args.lora_rank, args.lora_alpha)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_nf4 = sum(math.prod(m.shape) for m in model.modules() if isinstance(m, NF4Dense))
    n_all = n_nf4 + sum(p.numel() for p in model.parameters())
    print(f"model: {args.init}, {n_all:,} parameters, {n_train:,} trainable ({args.trainable}); "
          f"loaded in {time.time() - t0:.1f} s")
    nf4_bytes, other_bytes = model_bytes(model)
    in_nf4 = f"{nf4_bytes / 1e6:,.1f} MB of it NF4 ({n_nf4:,} weights, {8 * nf4_bytes / n_nf4:.3f} bits each), " \
        if n_nf4 else ""
    print(f"in memory: {(nf4_bytes + other_bytes) / 1e6:,.1f} MB of weights; {in_nf4}"
          f"{other_bytes / 1e6:,.1f} MB not quantized")
    return model, recipe


def frozen_blocks(model, trainable):
    """How many blocks, from the bottom, stay frozen: h[:n] never change, so their output is cacheable."""
    n = model.cfg.n_layers
    return {"head": n, "last_block": n - 1, "last_two_blocks": n - 2}.get(trainable, 0)


def make_batches(model, classes, splits, tokenizer, args, device, dtype):
    """Step 3, batches: token ids, cut to the longest training text (or --max-length) and the
    context; then, once, the frozen blocks' output for every text, in dtype (the blocks' weights
    cast once, inference being fastest that way; in bfloat16 the output takes half the memory).
    Returns the batches of every split, their labels, the number of frozen blocks and the
    tokens read per text."""
    index = {c: i for i, c in enumerate(classes)}
    whole = {name: minigpt.encode([t for _, t in part], tokenizer)[0] for name, part in splits.items()}  # uncut
    max_length = min(args.max_length or max(map(len, whole["train"])), model.cfg.context_length)
    ids = {name: [i[:max_length] for i in part] for name, part in whole.items()}
    labels = {name: torch.tensor([index[label] for label, _ in part], dtype=torch.long) for name, part in splits.items()}
    lengths = {name: [len(i) for i in part] for name, part in ids.items()}
    print(f"max length {max_length} tokens; {sum(map(sum, lengths.values())):,} tokens in all, "
          f"pooling '{args.pool}'")
    frozen = frozen_blocks(model, args.trainable)  # all, lora, qlora: nothing is frozen, 0
    rows = {name: model_inputs(part, args.pool, max_length) for name, part in ids.items()}
    if frozen > 0:
        t0 = time.time()
        model.h[:frozen].to(dtype)
        rows = {name: frozen_features(model, part, frozen, device) for name, part in rows.items()}
        print(f"cached the output of the {frozen} frozen blocks in {time.time() - t0:.1f} s "
              f"({minigpt.dtype_name(dtype)})")
    # Evaluating needs no backward pass, so its batches can be 8 times bigger (faster); not for
    # qlora, whose point is memory: on GPT-2 XL a no-grad pass over 56 texts took more memory
    # beyond the model than a training step over 8 (docs/finetuning.md).
    eval_batch_size = args.batch_size if args.trainable == "qlora" else args.batch_size * 8
    batches = {name: Batches(rows[name], lengths[name], eval_batch_size) for name in rows}
    batches["train_shuffled"] = Batches(rows["train"], lengths["train"], args.batch_size, shuffle=True,
                                        seed=args.seed, drop_last=True)
    if len(batches["train_shuffled"]) == 0:
        raise minigpt.DataError(f"{len(rows['train'])} training texts make no batch of {args.batch_size}; "
                                "give more data or a smaller --batch-size")
    # Random training batches for the periodic loss, with their own random order, so that
    # measuring never changes the order the model trains in.
    batches["train_sample"] = Batches(rows["train"], lengths["train"], args.batch_size, shuffle=True,
                                      seed=args.seed + 1)
    return batches, labels, frozen, max_length


def evaluate(model, splits, classes, batches, labels, frozen, accuracies, args, dtype):
    """Step 5, measure: accuracy on each split (train and validation: as after the last epoch);
    per-class precision, recall, F1 and the confusion matrix on test, beside two classical
    baselines; accuracy on the examples balancing left out (for SMS: the false-positive rate)."""
    acc = lambda name: accuracy(model, batches[name], labels[name], args.pool, frozen, dtype)
    final = {name: (accuracies[name] or [acc(name)])[-1] for name in ("train", "validation")}
    probs = predict(model, batches["test"], args.pool, frozen, dtype)
    test = classification_metrics(labels["test"], probs.argmax(dim=1), len(classes))
    classical = baselines(splits["train"], splits["test"], classes)
    print(f"Training accuracy: {final['train']:.2%}\nValidation accuracy: {final['validation']:.2%}\n"
          f"Test accuracy: {test['accuracy']:.2%} (macro F1 {test['macro_f1']:.2%})")
    print("\n".join(metrics_table(test, classes)))
    print(f"Classical baselines on test: majority class {classical['majority']:.2%}, "
          f"character 3-gram nearest centroid {classical['char_3gram_centroid']:.2%}")
    metrics = {"classes": classes, "train_accuracy": final["train"], "validation_accuracy": final["validation"],
               "val_accuracy": final["validation"], "test_accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
               "per_class": {c: {"precision": test["precision"][i], "recall": test["recall"][i],
                                 "f1": test["f1"][i], "examples": test["actual"][i]}
                             for i, c in enumerate(classes)},
               "confusion_cells": test["confusion_cells"], "baselines": classical}
    if "confusion" in test:  # up to SHOWN classes
        metrics["confusion"] = test["confusion"]
    if classes == ["ham", "spam"]:  # the SMS figures, as the reference reports them
        metrics.update(spam_figures(test))
    if splits["unseen"]:
        unseen = acc("unseen")
        metrics.update(unseen_accuracy=unseen, unseen_count=len(splits["unseen"]))
        if {label for label, _ in splits["unseen"]} == {"ham"} and classes == ["ham", "spam"]:
            metrics.update(unseen_ham_false_positive_rate=1 - unseen, unseen_ham_count=len(splits["unseen"]))
            print(f"False positives on {len(splits['unseen'])} unseen ham: {1 - unseen:.2%}")
        else:
            print(f"Accuracy on {len(splits['unseen'])} unseen examples (left out by balancing): {unseen:.2%}")
    return metrics


def spam_figures(test):
    """Precision, recall and F1 of the spam class and its confusion matrix by name, printed."""
    (tn, fp), (fn, tp) = test["confusion"]                 # rows: true ham, true spam
    figures = dict(precision=test["precision"][1], recall=test["recall"][1], f1=test["f1"][1],
                   confusion_matrix={"true_ham": {"ham": tn, "spam": fp}, "true_spam": {"ham": fn, "spam": tp}})
    print(f"Test spam: precision {figures['precision']:.2%}, recall {figures['recall']:.2%}, "
          f"F1 {figures['f1']:.2%}; confusion [[ham->ham {tn}, ham->spam {fp}], [spam->ham {fn}, spam->spam {tp}]]")
    return figures


def check_output(out):
    """--out must be new, empty, or what an earlier run wrote: it is replaced whole at the end."""
    if out.exists() and (foreign := sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)):
        raise minigpt.DataError(f"--out {out} holds files finetune.py did not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}), and a run replaces the whole folder; "
                                "give a new or empty folder")


# ----------------------------------------------------------------------------------------------
# 7. The command line.
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=minigpt.Help)
    p.add_argument("--init", default="gpt2-small",
                   help="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl (OpenAI's weights), random "
                        "(random weights of --preset's shape), or a pretrain.py checkpoint / model folder")
    p.add_argument("--preset", default="gpt2-small", type=minigpt.preset_name,
                   help=f"shape for --init random: {', '.join(minigpt.PRESETS)}")
    p.add_argument("--trainable", default="last_block", choices=TRAINABLE,
                   help="what trains besides the new head (last_block: last block + final LayerNorm)")
    p.add_argument("--pool", default="last_real", choices=POOLS,
                   help="last_real: the last real token; last: the final padded position (the book's "
                        "model(x)[:, -1]); mean: the average over the real tokens")
    p.add_argument("--lora-rank", type=minigpt.positive_int, default=16, help="rank of each LoRA update")
    p.add_argument("--lora-alpha", type=minigpt.positive_float, default=16, help="LoRA's scale is alpha / rank")
    p.add_argument("--epochs", type=minigpt.positive_int, default=5, help="passes over the training split")
    p.add_argument("--max-steps", type=minigpt.positive_int,
                   help="stop after this many optimizer steps (quick trials on big models) (default: no limit)")
    p.add_argument("--batch-size", type=minigpt.positive_int, default=8, help="texts per training step")
    p.add_argument("--lr", type=minigpt.positive_float, default=5e-5, help="AdamW's learning rate")
    p.add_argument("--weight-decay", type=minigpt.nonnegative_float, default=0.1, help="AdamW's, on weight matrices")
    p.add_argument("--max-length", type=minigpt.positive_int,
                   help="tokens per text (default: the longest training text, at most the context)")
    p.add_argument("--eval-every", type=minigpt.positive_int, default=50, help="steps between loss evaluations")
    p.add_argument("--data", default="sms", type=lambda s: "passages" if s == "books" else s,
                   help="sms (UCI's SMS Spam Collection), passages (passages of six texts), or a file: "
                        ".csv/.tsv with a header row, else label<TAB>text lines (UTF-8)")
    p.add_argument("--text-column", default="text", help="the text's column in a .csv/.tsv file")
    p.add_argument("--label-column", default="label", help="the label's column in a .csv/.tsv file")
    p.add_argument("--validation-data", type=minigpt.existing_file,
                   help="your own validation split (same format as --data; give --test-data too)")
    p.add_argument("--test-data", type=minigpt.existing_file, help="your own test split")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction,
                   help="down-sample every class to the smallest, then split (default: on for sms; "
                        "otherwise off: a stratified split)")
    p.add_argument("--split-seed", type=int, default=123,
                   help="the split and the balancing sample: the same split for every --seed")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate examples before splitting")
    how_many = lambda v: v if v == "all" else minigpt.nonnegative_int(v)
    p.add_argument("--unseen", default=1000, type=how_many,
                   help="how many of the examples that --balance left out (for sms: ham) to measure on "
                        "(a false-positive rate for sms), or 'all'; 0 skips it")
    p.add_argument("--unseen-ham", dest="unseen", type=how_many, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--title", help="the web page's question (default: from the data, e.g. 'Is this SMS spam?')")
    p.add_argument("--seed", type=int, default=123, help="the new head's initial weights and the order of the batches")
    p.add_argument("--unlabelled", type=minigpt.output_file, metavar="FILE",
                   help="write the texts of --data that this split leaves out of validation, test and the "
                        "unseen sample to FILE, one per line (for pretrain.py --text), and stop")
    minigpt.add_device_flags(p)
    p.add_argument("--out", type=minigpt.output_folder, default="runs/spam-classifier",
                   help="folder for classifier.pt, metrics.json, plots and the splits")
    args = p.parse_args(argv)
    if args.balance is None:  # --balance's default: on for the SMS data, as in the book
        args.balance = args.data == "sms"
    if (args.validation_data is None) != (args.test_data is None):
        p.error("give --validation-data and --test-data together (or neither: then --data is split 70/10/20)")
    return args


# ==============================================================================================
# 8. QLoRA (Dettmers et al. 2023): LoRA on a base whose frozen Dense weights are stored in 4 bits.
#    A weight matrix is cut into blocks of 64 weights; each block is divided by its largest
#    |weight| (its absmax, "scale"), and each weight, now in [-1, 1], is replaced by the index of
#    the nearest of 16 code values, 4 bits. The code values are NF4, "4-bit NormalFloat":
#    quantiles of N(0, 1) scaled to [-1, 1], so that each is about equally used by normally
#    distributed weights; 0 is exact. The scales (one float32 per 64 weights, 0.5 bit a weight)
#    are quantized again ("double quantization"): minus their mean, in groups of 256, to 8 bits
#    each against the group's largest |scale - mean|, stored as one float32. Bits per weight:
#    4 + 8/64 + 32/(64 * 256) = 4.127. And in training each block keeps only its input for the
#    backward pass, which runs the block again for the rest (CheckpointedBlock).
# ==============================================================================================

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])  # (16,), ascending
# A byte holds two codes, the first in its high 4 bits: row b of NF4_PAIRS is the two values byte b
# stands for, so one lookup per byte unpacks and decodes (faster than unpacking, then looking up).
NF4_PAIRS = torch.stack((NF4.repeat_interleave(16), NF4.repeat(16)), dim=1)  # (256, 2)
BLOCK = 64         # weights per absmax scale
SCALE_BLOCK = 256  # scales per float32 in the double quantization


def nf4_quantize(w):
    """A weight matrix (in, out) in NF4: a dict of four tensors. For n = in * out weights (padded
    with zeros to whole blocks: zeros change no absmax), nb = n / 64 blocks, ng = nb / 256 groups:

        codes         (n / 2,)      uint8    two 4-bit indices into NF4 per byte        n / 2 bytes
        scale_codes   (ng * 256,)   int8     each block's absmax minus the mean          nb bytes
        scale_scales  (ng,)         float32  each group's largest |absmax - mean|        4 ng bytes
        scale_mean    ()            float32  the mean absmax                            4 bytes

    GPT-2 XL's c_fc (1600, 6400): 5,120,000 + 160,000 + 2,500 + 4 bytes instead of 40,960,000.
    """
    flat = w.detach().float().flatten()
    flat = F.pad(flat, (0, -len(flat) % BLOCK))                       # (nb * 64,)
    blocks = flat.view(-1, BLOCK)                                     # (nb, 64)
    absmax = blocks.abs().amax(dim=1)                                 # (nb,)
    scaled = blocks / absmax.clamp_min(1e-30)[:, None]                # (nb, 64) in [-1, 1]
    code_values = NF4.to(w.device)
    between = (code_values[1:] + code_values[:-1]) / 2                # (15,) midpoints of neighbours
    codes = torch.bucketize(scaled, between, out_int32=True).to(torch.uint8).flatten()  # (nb * 64,): nearest
    # Double quantization of the scales: centred on their mean, so that the 8 bits spread over their
    # differences (all absmaxes are positive and alike); int8 steps of (group's largest) / 127.
    mean = absmax.mean()                                              # ()
    centred = F.pad(absmax - mean, (0, -len(absmax) % SCALE_BLOCK)).view(-1, SCALE_BLOCK)  # (ng, 256)
    scale_scales = centred.abs().amax(dim=1)                          # (ng,)
    scale_codes = torch.round(centred / scale_scales.clamp_min(1e-30)[:, None] * 127)     # (ng, 256)
    return {"codes": codes[0::2] << 4 | codes[1::2],                  # (nb * 32,): first code high
            "scale_codes": scale_codes.to(torch.int8).flatten(), "scale_scales": scale_scales,
            "scale_mean": mean}


def nf4_dequantize(q, shape, dtype=torch.float32):
    """The weight matrix `shape` (in, out) back from nf4_quantize's dict, in `dtype`:
    NF4[code] * (scale_code / 127 * scale_scale + mean) for each weight."""
    centred = q["scale_codes"].view(-1, SCALE_BLOCK) / 127 * q["scale_scales"][:, None]  # (ng, 256)
    scales = (centred + q["scale_mean"]).flatten()                    # (ng * 256,): each block's absmax
    values = NF4_PAIRS.to(q["codes"].device).index_select(0, q["codes"].int())  # (nb * 32, 2) in [-1, 1]
    w = values.view(-1, BLOCK).mul_(scales[:len(values) * 2 // BLOCK, None])    # (nb, 64)
    return w.flatten()[:math.prod(shape)].view(shape).to(dtype)      # (in, out)


def compute_dtype(x):
    """The dtype a matrix product with x runs in: autocast's where it is on, else x's own."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class NF4Matmul(torch.autograd.Function):
    """x @ W for the frozen NF4 weight W of `layer`, dequantized for the product and again for the
    backward pass (the gradient for x is grad @ Wᵀ). Plain autograd would keep every dequantized W
    from the forward pass to the backward: the whole float32 model again."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.dtype = layer, x.dtype
        return x @ layer.dequantize(compute_dtype(x))                 # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad):                                          # grad: (..., out)
        return (grad @ ctx.layer.dequantize(grad.dtype).T).to(ctx.dtype), None  # (..., in); W has none


class NF4Dense(nn.Module):
    """A frozen Dense layer, y = x @ W + bias, with W (in, out) stored in NF4 (the buffers are
    nf4_quantize's dict) and the bias in float. Built empty; filled by load_nf4."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.shape = (n_in, n_out)
        n_blocks = -(-n_in * n_out // BLOCK)                          # rounded up
        n_groups = -(-n_blocks // SCALE_BLOCK)
        self.register_buffer("codes", torch.zeros(n_blocks * BLOCK // 2, dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.zeros(n_groups * SCALE_BLOCK, dtype=torch.int8))
        self.register_buffer("scale_scales", torch.zeros(n_groups))
        self.register_buffer("scale_mean", torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(n_out), requires_grad=False)

    def dequantize(self, dtype=torch.float32):
        return nf4_dequantize(dict(self.named_buffers()), self.shape, dtype)  # (in, out)

    def weights(self):
        return self.dequantize(), self.bias

    def forward(self, x):
        return NF4Matmul.apply(x, self) + self.bias                  # (..., in) -> (..., out)


class CheckpointedBlock(minigpt.Block):
    """A Block that, when a backward pass will follow, keeps only its input and runs again in the
    backward pass for the rest (activation checkpointing). Keeping it all costs about 16 C floats
    per token per block, 4.9 MB a token for GPT-2 XL's 48 blocks: more than its 4-bit weights for a
    batch of 8 SMS; recomputing costs one more forward pass."""

    def forward(self, x, cache=None):
        if torch.is_grad_enabled() and cache is None:
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x, cache)


def load_nf4(cfg, tensors, device):
    """A GPT(cfg) whose blocks are CheckpointedBlocks with NF4Dense layers, from (name, array)
    pairs: each Dense weight is quantized as it arrives and dropped: besides the embeddings and
    the 4-bit rest, only the float32 matrix being quantized is in memory (GPT-2 XL: 41 MB at
    most, not 5.9 GB)."""
    with torch.device("meta"):                                        # shapes only, no memory
        model = minigpt.GPT(cfg)
        model.h = nn.ModuleList(CheckpointedBlock(cfg, i) for i in range(cfg.n_layers))
        for block in model.h:
            for parent, name in minigpt.dense_layers(block):
                setattr(parent, name, NF4Dense(*getattr(parent, name).weight.shape))
    quantized = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, NF4Dense)}

    def quantize(tensors):
        for name, a in tensors:
            if name in quantized:                                     # (in, out) float -> NF4 parts
                for part, t in nf4_quantize(torch.as_tensor(a, device=device)).items():
                    yield name.removesuffix("weight") + part, t
            else:
                yield name, a

    return minigpt.load_weights(cfg, quantize(tensors), device, model)


def random_tensors(cfg):
    """(name, tensor) pairs of a random GPT(cfg), made one tensor at a time: the very numbers
    minigpt.GPT(cfg) draws after the same torch.manual_seed (test_minigpt.py checks), without
    the whole model in memory. A GPT without blocks draws what GPT(cfg) draws before its blocks'
    weights (the embeddings, the head that wte then replaces: every preset ties it); then each
    block's, in GPT(cfg)'s order."""
    outside = minigpt.GPT(replace(cfg, n_layers=0))                   # wte, wpe, ln_f
    with torch.device("meta"):
        block = minigpt.Block(cfg, 0)                                 # the names and shapes of a block
    for i in range(cfg.n_layers):
        for name, p in block.named_parameters():
            name = f"h.{i}.{name}"
            yield name, minigpt.init_parameter(name, torch.empty(p.shape), cfg)
    yield from outside.named_parameters()


def model_bytes(model):
    """(bytes in NF4 layers, bytes of everything else) of a model's parameters and buffers."""
    nf4 = {id(t) for m in model.modules() if isinstance(m, NF4Dense) for t in m.buffers()}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()  # a tied tensor once
    count = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return count(t for t in tensors if id(t) in nf4), count(t for t in tensors if id(t) not in nf4)


if __name__ == "__main__":
    minigpt.run_script(main, "nothing was saved; --out is as it was")
