"""The specification of JAMBA.py: property tests (hypothesis) and unit tests (pytest)."""

import hashlib
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import train_tiny
from JAMBA import (MLP, AttentionBlock, Jamba, MambaBlock, _rotary, layer_schedule, selective_scan_parallel,
                   selective_scan_sequential)

settings.register_profile("jamba", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("jamba")

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_scan_inputs(seed, b, d, n, l, dtype, with_D=True, with_z=True, with_bias=True, with_state=False,
                     delta_scale=1.0, A_scale=3.0):
    """Random selective-scan inputs in the reference layouts, every tensor requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    inputs = dict(u=randn(b, d, l), delta=torch.rand(b, d, l, generator=g, dtype=dtype) * delta_scale,
                  A=-torch.rand(d, n, generator=g, dtype=dtype) * A_scale, B=randn(b, n, l), C=randn(b, n, l),
                  D=randn(d) if with_D else None, z=randn(b, d, l) if with_z else None,
                  delta_bias=torch.rand(d, generator=g, dtype=dtype) * 0.5 if with_bias else None,  # delta >= 0
                  initial_state=randn(b, d, n) if with_state else None)
    return {k: v.requires_grad_() for k, v in inputs.items() if v is not None}


def scan_and_grads(scan, inputs, **flags):
    """out, last_state and the gradient of a fixed non-linear function of both w.r.t. every input."""
    out, last_state = scan(**inputs, return_last_state=True, **flags)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    objective = (out * weights).sin().sum() + last_state.cos().sum()
    grads = torch.autograd.grad(objective, list(inputs.values()))
    return out, last_state, dict(zip(inputs, grads))


def assert_relative(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(|expected|, tiny): relative to the tensor's scale."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


scan_shapes = st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 300))
scan_flags = st.fixed_dictionaries(dict(with_D=st.booleans(), with_z=st.booleans(), with_bias=st.booleans(),
                                        with_state=st.booleans(), delta_softplus=st.booleans()))


# ---------------------------------------------------------------------------------------------------------------
# Selective scans
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@given(shape=scan_shapes, flags=scan_flags, seed=st.integers(0, 2 ** 16))
@settings(max_examples=80)
def test_parallel_scan_equals_sequential_with_gradients(dtype, tol, shape, flags, seed):
    delta_softplus = flags.pop("delta_softplus")
    inputs = make_scan_inputs(seed, *shape, dtype, **flags)
    expected = scan_and_grads(selective_scan_sequential, inputs, delta_softplus=delta_softplus)
    actual = scan_and_grads(selective_scan_parallel, inputs, delta_softplus=delta_softplus)
    assert actual[0].dtype == dtype and actual[1].shape == (shape[0], shape[1], shape[2])
    assert_relative(actual[0], expected[0], tol, "out")
    assert_relative(actual[1], expected[1], tol, "last_state")
    for name in inputs:
        assert_relative(actual[2][name], expected[2][name], tol, f"grad of {name}")


@pytest.mark.parametrize("scan", [selective_scan_sequential, selective_scan_parallel])
@given(l=st.integers(2, 120), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_split_sequence_carries_state(scan, l, data, seed):
    split = data.draw(st.integers(1, l - 1))
    inputs = {k: v.detach() for k, v in make_scan_inputs(seed, 2, 3, 4, l, torch.float64, with_state=True).items()}
    whole, whole_state = scan(**inputs, delta_softplus=True, return_last_state=True)
    first = {k: v[..., :split] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    second = {k: v[..., split:] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    out1, state1 = scan(**first, delta_softplus=True, return_last_state=True)
    out2, state2 = scan(**{**second, "initial_state": state1}, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.cat([out1, out2], dim=-1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state2, whole_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scan", [selective_scan_sequential, selective_scan_parallel])
@pytest.mark.parametrize("l", [1, 37, 256])
def test_scan_finite_at_extremes(scan, l):
    """delta up to 1e2 and A down to -1e3: every decay exp(delta A) underflows to 0, nothing overflows."""
    inputs = make_scan_inputs(0, 2, 4, 8, l, torch.float32, with_state=True, delta_scale=100.0, A_scale=1000.0)
    with torch.no_grad():
        inputs["delta"][0, 0] = 100.0
        inputs["A"][0] = -1000.0
    out, state, grads = scan_and_grads(scan, inputs)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("scan", [selective_scan_sequential, selective_scan_parallel])
def test_bf16_inputs_give_bf16_outputs_close_to_fp32(scan):
    inputs = {k: v.detach() for k, v in make_scan_inputs(3, 2, 8, 4, 64, torch.float32).items()}
    expected = scan(**inputs, delta_softplus=True)
    out = scan(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: inputs rounded to it move the result by a few parts in a thousand.
    assert_relative(out.float(), expected, 3e-2, "bf16 out")


@pytest.mark.parametrize("scan", [selective_scan_sequential, selective_scan_parallel])
def test_scan_rejects_bad_arguments(scan):
    good = {k: v.detach() for k, v in make_scan_inputs(0, 2, 3, 4, 5, torch.float32, with_state=True).items()}
    bad_cases = [
        (dict(u=good["u"][0]), ValueError, "u must have shape"),
        (dict(A=good["A"].t()), ValueError, "A must be a real tensor"),
        (dict(B=good["B"][..., :-1]), ValueError, "B must have shape"),
        (dict(C=good["C"][:, :-1]), ValueError, "C must have shape"),
        (dict(delta=good["delta"][:1]), ValueError, "delta must have shape"),
        (dict(D=good["D"][:-1]), ValueError, "D must have shape"),
        (dict(initial_state=good["initial_state"][:, :, :-1]), ValueError, "initial_state must have shape"),
        (dict(z=[1.0]), TypeError, "z must be a torch.Tensor"),
        (dict(u=good["u"].tolist()), TypeError, "u must be a torch.Tensor"),
        (dict(u=good["u"][..., :0], delta=good["delta"][..., :0], B=good["B"][..., :0], C=good["C"][..., :0],
              z=good["z"][..., :0]), ValueError, "at least one time step"),
    ]
    for change, error, message in bad_cases:
        with pytest.raises(error, match=message):
            scan(**{**good, **change})


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------

def test_mamba_block_parallel_scan_equals_sequential():
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4, dt_layernorm=True, b_layernorm=True, c_layernorm=True).double()
    x = torch.randn(2, 33, 16, dtype=torch.float64, requires_grad=True)
    out_parallel = block(x)
    grads_parallel = torch.autograd.grad(out_parallel.sum(), [x, *block.parameters()])
    block.scan = "sequential"
    out_sequential = block(x)
    grads_sequential = torch.autograd.grad(out_sequential.sum(), [x, *block.parameters()])
    torch.testing.assert_close(out_parallel, out_sequential, rtol=1e-10, atol=1e-10)
    for gp, gs in zip(grads_parallel, grads_sequential):
        torch.testing.assert_close(gp, gs, rtol=1e-9, atol=1e-10)


@given(l=st.integers(1, 20), prompt=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_mamba_block_step_equals_forward(l, prompt, seed):
    """Prefill `prompt` tokens in parallel, then step the rest one at a time: the full forward's outputs."""
    prompt = min(prompt, l)
    torch.manual_seed(seed)
    block = MambaBlock(8, d_state=4, d_conv=3, dt_layernorm=True).double()
    x = torch.randn(3, l, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        out, state = block(x[:, :prompt], return_state=True)
        steps = [out]
        for t in range(prompt, l):
            y, state = block.step(x[:, t], state)
            steps.append(y[:, None])
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)


def test_mamba_block_matches_reference_parameters_and_init():
    """The reference mamba_simple.Mamba(d_model=32) has exactly these parameters; its state_dict loads strictly."""
    torch.manual_seed(0)
    block = MambaBlock(32, d_state=16, d_conv=4, expand=2)
    d, n, r = 64, 16, 2
    reference_shapes = {"A_log": (d, n), "D": (d,), "in_proj.weight": (2 * d, 32), "conv1d.weight": (d, 1, 4),
                        "conv1d.bias": (d,), "x_proj.weight": (r + 2 * n, d), "dt_proj.weight": (d, r),
                        "dt_proj.bias": (d,), "out_proj.weight": (32, d)}
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == reference_shapes
    reference_state = {k: torch.randn(shape) for k, shape in reference_shapes.items()}
    block.load_state_dict(reference_state, strict=True)
    assert torch.equal(block.A_log, reference_state["A_log"])
    check_mamba_init(MambaBlock(32))


def check_mamba_init(block):
    d, n = block.A_log.shape
    torch.testing.assert_close(block.A_log, torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
    assert torch.equal(block.D, torch.ones(d))
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.max() / dt.min() > 10, "dt should spread log-uniformly over [1e-3, 1e-1]"
    assert block.dt_proj.weight.abs().max() <= block.dt_rank ** -0.5
    assert block.dt_proj.weight.std() > 0.5 * block.dt_rank ** -0.5 / math.sqrt(3)
    assert block.A_log._no_weight_decay and block.D._no_weight_decay


def test_attention_step_equals_forward_and_rotary_is_relative():
    torch.manual_seed(0)
    for rotary in (False, True):
        block = AttentionBlock(16, 4, max_seq_length=12, rotary=rotary).double().eval()
        x = torch.randn(2, 12, 16, dtype=torch.float64)
        with torch.no_grad():
            expected = block(x)
            out, state = block(x[:, :5], return_state=True)
            steps = [out] + [None] * 7
            for t in range(5, 12):
                y, state = block.step(x[:, t], state)
                steps[t - 4] = y[:, None]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)
    # Rotary makes attention scores depend on relative positions only: shifting everything changes nothing.
    q, k = torch.randn(1, 1, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    scores = _rotary(q, 0) @ _rotary(k, 0).transpose(-1, -2)
    shifted = _rotary(q, 100) @ _rotary(k, 100).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2))


