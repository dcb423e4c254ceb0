"""One run of a learning-rate sweep: ``train.py --lr 0.01 [--epochs 5]``.

Prints one JSON metric line per epoch (``runner-results`` charts every one of them) and
saves a model to ``../modeldir``.
"""
import argparse
import json
import math
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()
loss = 2.0
for epoch in range(1, args.epochs + 1):
    # A toy curve: small rates learn slowly, large ones overshoot.
    loss = loss * (1 - min(args.lr, 1.0) * 0.6) + 0.02 * math.log10(1 + 10 * args.lr)
    accuracy = 1 / (1 + loss)
    print(f"epoch {epoch}: loss {loss:.4f}")
    print(json.dumps({"experiment": {"epoch": epoch, "loss": round(loss, 6),
                                     "accuracy": round(accuracy, 6), "lr": args.lr}}), flush=True)
    time.sleep(0.3)
with open(os.path.join("..", "modeldir", "model.json"), "w") as handle:
    json.dump({"lr": args.lr, "loss": loss}, handle)
