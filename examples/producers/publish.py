# Publish one email job to amqp-mailer from Python (pip install pika).
import json, os, pika

params = pika.URLParameters(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
with pika.BlockingConnection(params) as connection:
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish now raises if the broker does not take the job
    job = {
        "id": "welcome-42",  # idempotency key: the Message-ID becomes <welcome-42@your-domain>
        "to": "Ann Example <ann@example.com>",
        "subject": "Welcome, Ann",
        "text": "Hello Ann, thanks for signing up.",
        "html": "<p>Hello Ann, thanks for signing up.</p>",
    }
    channel.basic_publish(
        exchange=os.environ.get("AMQP_EXCHANGE", "email"),
        routing_key=os.environ.get("AMQP_ROUTING_KEY", "email.send"),
        body=json.dumps(job).encode("utf-8"),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=job["id"],
        ),
        mandatory=True,  # an unroutable job raises UnroutableError instead of vanishing
    )
    print(job["id"])