def test_mlp_is_gated_silu():
    torch.manual_seed(0)
    mlp = MLP(8, 24)
    x = torch.randn(3, 5, 8)
    expected = (F.silu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t())) @ mlp.down_proj.weight.t()
    torch.testing.assert_close(mlp(x), expected)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------

def tiny_jamba(num_mamba_layers=3, num_transformer_layers=1, max_seq_length=24, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Jamba(vocab_size=11, d_model=16, num_mamba_layers=num_mamba_layers,
                 num_transformer_layers=num_transformer_layers, nhead=2, dim_feedforward=32,
                 max_seq_length=max_seq_length, d_state=4, **kwargs)


@pytest.mark.parametrize("mamba, attention, pattern", [
    (7, 1, "MMMMAMMM"), (28, 4, "MMMMAMMMMMMMAMMMMMMMAMMMMMMMAMMM"), (3, 0, "MMM"), (0, 3, "AAA"), (1, 1, "MA"),
    (2, 1, "MAM"), (5, 3, "MAMMAMAM"), (1, 2, "AMA"), (0, 1, "A"), (1, 0, "M")])
def test_layer_schedule(mamba, attention, pattern):
    assert layer_schedule(mamba, attention) == pattern
    positions = [i for i, kind in enumerate(pattern) if kind == "A"]
    assert positions == [math.floor((k + 0.5) * (mamba + attention) / attention) for k in range(attention)]


def test_model_layers_follow_schedule_and_print_it():
    model = tiny_jamba(7, 1)
    assert model.layer_pattern == "MMMMAMMM"
    assert [type(layer.mixer).__name__[0] for layer in model.layers] == list("MMMMAMMM")
    assert "layer_pattern='MMMMAMMM'" in repr(model)
    # Rotary only where no Mamba layer comes before: the plain transformer, and attention at the very start.
    assert [layer.mixer.rotary for layer in tiny_jamba(0, 2).layers] == [True, True]
    assert [layer.mixer.rotary for layer in tiny_jamba(7, 1).layers if layer.mixer.__class__ is AttentionBlock] \
        == [False]
    assert [layer.mixer.rotary for layer in tiny_jamba(1, 2).layers if layer.mixer.__class__ is AttentionBlock] \
        == [True, False]


@pytest.mark.parametrize("mamba, attention", [(3, 1), (0, 2), (2, 0)])
def test_cached_path_equals_full_forward(mamba, attention):
    """prefill the first token, then step the rest one at a time: the full forward's logits at every position."""
    model = tiny_jamba(mamba, attention).double().eval()
    idx = torch.randint(0, 11, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model(idx)
        logits, states = model.prefill(idx[:, :1])
        steps = [logits]
        for t in range(1, 24):
            step_logits, states = model.step(idx[:, t], states)
            steps.append(step_logits[:, None])
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mamba, attention", [(3, 1), (0, 2), (2, 0)])
def test_greedy_generate_equals_naive_loop(mamba, attention):
    model = tiny_jamba(mamba, attention).double().eval()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, max_new_tokens=19, temperature=0)
    naive = prompt
    with torch.no_grad():
        for _ in range(19):
            logits, _ = model(naive)
            naive = torch.cat([naive, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 24)
    assert torch.equal(generated, naive)


def test_generate_samples_with_top_k_and_continues_past_max_seq_length():
    model = tiny_jamba(max_seq_length=8).eval()
    torch.manual_seed(0)
    out = model.generate(torch.zeros(3, 10, dtype=torch.long), max_new_tokens=30, temperature=0.8, top_k=3)
    assert out.shape == (3, 40) and out.dtype == torch.long
    assert torch.equal(out[:, :10], torch.zeros(3, 10, dtype=torch.long))
    assert out.min() >= 0 and out.max() < 11
    # top_k=1 is greedy whatever the temperature.
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(prompt, 6, temperature=5.0, top_k=1), model.generate(prompt, 6, temperature=0))
    assert torch.equal(model.generate(prompt, 0), prompt)


@given(position=st.integers(0, 15), seed=st.integers(0, 2 ** 16))
@settings(max_examples=10)
def test_causality(position, seed):
    model = tiny_jamba(seed=seed % 7).double().eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 11, (2, 16), generator=g)
    changed = idx.clone()
    changed[:, position] = (idx[:, position] + 1 + torch.randint(0, 10, (2,), generator=g)) % 11
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=0)
    assert not torch.allclose(after[:, position:], before[:, position:])


