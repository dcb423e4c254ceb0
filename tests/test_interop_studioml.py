"""The real StudioML client (``studioml==0.0.49``) against a real ``runner-supervisor``.

Experiments are submitted with the client's own code (``studio-run``, CompletionService)
over the shared RabbitMQ broker with S3 storage and database on ``moto_server``, and read
back with the client's own API: its database record, ``get_artifact``, CompletionService's
``getResults``.  The client lives in a virtualenv of its own built once under the test
data directory (tests/studio_client.py); the runner installs each experiment's
``pythonenv`` (the client's ``pip freeze``) from the package index, with a uv cache kept
beside it so that this happens once.
"""
from __future__ import annotations

import json
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from .rabbitmq_support import unique
from .studio_client import StudioClient, client_config, interop_runner
from .support import Runner, short_tempdir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.interop]

ENVIRONMENT_TIMEOUT = 900.0  # the first build installs the client's whole pip freeze


@pytest.fixture()
def stem(broker):
    stem = unique("rmq_s")
    yield stem
    names = [q["name"] for q in broker.api("queues/%2F?columns=name") or []
             if q["name"].startswith(stem)]
    broker.delete(*names)


@pytest.fixture()
def studio(moto, broker, stem, runners):
    """(client, runner): a client configured for moto + the broker, and a runner serving
    the test's queues (not started)."""
    meta, artifacts = moto.create_bucket(), moto.create_bucket()
    root = short_tempdir()
    client = StudioClient(root / "client", client_config(moto, broker, meta, artifacts))
    client.moto = moto
    runner = interop_runner(root / "runner", broker, stem)
    runners.append(runner)
    return client, runner


def wait_status(client: StudioClient, key: str, statuses: tuple, runner: Runner,
                timeout: float = ENVIRONMENT_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = client.experiment(key)
        if seen and seen["status"] in statuses:
            return seen
        if runner.process is not None and runner.process.poll() is not None:
            break
        time.sleep(1.0)
    raise AssertionError(f"{key} never reached {statuses} (last {seen}):\n{runner.log()[-6000:]}")


def scrape_documents(moto, bucket: str, key: str) -> list[dict]:
    """The runner's scrape documents of ``key`` in the client's artifact bucket."""
    s3 = moto.client()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"experiments/{key}/_metadata/scrape-")
    return [json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            for item in listed.get("Contents", [])]


def workspace(root: Path, files: dict[str, str]) -> Path:
    folder = root / f"ws-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_studio_run_record_goes_running_then_finished_and_output_is_a_file(studio, stem):
    client, runner = studio
    runner.start()
    key = f"interop-{uuid.uuid4().hex[:8]}"
    ws = workspace(client.home, {"train.py": """
        import json, os, sys, time
        print("hello from", sys.argv[1:], flush=True)
        print(json.dumps({"loss": 0.25}), flush=True)
        os.makedirs("../modeldir", exist_ok=True)
        open("../modeldir/weights.txt", "w").write("w")
        time.sleep(float(sys.argv[2]))
        print("bye", flush=True)
    """})
    client.run(ws, "train.py", "two words", "6", queue=stem + "q", key=key)
    waiting = client.experiment(key)  # as the client made it (the runner may be quicker)
    assert waiting["status"] in ("waiting", "running") and waiting["time_finished"] is None

    running = wait_status(client, key, ("running", "finished"), runner)
    finished = wait_status(client, key, ("finished",), runner, timeout=180)
    assert finished["time_started"] and finished["time_finished"]
    assert finished["time_added"] <= finished["time_started"] <= finished["time_finished"]
    assert finished["time_last_checkpoint"] >= finished["time_started"]
    assert finished["owner"] == waiting["owner"] and finished["pythonenv"] > 0  # kept
    assert running["status"] in ("running", "finished")

    output = client.artifact(key, "output")
    assert output["kind"] == "file", output
    assert "hello from ['two words', '6']" in output["data"] and "bye" in output["data"]
    modeldir = client.artifact(key, "modeldir")
    assert modeldir == {"kind": "folder", "names": ["weights.txt"]}
    metrics = client.artifact(key, "_metrics")
    assert metrics["kind"] == "file" and metrics["data"].startswith("time: "), metrics

    [document] = scrape_documents(client.moto, client.config["storage"]["bucket"], key)
    assert document["runner"]["studio_record"]["state"] == "ok"
    assert document["loss"] == 0.25 and document["studioml"]["status"] == "completed"


def clientscript(client: StudioClient, name: str, body: str) -> Path:
    """A CompletionService client script whose ``clientFunction`` runs ``body``."""
    path = client.home / name
    path.write_text("def clientFunction(args, files):\n"
                    "    print('task', args, flush=True)\n" + textwrap.indent(body, "    "))
    return path


def test_completion_service_fan_out_of_ten_returns_ten_results(studio, stem):
    client, runner = studio
    runner.options["executors"] = 4
    runner.start()
    # The task lasts 2 s: 0.0.49's getResultsWithTimeout takes a result only when the
    # retval file is newer than the moment submitTask returned (about a second after it
    # published), so a task finished within that second is never collected by the client
    # (docs/studioml-client.md, "Known limits of the client").
    script = clientscript(client, "square.py", "import time\ntime.sleep(2)\n"
                                               "return {'n': args, 'square': args * args}\n")
    found = client.completion_service(stem + "q", script, list(range(10)))
    assert len(found["submitted"]) == 10
    by_n = {value["n"]: value["square"] for value in found["results"].values()}
    assert by_n == {n: n * n for n in range(10)}, found
    assert set(found["results"]) == set(found["submitted"])
    for key in found["submitted"]:
        record = client.experiment(key)
        assert record["status"] == "finished" and record["time_finished"], (key, record)


