"""What the benchmark scripts share: the machine's description, medians of repeated timings, optional plotting."""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # import JAMBA and train_tiny from the repo root
HERE = Path(__file__).resolve().parent


def machine():
    """One line naming the CPU, the threads torch uses and the versions, printed above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def active_parameters(model):
    """Parameters one token passes through: all of them (a tied head counted once), except the experts its
    router did not choose."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.layers:
        if hasattr(layer.feed_forward, "experts"):
            per_expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
            total -= per_expert * (len(layer.feed_forward.experts) - layer.feed_forward.num_experts_per_tok)
    return total


def median_ms(fn, repeats):
    """Median wall time of fn() in milliseconds over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pyplot():
    """matplotlib's pyplot (headless), or None with a note on how to get it: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed, so no plot is written: pip install matplotlib")
        return None


def write_table(name, title, header, rows):
    """Print a markdown table and write it, with the machine line, to benchmarks/NAME.md, and into
    benchmarks/README.md in place of the one there (between `<!-- NAME.md -->` and `<!-- end -->`)."""
    lines = [f"# {title}", "", f"Machine: {machine()}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)] + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / f"{name}.md").write_text(text)
    readme, start = (HERE / "README.md").read_text(), f"<!-- {name}.md -->\n"
    if start in readme:
        head, tail = readme.split(start)
        (HERE / "README.md").write_text(head + start + readme_block(text) + tail[tail.index("<!-- end -->"):])


def readme_block(table_md):
    """A table file as benchmarks/README.md shows it: its title in bold, not a heading of the page."""
    title, rest = table_md.split("\n", 1)
    return f"**{title[2:]}**\n{rest}\n"


def save_figure(fig, axes, name, title):
    """Grid and legend on each of axes, the title with the machine line, then benchmarks/NAME.png."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title} — {machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=110)
    print(f"wrote {HERE / (name + '.png')}")
