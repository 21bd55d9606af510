"""Train a small character-level Jamba, then sample from it; or fine-tune a Jamba checkpoint on your own text.

    python train_tiny.py                                  # a hybrid Jamba learns to write Python, ~3 min on 2 CPU cores
    python train_tiny.py --data input.txt                 # any UTF-8 text file instead
    python train_tiny.py --resume                         # continue the run in --out exactly where it stopped
    python train_tiny.py --sample --prompt "def "         # generate from the checkpoint in --out
    python train_tiny.py --export jamba-tiny              # --out's checkpoint in the Hugging Face format, tokenizer too
    python train_tiny.py --init-from DIR --data input.txt # fine-tune a JambaForCausalLM directory with its tokenizer
    torchrun --nproc_per_node=2 train_tiny.py             # the same run in 2 processes (DistributedDataParallel)
    torchrun --nproc_per_node=2 train_tiny.py --fsdp      # ... with the model's state sharded over them (FSDP2)

With no --data it trains on the Python standard library's own top-level modules (Lib/*.py of the running Python,
sorted by file name, the first 2 MB): text that is on every machine with Python, so nothing is downloaded.
Checkpoints (--out/ckpt.pt) are written atomically at every evaluation, at the end, and on Ctrl-C.
"""

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from JAMBA import Jamba, JambaConfig

STDLIB_CORPUS_CHARS = 2_000_000
# The model's defaults here, where they differ from JambaConfig's: a model that learns in minutes on a CPU.
MODEL_DEFAULTS = {"d_model": 128, "num_mamba_layers": 3, "num_transformer_layers": 1, "nhead": 4, "dim_feedforward": 256,
                  "max_seq_length": 256, "d_state": 8, "expand": 1}
