"""A tiny StudioML-style experiment: prints plain lines and JSON metric lines, saves a model."""
import json
import os
import sys
import time

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
print(f"training for {epochs} epochs in {os.getcwd()}")
loss = 1.0
for epoch in range(1, epochs + 1):
    loss *= 0.5
    print(f"epoch {epoch} done")
    print(json.dumps({"experiment": {"loss": loss, "epoch": epoch,
                                     "history": {f"epoch_{epoch}": loss}}}))
    time.sleep(0.2)
modeldir = os.path.join(os.path.dirname(os.getcwd()), "modeldir")
with open(os.path.join(modeldir, "model.json"), "w") as handle:
    json.dump({"weights": [loss]}, handle)
print("model saved", file=sys.stderr)