def test_mamba_init_survives_model_construction():
    model = tiny_jamba(3, 1)
    blocks = [layer.mixer for layer in model.layers if isinstance(layer.mixer, MambaBlock)]
    assert len(blocks) == 3
    for block in blocks:
        check_mamba_init(block)
        assert block.dt_layernorm is not None and block.b_layernorm is not None and block.c_layernorm is not None
    assert model.lm_head.weight is model.embedding.weight
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.005


@pytest.mark.parametrize("idx, error, message", [
    ([[1, 2, 3]], TypeError, "must be a torch.Tensor"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "torch.int64 or torch.int32"),
    (torch.tensor([1, 2, 3]), ValueError, r"shape \(b, l\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty sequence"),
    (torch.tensor([[1, 11]]), ValueError, r"outside \[0, vocab_size=11\)"),
    (torch.tensor([[-1, 2]]), ValueError, r"outside \[0, vocab_size=11\)"),
    (torch.zeros(1, 25, dtype=torch.long), ValueError, "over max_seq_length=24"),
])
def test_model_rejects_bad_input(idx, error, message):
    model = tiny_jamba()
    with pytest.raises(error, match=message):
        model(idx)
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] == 25):
        with pytest.raises(error, match=message):   # generate reads long prompts in pieces, so no length limit
            model.generate(idx, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=1, top_k=0), "top_k")])