MODEL_HELP = {"d_state": "small for a CPU: the scan's cost grows with d_state * expand",
              "num_experts": "above 1: mixture-of-experts MLPs (see --expert_layer_period/offset)",
              "num_key_value_heads": "grouped-query attention; None: --nhead",
              "rotary": "rotary positions in attention layers that no Mamba layer precedes"}


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2, nothing written."""


def _int_or_text(text):
    """A flag that takes an int or a word: --dt_rank 8 or --dt_rank auto."""
    return int(text) if text.lstrip("-").isdigit() else text


NOTES = """\
notes:
  Resuming is exact on CPU: a run stopped at any step (Ctrl-C saves) and resumed with the same command ends with
  the weights, optimizer state and losses of an uninterrupted run. The checkpoint holds the config, weights,
  optimizer, vocabulary, step, RNG states and the data's sha256; --resume refuses one whose data, vocabulary or
  config differ from the command's. Under float16 the gradient scaler's state is kept too.
  torchrun: every rank draws the same batch and takes its share, gradients are averaged, so N processes take the
  steps of one with the same --batch-size (with experts, each rank's load-balancing term covers its share only).
  Only rank 0 prints, evaluates, saves and samples. Several machines: add torchrun's --nnodes, --node_rank and
  --rdzv-endpoint. Data-parallel divides the time, not the memory: each rank holds the model, its gradients and
  AdamW's moments, 16 bytes per parameter before activations. --fsdp divides that memory too: each rank holds
  1/N of them (FSDP2: each layer's weights are gathered for its forward and backward, and its gradients
  reduce-scattered), and takes the same steps. Its ckpt.pt is the whole state, gathered into rank 0's CPU memory,
  so a single process samples, exports or resumes it, and --fsdp --resume shards it again.
  The progress bar (a terminal only; a log gets a line per evaluation) shows the loss, tokens/s and, with
  experts, the load-balancing term ("balance", K when even). --time-budget makes it count seconds.
  --export writes one token per character in tokenizer.json, in Llama's format, which transformers and llama.cpp's
  converter read: greedy generation in either gives the text of --sample --temperature 0 (llama.cpp runs Jamba
  with --expand 2 only; an export of another expand says so). A model the format cannot express (rotary positions,
  a layer plan that no attn_layer_period and attn_layer_offset give) is refused with what to change. --init-from
  takes the model and its settings from the checkpoint (model flags are refused, --dropout aside) and encodes
  --data once with its tokenizer; --export then writes that tokenizer and its special token ids.
  Checkpoints are read with torch.load(weights_only=True), so a ckpt.pt from elsewhere cannot run code.
  Bad input (a missing, empty, binary or too-short corpus, a setting JambaConfig refuses, a batch that does not
  split over the ranks, a corrupt or mismatched checkpoint, a prompt outside the vocabulary, an unavailable
  device) gets a one-line message and exit status 2, and nothing is overwritten.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside each flag; the notes kept as written."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=NOTES, formatter_class=_HelpFormatter)
    p.add_argument("--data", help="a UTF-8 text file; default: the Python standard library's source")
    p.add_argument("--out", default="out", help="directory for ckpt.pt")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--sample", action="store_true", help="only generate from --out/ckpt.pt")
    p.add_argument("--export", metavar="DIR", help="only write --out/ckpt.pt to DIR in the Hugging Face format "
                   "(config.json, model.safetensors, tokenizer.json) that transformers' JambaForCausalLM reads")
    p.add_argument("--force", action="store_true", help="let --export replace a directory that is not empty")
    p.add_argument("--init-from", metavar="DIR", help="fine-tune this JambaForCausalLM checkpoint directory "
                   "(config.json, model.safetensors, tokenizer.json): its model and tokenizer, your --data")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="bfloat16 or float16 autocast (float16 with a gradient scaler, for GPUs without bfloat16); "
                        "auto = bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action="store_true", help="train through torch.compile(model) (the fused scan is a "
                   "torch op it traces): the first steps compile, later ones run faster; off by default")
    model = p.add_argument_group("model: JambaConfig's fields, named as in the Jamba constructor")
    for field in dataclasses.fields(JambaConfig):
        if field.name == "vocab_size":                                  # the corpus decides it
            continue
        default = MODEL_DEFAULTS.get(field.name, field.default)
        names = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])   # dashes accepted too
        if field.type is bool:
            model.add_argument(*names, action=argparse.BooleanOptionalAction, default=default,
                               help=MODEL_HELP.get(field.name, "as in JambaConfig"))
        else:
            kind = {int: int, float: float, str: str}.get(field.type, _int_or_text)   # int | str, int | None
            model.add_argument(*names, type=kind, default=default, help=MODEL_HELP.get(field.name, "as in JambaConfig"))
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=16, help="sequences per optimiser step, over all "
                       "processes and --grad-accum parts together")
    train.add_argument("--fsdp", action="store_true", help="under torchrun: shard the weights, gradients and "
                       "AdamW's moments over the processes (FSDP2), where DDP copies them to each")
    train.add_argument("--grad-accum", type=int, default=1, help="split each batch into this many parts, one "
                       "forward and backward each (for a batch larger than memory holds)")
    train.add_argument("--block-size", type=int, default=128, help="characters per training sequence")
    train.add_argument("--max-iters", type=int, default=1500, help="training steps; the learning-rate schedule "
                       "spans them (with --time-budget, set it high: the run stops at whichever comes first)")
    train.add_argument("--time-budget", type=float, default=None,
                       help="stop after this many seconds of training (evaluations included), evaluate and save")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up, cosine decay)")
    train.add_argument("--warmup-iters", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1, help="on weight matrices only")
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    train.add_argument("--eval-interval", type=int, default=250)
    train.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    sample = p.add_argument_group("sampling")
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--max-new-tokens", type=int, default=500)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    args = p.parse_args(argv)
    # The model flags this command line gives: a fine-tuning run takes its model from the checkpoint instead.
    given = {token.split("=")[0] for token in (sys.argv[1:] if argv is None else argv) if token.startswith("--")}
    args.model_flags = sorted({action.dest for action in model._group_actions if given & set(action.option_strings)})
    for name in ("batch_size", "grad_accum", "block_size", "max_iters", "eval_interval", "eval_iters",
                 "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.weight_decay < 0 or args.grad_clip < 0 or args.warmup_iters < 0:
        raise UsageError("--lr must be > 0 and --weight-decay, --grad-clip, --warmup-iters >= 0")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.init_from and set(args.model_flags) - {"dropout"}:
        raise UsageError(f"--init-from takes the model and its settings from the checkpoint: drop "
                         f"{', '.join('--' + name for name in args.model_flags if name != 'dropout')} "
                         "(only --dropout may be given)")
    if not args.init_from and args.block_size > args.max_seq_length:
        raise UsageError(f"--block-size {args.block_size} is over the model's --max_seq_length {args.max_seq_length}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def read_corpus(path):
    """(text, identity): identity names the data and holds its sha256, so a resume can check it is the same."""
    if path is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        parts, size = [], 0
        for file in sorted(stdlib.glob("*.py")):
            try:
                parts.append(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            size += len(parts[-1])
            if size >= STDLIB_CORPUS_CHARS:
                break
        text = "".join(parts)[:STDLIB_CORPUS_CHARS]
        name = f"python-stdlib:{stdlib}"
    else:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"--data {path}: no such file")
        raw = file.read_bytes()
        if b"\0" in raw[:65536]:
            raise UsageError(f"--data {path}: looks binary (holds NUL bytes); give a UTF-8 text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"--data {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        name = str(file.resolve())
    if not text:
        raise UsageError(f"--data {path or name}: the corpus is empty")
    return text, {"name": name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}


class Codec:
    """Text to ids and back: a character run's vocabulary (the str of its characters), or a checkpoint's tokenizer
    (the text of its tokenizer.json, read by the tokenizers package)."""

    def __init__(self, vocab=None, tokenizer_json=None):
        self.vocab, self.tokenizer = vocab, None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.size = len(vocab) if vocab is not None else self.tokenizer.get_vocab_size()
        self.unit, self.bits_per = ("chars", "bpc") if self.tokenizer is None else ("tokens", "bits/token")

    def unknown(self, text):
        """The characters of text it cannot encode: outside the vocabulary, or that the tokenizer drops or turns
        into its unknown token (whitespace aside, which many tokenizers drop by design)."""
        if self.tokenizer is None:
            return sorted(set(text) - set(self.vocab))
        unk = getattr(self.tokenizer.model, "unk_token", None)
        unk_id = None if unk is None else self.tokenizer.token_to_id(unk)

        def encodes(ch):
            try:
                ids = self.tokenizer.encode(ch).ids
            except Exception:  # noqa: BLE001   a tokenizer with no unknown token raises, each its own way
                return False
            return bool(ids) and unk_id not in ids
        return [ch for ch in sorted(set(text)) if not ch.isspace() and not encodes(ch)]

    def encode(self, text, what):
        unknown = self.unknown(text)
        if unknown:
            raise UsageError(f"{what} has characters outside the "
                             f"{'vocabulary' if self.tokenizer is None else 'tokenizer'}: {''.join(unknown[:20])!r}")
        if self.tokenizer is None:
            stoi = {ch: i for i, ch in enumerate(self.vocab)}
            return [stoi[ch] for ch in text]
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids) if self.tokenizer is None else self.tokenizer.decode(ids)


def character_tokenizer_files(vocab):
    """tokenizer.json (one token per character, in the run's order) and tokenizer_config.json, in the form of
    Llama's tokenizer (BPE, here without merges; spaces written "▁"; byte fallback) so that both transformers'
    AutoTokenizer and llama.cpp's converter read a character run's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    if "▁" in vocab:
        raise UsageError("the vocabulary has the character '▁', which Llama's tokenizer format writes for a space")
    tokenizer = Tokenizer(models.BPE({ch.replace(" ", "▁"): i for i, ch in enumerate(vocab)}, [], byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return {"tokenizer.json": tokenizer.to_str(),
            "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                 "clean_up_tokenization_spaces": False,
                                                 "add_bos_token": False, "add_eos_token": False})}   # none


def split_data(data, block_size):
    """The corpus's ids (t,), split 90/10 into train and validation sources."""
    n_train = int(0.9 * len(data))
    train, val = data[:n_train], data[n_train:]
    if len(val) < block_size + 1:
        need = math.ceil((block_size + 1) / 0.1)
        raise UsageError(f"the corpus is too short: {len(data)} tokens, need at least {need} for --block-size "
                         f"{block_size} (10% is held out for validation)")
    return train, val


def windows(data, starts, block_size, device):
    """The windows of the data at starts: x (b, l) and the next characters y (b, l)."""
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x.to(device), y.to(device)


def shard(starts, rank, world_size, grad_accum):
    """This rank's share of a batch's window starts (b,), in grad_accum parts: (grad_accum, b / (world_size *
    grad_accum)). The shares of all ranks are disjoint and together make the batch."""
    return starts.view(world_size, grad_accum, -1)[rank]


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of the data: x (b, l) and the next characters y (b, l)."""
    return windows(data, torch.randint(len(data) - block_size, (batch_size,), generator=generator), block_size,
                   device)


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, checkpoint
# ---------------------------------------------------------------------------------------------------------------

def make_config(args, vocab_size):
    """The model's JambaConfig from the command's flags; a setting it refuses is a usage error."""
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(JambaConfig)
                if field.name != "vocab_size"}
    try:
        return JambaConfig(vocab_size=vocab_size, **settings)
    except ValueError as err:
        raise UsageError(str(err)) from None


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (use auto, cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}.get(device.type, False)
    if not available:
        raise UsageError(f"--device {name}: not available on this machine")
    return device


def start_processes(device_name):
    """(device, world size): one process, or under torchrun (which sets WORLD_SIZE) a process group, gloo on CPU
    and nccl on CUDA, where each rank takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world_size


def decays(name, param):
    """Weight decay for weight matrices only: never biases, norms, D, or A_log (the Mamba reference marks A_log
    and D "no weight decay")."""
    return param.dim() >= 2 and not name.endswith("A_log")


def make_optimizer(model, lr, weight_decay):
    """AdamW that decays weight matrices only; its parameters in the order of optimizer_names."""
    named = list(model.named_parameters())
    groups = [{"params": [param for name, param in named if decays(name, param) == decay],
               "weight_decay": weight_decay if decay else 0.0} for decay in (True, False)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def optimizer_names(model):
    """The names of make_optimizer's parameters, in the order its state_dict numbers them."""
    named = list(model.named_parameters())
    return [name for decay in (True, False) for name, param in named if decays(name, param) == decay]


def learning_rate(step, seconds, args):
    """Linear warm-up over --warmup-iters steps, then cosine decay to lr/10 at the end of the run: at --max-iters,
    or at --time-budget seconds if that comes first (so a budget run ends with a decayed learning rate too)."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    if args.time_budget is not None:
        progress = max(progress, seconds / args.time_budget)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_checkpoint(path, state):
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    """--out's checkpoint. weights_only: tensors, numbers, strings and containers only, so a checkpoint from
    elsewhere cannot run code when it is read."""
    if not path.is_file():
        raise UsageError(f"{path}: no checkpoint (train first, or point --out at the run's directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"config", "model", "vocab", "step"} - set(ckpt)
    except Exception as err:  # noqa: BLE001   whatever torch.load or the unpickler raises: one line
        raise UsageError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err)[:80]})") from None
    if missing:
        raise UsageError(f"{path}: not a train_tiny.py checkpoint (missing {sorted(missing)})")
    return upgrade_checkpoint(ckpt)


def upgrade_checkpoint(ckpt):
    """A checkpoint written before JAMBA.py took the public Jamba code's module names (December 2026), as
    today's: its tensors renamed, and each attention layer's qkv_proj (q, k and v stacked) split into q_proj,
    k_proj and v_proj, in the weights and in AdamW's moments, so that it samples, exports and resumes exactly."""
    if "embedding.weight" not in ckpt["model"]:
        return ckpt
    model = Jamba(**ckpt["config"])
    renames = [("embed_tokens.", "embedding."), ("final_layernorm.", "norm."), (".input_layernorm.", ".mixer_norm."),
               (".pre_ff_layernorm.", ".mlp_norm."), (".feed_forward.", ".mlp."), (".o_proj.", ".out_proj.")]

    def old_name(name):
        """(the old name of a tensor, which third of it when it was q, k or v stacked, else None)."""
        for new, old in renames:
            name = name.replace(new, old) if name.startswith(new) or new.startswith(".") else name
        part = next((i for i, p in enumerate(("q_proj", "k_proj", "v_proj")) if f".{p}." in name), None)
        return (name if part is None else name.replace(("q_proj", "k_proj", "v_proj")[part], "qkv_proj")), part

    def piece(name, tensor):
        """The part of an old tensor that name now holds (a tensor of the new parameter's shape)."""
        part = old_name(name)[1]
        if part is None or not tensor.dim():                     # AdamW's step count: one per parameter
            return tensor
        mixer = model.get_submodule(name.rsplit(".", 2)[0])
        return tensor.split([mixer.q_proj.out_features, *2 * [mixer.k_proj.out_features]])[part]

    state = {name: piece(name, ckpt["model"][old_name(name)[0]]) for name in model.state_dict()}
    # AdamW's state is kept by position in its parameter groups; the groups are rebuilt from today's names.
    groups = [[name for name, p in model.named_parameters() if (p.dim() >= 2 and not name.endswith("A_log")) == decay]
              for decay in (True, False)]
    old_order = list(dict.fromkeys(old_name(name)[0] for group in groups for name in group))
    optimizer, new_state, start = ckpt["optimizer"], {}, 0
    for group, old_group in zip(groups, optimizer["param_groups"]):
        for i, name in enumerate(group, start):
            saved = optimizer["state"].get(old_order.index(old_name(name)[0]))
            if saved is not None:
                new_state[i] = {key: piece(name, value).clone() for key, value in saved.items()}   # own step
        old_group["params"], start = list(range(start, start + len(group))), start + len(group)
    return {**ckpt, "model": state, "optimizer": {"state": new_state, "param_groups": optimizer["param_groups"]}}


@torch.no_grad()
def estimate_loss(model, splits, args, device, autocast):
    """Mean loss over --eval-iters batches of each split, on fixed windows (a seeded generator of its own)."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(args.seed + 1)
        total = 0.0
        for _ in range(args.eval_iters):
            x, y = get_batch(data, args.batch_size, args.block_size, generator, device)
            with autocast:
                total += model(x, y)[1].item()
        losses[name] = total / args.eval_iters
    model.train()
    return losses


def read_init_from(path):
    """(model in float32, Codec, tokenizer files {name: text}, special token ids) of a JambaForCausalLM checkpoint
    directory with its tokenizer.json, for fine-tuning."""
    directory = Path(path)
    if not (directory / "tokenizer.json").is_file():
        raise UsageError(f"--init-from {path}: no tokenizer.json there (a Jamba checkpoint directory with its "
                         "tokenizer is needed: config.json, model.safetensors, tokenizer.json)")
    try:
        model = Jamba.from_pretrained(directory, dtype=torch.float32)
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        files = {name: (directory / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                 if (directory / name).is_file()}
        codec = Codec(tokenizer_json=files["tokenizer.json"])
    except ImportError as err:
        raise UsageError(f"--init-from needs the {err.name} package: pip install safetensors tokenizers") from None
    except Exception as err:  # noqa: BLE001   a ValueError from the loader, or a broken tokenizer
        raise UsageError(f"--init-from {path}: {str(err).splitlines()[0][:300]}") from None
    special = {key: config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return model, codec, files, special


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_codec(ckpt):
    """The checkpoint's Codec: its characters, or the tokenizer it was fine-tuned with."""
    return Codec(tokenizer_json=ckpt["tokenizer"]["tokenizer.json"]) if ckpt.get("tokenizer") else Codec(ckpt["vocab"])


@torch.no_grad()
def sample_text(model, codec, prompt, args, device):
    """(prompt and its continuation, tokens per second)."""
    idx = torch.tensor([codec.encode(prompt, "--prompt")], dtype=torch.long, device=device)
    model.eval()
    start = time.perf_counter()
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    seconds = time.perf_counter() - start
    return codec.decode(out[0].tolist()), args.max_new_tokens / seconds


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def sample_main(args, device):
    ckpt = load_checkpoint(Path(args.out) / "ckpt.pt")
    model = Jamba(**ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    codec = checkpoint_codec(ckpt)
    text, tokens_per_second = sample_text(model, codec, args.prompt, args, device)
    print(text)
    print(f"\n[{args.max_new_tokens} {'characters' if codec.tokenizer is None else 'tokens'} at "
          f"{tokens_per_second:.0f} {codec.unit}/s on {device}]")


def export_main(args):
    """--out's checkpoint as a JambaForCausalLM directory, with the tokenizer that reads its text."""
    target = Path(args.export)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not args.force:
        raise UsageError(f"--export {target}: not an empty directory; give --force to replace it")
    ckpt = load_checkpoint(Path(args.out) / "ckpt.pt")
    model = Jamba(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    try:
        files = ckpt.get("tokenizer") or character_tokenizer_files(ckpt["vocab"])
        model.save_pretrained(target, ckpt.get("special_token_ids"), files)
    except ImportError as err:
        raise UsageError(f"--export needs the {err.name} package: pip install safetensors tokenizers") from None
    except ValueError as err:
        raise UsageError(f"--export: {err}") from None
    print(f"wrote {target}: {', '.join(sorted(path.name for path in target.iterdir()))}")
    if model.config.expand != 2:
        print(f"note: llama.cpp runs Jamba with expand 2 only, and this model has expand {model.config.expand}: "
              "train with --expand 2 for a model that runs there too")
    return 0


@dataclasses.dataclass
class Run:
    """A training run: what it trains on and with, and where it stands, all of which its checkpoint keeps."""
    args: argparse.Namespace
    config: JambaConfig
    codec: Codec
    data_identity: dict
    train_data: torch.Tensor
    val_data: torch.Tensor
    tokenizer_files: "dict | None"                # a fine-tuning run's tokenizer (--init-from), else None
    special_token_ids: "dict | None"
    model: Jamba
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: torch.Generator                      # draws the windows of every batch
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_val: float = float("inf")
    seconds_before: float = 0.0                   # of training in earlier runs of this checkpoint
    started: float = 0.0                          # this run's clock start

    def seconds(self):
        """Seconds of training so far, over every run of this checkpoint, evaluations included."""
        return self.seconds_before + time.perf_counter() - self.started

    def states(self):
        """The model's and the optimizer's whole state, as one process keeps them. Under --fsdp every rank must
        call this: torch.distributed.checkpoint gathers the shards into rank 0's CPU memory (the other ranks get
        empty ones), and the optimizer's state, which it keys by name, is numbered again as one process's."""
        if not self.args.fsdp:
            return self.model.state_dict(), self.optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return model, numbered(optimizer, optimizer_names(self.model)) if model else {}

    def checkpoint(self, device):
        model, optimizer = self.states()
        return {"config": dataclasses.asdict(self.config), "model": model,
                "optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "vocab": self.codec.vocab, "tokenizer": self.tokenizer_files,
                "special_token_ids": self.special_token_ids, "init_from": self.args.init_from, "step": self.step,
                "seconds": self.seconds(), "history": self.history, "best_val_loss": self.best_val,
                "data": self.data_identity, "args": vars(self.args),
                "rng": {"torch": torch.get_rng_state(), "batches": self.batches.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def prepare_run(args, device, dtype, world_size):
    """The Run a command asks for: a new one, or the one in --out with --resume (refused where the data, the
    model or the tokenizer differ from the command's); its model and its tokenizer from --init-from if given."""
    ckpt_path = Path(args.out) / "ckpt.pt"
    text, data_identity = read_corpus(args.data)
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    tokenizer_files = special_token_ids = weights = None
    if args.init_from:                              # the model, its settings and its tokenizer from the checkpoint
        pretrained, codec, tokenizer_files, special_token_ids = read_init_from(args.init_from)
        config, weights = dataclasses.replace(pretrained.config, dropout=args.dropout), pretrained.state_dict()
        if args.block_size > config.max_seq_length:
            raise UsageError(f"--block-size {args.block_size} is over the checkpoint's max_position_embeddings "
                             f"{config.max_seq_length}")
    else:
        codec = Codec(vocab="".join(sorted(set(text))))
        config = make_config(args, codec.size)
    if ckpt is not None:
        if ckpt.get("data", {}).get("sha256") != data_identity["sha256"]:   # the same text also means the same vocab
            raise UsageError(f"{ckpt_path} was trained on other data ({ckpt.get('data', {}).get('name')}); "
                             "resume with the same --data")
        if ckpt.get("tokenizer") != tokenizer_files:
            raise UsageError(f"{ckpt_path} was fine-tuned from a checkpoint with another tokenizer: resume with the "
                             "same --init-from" if ckpt.get("tokenizer") else
                             f"{ckpt_path} is a character-level run: resume it without --init-from")
        saved = dataclasses.asdict(JambaConfig(**ckpt["config"]))
        changed = {k: (saved[k], v) for k, v in dataclasses.asdict(config).items() if saved[k] != v}
        if changed:
            raise UsageError(f"{ckpt_path}: model config differs from this command's (checkpoint, command): "
                             + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in changed.items()))
    if args.batch_size % (world_size * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} must split evenly over {world_size} processes x "
                         f"--grad-accum {args.grad_accum}")
    # The corpus is encoded once and kept as a tensor of ids.
    data = torch.tensor(codec.encode(text, f"--data {args.data or data_identity['name']}"), dtype=torch.long)
    train_data, val_data = split_data(data, args.block_size)

    torch.manual_seed(args.seed)
    batches = torch.Generator().manual_seed(args.seed)
    model = Jamba(config)
    if weights is not None:
        model.load_state_dict(weights)
    model.to(device)
    # float16's narrow range would flush small gradients to zero: the loss is scaled up before backward and the
    # gradients down before the step, the scale adapting to stay clear of overflow.
    run = Run(args, config, codec, data_identity, train_data, val_data, tokenizer_files, special_token_ids, model,
              make_optimizer(model, args.lr, args.weight_decay),
              torch.amp.GradScaler(device.type, enabled=dtype == "float16"), batches)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        run.step, run.history, run.best_val, run.seconds_before = (ckpt["step"], ckpt["history"],
                                                                   ckpt["best_val_loss"], ckpt["seconds"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        batches.set_state(ckpt["rng"]["batches"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return run


def describe(run, device, dtype, world_size, say):
    """The run's data and model, in two lines (three when it resumes)."""
    model, config = run.model, run.config
    say(f"data: {run.data_identity['name']} ({run.data_identity['chars']:,} chars, "
        f"{len(run.train_data) + len(run.val_data):,} tokens, vocab {run.codec.size}, {len(run.train_data):,} train "
        f"/ {len(run.val_data):,} val)")
    experts = "" if "E" not in model.mlp_pattern else (
        f" mlp_pattern={model.mlp_pattern} ({config.num_experts} experts, top-{config.num_experts_per_tok})")
    processes = f" x {world_size} processes" if world_size > 1 else ""
    say(f"model: Jamba layer_pattern={model.layer_pattern}{experts} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on {device}{processes}, {dtype}")
    if run.step:
        say(f"resuming at step {run.step} of {run.args.max_iters} from {Path(run.args.out) / 'ckpt.pt'}")


def evaluate(run, device, autocast, rank):
    """Losses on both splits into the history and the log, then a checkpoint: by rank 0 alone, but under --fsdp
    with every rank, whose shards each forward and the checkpoint gather."""
    losses = estimate_loss(run.model, {"train": run.train_data, "val": run.val_data}, run.args, device, autocast)
    run.best_val = min(run.best_val, losses["val"])
    run.history.append({"step": run.step, "seconds": run.seconds(), **losses})
    balance = "" if run.model.aux_loss is None else f", load balance {run.model.aux_loss.item():.3f}"
    bits = run.codec.bits_per
    if rank == 0:
        tqdm.write(f"step {run.step}: train {losses['train']:.4f} nats ({losses['train'] / math.log(2):.3f} "
                   f"{bits}), val {losses['val']:.4f} nats ({losses['val'] / math.log(2):.3f} {bits}){balance}")
    save(run, device, rank)


def save(run, device, rank):
    """--out/ckpt.pt, written by rank 0 (under --fsdp every rank calls this: the state is gathered)."""
    state = run.checkpoint(device)
    if rank == 0:
        save_checkpoint(Path(run.args.out) / "ckpt.pt", state)


def agree(stop, seconds, world_size, device):
    """Rank 0's stop decision and clock, for every rank: the learning rate follows the clock under --time-budget,
    and all ranks must take the same steps."""
    if world_size == 1:
        return stop, seconds
    shared = torch.tensor([float(stop), seconds], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return bool(shared[0]), shared[1].item()


def numbered(state, names):
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) keyed by number, as
    optimizer.state_dict() keys it; named() is the way back."""
    number = {name: i for i, name in enumerate(names)}
    return {"state": {number[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def named(state, names):
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def shard_run(run, device, dtype, say):
    """FSDP2, as torchtitan applies it: fully_shard on each layer, then on the whole model, over a mesh of the
    ranks, so that each rank keeps 1/N of every weight, gradient and AdamW moment. Training in bfloat16 on CUDA,
    the weights are gathered in bfloat16 and the gradients reduced in float32. The optimizer is made again over
    the shards, with the state it had (a resumed run's), which torch.distributed.checkpoint splits."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    except ImportError:
        raise UsageError(f"--fsdp needs torch 2.6 or newer (FSDP2), not {torch.__version__}") from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" and dtype == "bfloat16" else MixedPrecisionPolicy())
    for module in [*run.model.layers, run.model]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    # float16's scaler must skip a step on every rank if any rank's shard of the gradients overflowed.
    scaler, run.scaler = run.scaler, ShardedGradScaler(device.type, enabled=run.scaler.is_enabled())
    run.scaler.load_state_dict(scaler.state_dict())
    state = run.optimizer.state_dict()
    run.optimizer = make_optimizer(run.model, run.args.lr, run.args.weight_decay)
    if state["state"]:
        set_optimizer_state_dict(run.model, run.optimizer, named(state, optimizer_names(run.model)),
                                 options=StateDictOptions(full_state_dict=True))
    local = sum(param.to_local().numel() for param in run.model.parameters())
    total = sum(param.numel() for param in run.model.parameters())
    say(f"sharded over {dist.get_world_size()} ranks (FSDP2): rank 0 holds {local:,} of the {total:,} parameters")


def catch_signals():
    """A list that Ctrl-C or torchrun's SIGTERM appends to, so the run stops after its step and saves."""
    interrupted = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: interrupted.append(signum))
    return interrupted


def release_signals():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def progress_bar(run, rank):
    """Seconds of the budget under --time-budget, steps otherwise; only on a terminal, as in a log the evaluation
    lines tell the progress."""
    args = run.args
    counts = ({"total": round(args.time_budget), "initial": round(run.seconds_before), "unit": "s",
               "bar_format": "{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]"}
              if args.time_budget is not None else {"total": args.max_iters, "initial": run.step, "unit": "step"})
    return tqdm(**counts, dynamic_ncols=True, mininterval=1.0, disable=rank != 0 or not sys.stderr.isatty())


def show_progress(bar, run, loss, tokens_per_second):
    postfix = {"step": run.step, "loss": f"{loss:.4f}", "tok_s": f"{tokens_per_second:.0f}"}
    if run.model.aux_loss is not None:                              # the load-balancing term, K when balanced
        postfix["balance"] = f"{run.model.aux_loss.item():.3f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1 if run.args.time_budget is None else round(run.seconds()) - bar.n)


def train_main(args, device, rank=0, world_size=1):
    """Train, evaluate and checkpoint; under torchrun every rank runs this, and rank 0 alone prints, evaluates,
    writes checkpoints and samples."""
    say = print if rank == 0 else (lambda *_, **__: None)
    if args.fsdp and world_size == 1:
        raise UsageError("--fsdp shards the model over torchrun's processes: run it as torchrun "
                         "--nproc_per_node=N train_tiny.py --fsdp ... with N >= 2")
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    run = prepare_run(args, device, dtype, world_size)
    describe(run, device, dtype, world_size, say)
    if args.fsdp:
        shard_run(run, device, dtype, say)
    # The training forward, compiled if asked (evaluation and sampling run the model as it is); with several
    # processes DistributedDataParallel averages the gradients of their shares of every batch (FSDP
    # reduce-scatters them itself).
    trained = torch.compile(run.model) if args.compile else run.model
    trained = trained if world_size == 1 or args.fsdp else DistributedDataParallel(trained)
    interrupted, bar = catch_signals(), progress_bar(run, rank)
    run.started, tokens = time.perf_counter(), 0
    run.model.train()
    while run.step < args.max_iters:
        over_budget = args.time_budget is not None and run.seconds() >= args.time_budget
        stop, seconds = agree(bool(interrupted) or over_budget, run.seconds(), world_size, device)
        if stop:
            break
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(run.step, seconds, args)
        # The whole batch's windows are drawn alike on every rank; each rank takes its share, in --grad-accum parts.
        starts = torch.randint(len(run.train_data) - args.block_size, (args.batch_size,), generator=run.batches)
        run.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, part in enumerate(shard(starts, rank, world_size, args.grad_accum)):
            x, y = windows(run.train_data, part, args.block_size, device)
            last = i == args.grad_accum - 1                 # gradients are averaged after the last part only
            if args.fsdp:
                run.model.set_requires_gradient_sync(last)
            with (nullcontext() if last or world_size == 1 or args.fsdp else trained.no_sync()), autocast:
                _, loss = trained(x, y)
            run.scaler.scale(loss / args.grad_accum).backward()   # gradients of the mean over the whole batch
            losses.append(loss.item())
        run.scaler.unscale_(run.optimizer)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
        run.scaler.step(run.optimizer)                      # skipped if float16 gradients overflowed
        run.scaler.update()
        run.step += 1
        tokens += args.batch_size * args.block_size
        show_progress(bar, run, sum(losses) / len(losses), tokens / (time.perf_counter() - run.started))
        if run.step % args.eval_interval == 0 and run.step < args.max_iters and (rank == 0 or args.fsdp):
            evaluate(run, device, autocast, rank)
    bar.close()
    wall = time.perf_counter() - run.started
    if rank != 0 and not args.fsdp:
        return 130 if interrupted else 0
    ckpt_path = Path(args.out) / "ckpt.pt"
    if interrupted:
        save(run, device, rank)
        say(f"interrupted at step {run.step} of {args.max_iters}: checkpoint saved to {ckpt_path}; "
            f"rerun the same command with --resume to continue")
        return 130
    if not run.history or run.history[-1]["step"] != run.step:
        evaluate(run, device, autocast, rank)
    if rank != 0:
        return 0
    release_signals()
    say(f"done: {run.step} steps, {tokens:,} tokens in {wall:.0f} s this run ({tokens / wall:.0f} tok/s); best val "
        f"loss {run.best_val:.4f} nats ({run.best_val / math.log(2):.3f} {run.codec.bits_per}); checkpoint {ckpt_path}")
    prompt = args.prompt if not run.codec.unknown(args.prompt) else run.codec.decode([0])
    model = run.model
    if args.fsdp:                                   # one process's model, from the checkpoint just gathered
        model = Jamba(run.config).to(device)
        model.load_state_dict(load_checkpoint(ckpt_path)["model"])
    text, tokens_per_second = sample_text(model, run.codec, prompt, args, device)
    say(f"--- sample ({tokens_per_second:.0f} {run.codec.unit}/s) ---\n{text}")
    return 0


def main(argv=None):
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)
        if args.sample:
            return sample_main(args, pick_device(args.device))
        if args.export:
            return export_main(args)
        device, world_size = start_processes(args.device)
        try:
            return train_main(args, device, rank, world_size)
        finally:
            if world_size > 1:                         # rank 0 may still be evaluating and sampling: wait for it
                # A sharded model left to outlive the process group can abort the process at exit (torch
                # 2.13, CPU, about one run in four): it goes first.
                gc.collect()
                dist.barrier()
                dist.destroy_process_group()
    except UsageError as err:
        if rank == 0:
            print(f"train_tiny.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_tiny.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
