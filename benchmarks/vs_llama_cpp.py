"""A model trained here, run in llama.cpp: the same logits and greedy tokens, and what a token costs in each.

    python benchmarks/vs_llama_cpp.py            # train a 0.82M-parameter MMAM (expand 2), compare, time: md (~3 min)
    python benchmarks/vs_llama_cpp.py --smoke    # a tiny model trained for 20 steps, compared, seconds
    python benchmarks/vs_llama_cpp.py --out run  # take a run of train_tiny.py (trained with --expand 2) instead

Needs llama-cpp-python (pip install llama-cpp-python, which builds llama.cpp from source) and llama.cpp's converter,
convert_hf_to_gguf.py, from a llama.cpp checkout or from the llama-cpp-python source package (its vendor/llama.cpp):
--llama-cpp DIR, or the environment's LLAMA_CPP_DIR. The way out is the one README gives: train_tiny.py --export
DIR writes the Hugging Face format, the converter turns it into a GGUF file (f32, and q8_0 for a quantized one),
and llama-cpp-python loads that.

Compared: the logits of both over --compare-tokens tokens of the validation text, read at once, as the largest
difference relative to the largest logit; and --new-tokens greedy tokens after a 16-token prompt. Timed at batch 1,
in turns, median of --repeats: the prompt then --new-tokens greedy tokens, per token: JAMBA.py's generate (its
fused step), the same greedy loop through torch.compile(model.step), and llama.cpp at f32 and at q8_0,
each on 2 threads. The logits must agree within float32's rounding bound (float32_bound), the greedy tokens
exactly; otherwise the script exits with status 1.
"""

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write_table

import train_tiny
from JAMBA import Jamba

# README's model that runs everywhere: train_tiny.py's defaults with --expand 2 and the reference's d_state 16.
EVERYWHERE = ["--expand", "2", "--d_state", "16"]


def train_and_export(work, smoke):
    """A run of train_tiny.py on its offline corpus: its --out."""
    out = work / "run"
    flags = (["--max-iters", "20", "--d_model", "32", "--nhead", "2", "--dim_feedforward", "64", "--eval-iters", "2"]
             if smoke else ["--max-iters", "300"])
    subprocess.run([sys.executable, train_tiny.__file__, "--out", str(out), *EVERYWHERE, *flags, "--eval-interval",
                    "1000", "--max-new-tokens", "1", "--device", "cpu"], check=True, capture_output=True)
    return out


def export(out, target):
    subprocess.run([sys.executable, train_tiny.__file__, "--out", str(out), "--export", str(target)], check=True,
                   capture_output=True)


def convert(converter, exported, outtype, target):
    """llama.cpp's own converter, as a user runs it."""
    result = subprocess.run([sys.executable, str(converter), str(exported), "--outfile", str(target), "--outtype",
                             outtype], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {exported}:\n{result.stderr[-3000:]}")


def llama_logits(llm, tokens):
    """llama.cpp's logits (l, v) for tokens read at once."""
    import numpy as np
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))


def llama_greedy(llm, prompt, new_tokens):
    """The prompt then new_tokens tokens, each the argmax of the last logits, one eval of one token at a time."""
    llm.reset()
    llm.eval(prompt)
    out = list(prompt)
    for _ in range(new_tokens):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


def float32_bound(config, length):
    """How far float32 rounding alone may move a logit, relative to the largest: u = 2^-24 times T, the roundings
    on the longest chain from an input to a logit (each term of a sum one rounding): per Mamba layer in_proj's,
    x_proj's, out_proj's sums and the scan's steps, per attention layer the q, score, softmax and value sums, per
    MLP its two, then the head. Two float32 programs adding in different orders stay within twice that."""
    m, d, f = config.d_model, config.expand * config.d_model, config.dim_feedforward
    layers = config.num_mamba_layers + config.num_transformer_layers
    return 2 * 2.0 ** -24 * (layers * (2 * m + 2 * d + f + 2 * length) + m)


