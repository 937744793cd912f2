// Publish one email job and wait for its receipt, from Node.js (npm install amqplib).
// Prints "<outcome> <job id>" once the job is settled for good; exits 1 after 30 s without that.
const amqp = require("amqplib");
const { randomUUID } = require("node:crypto");

async function main() {
  const connection = await amqp.connect(process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f");
  const channel = await connection.createConfirmChannel();
  channel.on("return", () => { console.error("unroutable: is amqp-mailer's queue declared?"); process.exit(1); });
  // The receipts come to a queue of our own: named by the server, gone when we disconnect.
  const { queue } = await channel.assertQueue("", { exclusive: true });
  const job = { id: "shipped-8", to: "dan@example.com", subject: "Your order has shipped",
                text: "Order 8 is on its way." };
  const correlationId = randomUUID(); // the receipts carry it: they are for this job
  const receipt = new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(`no final receipt for ${job.id} within 30 s`)), 30_000).unref();
    channel.consume(queue, (message) => {
      if (!message || message.properties.correlationId !== correlationId) return;
      const r = JSON.parse(message.content.toString());
      // deferred and ambiguous are tried again, as is a deferred recipient: another receipt follows.
      if (["deferred", "ambiguous"].includes(r.outcome) || r.recipients.some((x) => x.status === "deferred")) return;
      resolve(r);
    }, { noAck: true }).catch(reject);
  });
  channel.publish(
    process.env.AMQP_EXCHANGE || "email",
    process.env.AMQP_ROUTING_KEY || "email.send",
    Buffer.from(JSON.stringify(job)),
    { contentType: "application/json", persistent: true, mandatory: true, messageId: job.id,
      correlationId, replyTo: queue }, // each receipt of the job also goes to replyTo
  );
  await channel.waitForConfirms();
  const { outcome, job_id } = await receipt;
  console.log(`${outcome} ${job_id}`);
  await connection.close();
}

main().catch((err) => { console.error(err.message || err); process.exit(1); });