def test_generate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_jamba().generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_mamba_layers=0, num_transformer_layers=0), "at least 1"),
    (dict(num_mamba_layers=-1), "num_mamba_layers"), (dict(d_model=15), "multiple of nhead"),
    (dict(vocab_size=0), "vocab_size"), (dict(dropout=1.0), "dropout"), (dict(scan="fast"), "scan must be"),
    (dict(max_seq_length=2.5), "max_seq_length")])
def test_model_rejects_bad_config(kwargs, message):
    config = dict(vocab_size=11, d_model=16, num_mamba_layers=1, num_transformer_layers=1, nhead=2,
                  dim_feedforward=32, max_seq_length=8)
    with pytest.raises(ValueError, match=message):
        Jamba(**{**config, **kwargs})


def test_state_dict_round_trip(tmp_path):
    model = tiny_jamba(seed=0).eval()
    torch.save({"config": model.config, "model": model.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    restored = Jamba(**checkpoint["config"])
    restored.load_state_dict(checkpoint["model"], strict=True)
    restored.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    idx = torch.randint(0, 11, (2, 9))
    assert torch.equal(model(idx)[0], restored(idx)[0])
    assert restored.lm_head.weight is restored.embedding.weight


def test_tiny_model_overfits_one_batch():
    model = tiny_jamba(2, 1)
    idx = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * math.log(11), loss.item()


# ---------------------------------------------------------------------------------------------------------------
# train_tiny.py, end to end
# ---------------------------------------------------------------------------------------------------------------

TRAIN_SCRIPT = str(Path(__file__).with_name("train_tiny.py"))
TINY_FLAGS = ["--device", "cpu", "--d_model", "16", "--num_mamba_layers", "1", "--num_transformer_layers", "1",
              "--nhead", "2", "--dim_feedforward", "32", "--max_seq_length", "32", "--d_state", "4",
              "--batch-size", "4", "--block-size", "16", "--eval-iters", "2", "--eval-interval", "10",
              "--warmup-iters", "5", "--max-new-tokens", "20"]


def train(out, corpus, *extra, check=True):
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--data", str(corpus), "--out", str(out),
                             *TINY_FLAGS, *extra], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ["the", "mamba", "attends", "to", "state", "and", "scan", "jamba", "layer", "token"]
    rng = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[i] for i in torch.randint(0, 10, (8,), generator=rng).tolist())
                     for _ in range(300))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus):
    """An uninterrupted run of 60 steps."""
    out = tmp_path_factory.mktemp("full")
    result = train(out, corpus, "--max-iters", "60")
    return out, result


