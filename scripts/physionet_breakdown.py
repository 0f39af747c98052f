"""Where one PhysioNet model's lead over another comes from: per variable, per (record, variable) pair by its
number of observations, and per position in the record's time span, in Rubanova et al.'s units.

    python scripts/physionet_breakdown.py runs/physionet-rub-odernn-mean-12800 runs/physionet-rub-gru51-12800

Each run is rebuilt from its ``config.json`` and ``checkpoints/last.pt`` (the two must share the data settings),
its ``test_mse_rubanova`` recomputed and printed beside its ``summary.json`` figure, then the test entries' weighted
squared errors (``rubanova_weight``, the seen entries) are broken down. The first run is "A", the second "B";
"share" is the part of Rubanova's average difference A - B that a row accounts for. One thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from neuralode.data import PHYSIONET_VARIABLES
from neuralode.experiments import get_experiment
from neuralode.experiments.config import config_from_dict
from neuralode.experiments.runner import load_checkpoint, seed_everything

_DATA_FIELDS = ("data_path", "max_records", "quantization", "test_fraction", "holdout", "time_scale", "seed",
                "eval_batch")
_SHARED = ("normalizer", "train", "test", "n_records", "rubanova_weight", "var_mean", "test_batches",
           "dataset_stats")


def rebuild(run_dirs: list) -> list:
    """``[(experiment, model, kind)]``: each run's experiment (the first one's data shared) and trained model."""
    experiment_class, built, first = get_experiment("physionet"), [], None
    for run in run_dirs:
        raw = json.loads((Path(run) / "config.json").read_text())["config"]
        config = experiment_class.resolve(config_from_dict(experiment_class.Config, raw, strict=True))
        seed_everything(config.seed)
        experiment = experiment_class(config, "cpu")
        if first is None:
            experiment.setup()
            first = experiment
        else:
            different = [k for k in _DATA_FIELDS if getattr(config, k) != getattr(first.config, k)]
            if different:
                raise SystemExit(f"{run} differs from {run_dirs[0]} in {different}: not the same test set")
            for name in _SHARED:
                setattr(experiment, name, getattr(first, name))
            experiment.totals = {k: [0.0, 0.0] for k in config.models}
        if len(config.models) != 1:
            raise SystemExit(f"{run} trained {config.models}: give runs of one model each")
        model = experiment.build_model()
        model.load_state_dict(load_checkpoint(Path(run) / "checkpoints" / "last.pt", "cpu")["model"])
        model.eval()
        built.append((experiment, model, config.models[0]))
    return built


def entries(built) -> dict:
    """Per seen test entry: record, variable, position in the record's span, and each model's weighted error."""
    first = built[0][0]
    out = {k: [] for k in ("record", "variable", "position", "a", "b")}
    offset = 0
    with torch.no_grad():
        for times, values, mask, held in first.test_batches:
            seen = mask & ~held
            errors = [(experiment._forward(model, kind, times, values, mask, held).pred - values).square()
                      * first.rubanova_weight for experiment, model, kind in built]
            for b in range(values.shape[0]):
                observed = times[mask[b].any(-1)]
                start, span = float(observed.min()), float(observed.max() - observed.min())
                index = seen[b].nonzero()
                t_index, v_index = index[:, 0], index[:, 1]
                out["record"].append(np.full(len(t_index), offset + b))
                out["variable"].append(v_index.numpy())
                position = ((times[t_index] - start) / span).numpy() if span > 0 else np.full(len(t_index), np.nan)
                out["position"].append(position)
                out["a"].append(errors[0][b][t_index, v_index].double().numpy())
                out["b"].append(errors[1][b][t_index, v_index].double().numpy())
            offset += values.shape[0]
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["records"] = offset
    return result


def report(d: dict) -> None:
    names, n_variables, n_records = PHYSIONET_VARIABLES, len(PHYSIONET_VARIABLES), d["records"]
    key = d["record"] * n_variables + d["variable"]
    pairs, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    pair_a, pair_b = np.bincount(inverse, d["a"]) / counts, np.bincount(inverse, d["b"]) / counts
    pair_variable = pairs % n_variables
    scale = n_records * n_variables            # Rubanova's average: per pair, then over variables and records
    total_a, total_b = pair_a.sum() / scale, pair_b.sum() / scale
    difference = total_a - total_b
    print(f"Rubanova's average: A {total_a:.4e}, B {total_b:.4e}, A - B {difference:+.4e}; per entry: A "
          f"{d['a'].mean():.4e}, B {d['b'].mean():.4e}; {len(d['a'])} entries in {len(pairs)} (record, variable) "
          f"pairs\n")
    print("| variable | entries | entry MSE A | entry MSE B | A - B in the average (1e-5) | share |")
    print("|---|---|---|---|---|---|")
    rows = []
    for j in range(n_variables):
        at_j = pair_variable == j
        contribution = (pair_a[at_j].sum() - pair_b[at_j].sum()) / scale
        entries_j = d["variable"] == j
        rows.append((contribution, names[j], int(entries_j.sum()), d["a"][entries_j].mean() if entries_j.any()
                     else float("nan"), d["b"][entries_j].mean() if entries_j.any() else float("nan")))
    for contribution, name, count, a, b in sorted(rows, key=lambda r: -abs(r[0])):
        share = contribution / difference
        print(f"| {name} | {count} | {a:.3e} | {b:.3e} | {contribution * 1e5:+.3f} | {share:+.1%} |")
    print("\n| observations per (record, variable) | pairs | entries | mean pair MSE A | B | share |")
    print("|---|---|---|---|---|---|")
    for low, high, label in ((1, 1, "1"), (2, 3, "2-3"), (4, 10, "4-10"), (11, 30, "11-30"), (31, None, ">30")):
        chosen = (counts >= low) & (counts <= (high or counts.max()))
        share = (pair_a[chosen] - pair_b[chosen]).sum() / scale / difference
        print(f"| {label} | {chosen.sum()} | {counts[chosen].sum()} | {pair_a[chosen].mean():.3e} | "
              f"{pair_b[chosen].mean():.3e} | {share:+.1%} |")
    position = d["position"]
    order = np.lexsort((position, key))
    first_entry = np.zeros(len(key), bool)
    first_entry[order[np.r_[True, key[order][1:] != key[order][:-1]]]] = True
    print("\n| entries | count | entry MSE A | B | A / B |")
    print("|---|---|---|---|---|")
    for label, chosen in (("first 10% of the record's span", position < 0.1),
                          ("middle", (position >= 0.1) & (position <= 0.9)),
                          ("last 10%", position > 0.9),
                          ("first observation of each (record, variable)", first_entry),
                          ("later observations", ~first_entry)):
        if chosen.any():
            a, b = d["a"][chosen].mean(), d["b"][chosen].mean()
            print(f"| {label} | {chosen.sum()} | {a:.3e} | {b:.3e} | {a / b:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, help="two run directories: A, then B")
    args = parser.parse_args()
    torch.set_num_threads(1)
    built = rebuild(args.runs)
    for (experiment, model, kind), run in zip(built, args.runs):
        recomputed = experiment._test_mse(model)[f"test_mse_rubanova/{kind}"]
        stored = json.loads((Path(run) / "summary.json").read_text())["metrics"].get(f"test_mse_rubanova/{kind}")
        print(f"{run}: test_mse_rubanova recomputed {recomputed:.6e}, summary.json {stored:.6e}")
    report(entries(built))


if __name__ == "__main__":
    main()
