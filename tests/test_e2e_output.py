"""What a real experiment prints, end to end through a real ``runner-supervisor``: progress
bars from a real ``tqdm`` on stderr beside JSON metric lines on stdout, a stdout line written
in two parts with stderr in between, non-finite numbers, and a line too long to scrape."""
from __future__ import annotations

import json
import os

import tqdm

from runner import metadata

TQDM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tqdm.__file__)))

SCRIPT = f"""
    import json, sys, time
    sys.path.insert(0, {TQDM_DIR!r})  # the test's own tqdm, no download
    from tqdm import tqdm
    for epoch in tqdm(range(5), mininterval=0, desc="epochs"):
        for step in tqdm(range(30), mininterval=0, leave=False, desc="steps"):
            time.sleep(0.001)
        print(json.dumps({{"experiment": {{"epochs": {{str(epoch): 1.0 / (epoch + 1)}}}}}}))
    sys.stdout.write('{{"experiment": {{"split": ')
    sys.stdout.flush()
    sys.stderr.write("stderr between the halves\\n")
    sys.stderr.flush()
    time.sleep(0.3)
    sys.stdout.write('"whole"}}}}\\n')
    sys.stdout.flush()
    print(json.dumps({{"experiment": {{"diverged": float("nan"), "huge": 1e400}}}}))
    print('{{"experiment": {{"too_long": "' + "x" * 3_000_000 + '"}}}}')
    print(json.dumps({{"experiment": {{"after_long": True}}}}))
"""


def test_metrics_survive_progress_bars_interleaved_streams_and_long_lines(runner):
    runner.start()
    request = runner.request(runner.workspace({"train.py": SCRIPT}), "train.py")
    runner.publish(request)
    record = runner.wait_final(request, timeout=180)
    assert record["status"] == "completed", runner.log()

    folder = runner.experiment_dir(request) / "_metadata"
    text = (folder / metadata.scrape_name(record["attempt"])).read_text()
    document = json.loads(text, parse_constant=lambda name: f"non-standard constant {name}")
    experiment = document["experiment"]
    assert experiment["epochs"] == {str(e): 1.0 / (e + 1) for e in range(5)}, \
        "every epoch's line printed while the bars ran is scraped"
    assert experiment["split"] == "whole", "stderr never cuts a stdout line"
    assert experiment["diverged"] == "NaN" and experiment["huge"] == "Infinity"
    assert "too_long" not in experiment, "a line over the bound is plain output"
    assert experiment["after_long"] is True

    output = (folder / metadata.output_name(record["attempt"])).read_bytes()
    assert b"\r" in output and b"steps" in output and b"epochs" in output, "bars kept as printed"
    assert b"stderr between the halves\n" in output
    assert b"x" * 3_000_000 in output, "the long line is still written"
    assert runner.stop() == 0


HEAVY_SCRIPT = """
    import json, random, sys
    rng = random.Random(1)
    dna = "".join(rng.choice("ACGT") for _ in range(2_000_000))
    for i in range(10):  # 20 MB of long token lines (the shape that took masking minutes)
        print(dna)
        print(json.dumps({"experiment": {"line": i}}))
    sys.stdout.write("a" * 5_000_000)  # and an unterminated 5 MB tail at exit
"""


def test_heavy_output_never_starves_the_scraper(runner):
    runner.start()
    before = runner.role_pids()
    request = runner.request(runner.workspace({"heavy.py": HEAVY_SCRIPT}), "heavy.py")
    runner.publish(request)
    record = runner.wait_final(request, timeout=240)
    assert record["status"] == "completed", runner.log()
    assert runner.role_pids() == before, "no role was taken for dead and restarted"
    [document] = runner.scrape_documents(request)
    assert document["experiment"] == {"line": 9}
    output = (runner.experiment_dir(request) / "_metadata"
              / metadata.output_name(record["attempt"])).read_bytes()
    assert len(output) >= 25_000_000 and output.endswith(b"a" * 1000 + b"\n")
    assert runner.stop() == 0
