"""Jamba beyond text: forecasting a real monthly series, Mauna Loa CO2, against the classic baselines.

    python benchmarks/forecast.py          # benchmarks/forecast.md and forecast.png (statsmodels; ~6 min, 2 cores)
    python benchmarks/forecast.py --smoke  # tiny sizes, seconds, no files: checks that the script still runs

The series: statsmodels' co2 data set (Keeling & Whorf: weekly CO2 at Mauna Loa in ppm, shipped inside the
package, so nothing is downloaded), averaged per month with its few empty months interpolated: 526 months,
1958-03 to 2001-12. One fixed split: training to 1989-12 (382 months), validation 1990-01 to 1995-12, test
1996-01 to 2001-12 (72 months each). From every month o whose next HORIZON = 12 months lie in the test years
(61 origins, 1995-12 to 2000-12) each model forecasts those 12 months from the series up to o alone; errors are
pooled over origins, and reported per horizon h = 1..12 too.

Baselines: seasonal naive (each month as it was a year before its forecast month, from the history) and the
"airline" SARIMA(0,1,1)(0,1,1)_12 (Box & Jenkins), fitted by maximum likelihood on the training years, then run
along the history to each origin with those parameters (not refitted) and forecast.
Networks: a Forecaster (below) of each plan with the same parameter count (the MLP width solved for it): hybrid
(MMAM), transformer (AAAA, rotary), Mamba (MMMM). Each reads the month-on-month changes, scaled by the training
years' mean and standard deviation, and learns to predict the next one (mean squared error on windows of CONTEXT
months, AdamW, one-cycle schedule); to forecast it reads the last CONTEXT changes in one parallel prefill, then
steps, feeding each predicted change back in, and the changes are summed onto the last value. The checkpoint kept
is the one with the lowest validation MAE (checked every EVAL_EVERY steps); --seeds seeds each.
"""

import argparse
import statistics
import time
from typing import NamedTuple

import torch
from _common import machine, pyplot, save_figure, write_table
from torch import nn

from JAMBA import Jamba
from train_tiny import make_optimizer

HORIZON, SEASON, CONTEXT, EVAL_EVERY = 12, 12, 96, 50
PLANS = {"hybrid": (3, 1), "transformer": (0, 4), "mamba": (4, 0)}      # (Mamba layers, attention layers)


class Forecaster(nn.Module):
    """A next-value forecaster made of Jamba's pieces: a linear read-in of the c channels in place of the token
    embedding (inputs_embeds), Jamba's layers, and a linear read-out of its final hidden states (return_hidden).
    settings: Jamba's, but vocab_size (its embedding and head, one row, go unused)."""

    def __init__(self, channels=1, **settings):
        super().__init__()
        self.body = Jamba(vocab_size=1, **settings)
        self.read_in = nn.Linear(channels, self.body.config.d_model)
        self.read_out = nn.Linear(self.body.config.d_model, channels)

    def forward(self, x):
        """x (b, l, c) -> the prediction of each next value (b, l, c), every position reading only those before."""
        hidden, _ = self.body(inputs_embeds=self.read_in(x), return_hidden=True)     # (b, l, m)
        return self.read_out(hidden)

    @torch.no_grad()
    def forecast(self, history, horizon):
        """history (b, l, c) -> the next horizon values (b, horizon, c): one parallel prefill over the history,
        then one recurrent step per value, each prediction read back in as the next input."""
        hidden, states = self.body.prefill(inputs_embeds=self.read_in(history), return_hidden=True)   # (b, l, m)
        predictions = [self.read_out(hidden[:, -1])]                                 # (b, c)
        for _ in range(horizon - 1):
            hidden, states = self.body.step(None, states, inputs_embeds=self.read_in(predictions[-1]),
                                            return_hidden=True)                      # (b, m)
            predictions.append(self.read_out(hidden))
        return torch.stack(predictions, dim=1)                                       # (b, horizon, c)


def monthly_co2():
    """The co2 series of statsmodels averaged per month: a pandas Series of 526 values, 1958-03 to 2001-12."""
    try:
        import statsmodels.api as sm
    except ImportError:
        raise SystemExit("benchmarks/forecast.py needs statsmodels for its data and ARIMA: pip install statsmodels")
    return sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().interpolate()