def test_a_failed_completion_service_task_is_finished_with_its_output(studio, stem):
    client, runner = studio
    runner.options["max-attempts"] = 1
    runner.start()
    script = clientscript(client, "fails.py", "raise RuntimeError('this task fails on purpose')\n")
    found = client.completion_service(stem + "q", script, ["fail"], timeout=20)
    [key] = found["submitted"]
    assert found["results"] == {}
    record = wait_status(client, key, ("finished",), runner, timeout=300)
    assert record["time_finished"] >= record["time_started"]
    output = client.artifact(key, "output")
    assert output["kind"] == "file"
    assert "this task fails on purpose" in output["data"], output


def test_a_stop_from_the_client_stops_the_run_and_acks_it_cancelled(studio, stem, broker):
    client, runner = studio
    runner.start()
    key = f"interop-{uuid.uuid4().hex[:8]}"
    ws = workspace(client.home, {"long.py": """
        import time
        print("started", flush=True)
        for _ in range(600):
            time.sleep(0.5)
        print("ran to its end", flush=True)
    """})
    client.run(ws, "long.py", queue=stem + "q", key=key)
    wait_status(client, key, ("running",), runner)
    runner.wait_for(lambda: [j for j in runner.status()["attempts"] if j["phase"] == "running"],
                    timeout=ENVIRONMENT_TIMEOUT, what="the run to start")
    client.stop(key)
    assert client.experiment(key)["status"] in ("stopped", "finished")  # the runner is quick

    record = wait_status(client, key, ("finished",), runner, timeout=120)
    assert record["time_finished"] >= record["time_started"]
    broker.wait_counts(stem + "q", ready=0, unacked=0)  # acked, not requeued
    [document] = scrape_documents(client.moto, client.config["storage"]["bucket"], key)
    assert document["studioml"]["status"] == "cancelled"
    assert document["runner"]["error"] == "ClientStopped"
    output = client.artifact(key, "output")
    assert "started" in output["data"] and "ran to its end" not in output["data"]


def envelope_keys(root: Path, stem: str) -> dict:
    """Keys as the go runner's operators make them: the runner's RSA key (PEM, passphrase
    apart) and the experimenter's ed25519 signing key registered for the queue prefix."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    runner_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signing = ed25519.Ed25519PrivateKey.generate()
    paths = {name: root / name for name in ("encryption", "passphrase", "signing", "client")}
    for path in paths.values():
        path.mkdir(parents=True)
    (paths["passphrase"] / "ssh-passphrase").write_text("PassPhrase\n")
    (paths["encryption"] / "ssh-privatekey").write_bytes(runner_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"PassPhrase")))
    (paths["client"] / "runner.pub.pem").write_bytes(runner_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    (paths["client"] / "signing").write_bytes(signing.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (paths["signing"] / stem).write_bytes(signing.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" tester\n")
    return paths


def test_a_signed_envelope_from_the_client_runs_and_a_tampered_one_is_dead_lettered(
        moto, broker, stem, runners):
    root = short_tempdir()
    keys = envelope_keys(root / "keys", stem)
    meta, artifacts = moto.create_bucket(), moto.create_bucket()
    config = client_config(moto, broker, meta, artifacts,
                           public_key_path=str(keys["client"] / "runner.pub.pem"),
                           signing_key_path=str(keys["client"] / "signing"))
    client = StudioClient(root / "client", config)
    client.moto = moto
    runner = interop_runner(root / "runner", broker, stem, encrypt_key_dir=keys["encryption"],
                            encrypt_passphrase_dir=keys["passphrase"],
                            signing_keys_dir=keys["signing"])
    runners.append(runner)
    runner.start()

    key = f"interop-{uuid.uuid4().hex[:8]}"
    ws = workspace(client.home, {"secret.py": "print('ran from an envelope', flush=True)\n"})
    client.run(ws, "secret.py", queue=stem + "q", key=key)  # studio-run encrypts and signs
    record = wait_status(client, key, ("finished",), runner)
    assert record["time_finished"]
    assert "ran from an envelope" in client.artifact(key, "output")["data"]

    tampered = client.envelope(f"interop-{uuid.uuid4().hex[:8]}")
    assert tampered["message"]["signature"] and tampered["message"]["payload"].count(",") == 1
    session, data = tampered["message"]["payload"].split(",")
    flipped = "A" if data[10] != "A" else "B"
    tampered["message"]["payload"] = f"{session},{data[:10]}{flipped}{data[11:]}"
    broker.publish(runner.queue, tampered)
    runner.wait_for(lambda: broker.ready(runner.queue + "_dead") == 1, what="a dead letter",
                    timeout=60)
    props, _body = broker.get(runner.queue + "_dead")
    assert "signature does not verify" in props.headers["x-studioml-dead-reason"]