def test_training_writes_a_complete_checkpoint_and_a_sample(full_run, corpus):
    out, result = full_run
    assert "layer_pattern=MA" in result.stdout and "parameters" in result.stdout
    assert "done: 60 steps" in result.stdout and "--- sample" in result.stdout
    assert "bpc" in result.stderr + result.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 60 and [h["step"] for h in ckpt["history"]] == [10, 20, 30, 40, 50, 60]
    assert ckpt["vocab"] == "".join(sorted(set(corpus.read_text())))
    assert ckpt["data"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert {"torch", "batches"} <= set(ckpt["rng"]) and ckpt["optimizer"]["state"]
    assert ckpt["history"][-1]["val"] < ckpt["history"][0]["val"] < math.log(len(ckpt["vocab"])) + 0.5
    model = Jamba(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    assert not list(out.glob(".ckpt-*")), "a temporary checkpoint file was left behind"


def test_interrupted_run_resumes_exactly(full_run, corpus, tmp_path):
    """Ctrl-C at an arbitrary step, then the same command with --resume: the uninterrupted run's end state."""
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--data", str(corpus), "--out", str(tmp_path),
                                *TINY_FLAGS, "--max-iters", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    while not (tmp_path / "ckpt.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and "rerun the same command with --resume" in stdout
    interrupted_at = torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"]
    assert 10 <= interrupted_at < 60

    resumed = train(tmp_path, corpus, "--max-iters", "60", "--resume")
    assert f"resuming at step {interrupted_at} of 60" in resumed.stdout
    expected = torch.load(full_run[0] / "ckpt.pt", weights_only=False)
    actual = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(actual["optimizer"]["state"][index][key], value), (index, key)
    strip = [(h["step"], h["train"], h["val"]) for h in expected["history"]]
    assert [(h["step"], h["train"], h["val"]) for h in actual["history"]] == strip


def test_sample_from_checkpoint(full_run):
    out, _ = full_run
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--sample", "--out", str(out), "--prompt", "the ",
                             "--max-new-tokens", "40", "--device", "cpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the ") and "chars/s" in result.stdout
    assert len(result.stdout.split("\n\n[")[0]) == 44


def test_bad_input_gets_one_line_and_overwrites_nothing(full_run, corpus, tmp_path, capsys):
    out, _ = full_run
    before = file_digest(out / "ckpt.pt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "short.txt").write_text("tiny corpus")
    (tmp_path / "other.txt").write_text(corpus.read_text().replace("jamba", "JAMBA"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    common = ["--out", str(out), *TINY_FLAGS]
    cases = [
        (["--data", str(tmp_path / "missing.txt"), *common], "no such file"),
        (["--data", str(tmp_path / "empty.txt"), *common], "the corpus is empty"),
        (["--data", str(tmp_path / "binary.bin"), *common], "looks binary"),
        (["--data", str(tmp_path / "short.txt"), *common], "the corpus is too short"),
        (["--data", str(corpus), *common, "--block-size", "64"], "is over the model's --max_seq_length 32"),
        (["--data", str(corpus), *TINY_FLAGS, "--out", str(corrupt), "--resume"], "not a readable checkpoint"),
        (["--data", str(tmp_path / "other.txt"), *common, "--resume"], "trained on other data"),
        (["--data", str(corpus), *common, "--resume", "--d_model", "32"], "model config differs"),
        (["--sample", "--out", str(out), "--prompt", "XYZ"], "outside the vocabulary: 'XYZ'"),
        (["--sample", "--out", str(tmp_path / "nowhere")], "no checkpoint"),
        (["--data", str(corpus), *common, "--device", "banana"], "not a device name"),
        (["--data", str(corpus), *common, "--device", "mps" if torch.cuda.is_available() else "cuda"],
         "not available on this machine"),
    ]
    for argv, message in cases:
        assert train_tiny.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("train_tiny.py: error:"), err
        assert file_digest(out / "ckpt.pt") == before
    assert (corrupt / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_weight_decay_spares_A_log_D_norms_and_biases():
    model = tiny_jamba()
    decayed, spared = train_tiny.make_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert all(name.endswith(("A_log", "D", "bias")) or "norm" in name for name in spared_names)
    assert any(name.endswith("A_log") for name in spared_names) and any(name.endswith(".D") for name in spared_names)
    assert all(p.dim() >= 2 for p in decayed["params"])


def test_learning_rate_warms_up_then_decays_to_a_tenth_at_the_end_of_the_run():
    args = train_tiny.parse_args(["--lr", "1.0", "--warmup-iters", "10", "--max-iters", "110"])
    rates = [train_tiny.learning_rate(step, 0.0, args) for step in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert train_tiny.learning_rate(110, 0.0, args) == pytest.approx(0.1)
    assert rates[60] == pytest.approx(0.55)
    # With a time budget the schedule ends at the budget when that comes before --max-iters.
    budget = train_tiny.parse_args(["--lr", "1.0", "--warmup-iters", "10", "--max-iters", "10000",
                                    "--time-budget", "100"])
    assert train_tiny.learning_rate(20, 50.0, budget) == pytest.approx(0.55)
    assert train_tiny.learning_rate(20, 100.0, budget) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks: each script runs in its smoke mode (tiny sizes) so that none can silently rot
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["scan_speed.py", "generation.py", "quality.py"])
def test_benchmark_smoke(script):
    path = Path(__file__).with_name("benchmarks") / script
    result = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" in result.stdout and "threads" in result.stdout   # the machine line
