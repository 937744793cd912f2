// Publish one email job to amqp-mailer from Node.js (npm install amqplib).
const amqp = require("amqplib");

async function main() {
  const connection = await amqp.connect(process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f");
  const channel = await connection.createConfirmChannel();
  channel.on("return", () => { console.error("unroutable: is amqp-mailer's queue declared?"); process.exitCode = 1; });
  const job = {
    id: "invoice-1001", // idempotency key: the Message-ID becomes <invoice-1001@your-domain>
    to: ["billing@example.com"],
    subject: "Invoice 1001",
    text: "Your invoice is attached.",
    attachments: [{ filename: "invoice.txt", content_type: "text/plain",
                    content_base64: Buffer.from("Total: 42 EUR\n").toString("base64") }],
  };
  channel.publish(
    process.env.AMQP_EXCHANGE || "email",
    process.env.AMQP_ROUTING_KEY || "email.send",
    Buffer.from(JSON.stringify(job)),
    { contentType: "application/json", persistent: true, mandatory: true, messageId: job.id },
  );
  await channel.waitForConfirms(); // rejects if the broker did not take the job
  console.log(job.id);
  await connection.close();
}

main().catch((err) => { console.error(err); process.exit(1); });
