"""Dispatch latency of the SQS and Pub/Sub back ends: message sent -> take() returned it,
with take() called every 50 ms as the fetcher does.  Starts moto_server and the Pub/Sub
emulator on free ports (stopped by PID).  Run: python3 scripts/queue_latency.py"""
import time, sys, os, statistics, tempfile, pathlib
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.cloud_support import MotoServer, PubSubEmulator, service_account_file
from runner.queues.sqs import SQSQueue
def measure(q, queue, send, n=20):
    lat=[]
    q.discover()
    for i in range(n):
        q.take(queue)  # demand, as the fetcher's tick does
        time.sleep(0.3)
        t0=time.monotonic(); send()
        d=None
        while d is None:
            d=q.take(queue)
            if d is None: time.sleep(0.05)  # the fetcher's 50 ms tick
        lat.append(time.monotonic()-t0); q.ack(d)
    return statistics.median(lat)*1000, max(lat)*1000
m=MotoServer().start()
try:
    os.environ.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    c=m.client("k"); url=c.create_queue(QueueName="sqs_lat")["QueueUrl"]
    q=SQSQueue(region="us-east-1", endpoint=m.url)
    print("sqs receiver thread: median %.0f ms, max %.0f ms" % measure(q, "sqs_lat", lambda: c.send_message(QueueUrl=url, MessageBody="{}")))
    q.close()
    t=[]
    for _ in range(50):
        t0=time.monotonic(); c.receive_message(QueueUrl=url, WaitTimeSeconds=0, MaxNumberOfMessages=1); t.append(time.monotonic()-t0)
    print("one empty WaitTimeSeconds=0 receive inside the loop (moto, loopback): median %.1f ms" % (statistics.median(t)*1000))
finally:
    m.stop()
e=PubSubEmulator().start()
try:
    os.environ["PUBSUB_EMULATOR_HOST"]=e.host
    from runner.queues.pubsub import PubSubQueue
    root=pathlib.Path(tempfile.mkdtemp()); service_account_file(root,"plat")
    pub,sub=e.clients()
    pub.create_topic(request={"name":"projects/plat/topics/lat1"})
    sub.create_subscription(request={"name":"projects/plat/subscriptions/ps_lat","topic":"projects/plat/topics/lat1"})
    q=PubSubQueue([], str(root))
    print("pubsub receiver thread: median %.0f ms, max %.0f ms" % measure(q, "ps_lat", lambda: pub.publish("projects/plat/topics/lat1", b"{}").result()))
    q.close()
finally:
    e.stop()
