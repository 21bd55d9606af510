"""JAMBA.py against Hugging Face transformers' JambaForCausalLM, the same model in both, on a CPU.

    python benchmarks/vs_transformers.py            # train_tiny.py's sizes: a table, md (half a minute)
    python benchmarks/vs_transformers.py --smoke    # tiny sizes, seconds: checks that the script still runs

The model is train_tiny.py's default hybrid (layers MMAM, d_model 128, d_state 8, expand 1; rotary=False, which the
Hugging Face format needs), written by save_pretrained and read by transformers, so both hold the same weights;
the test suite proves they give the same logits. Timed in turns in one process, median of --repeats: a training
step (forward, backward, AdamW) on a batch of 16 x 128 tokens, and greedy generation of 64 tokens after a
16-token prompt (batch 1). transformers runs its pure-PyTorch path, the one a CPU has (its fast path needs the
CUDA kernels of mamba_ssm and causal_conv1d); JAMBA.py runs its default, the fused CPU kernel.
"""

import argparse
import statistics
import tempfile
import time

import torch
from _common import machine, write_table

from JAMBA import Jamba


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, no files written")
    args = p.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("vs_transformers.py needs the transformers package: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    d_model, batch, length, new_tokens = (16, 2, 16, 4) if args.smoke else (128, 16, 128, 64)
    repeats = 1 if args.smoke else args.repeats
    print(f"JAMBA.py against transformers' JambaForCausalLM; {machine()}, transformers {transformers.__version__}")
    torch.manual_seed(0)
    ours = Jamba(vocab_size=101, d_model=d_model, num_mamba_layers=3, num_transformer_layers=1, nhead=4,
                 dim_feedforward=2 * d_model, max_seq_length=256, d_state=8, expand=1, rotary=False)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = transformers.JambaForCausalLM.from_pretrained(ours.save_pretrained(f"{tmp}/model"))
    x = torch.randint(0, 101, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    prompt = x[:1, :16]
    steps = {
        "JAMBA.py": (lambda: ours(x[:, :-1], x[:, 1:])[1],
                     lambda: ours.eval().generate(prompt, new_tokens, temperature=0)),
        "transformers": (lambda: theirs(input_ids=x[:, :-1], labels=x[:, :-1]).loss,
                         lambda: theirs.eval().generate(prompt, max_new_tokens=new_tokens, do_sample=False))}
    optimizers = {"JAMBA.py": torch.optim.AdamW(ours.parameters()),
                  "transformers": torch.optim.AdamW(theirs.parameters())}
    train, generate = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(repeats + 1):                       # the first round warms up, untimed
        for name, (loss, sample) in steps.items():
            (ours if name == "JAMBA.py" else theirs).train()
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            loss().backward()
            optimizers[name].step()
            train[name].append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                sample()
                generate[name].append(time.perf_counter() - start)
    rows = []
    for name in steps:
        step, token = statistics.median(train[name][1:]), statistics.median(generate[name][1:]) / new_tokens
        rows.append([name, f"{1e3 * step:.1f}", f"{batch * length / step:,.0f}", f"{1e3 * token:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    ratio = [float(rows[1][1]) / float(rows[0][1]), float(rows[1][3]) / float(rows[0][3])]
    print(f"JAMBA.py trains {ratio[0]:.1f}x and generates {ratio[1]:.1f}x as fast as transformers here")
    if not args.smoke:
        write_table("vs_transformers", f"The same model (MMAM, d_model {d_model}) in JAMBA.py and in transformers' "
                    f"JambaForCausalLM, float32, CPU, median of {repeats} in turns: a training step of {batch} x "
                    f"{length} tokens, and greedy generation after a 16-token prompt (batch 1); JAMBA.py "
                    f"{ratio[0]:.1f}x as fast to train, {ratio[1]:.1f}x to generate",
                    ["implementation", "training ms/step", "training tokens/s", "generation ms/token"], rows)


if __name__ == "__main__":
    main()
