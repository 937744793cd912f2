<?php
// Publish one email job and wait for its receipt, from PHP (composer require php-amqplib/php-amqplib).
// Prints "<outcome> <job id>" once the job is settled for good; exits 1 after 30 s without that.
require_once getenv('AMQPLIB_AUTOLOAD') ?: __DIR__ . '/vendor/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Exception\AMQPTimeoutException;
use PhpAmqpLib\Message\AMQPMessage;

$url = parse_url(getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$connection = new AMQPStreamConnection($url['host'], $url['port'] ?? 5672, $url['user'], $url['pass'],
    urldecode(ltrim($url['path'] ?? '/%2f', '/')) ?: '/');
$channel = $connection->channel();
$channel->confirm_select();
$channel->set_return_listener(function () { fwrite(STDERR, "unroutable: is amqp-mailer's queue declared?\n"); exit(1); });
// The receipts come to a queue of our own: named by the server, gone when we disconnect.
[$queue] = $channel->queue_declare('', false, false, true);

$job = ['id' => 'shipped-9', 'to' => 'erin@example.com', 'subject' => 'Your order has shipped',
        'text' => 'Order 9 is on its way.'];
$correlationId = bin2hex(random_bytes(16)); // the receipts carry it: they are for this job
$receipt = null;
$channel->basic_consume($queue, '', false, true, false, false, function (AMQPMessage $message) use ($correlationId, &$receipt) {
    if (($message->get_properties()['correlation_id'] ?? null) !== $correlationId) return;
    $r = json_decode($message->getBody(), true);
    // deferred and ambiguous are tried again, as is a deferred recipient: another receipt follows.
    if (in_array($r['outcome'], ['deferred', 'ambiguous'], true)
        || in_array('deferred', array_column($r['recipients'], 'status'), true)) return;
    $receipt = $r;
});
$channel->basic_publish(new AMQPMessage(json_encode($job), [
    'content_type' => 'application/json',
    'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
    'message_id' => $job['id'],
    'correlation_id' => $correlationId,
    'reply_to' => $queue, // each receipt of the job also goes here
]), getenv('AMQP_EXCHANGE') ?: 'email', getenv('AMQP_ROUTING_KEY') ?: 'email.send', true);
$channel->wait_for_pending_acks_returns(5.0);

$deadline = microtime(true) + 30;
while ($receipt === null) {
    if (($left = $deadline - microtime(true)) <= 0) { fwrite(STDERR, "no final receipt for {$job['id']} within 30 s\n"); exit(1); }
    try { $channel->wait(null, false, $left); } catch (AMQPTimeoutException $e) {}
}
echo $receipt['outcome'], ' ', $receipt['job_id'], "\n";
$channel->close();
$connection->close();
