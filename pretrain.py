"""Pretrain a GPT from random weights: on Edith Wharton's short story "The Verdict" (1908), or on
whole books.

Pretraining is next-token prediction: show the model a window of text, and at every position
ask it for the token that comes next. The loss is the cross-entropy of the true next token; as it
falls, the model's samples turn from random tokens into words and phrases. The story is about
5,000 tokens, far too little to learn English; the model mostly memorises it, which is what
makes the effect visible in minutes on a laptop CPU. Four novels (1.7 million tokens) are enough
for a small model to learn what English looks like: there the validation loss keeps falling.

    python pretrain.py                     # small model on the story, about 2 minutes on a 2-core CPU
    python pretrain.py --setting ch5       # the book's chapter 5 run: 124M shape, about 6 minutes
    python pretrain.py --corpus books      # four novels: a model that generalises, 6-10 minutes
    python pretrain.py --text my.txt docs/ # your own UTF-8 files (folders: every *.txt inside)
    python pretrain.py --corpus books --resume                   # continue a stopped run
    torchrun --nproc-per-node=4 pretrain.py --corpus books       # 4 processes, DistributedDataParallel

The text is tokenized once into token files (data/tokens/), which every later run reuses.
Writes model.pt (for finetune.py and `python minigpt.py --model ...`; while a run is unfinished
it also holds everything --resume needs), loss.svg and history.json to --out.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import minigpt

# Named settings: what each changes from the flags' defaults (a flag given on the command line wins).
SETTINGS = {
    "default": {},  # the run with no --setting (and no --corpus books or shakespeare): the flags' defaults
    # The book's run (Raschka, ch. 5; lr 4e-4 as in the chapter, its gpt_train.py has 5e-4), with
    # its model's untied output layer and N(0, 1) embeddings, in which the token's own identity
    # dominates the residual stream and the story is learnt fast; with GPT-2's tied N(0, 0.02)
    # ones the same run stays at a train loss near 6.
    "ch5": dict(preset="gpt2-small", context_length=256, epochs=10, lr=4e-4, dropout=0.1, warmup=0, clip=0.0,
                eval_every=5, out="runs/pretrain-ch5", model=dict(tied_head=False, embedding_std=1.0)),
    # --corpus books or shakespeare picks this one: the small model, random windows, 6-10 minutes
    # of steps on a 2-core CPU, a bigger evaluation sample.
    "corpus": dict(corpus="books", epochs=None, max_steps=1200, batch_size=8, warmup=50, windows="random",
                   eval_every=100, eval_windows=40, out="runs/pretrain-{corpus}"),
}
OLD_SETTING_NAMES = {"book": "ch5"}
# The flags that decide what training computes: a resumed run keeps them (--resume takes them
# from the checkpoint, and refuses a different value on the command line).
PLAN = ("setting", "corpus", "text", "init", "preset", "context_length", "epochs", "max_steps", "minutes", "batch_size",
        "grad_accum", "lr", "weight_decay", "dropout", "warmup", "clip", "windows", "seed", "dtype")
KEPT = ("eval_every", "eval_windows", "save_every", "prompt")  # also from the checkpoint, unless given again
FINAL_WINDOWS = 200  # the final losses: over this many windows of each split (all of them, for the story)


# ----------------------------------------------------------------------------------------------
# 1. Documents: a corpus's files, fetched once and checked against their sha256, or the user's.
# ----------------------------------------------------------------------------------------------

def documents(args):
    """[{name, path, sha256, url}] for each document, in order."""
    if not args.text:
        return [{"name": name, "path": minigpt.fetch(name, url, sha256), "sha256": sha256, "url": url}
                for name, url, sha256 in minigpt.CORPORA[args.corpus]]
    paths = []
    for given in map(Path, args.text):
        if given.is_dir():
            found = sorted(given.rglob("*.txt"))
            if not found:
                raise minigpt.DataError(f"{given}: a folder with no *.txt files")
            paths += found
        elif given.is_file():
            paths.append(given)
        else:
            raise minigpt.DataError(f"{given}: no such file or folder")
    return [{"name": str(p), "path": p, "sha256": minigpt.sha256_of(p)} for p in paths]


def text_pieces(path, size=1 << 20):
    """The text of `path` (its Gutenberg body, where it has one) in pieces of about `size`
    characters, so that no corpus is ever in memory whole.

    Tokenizing the pieces one by one must give exactly the tokens of the whole text, so a piece
    ends only where GPT-2's tokenizer splits anyway: just before the newline that precedes a line
    starting with a visible character ("...said." | "\\nThen..."). Before a word, a run of
    whitespace is split into all but its last character, and that character; at the very end
    of a text it would stay one token ("\\n\\nThen" is 198 198 ...; "\\n\\n" alone is 628).
    (A single line is never cut: text with no line breaks is read whole.)
    """
    first, end = minigpt.gutenberg_body(path)
    piece = []
    length = 0
    with open(path, encoding="utf-8") as f:  # text mode: CRLF and CR read as \n
        for number, line in enumerate(f):
            if number < first:
                continue
            if number == end:
                break
            if length >= size and line[:1].strip() and not line.startswith("<|endoftext|>"):
                yield "".join(piece)[:-1]  # all but the newline that ends the previous line
                piece = ["\n"]
                length = 1
            piece.append(line)
            length += len(line)
    if piece:
        yield "".join(piece)


# ----------------------------------------------------------------------------------------------
# 2. Token files: each corpus is tokenized once, streaming, into two flat files of uint16 token
#    ids (2 bytes per token; GPT-2's 50,257 ids fit in 16 bits), read back with np.memmap: the
#    operating system pages in the windows a batch needs, so the corpus never has to fit in memory.
# ----------------------------------------------------------------------------------------------

TOKEN_FORMAT = ("GPT-2 token ids as little-endian uint16; documents joined with <|endoftext|>; Project Gutenberg "
                "header and footer left out; validation: the last 10% of each document's tokens")


def token_files(docs, name, tokenizer):
    """The folder data/tokens/<name>-<hash of the sources>/ holding train.bin, validation.bin and
    tokens.json; written here unless an earlier run already did. Returns (folder, tokens.json)."""
    digest = hashlib.sha256(json.dumps([TOKEN_FORMAT, [d["sha256"] for d in docs]]).encode()).hexdigest()
    folder = minigpt.DATA_DIR / "tokens" / f"{name}-{digest[:10]}"
    if (folder / "tokens.json").exists():
        print(f"Reusing the token files in {folder} (delete the folder to tokenize again)")
        return folder, json.loads((folder / "tokens.json").read_text())
    # Written beside, then renamed into place: never half a folder. If another process (on another
    # machine, sharing the folder) finishes the same files first, theirs are kept: they are the same.
    with minigpt.atomic_folder(folder, replace_existing=False) as tmp:
        contents = write_token_files(docs, tmp, tokenizer)
        (tmp / "tokens.json").write_text(json.dumps(contents, indent=1))
    return folder, contents


def write_token_files(docs, folder, tokenizer):
    """Tokenize the documents, piece by piece, into folder/train.bin and folder/validation.bin.

    Validation gets the last 10 % of each document's tokens (not of the whole stream), so that
    every book is in both splits. A document's tokens are first appended to train.bin; once it
    ends and its length is known, its last 10 % are moved to validation.bin (train.bin is cut
    back). Memory stays at one piece of text and its ids, whatever the corpus's size.
    """
    eot = np.array([minigpt.EOT], dtype="<u2").tobytes()
    progress = minigpt.Progress()
    done = 0  # bytes of text read
    contents = {"format": TOKEN_FORMAT, "tokenizer": "gpt2", "documents": []}
    with open(folder / "train.bin", "w+b") as train, open(folder / "validation.bin", "wb") as validation:
        for i, doc in enumerate(docs):
            if i:  # <|endoftext|> between documents, in both files
                train.write(eot)
                validation.write(eot)
            begin = train.tell()
            try:
                for piece in text_pieces(doc["path"]):
                    ids = tokenizer.encode_to_numpy(piece, allowed_special={"<|endoftext|>"})  # uint32
                    train.write(ids.astype("<u2").tobytes())
                    done += len(piece.encode("utf-8"))
                    tokens = (train.tell() + validation.tell()) // 2
                    progress.show(f"tokenizing: {done / 1e6:.1f} MB, {tokens:,} tokens, "
                                  f"{tokens / max(time.time() - progress.start, 1e-9):,.0f} tokens/s")
            except UnicodeDecodeError as e:
                raise minigpt.DataError(f"{doc['path']} is not UTF-8 text ({e})") from e
            n = (train.tell() - begin) // 2
            keep = int(0.9 * n)
            train.seek(begin + 2 * keep)
            shutil.copyfileobj(train, validation)  # the document's last 10 %
            train.seek(begin + 2 * keep)
            train.truncate()
            contents["documents"].append({"name": doc["name"], "url": doc.get("url"), "sha256": doc["sha256"],
                                      "gutenberg_body_lines": minigpt.gutenberg_body(doc["path"]), "tokens": n,
                                      "train_tokens": keep, "validation_tokens": n - keep})
        contents["train_tokens"] = train.tell() // 2
        contents["validation_tokens"] = validation.tell() // 2
    contents["seconds"] = time.time() - progress.start
    tokens = contents["train_tokens"] + contents["validation_tokens"]
    progress.done(f"tokenized {len(docs)} document(s), {done / 1e6:.1f} MB: {tokens:,} tokens in "
                  f"{contents['seconds']:.1f} s ({tokens / max(contents['seconds'], 1e-9):,.0f} tokens/s)")
    return contents


def load_tokens(args, tokenizer):
    """(train, validation) token ids as read-only np.memmap arrays, and the folder they live in.
    Under torchrun, one process per machine writes the files while the others wait."""
    name = args.corpus or (Path(args.text[0]).stem if len(args.text) == 1 else "text")
    first = not dist.is_initialized() or int(os.environ["LOCAL_RANK"]) == 0
    if not first:
        dist.barrier()  # wait for the first to write the files; then token_files finds them
    folder, contents = token_files(documents(args), name, tokenizer)
    if first and dist.is_initialized():
        dist.barrier()
    splits = []
    for split in ("train", "validation"):
        if contents[f"{split}_tokens"] <= args.context_length:
            raise minigpt.DataError(f"{contents['train_tokens'] + contents['validation_tokens']:,} tokens is too little text "
                                    f"for windows of {args.context_length} + 1 tokens in both splits; give more "
                                    "text or a smaller --context-length")
        ids = np.memmap(folder / f"{split}.bin", dtype="<u2", mode="r")
        if len(ids) != contents[f"{split}_tokens"]:
            raise minigpt.DataError(f"{folder / split}.bin holds {len(ids):,} tokens, not "
                                    f"{contents[f'{split}_tokens']:,}: damaged; delete the folder")
        splits.append(ids)
    return splits[0], splits[1], folder


# ----------------------------------------------------------------------------------------------
# 3. Windows: the examples. A window is T + 1 consecutive token ids: the inputs are the first T,
#    the targets the last T (at every position, the next token).
# ----------------------------------------------------------------------------------------------

def window_batch(ids, starts, T):
    """Inputs and targets, (B, T) int64 each, for the windows starting at `starts`."""
    windows = np.stack([ids[s:s + T + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
    return torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])


def side_by_side(ids, T):
    """Start offsets of the windows that cut `ids` into consecutive, non-overlapping pieces."""
    return np.arange(0, len(ids) - T, T)  # each window needs one more id as its last target


def sample_batches(ids, T, count, batch_size):
    """Up to `count` side-by-side windows spread evenly over `ids`, in batches: a fixed sample, so
    losses measured at different steps are comparable (and every document has its say)."""
    starts = side_by_side(ids, T)
    chosen = starts[np.linspace(0, len(starts) - 1, min(count, len(starts))).round().astype(int)]
    return [window_batch(ids, chosen[i:i + batch_size], T) for i in range(0, len(chosen), batch_size)]


class Windows:
    """This process's training micro-batches, step by step.

    Every optimizer step takes a global batch of batch_size x grad_accum x world windows; process
    `rank` of `world` uses its own share, as grad_accum micro-batches of batch_size windows. Two
    ways to choose them:
    - "sliding": the text cut into side-by-side windows, in a new random order every epoch.
      Every token is trained on once per epoch: right for a short text that is read many times
      (the story's run).
    - "random": windows at random offsets, drawn afresh for every step (nanoGPT's way). Nothing to
      keep track of, and a window may start anywhere: right for a corpus read about once.
    Either way, which windows step k takes depends only on the seed and k, never on earlier steps
    or on the number of processes. So a resumed run continues exactly where it stopped, and N
    processes train on what one process would with N times the batch.
    An epoch is as many steps as the side-by-side windows fill (both ways).
    """

    def __init__(self, ids, T, batch_size, grad_accum, rank, world, seed, how):
        self.ids, self.T, self.seed, self.how = ids, T, seed, how
        self.batch_size, self.grad_accum, self.rank = batch_size, grad_accum, rank
        self.global_batch = batch_size * grad_accum * world
        self.starts = side_by_side(ids, T)
        self.steps_per_epoch = len(self.starts) // self.global_batch  # the last, partial batch is left out
        self.order = (None, None)  # (epoch, its order of the side-by-side windows): shuffled once an epoch

    def step_starts(self, step):
        """Start offsets of the global batch of step `step` (from 1); every process computes the same."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        if self.how == "sliding":
            if self.order[0] != epoch:
                self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
            return self.starts[self.order[1][i * self.global_batch:(i + 1) * self.global_batch]]
        return np.random.default_rng([self.seed, step - 1]).integers(0, len(self.ids) - self.T, self.global_batch)

    def micro_batches(self, step):
        """This process's share of step `step`: grad_accum (inputs, targets) pairs of batch_size windows."""
        share = self.batch_size * self.grad_accum
        mine = self.step_starts(step)[self.rank * share:(self.rank + 1) * share]  # (batch_size * grad_accum,)
        return [window_batch(self.ids, mine[i * self.batch_size:(i + 1) * self.batch_size], self.T)
                for i in range(self.grad_accum)]


# ----------------------------------------------------------------------------------------------
# 4. The run: data, model, the training loop, the final losses.
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """The run. Returns 130 when Ctrl+C or SIGTERM stopped it (after saving), None otherwise."""
    args = parse_args(argv)
    minigpt.set_malloc(keep_freed=True)  # the same big tensors every step: faster kept
    device = minigpt.pick_device(args.device)
    if "RANK" not in os.environ:  # set by torchrun; a plain `python pretrain.py` runs none of this
        return pretrain(args, device)
    device = join_processes(device)
    try:
        status = pretrain(args, device)
    except BaseException:
        dist.destroy_process_group()  # a failed process leaves at once; torchrun stops the others
        raise
    leave_processes()
    return status


def pretrain(args, device):
    checkpoint = resume(args, device)
    dtype = minigpt.pick_dtype(args.dtype, device)  # weights and AdamW stay float32; see minigpt.autocast
    tokenizer = minigpt.get_tokenizer()
    train_ids, validation_ids, token_folder = load_tokens(args, tokenizer)
    if args.prepare_only:
        print(f"Token files: {token_folder}")
        return None
    rank, world = ranks()
    windows = Windows(train_ids, args.context_length, args.batch_size, args.grad_accum, rank, world, args.seed,
                      args.windows)
    plan = planned_steps(args, windows)
    length = f"{plan:,} steps ({plan / windows.steps_per_epoch:.2f} epochs" if plan < float("inf") else \
        f"{args.minutes:g} minutes of training (steps: as many as fit"
    print(f"{len(train_ids):,} training and {len(validation_ids):,} validation tokens in {token_folder}")
    print(f"global batch: {args.batch_size} windows x {args.grad_accum} micro-batches x {world} process(es) = "
          f"{windows.global_batch} windows of {args.context_length} = {windows.global_batch * args.context_length:,} "
          f"tokens per step; {length}, {args.windows} windows)")
    model, optimizer, progress = start(args, device, checkpoint, plan)
    if progress is None:  # the checkpoint's run is already finished
        return None
    args.token_folder = token_folder
    eval_sets = {} if rank else {name: sample_batches(ids, args.context_length, args.eval_windows, args.batch_size)
                                 for name, ids in (("train", train_ids), ("validation", validation_ids))}
    stopped, total = train(args, model, optimizer, windows, progress, plan, eval_sets, tokenizer, dtype)
    finished = progress["step"] >= total
    save(args, model, optimizer, progress, total, finished)
    if rank:
        return None
    plot(args, progress["history"], model, len(train_ids) + len(validation_ids))
    if not finished:
        minigpt.write_text(args.out / "history.json", json.dumps(history_record(args, progress), indent=1))
        print(f"Stopped after step {progress['step']:,} of {total:,}; saved {args.out / 'model.pt'}. To continue: "
              f"the same command with --resume")
        return 130 if stopped else None
    report(args, model, progress, windows, train_ids, validation_ids, tokenizer, dtype)
    return None


def train(args, model, optimizer, windows, progress, plan, eval_sets, tokenizer, dtype):
    """The training loop, one optimizer step per turn; after each, in order, what is due: the
    losses and the speed, a sample at the end of an epoch, a stop, a checkpoint. Steps are
    counted from 1; `plan` of them (with --minutes, as many as fit). Returns (True if Ctrl+C or
    SIGTERM stopped it (after the step under way), the run's length in steps)."""
    # Under torchrun the wrapper shares gradients; the model itself is what is evaluated, sampled
    # and saved. The GPT has no buffers, so the wrapper's forward pass needs no talk between
    # processes (it would broadcast buffers) and process 0 can evaluate alone.
    trained = DistributedDataParallel(model) if dist.is_initialized() else model
    meter = progress["seen"], progress["seconds"]  # at the last speed report
    model.train()
    total = steps_to_run(args, progress, plan)  # the plan (planned_steps: --epochs or --max-steps); --minutes: what fits
    with StopRequests() as stop:
        while progress["step"] < total:
            step = progress["step"] + 1
            start = time.perf_counter()
            lr = learning_rate(args, step, total)
            train_step(args, trained, optimizer, windows.micro_batches(step), lr, dtype)
            progress.update(step=step, seen=progress["seen"] + windows.global_batch * args.context_length,
                            seconds=progress["seconds"] + time.perf_counter() - start)
            total = steps_to_run(args, progress, plan)  # (with --minutes, the time left may end the run here)
            if eval_sets:  # process 0: the losses and the speed, a sample, when due
                meter = show_progress(args, model, eval_sets, progress, windows, total, lr, tokenizer, dtype, meter)
            if agree(stop.requested or step == args.stop_at):  # every process stops after the same step
                return stop.requested, total
            if args.save_every and step % args.save_every == 0 and step < total:
                save(args, model, optimizer, progress, total, finished=False)
                print(f"Saved step {step:,} to {args.out / 'model.pt'}")
    return False, total


def learning_rate(args, step, total):
    """AdamW's learning rate at step `step` (from 1) of the run's `total` planned steps: a linear
    warmup to --lr over --warmup steps, then a half cosine from --lr toward 0; no warmup: --lr
    throughout (the ch5 setting). `python pretrain.py` applies no setting: --lr 2e-3, --warmup 20."""
    if args.warmup == 0:
        return args.lr
    if step <= args.warmup:
        return args.lr * step / args.warmup
    done = (step - 1 - args.warmup) / max(1, total - args.warmup)  # 0 right after the warmup, under 1 at the last
    return 0.5 * args.lr * (1 + math.cos(math.pi * min(done, 1.0)))


def train_step(args, trained, optimizer, micro_batches, lr, dtype):
    """One optimizer step: the gradient of the mean loss over the micro-batches (grad_accum pairs
    (x, y), (B, T) each; y is x shifted by one), its norm clipped to --clip, then AdamW's update."""
    device = next(trained.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1       # under torchrun, gradients are shared once, after the last
        with contextlib.nullcontext() if last or not dist.is_initialized() else trained.no_sync():
            with minigpt.autocast(device, dtype):
                loss = trained(x.to(device), targets=y.to(device))  # mean cross-entropy of B*T next tokens
            (loss / len(micro_batches)).backward()  # summed: the gradient of the micro-batches' mean
    if args.clip:                                # --clip (the book's ch5 setting: 0, none)
        torch.nn.utils.clip_grad_norm_(trained.parameters(), args.clip)
    optimizer.step()


def show_progress(args, model, eval_sets, progress, windows, total, lr, tokenizer, dtype, meter):
    """After step progress["step"]: every --eval-every steps (and the last), the losses on the
    fixed samples and the speed since the last report (meter: its (seen, seconds)); at the end of
    an epoch, a greedy sample (so that runs can be compared). Returns the meter."""
    step = progress["step"]
    if (step - 1) % args.eval_every == 0 or step == total:
        losses = evaluate(model, eval_sets, progress, dtype)
        speed = (progress["seen"] - meter[0]) / max(progress["seconds"] - meter[1], 1e-9)
        meter = progress["seen"], progress["seconds"]
        flops = flops_per_token(model, args.context_length)[0]
        print(f"Ep {(step - 1) // windows.steps_per_epoch + 1} (Step {step:06d}): "
              + ", ".join(f"{name.capitalize()} loss {loss:.3f}" for name, loss in losses.items()))
        print(f"    {speed:,.0f} tokens/s, {speed * flops / 1e9:.1f} GFLOP/s, lr {lr:.2e}, "
              f"{progress['seen']:,} tokens seen")
    if step % windows.steps_per_epoch == 0:
        with minigpt.autocast(model.wte.weight.device, dtype):
            text = minigpt.complete(model, tokenizer, args.prompt, 50, eos_id=minigpt.EOT)
        print(f"Sample after epoch {step // windows.steps_per_epoch}: {text!r}")
    return meter


def evaluate(model, eval_sets, progress, dtype):
    """The mean loss on each fixed sample of windows, also added to the run's history."""
    losses = {name: minigpt.lm_evaluate(model, batches, dtype) for name, batches in eval_sets.items()}
    for key, value in {"step": progress["step"], "seen": progress["seen"], **losses}.items():
        progress["history"].setdefault(key, []).append(value)
    return losses


def steps_to_run(args, progress, plan):
    """The run's length in steps: the plan; with --minutes, no more than fit in the minutes of
    training at the mean speed of the steps so far, re-estimated after every step, so that the
    schedule's cosine ends on time. Under torchrun every process takes the smallest estimate."""
    if not args.minutes or progress["step"] == 0:
        return plan
    left = args.minutes * 60 - progress["seconds"]
    estimate = progress["step"] + max(0, round(left / (progress["seconds"] / progress["step"])))
    if dist.is_initialized():
        estimate = int(reduced(estimate, dist.ReduceOp.MIN))
    return min(plan, estimate)


def planned_steps(args, windows):
    """The run's length in optimizer steps: --epochs or --max-steps, whichever ends first (with
    --minutes, either may be left out)."""
    if windows.steps_per_epoch == 0:
        raise minigpt.DataError(f"{len(windows.starts)} training windows make no global batch of "
                                f"{windows.global_batch}; give more text or smaller batches")
    total = min(args.epochs * windows.steps_per_epoch if args.epochs else float("inf"),
                args.max_steps or float("inf"))
    if total == float("inf") and not args.minutes:
        raise minigpt.DataError("give --epochs, --max-steps or --minutes")
    return total


def start(args, device, checkpoint, plan):
    """(model, optimizer, progress): new (random, or --init's weights), or as the checkpoint left
    them; progress None if the checkpoint's run is already finished."""
    rank, world = ranks()
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if checkpoint is not None:
        model = minigpt.load_weights(minigpt.GPTConfig(**checkpoint["config"]), checkpoint["model"].items(), device)
    elif args.init:  # continued pretraining: the weights of a model pretrained before
        model = minigpt.load_model(args.init, device, dropout=args.dropout)
        if args.context_length > model.cfg.context_length:
            raise minigpt.DataError(f"--context-length {args.context_length}: {args.init} sees at most "
                                    f"{model.cfg.context_length} positions")
    else:
        cfg = replace(minigpt.PRESETS[args.preset], context_length=args.context_length, dropout=args.dropout,
                      **args.model)
        model = minigpt.GPT(cfg).to(device)
    flops, n_multiplying = flops_per_token(model, args.context_length)
    shape = f"{args.init}'s" if args.init else f"{args.preset}"
    print(f"model: {shape} shape, {sum(p.numel() for p in model.parameters()):,} parameters "
          f"({n_multiplying:,} that multiply: N in 6N + 12LTC = {flops / 1e6:.1f} MFLOP per token), "
          f"{args.context_length} positions, on {device}")
    # betas (0.9, 0.95): GPT-3's; a shorter memory of squared gradients reacts faster to spikes.
    optimizer = minigpt.adamw(model, args.lr, args.weight_decay, betas=(0.9, 0.95))
    if checkpoint is None:
        if rank:
            torch.manual_seed(args.seed + rank)  # other processes: their own dropout masks
        return model, optimizer, {"step": 0, "seen": 0, "seconds": 0.0, "history": {}}
    training = checkpoint["training"]
    progress = training.get("progress") or training["state"]  # "state" in older checkpoints
    if "optimizer" not in checkpoint:
        print(f"{args.out / 'model.pt'} has finished all its {progress['step']:,} steps")
        return model, optimizer, None
    if training["world_size"] != world:
        raise minigpt.DataError(f"this run was started with {training['world_size']} process(es); "
                                f"resume it with as many (here: {world})")
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    total = steps_to_run(args, progress, plan)
    print(f"Resuming {args.out / 'model.pt'} after step {progress['step']:,} of {total:,} ({args.dtype})")
    return model, optimizer, progress


def save(args, model, optimizer, progress, total, finished):
    """model.pt: config, weights and the training record; until the run is finished also the
    optimizer and every generator, for --resume. Atomic: a crash leaves the previous file.
    Every process calls it (the generators' states are gathered); process 0 writes."""
    training = {"args": {key: getattr(args, key) for key in PLAN + KEPT}, "world_size": ranks()[1],
                "progress": progress, "total_steps": total, "tokens": args.token_folder.name}
    extra = {} if finished else {"optimizer": optimizer.state_dict(), "rng": rng_states()}
    if ranks()[0] == 0:
        minigpt.save_checkpoint(args.out / "model.pt", model, training=training, **extra)


def plot(args, history, model, tokens):
    minigpt.svg_plot(args.out / "loss.svg", {"train": (history["seen"], history["train"]),
                                             "validation": (history["seen"], history["validation"])},
                     "tokens seen", "cross-entropy loss",
                     f"Pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter GPT on "
                     f"{args.token_folder.name.rsplit('-', 1)[0]}: {tokens:,} tokens")


def report(args, model, progress, windows, train_ids, validation_ids, tokenizer, dtype):
    """After the last step: speed, the final losses over more windows, a sampled continuation."""
    steps, tokens, seconds = progress["step"], progress["seen"], progress["seconds"]
    flops = flops_per_token(model, args.context_length)[0]
    print(f"Trained {steps:,} steps ({steps / windows.steps_per_epoch:.2f} epochs) in {seconds:.1f} s: "
          f"{tokens:,} tokens, {tokens / seconds:,.0f} tokens/s, {tokens / seconds * flops / 1e9:.1f} GFLOP/s "
          f"({args.dtype})")
    final_sets = {name: sample_batches(ids, args.context_length, FINAL_WINDOWS, args.batch_size)
                  for name, ids in (("train", train_ids), ("validation", validation_ids))}
    final = {name: minigpt.lm_evaluate(model, batches, dtype) for name, batches in final_sets.items()}
    counts = {name: sum(len(x) for x, _ in batches) for name, batches in final_sets.items()}
    print(f"Final loss over {counts['train']} training and {counts['validation']} validation windows: "
          f"train {final['train']:.3f}, validation {final['validation']:.3f}")
    gen = torch.Generator(model.wte.weight.device).manual_seed(args.seed)
    with minigpt.autocast(model.wte.weight.device, dtype):
        text = minigpt.complete(model, tokenizer, args.prompt, 50, temperature=1.0, top_k=25, generator=gen)
    print(f"Sampled with temperature 1.0, top-k 25: {text!r}")
    history = {**history_record(args, progress), "final_loss": final}
    minigpt.write_text(args.out / "history.json", json.dumps(history, indent=1))
    print(f"Saved {args.out / 'model.pt'}, {args.out / 'loss.svg'} and {args.out / 'history.json'}")


def history_record(args, progress):
    """history.json: the losses at every evaluation (keys step, seen, train, validation), and the totals."""
    return {**progress["history"], "steps": progress["step"], "seconds": progress["seconds"],
            "tokens": progress["seen"], "token_files": str(args.token_folder)}


def flops_per_token(model, positions=None):
    """(6N + 12·L·T·C, N): the arithmetic of training on one token, forward and backward.

    N counts the parameters that multiply: every weight matrix, bias and LayerNorm gain, the output
    layer included, but not the token and position embedding tables, which are looked up, not
    multiplied (a tied output layer is counted once, as the output layer). Each of them costs a
    multiply and an add forward and twice that backward: 6N. Attention adds 12·L·T·C: per layer,
    query times T keys and weights times T values, 2·T·C each way forward, times 3. T: the
    windows' `positions` (default: the model's context length).
    """
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    if not cfg.tied_head:
        n -= model.wte.weight.numel()
    return 6 * n + 12 * cfg.n_layers * (positions or cfg.context_length) * cfg.emb_dim, n


class StopRequests:
    """Ctrl+C (SIGINT) or SIGTERM while training: the step under way finishes, the run is saved,
    the script stops. Under torchrun every process gets the signal; agree() makes them stop after
    the same step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def request(self, signum, frame):
        if not self.requested:
            print("\nStopping after this step, to save the run (Ctrl+\\ quits at once)", file=sys.stderr)
        self.requested = True


# ----------------------------------------------------------------------------------------------
# 5. Several processes: torchrun starts one copy of this script per process (per GPU, or a few
#    per CPU machine), with RANK, LOCAL_RANK, WORLD_SIZE and a meeting point in the environment.
#    Each copy holds the whole model; DistributedDataParallel averages the gradients of all of
#    them after every backward pass, so every copy takes the same optimizer step.
# ----------------------------------------------------------------------------------------------

def join_processes(device):
    """Join torchrun's process group: NCCL between GPUs, gloo between CPUs (also across machines).
    Returns this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank():  # only process 0 prints (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")
    return device


def leave_processes():
    """Leave the process group together, once every process is done.

    Without the barrier, process 1 exits while process 0 still evaluates and saves, and it can
    abort on its way out ("terminate called without an active exception"): gloo's worker thread
    releases the last collective's tensors, which needs Python's lock, just as the interpreter
    shuts down. Waiting in the barrier (for the other processes, at least a network round trip)
    releases that lock, so the thread finishes first; the barrier's own work holds no Python tensors.
    """
    dist.barrier()
    dist.destroy_process_group()


def ranks():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agree(stop):
    """True if any process wants to stop after this step (else the others would wait for it forever)."""
    if not dist.is_initialized():
        return stop
    return reduced(float(stop), dist.ReduceOp.MAX) > 0


def reduced(number, op):
    """number, reduced over every process with op (MIN, MAX, ...). gloo reduces tensors on the CPU,
    NCCL only on this process's GPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor(float(number), device=device)
    dist.all_reduce(value, op=op)
    return value.item()


def rng_states():
    """Every random generator's state, of every process (a list, one per rank): dropout draws from
    these. (The windows need none: they follow from the seed and the step.)"""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


# ----------------------------------------------------------------------------------------------
# 6. The command line. The flags' defaults are the default run's: about 100 s of training on a
#    2-core CPU, after which the mini model has memorised the story (train loss < 1.5). --setting
#    (or --corpus books) changes several of them; a flag given on the command line wins.
# ----------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=minigpt.Help,
                                epilog=settings_help())
    p.add_argument("--setting", type=lambda s: OLD_SETTING_NAMES.get(s, s), choices=SETTINGS,
                   help="named defaults, listed below (default: 'corpus' for --corpus books or shakespeare, "
                        "else 'default')")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--corpus", choices=minigpt.CORPORA, default="verdict", help="public text to train on")
    what.add_argument("--text", nargs="+", type=Path, metavar="FILE_OR_FOLDER",
                      help="train on these UTF-8 files instead (folders: every *.txt inside, sorted)")
    p.add_argument("--preset", type=minigpt.preset_name, default="mini",
                   help=f"model shape: {', '.join(minigpt.PRESETS)}")
    p.add_argument("--init", help="go on pretraining this model (a pretrain.py checkpoint, a model folder or a "
                                  "GPT-2 name) on the text, instead of random weights of --preset's shape "
                                  "(default: random weights)")
    p.add_argument("--context-length", type=minigpt.positive_int, default=128, help="positions per training window")
    p.add_argument("--epochs", type=minigpt.positive_int, default=40, help="passes over the training tokens")
    p.add_argument("--max-steps", type=minigpt.positive_int, help="optimizer steps; with --epochs, whichever ends first")
    p.add_argument("--minutes", type=minigpt.positive_float,
                   help="a budget of this many minutes of training: the schedule is planned to end on time, "
                        "and --epochs and --max-steps apply only if given (default: no budget)")
    # Small batches give more steps per epoch; dropout 0 because the default run is there to memorise.
    p.add_argument("--batch-size", type=minigpt.positive_int, default=2, help="windows per micro-batch, per process")
    p.add_argument("--grad-accum", type=minigpt.positive_int, default=1,
                   help="micro-batches whose gradients are summed into one step")
    p.add_argument("--lr", type=minigpt.positive_float, default=2e-3, help="peak learning rate of AdamW")
    p.add_argument("--weight-decay", type=minigpt.nonnegative_float, default=0.1, help="AdamW's, on the weight matrices")
    p.add_argument("--dropout", type=minigpt.fraction, default=0.0, help="dropout probability while training")
    # Warmup + cosine decay, betas (0.9, 0.95) and gradient clipping make the loss fall much faster
    # and more alike across seeds (docs/pretraining.md).
    p.add_argument("--warmup", type=minigpt.nonnegative_int, default=20,
                   help="steps of linear warmup, then cosine decay; 0: constant lr")
    p.add_argument("--clip", type=minigpt.nonnegative_float, default=1.0, help="clip the gradient norm to this; 0: off")
    p.add_argument("--windows", choices=("sliding", "random"), default="sliding",
                   help="sliding: the text cut into side-by-side windows, shuffled every epoch; "
                        "random: windows at random offsets, drawn afresh every step")
    p.add_argument("--eval-every", type=minigpt.positive_int, default=50, help="steps between loss evaluations")
    p.add_argument("--eval-windows", type=minigpt.positive_int, default=10,
                   help="windows of each split in the fixed evaluation sample")
    p.add_argument("--save-every", type=minigpt.nonnegative_int, default=0,
                   help="also save model.pt every this many steps; 0: off")
    p.add_argument("--stop-at", type=minigpt.positive_int,
                   help="end this session after this many steps, saving (then --resume) (default: run to the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out/model.pt, with its settings")
    p.add_argument("--prepare-only", action="store_true", help="write the token files, say where, and stop")
    p.add_argument("--prompt", default="Every effort moves you", help="start of the samples")
    p.add_argument("--seed", type=int, default=123, help="initial weights, dropout and the order of the windows")
    minigpt.add_device_flags(p)
    p.add_argument("--out", type=minigpt.output_folder, default="runs/pretrain",
                   help="folder for model.pt, loss.svg, history.json (--corpus's name replaces {corpus})")
    p.set_defaults(model={})  # changes to the preset's GPTConfig (a setting's)
    return p


def parse_args(argv=None):
    """The flags. A setting's values (SETTINGS) are the defaults of the flags it names, so a flag
    given on the command line wins; with no --setting, none applies but 'corpus' for a corpus."""
    p = parser()
    first = p.parse_args(argv)  # --help, usage errors, and which setting
    setting = first.setting or ("corpus" if first.corpus in ("books", "shakespeare") else "default")
    p.set_defaults(setting=setting, **SETTINGS[setting])  # SETTINGS['default'] is {}: the flags' own defaults
    args = p.parse_args(argv)
    args.given = flags_given(p, argv, vars(args))
    if args.minutes:  # the budget is the time: a setting's epochs or steps apply only if given
        args.epochs, args.max_steps = args.given.get("epochs"), args.given.get("max_steps")
    if args.init and "preset" in args.given:
        p.error("--preset and --init: the model's shape comes from --init")
    if args.text:
        args.text = [str(path.resolve()) for path in args.text]
        args.corpus = None
    return args


def settings_help():
    """What each named setting changes, for --help."""
    lines = ["settings (--setting NAME changes these defaults):", "  default: the flags' defaults above"]
    for name, values in SETTINGS.items():
        if values:
            shown = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in values.items()
                              if key != "model" and value is not None)
            model = f"; model {values['model']}" if values.get("model") else ""
            lines.append(textwrap.fill(shown + model, 100, initial_indent=f"  {name}: ", subsequent_indent="    ",
                                       break_on_hyphens=False))
    return "\n".join(lines)


UNSET = object()  # marks the flags a command line leaves out (flags_given)


def flags_given(p, argv, names):
    """{name: value} of the flags the command line gives (for --resume and --minutes): parsed onto
    a namespace where every name (of the parsed args) is UNSET, argparse fills in a default only
    where a name is missing, so what stays UNSET was not given."""
    marked = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, UNSET)))
    return {key: value for key, value in vars(marked).items() if value is not UNSET}


def resume(args, device):
    """Fill in what the command line left open; when resuming, from the checkpoint, which must
    agree with every flag given. Returns the checkpoint being resumed, or None."""
    if args.dtype == "auto":  # what auto means here, so that a resumed run can compare it with its own
        args.dtype = minigpt.dtype_name(minigpt.pick_dtype("auto", device))
    if args.given.get("out") is None:  # the setting's --out names its corpus
        args.out = minigpt.output_folder(str(args.out).format(corpus=args.corpus or "text"))
    if not args.resume:
        return None
    path = args.out / "model.pt"
    if not path.exists():
        raise minigpt.DataError(f"nothing to resume: {path} does not exist")
    _, checkpoint = minigpt.read_checkpoint(path, device)
    if "training" not in checkpoint:
        raise minigpt.DataError(f"{path} holds no training state to resume")
    for key, value in checkpoint["training"]["args"].items():
        value = OLD_SETTING_NAMES.get(value, value) if key == "setting" else value
        if args.given.get(key) is None:  # left open: the run's own
            setattr(args, key, value)
        elif key in PLAN and getattr(args, key) != value:  # as given, read as the run saved it (paths resolved)
            flag = "--" + key.replace("_", "-")
            raise minigpt.DataError(f"{path} was trained with {flag} {value}, not {getattr(args, key)}: a resumed "
                                    f"run keeps its plan (leave out {flag}, or start afresh in another --out)")
    return checkpoint


if __name__ == "__main__":
    minigpt.run_script(main, "files saved before now are kept, each whole (model.pt is never half-written)")
