"""LoRA against full fine-tuning on the built-in task (docs/method.md §13).

SRFT (configs/default.py, the `make run` setup) from one shared warmed-up
base, at the same number of steps: full fine-tuning at its default rate, and
LoRA (rank `--rank` on every projection, alpha = 2 x rank) at its own rate,
chosen on the `val` split at seed 0 from `--lora_lrs` (ties: the smaller).
Then both on `--seeds` seeds, scored greedy on test_id / test_ood.

  python benchmarks/lora_vs_full.py --out /tmp/lora_vs_full [--steps 60] [--seeds 0,1,2]

Finished runs are reused (rerun the same command to resume). Prints one JSON
line: per-seed and mean accuracies, the LoRA - full difference, the chosen
LoRA rate and the training seconds of each arm.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

from srft_jax import factory
from srft_jax import job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")


def config(out: str, *, seed: int, steps: int, lr: float, rank: int, n_val: int, test: bool):
  overrides = {
    "seed": seed,
    "steps": steps,
    "optim.lr": lr,
    "lora.rank": rank,
    "warmup.dir": os.path.join(out, "base"),  # one base for every run
    "eval.n_val": 0 if test else n_val,
    "eval.before": test,  # computed once, cached beside the shared base
    "log.progress": False,
    "log.plots": False,
    "checkpoint.export_hf": False,
  }
  if rank:
    overrides["lora.alpha"] = 2.0 * rank
  if not test:  # the lr choice sees val only
    overrides.update({"eval.n_id": 0, "eval.n_ood": 0})
  return factory.run_spec(factory.load_config(DEFAULT_CONFIG), overrides)


def run(out: str, name: str, c) -> dict:
  workdir = os.path.join(out, name)
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  t = time.time()
  r = job.run(c, workdir)
  if r.get("status") == "preempted":
    raise SystemExit(f"{name}: preempted; rerun to resume")
  logging.info("%s: %s (%.0f s)", name, r["after"], time.time() - t)
  return r


def mean(xs):
  return round(statistics.fmean(xs), 4)


def std(xs):
  return round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="/tmp/lora_vs_full")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--full_lr", type=float, default=2e-4)
  p.add_argument("--lora_lrs", default="1e-3,4e-3")
  p.add_argument("--n_val", type=int, default=200)
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "srft_jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  seeds = [int(s) for s in a.seeds.split(",")]
  kw = dict(steps=a.steps, n_val=a.n_val)

  sweep = {}
  for lr in (float(x) for x in a.lora_lrs.split(",")):
    c = config(a.out, seed=seeds[0], lr=lr, rank=a.rank, test=False, **kw)
    sweep[lr] = run(a.out, f"sweep/lora_lr{lr:g}", c)["after"]["val_acc"]
  lora_lr = max(sorted(sweep), key=lambda lr: sweep[lr])  # first max: the smaller rate

  arms = {"full": (a.full_lr, 0), "lora": (lora_lr, a.rank)}
  res: dict = {
    "steps": a.steps,
    "rank": a.rank,
    "sweep_val": {f"{k:g}": v for k, v in sweep.items()},
  }
  for arm, (lr, rank) in arms.items():
    rows = [
      run(a.out, f"{arm}/seed{s}", config(a.out, seed=s, lr=lr, rank=rank, test=True, **kw))
      for s in seeds
    ]
    ids = [r["after"]["id_acc"] for r in rows]
    oods = [r["after"]["ood_acc"] for r in rows]
    res[arm] = {
      "lr": lr,
      "id": ids,
      "ood": oods,
      "id_mean": mean(ids),
      "id_std": std(ids),
      "ood_mean": mean(oods),
      "ood_std": std(oods),
      "train_s_mean": round(statistics.fmean(r["train_s"] for r in rows), 1),
    }
  res["before"] = rows[0]["before"] if rows[0]["before"].get("id_acc") is not None else None
  res["lora_minus_full_id"] = round(res["lora"]["id_mean"] - res["full"]["id_mean"], 4)
  res["lora_minus_full_ood"] = round(res["lora"]["ood_mean"] - res["full"]["ood_mean"], 4)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