def compiled_greedy(model, step, prompt, new_tokens):
    """generate(prompt, new_tokens, temperature=0) with step in place of model.step."""
    logits, states = model.prefill(prompt)
    token = logits[:, -1].argmax(-1)                                    # (1,)
    for _ in range(new_tokens - 1):
        logits, states = step(token, states)
        token = logits.argmax(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), metavar="DIR",
                   help="a llama.cpp checkout (or llama-cpp-python's vendor/llama.cpp) with convert_hf_to_gguf.py")
    p.add_argument("--out", help="a train_tiny.py run (with --expand 2) to take instead of training one")
    p.add_argument("--compare-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="a tiny model, 20 steps, fewer tokens, no files written")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("vs_llama_cpp.py needs llama-cpp-python: pip install llama-cpp-python") from None
    converter = Path(args.llama_cpp or ".") / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit("vs_llama_cpp.py needs llama.cpp's convert_hf_to_gguf.py: give --llama-cpp DIR (a llama.cpp "
                         "checkout, or vendor/llama.cpp of the llama-cpp-python source package) or LLAMA_CPP_DIR")
    compare, new_tokens, repeats = (64, 16, 1) if args.smoke else (args.compare_tokens, args.new_tokens, args.repeats)
    print(f"JAMBA.py against llama.cpp; {machine()}, llama-cpp-python {llama_cpp.__version__}", flush=True)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = Path(args.out) if args.out else train_and_export(work, args.smoke)
        export(out, work / "hf")
        ckpt = train_tiny.load_checkpoint(out / "ckpt.pt")
        model = Jamba(**ckpt["config"]).eval()
        model.load_state_dict(ckpt["model"])
        codec = train_tiny.checkpoint_codec(ckpt)
        text, _ = train_tiny.read_corpus(ckpt["args"].get("data"))
        tokens = codec.encode(text[len(text) // 2:][:compare], "the corpus")
        llms = {}
        for outtype in ("f32", "q8_0"):
            convert(converter, work / "hf", outtype, work / f"model-{outtype}.gguf")
            llms[outtype] = llama_cpp.Llama(str(work / f"model-{outtype}.gguf"), n_ctx=model.config.max_seq_length,
                                            n_batch=512, n_threads=2, logits_all=True, verbose=False)

        with torch.no_grad():
            ours = model(torch.tensor([tokens]))[0][0]                              # (l, v)
            ours64 = model.double()(torch.tensor([tokens]))[0][0]
            model.float()
        theirs = llama_logits(llms["f32"], tokens)
        scale = ours64.abs().max().item()
        difference = (theirs - ours).abs().max().item() / scale
        float32 = (ours.double() - ours64).abs().max().item() / scale
        prompt = tokens[:16]
        greedy_ours = model.generate(torch.tensor([prompt]), new_tokens, temperature=0)[0].tolist()
        greedy_theirs = llama_greedy(llms["f32"], prompt, new_tokens)
        same = greedy_ours == greedy_theirs
        bound = float32_bound(model.config, len(tokens))
        print(f"logits over {len(tokens)} tokens: llama.cpp f32 within {difference:.2e} of ours (relative to the "
              f"largest logit; float32 rounding may move them {bound:.1e}; ours against float64: {float32:.1e}); "
              f"{new_tokens} greedy tokens {'identical' if same else 'DIFFERENT'}", flush=True)

        steps = {"JAMBA.py": lambda: model.generate(torch.tensor([prompt]), new_tokens, temperature=0),
                 **({} if args.smoke else {"JAMBA.py, torch.compile(model.step)": functools.partial(
                     compiled_greedy, model, torch.compile(model.step, dynamic=True), torch.tensor([prompt]),
                     new_tokens)}),
                 **{f"llama.cpp {outtype}": (lambda llm=llm: llama_greedy(llm, prompt, new_tokens))
                    for outtype, llm in llms.items()}}
        times = {name: [] for name in steps}
        for _ in range(repeats + 1):                        # the first round warms up (and compiles), untimed
            for name, step in steps.items():
                start = time.perf_counter()
                with torch.no_grad():
                    step()
                times[name].append(time.perf_counter() - start)
        per_token = {name: statistics.median(values[1:]) / new_tokens for name, values in times.items()}
        rows = [[name, f"{1e3 * seconds:.3f}", f"{seconds / per_token['llama.cpp f32']:.2f}x"]
                for name, seconds in per_token.items()]
        for row in rows:
            print(" | ".join(row), flush=True)
    if not args.smoke:
        parameters = sum(p.numel() for p in model.parameters())
        write_table("vs_llama_cpp", f"JAMBA.py and llama.cpp on the same model ({model.layer_pattern}, "
                    f"{parameters / 1e6:.2f}M parameters, d_model {model.config.d_model}, expand 2, d_state "
                    f"{model.config.d_state}, float32, 2 threads): logits over {len(tokens)} tokens within "
                    f"{difference:.1e} of the largest (float32's bound {bound:.1e}), {new_tokens} greedy tokens "
                    f"{'identical' if same else 'not'}; "
                    f"a 16-token prompt then {new_tokens} greedy tokens, per token, median of {repeats} in turns",
                    ["implementation", "ms/token", "vs llama.cpp f32"], rows)
    if not same or difference > bound:
        raise SystemExit(f"llama.cpp differs: logits {difference:.2e} apart (bound {bound:.1e}), greedy tokens "
                         f"{'identical' if same else 'different'}")


if __name__ == "__main__":
    main()
