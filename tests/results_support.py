"""A real learning-rate sweep for the runner-results tests (tests/test_results*.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from runner.results.catalog import Catalog

from .support import REPO, TEST_AWS, Runner, short_tempdir

SWEEP = """
    import json, os, sys
    lr = float(sys.argv[sys.argv.index("--lr") + 1])
    for epoch in range(1, 5):
        print(json.dumps({"experiment": {"epoch": epoch, "loss": round(1.0 / (1 + 10 * lr * epoch), 6),
                                         "accuracy": round(1 - 1.0 / (1 + epoch), 6)}}), flush=True)
    print("secret", os.environ.get("SEEN", ""), flush=True)
    with open(os.path.join("..", "modeldir", "model.txt"), "w") as handle:
        handle.write("lr=%s" % lr)
"""
RATES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
EPOCHS = 4


class Sweep:
    """A started runner, its storage root and the keys of a finished 8-run sweep."""

    def __init__(self, kind: str, runner: Runner, storage_args: list[str]):
        self.kind = kind
        self.runner = runner
        self.storage_args = storage_args
        self.keys = [f"lr-{i}" for i in range(len(RATES))]
        self.env = dict(runner.env)

    def submit(self, directory, script: str, *args: str, key: str, options=(),
               project: str = "sweep") -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "runner.submit", "--queue", self.runner.queue,
             "--queue-root", str(self.runner.options["queue-root"]), *self.storage_args,
             "--project", project, "--key", key, "--save-frequency", "1s", *options,
             str(directory), script, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO)

    def record(self, key: str, project: str = "sweep") -> dict | None:
        data = self.runner.read(f"{self.runner.store_root}/metadata/{project}/{key}.json")
        return json.loads(data) if data else None

    def wait_final(self, key: str, timeout: float = 180.0) -> dict:
        return self.runner.wait_for(lambda: (lambda r: r if r and r.get("final") else None)(
            self.record(key)), timeout=timeout, what=f"final record of {key}")

    def results(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``runner-results --storage … ARGS`` as a real process."""
        done = subprocess.run([sys.executable, "-m", "runner.results", *self.storage_args, *args],
                              capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def results_json(self, *args: str):
        return json.loads(self.results(*args).stdout)

    def catalog(self) -> Catalog:
        if self.kind == "s3":
            return Catalog(self.runner.store_root, credentials={
                "aws": {"access_key": "testing", "secret_access_key": "testing"}})
        return Catalog(self.runner.store_root)


def finished_sweep(request, kind: str):
    """Generator for a module fixture: a started runner on ``kind`` storage (``file`` or
    ``s3``) that has finished the 8-run sweep (runner-submit), cleaned up at the end."""
    root = short_tempdir()
    storage_args: list[str]
    if kind == "s3":
        moto = request.getfixturevalue("moto")
        runner = Runner(root, store_root=moto.root_url(moto.create_bucket()))
        storage_args = ["--storage", runner.store_root, "--access-key", "testing",
                        "--secret-key", "testing"]
    else:
        runner = Runner(root)
        storage_args = ["--storage", runner.store_root]
    found = Sweep(kind, runner, storage_args)
    if kind == "s3":
        found.env = {k: v for k, v in runner.env.items() if k not in TEST_AWS}
    try:
        runner.start()
        workspace = runner.workspace({"train.py": SWEEP})
        submitted = [found.submit(workspace, "train.py", "--lr", str(rate), key=key)
                     for key, rate in zip(found.keys, RATES)]
        for process in submitted:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        for key in found.keys:
            assert found.wait_final(key)["status"] == "completed", runner.log()
        yield found
    finally:
        runner.cleanup()