def network(plan, d_model, parameters, dropout):
    """A Forecaster of the plan whose parameter count is the nearest to `parameters`: the MLPs' width solved for it
    (the count is linear in dim_feedforward)."""
    mamba, attention = PLANS[plan]
    settings = {"d_model": d_model, "num_mamba_layers": mamba, "num_transformer_layers": attention, "nhead": 4,
                "max_seq_length": CONTEXT, "dropout": dropout}

    def count(dim_feedforward):
        return sum(p.numel() for p in Forecaster(dim_feedforward=dim_feedforward, **settings).parameters())

    per_unit = count(2) - count(1)
    return Forecaster(dim_feedforward=max(1, round(1 + (parameters - count(1)) / per_unit)), **settings)


def origins_in(series, first_year, last_year):
    """Indices o of the months whose next HORIZON months all lie in first_year..last_year."""
    years = series.index.year
    return [o for o in range(len(series) - HORIZON) if years[o + 1] >= first_year and years[o + HORIZON] <= last_year]


class Split(NamedTuple):
    """The series as the models see it. values (T,) in ppm; changes (T,): changes[o] is the change into month o,
    minus the training years' mean change, over their standard deviation (changes[0] = 0 is never read), so the
    CONTEXT changes up to o are a network's history at origin o; train_end: the months 0 .. train_end - 1 are the
    training years; validation and test: the origins, lists of indices o."""
    values: torch.Tensor
    changes: torch.Tensor
    scale: tuple
    train_end: int
    validation: list
    test: list


def split(series):
    values = torch.tensor(series.to_numpy(), dtype=torch.float32)                # (T,)
    train_end = int((series.index.year <= 1989).sum())
    raw = values[1:] - values[:-1]                                               # (T - 1,)  into months 1 .. T - 1
    scale = (raw[:train_end - 1].mean().item(), raw[:train_end - 1].std().item())
    changes = torch.cat([torch.zeros(1), (raw - scale[0]) / scale[1]])           # (T,)
    return Split(values, changes, scale, train_end, origins_in(series, 1990, 1995), origins_in(series, 1996, 2001))


def truth_at(data, origins):
    """The next HORIZON values after each origin: (origins, HORIZON)."""
    return torch.stack([data.values[o + 1:o + 1 + HORIZON] for o in origins])


def network_forecasts(model, data, origins):
    """(origins, HORIZON) forecasts of the values: the model's forecast of the scaled changes, summed onto y_o."""
    model.eval()
    history = torch.stack([data.changes[o - CONTEXT + 1:o + 1] for o in origins])[..., None]   # (b, l, 1)
    predicted = model.forecast(history, HORIZON)[..., 0]                         # (b, HORIZON)
    model.train()
    return data.values[origins, None] + (predicted * data.scale[1] + data.scale[0]).cumsum(dim=1)


