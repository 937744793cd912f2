# Publish one email job and wait for its receipt, from Python (pip install pika).
# Prints "<outcome> <job id>" once the job is settled for good; exits 1 after 30 s without that.
import json, os, sys, time, uuid, pika

params = pika.URLParameters(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
with pika.BlockingConnection(params) as connection:
    channel = connection.channel()
    channel.confirm_delivery()
    # The receipts come to a queue of our own: named by the server, gone when we disconnect.
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    job = {"id": "shipped-7", "to": "carol@example.com", "subject": "Your order has shipped",
           "text": "Order 7 is on its way."}
    correlation_id = uuid.uuid4().hex  # the receipts carry it: they are for this job
    channel.basic_publish(
        exchange=os.environ.get("AMQP_EXCHANGE", "email"),
        routing_key=os.environ.get("AMQP_ROUTING_KEY", "email.send"),
        body=json.dumps(job).encode("utf-8"),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=job["id"],
            correlation_id=correlation_id,
            reply_to=queue,  # each receipt of the job also goes here
        ),
        mandatory=True,
    )
    deadline = time.monotonic() + 30
    for method, properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1):
        if time.monotonic() > deadline:
            sys.exit(f"no final receipt for {job['id']} within 30 s")
        if method is None or properties.correlation_id != correlation_id:
            continue
        receipt = json.loads(body)
        # deferred and ambiguous are tried again, as is a deferred recipient: another receipt follows.
        if receipt["outcome"] in ("deferred", "ambiguous") or any(
                r["status"] == "deferred" for r in receipt["recipients"]):
            continue
        print(receipt["outcome"], receipt["job_id"])
        break
