"""Dispatch latency of the SQS and Pub/Sub back ends: message sent -> take() returned it,
with take() called every 50 ms as the fetcher does.  Starts moto_server and the Pub/Sub
emulator on free ports (stopped by PID).  Run: python3 scripts/queue_latency.py"""
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from runner.queues.sqs import SQSQueue  # noqa: E402
from tests.cloud_support import PubSubEmulator, service_account_file  # noqa: E402
from tests.support import MotoServer, short_tempdir  # noqa: E402


def measure(q, queue, send, n=20):
    """Median and largest latency (ms) of ``n`` sends, each after a first demanding take."""
    latencies = []
    q.discover()
    for _ in range(n):
        q.take(queue)  # demand, as the fetcher's tick does
        time.sleep(0.3)
        start = time.monotonic()
        send()
        delivery = None
        while delivery is None:
            delivery = q.take(queue)
            if delivery is None:
                time.sleep(0.05)  # the fetcher's 50 ms tick
        latencies.append(time.monotonic() - start)
        q.ack(delivery)
    return statistics.median(latencies) * 1000, max(latencies) * 1000


def sqs() -> None:
    moto = MotoServer(short_tempdir("moto")).start()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
        client = moto.sqs_client("k")
        url = client.create_queue(QueueName="sqs_lat")["QueueUrl"]
        q = SQSQueue(region="us-east-1", endpoint=moto.endpoint)
        median, worst = measure(q, "sqs_lat",
                                lambda: client.send_message(QueueUrl=url, MessageBody="{}"))
        print(f"sqs receiver thread: median {median:.0f} ms, max {worst:.0f} ms")
        q.close()
        times = []
        for _ in range(50):
            start = time.monotonic()
            client.receive_message(QueueUrl=url, WaitTimeSeconds=0, MaxNumberOfMessages=1)
            times.append(time.monotonic() - start)
        print("one empty WaitTimeSeconds=0 receive inside the loop (moto, loopback): "
              f"median {statistics.median(times) * 1000:.1f} ms")
    finally:
        moto.stop()


def pubsub() -> None:
    emulator = PubSubEmulator().start()
    try:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        from runner.queues.pubsub import PubSubQueue

        root = pathlib.Path(tempfile.mkdtemp())
        service_account_file(root, "plat")
        pub, sub = emulator.clients()
        pub.create_topic(request={"name": "projects/plat/topics/lat1"})
        sub.create_subscription(request={"name": "projects/plat/subscriptions/ps_lat",
                                         "topic": "projects/plat/topics/lat1"})
        q = PubSubQueue([], str(root))
        median, worst = measure(
            q, "ps_lat", lambda: pub.publish("projects/plat/topics/lat1", b"{}").result())
        print(f"pubsub receiver thread: median {median:.0f} ms, max {worst:.0f} ms")
        q.close()
    finally:
        emulator.stop()


if __name__ == "__main__":
    sqs()
    pubsub()
