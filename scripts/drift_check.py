"""How far the batched engine and train.py drift apart over a long run: one seed of a compare
cell trained both ways from the same weights and batch order, and the largest relative
difference of the per-epoch validation MSE over the first N epochs.

    python scripts/drift_check.py [--factor lr] [--cells "lr 1e-2,lr 1e-4"] [--epochs 1000]

The equivalence tests bound the first epochs (1e-4 relative); float32 rounding (bmm in the
engine, addmm in train.py) can grow after that where training is chaotic.
"""

from __future__ import annotations

import argparse

from study import compare
from study.config import DataConfig
from study.run.batched.stack import Stack, new_slot
from study.trial.data import make_data
from study.trial.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", default="lr")
    ap.add_argument("--cells", default="lr 1e-2,lr 1e-4")
    ap.add_argument("--epochs", type=int, default=1000)
    args = ap.parse_args()
    data = make_data(DataConfig())
    factor = compare.FACTORS[args.factor](args.epochs)
    marks = [e for e in (1, 10, 30, 100, 300, 1000, 3000) if e <= args.epochs]
    for cell in args.cells.split(","):
        cfg = compare.cell_config(factor, cell, 0, args.epochs)
        ref: list[float] = []
        train(cfg, data, on_epoch=lambda log, ref=ref: ref.append(log.val_mse))
        stack = Stack([new_slot(cfg, "cpu")], data)
        got = [stack.train_epoch()[1].item() for _ in range(args.epochs)]
        worst = {
            e: max(abs(g - r) / r for g, r in zip(got[:e], ref[:e], strict=True)) for e in marks
        }
        print(
            f"{cell}: "
            + ", ".join(f"{w:.1e} by epoch {e}" for e, w in worst.items())
            + f"; final validation MSE {ref[-1]:.4g} (train.py) vs {got[-1]:.4g} (engine)"
        )


if __name__ == "__main__":
    main()