def train(plan, seed, args, data, parameters):
    """One network trained on the training years: (the model at its best validation MAE, its seconds of training)."""
    torch.manual_seed(seed)
    model = network(plan, args.d_model, parameters, args.dropout)
    optimizer = make_optimizer(model, args.lr, 0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)
    generator = torch.Generator().manual_seed(seed)
    truth = truth_at(data, data.validation)
    best, seconds = (float("inf"), None), 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        # Windows of CONTEXT + 1 changes inside the training years (changes 1 .. train_end - 1): the model reads
        # the first CONTEXT of them and predicts each next one.
        first = torch.randint(1, data.train_end - CONTEXT, (args.batch_size,), generator=generator)
        windows = torch.stack([data.changes[i:i + CONTEXT + 1] for i in first.tolist()])[..., None]  # (b, l + 1, 1)
        loss = nn.functional.mse_loss(model(windows[:, :-1]), windows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if step % EVAL_EVERY == 0 or step == args.steps:
            mae = (network_forecasts(model, data, data.validation) - truth).abs().mean().item()
            if mae < best[0]:
                best = (mae, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model.eval(), seconds


def scores(forecasts, truth):
    """MAE, MSE, and the MAE at horizons 1, 6 and 12, of (origins, HORIZON) forecasts."""
    error = forecasts - truth
    by_horizon = error.abs().mean(0)
    return [error.abs().mean().item(), error.pow(2).mean().item()] + [by_horizon[h - 1].item() for h in (1, 6, 12)]


def mean_std(values, digits=3):
    """'mean ± std' over seeds, or the value itself for one."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.d_model = 4, 1, 16
    series = monthly_co2()
    data = split(series)
    truth = truth_at(data, data.test)                                            # (origins, HORIZON)
    print(f"Mauna Loa CO2, {len(series)} months {series.index[0]:%Y-%m} to {series.index[-1]:%Y-%m}: training "
          f"{data.train_end}, validation and test 72 months each; {len(data.test)} test origins, horizons "
          f"1-{HORIZON}; {machine()}", flush=True)

    from statsmodels.tsa.statespace.sarimax import SARIMAX
    naive = torch.stack([data.values[o + 1 - SEASON:o + 1 - SEASON + HORIZON] for o in data.test])
    start = time.perf_counter()
    fitted = SARIMAX(series[:data.train_end], order=(0, 1, 1), seasonal_order=(0, 1, 1, SEASON)).fit(disp=False)
    arima = torch.stack([torch.tensor(fitted.apply(series[:o + 1]).forecast(HORIZON).to_numpy(),
                                      dtype=torch.float32) for o in data.test])
    arima_seconds = time.perf_counter() - start
    forecasts = {"seasonal naive": [naive], "SARIMA": [arima]}
    details = {"seasonal naive": ("-", 0, 0.0), "SARIMA": ("(0,1,1)(0,1,1)12", len(fitted.params), arima_seconds)}
    # The hybrid with MLPs twice d_model wide sets the size; the others' MLPs are widened or narrowed to match it.
    target = sum(p.numel() for p in Forecaster(d_model=args.d_model, num_mamba_layers=3, num_transformer_layers=1,
                                               nhead=4, dim_feedforward=2 * args.d_model,
                                               max_seq_length=CONTEXT).parameters())
    for plan in PLANS:
        forecasts[plan], times = [], []
        for seed in range(args.seeds):
            model, seconds = train(plan, seed, args, data, target)
            forecasts[plan].append(network_forecasts(model, data, data.test))
            times.append(seconds)
            print(f"{plan:12s} {model.body.layer_pattern} seed {seed}: test MAE "
                  f"{scores(forecasts[plan][-1], truth)[0]:.3f} ppm, {seconds:.0f} s", flush=True)
        details[plan] = (f"{model.body.layer_pattern}, ff {model.body.config.dim_feedforward}",
                         sum(p.numel() for p in model.parameters()), statistics.mean(times))
    rows = []
    for name, runs in forecasts.items():
        per_seed = list(zip(*(scores(f, truth) for f in runs)))                 # 5 lists, one per score
        plan, count, seconds = details[name]
        rows.append([name, plan, f"{count:,}", f"{seconds:.0f}"] + [mean_std(list(s)) for s in per_seed])
        print(f"{name:16s} MAE {rows[-1][4]}, MSE {rows[-1][5]}", flush=True)
    if args.smoke:
        return
    write_table("forecast", f"Mauna Loa CO2 (statsmodels' co2, monthly), forecasts 1-{HORIZON} months ahead from "
                f"{len(data.test)} origins in 1995-12 .. 2000-12 (test years 1996-2001; trained on 1958-1989, "
                f"checkpoints chosen on 1990-1995); errors in ppm, networks mean ± std over {args.seeds} seeds, "
                f"{args.steps} steps each",
                ["model", "plan", "parameters", "seconds", "MAE", "MSE", "MAE h=1", "MAE h=6", "MAE h=12"], rows)
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_series, ax_horizon) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    months = series.index
    test_months = [o for o in data.test if months[o].month == 12]               # six forecasts tile 1996-2001
    shown = slice(test_months[0] - 24, len(series))
    ax_series.plot(months[shown], series.to_numpy()[shown], "k-", lw=1.5, label="observed")
    styles = {"seasonal naive": ":", "SARIMA": "--", "hybrid": "-", "transformer": "-", "mamba": "-"}
    for name, runs in forecasts.items():
        for i, o in enumerate(test_months):
            row = data.test.index(o)
            ax_series.plot(months[o + 1:o + 1 + HORIZON], runs[0][row].numpy(), styles[name], lw=1,
                           color=f"C{list(forecasts).index(name)}", label=name if i == 0 else None)
        by_horizon = torch.stack([(f - truth).abs().mean(0) for f in runs]).mean(0)
        ax_horizon.plot(range(1, HORIZON + 1), by_horizon.numpy(), styles[name], marker="o", ms=3,
                        color=f"C{list(forecasts).index(name)}", label=name)
    ax_series.set(title="12-month forecasts made each December (networks: seed 0)", ylabel="CO2 (ppm)")
    ax_horizon.set(title=f"MAE by horizon, {len(data.test)} origins (networks: mean of seeds)",
                   xlabel="months ahead", ylabel="MAE (ppm)")
    save_figure(fig, [ax_series, ax_horizon], "forecast", "Mauna Loa CO2, test years 1996-2001")


if __name__ == "__main__":
    main()
