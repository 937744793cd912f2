<?php
// Publish one email job to amqp-mailer from PHP (composer require php-amqplib/php-amqplib,
// or Debian's php-amqplib package).
require_once getenv('AMQPLIB_AUTOLOAD') ?: __DIR__ . '/vendor/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

$url = parse_url(getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$connection = new AMQPStreamConnection($url['host'], $url['port'] ?? 5672, $url['user'], $url['pass'],
    urldecode(ltrim($url['path'] ?? '/%2f', '/')) ?: '/');
$channel = $connection->channel();
$channel->confirm_select(); // wait_for_pending_acks() below then throws if the job was refused
$channel->set_return_listener(function () { fwrite(STDERR, "unroutable: is amqp-mailer's queue declared?\n"); exit(1); });

$job = [
    'id' => 'reset-77', // idempotency key: the Message-ID becomes <reset-77@your-domain>
    'to' => 'bob@example.com',
    'subject' => 'Reset your password',
    'text' => "Follow this link to reset your password: https://example.com/reset/77",
];
$message = new AMQPMessage(json_encode($job), [
    'content_type' => 'application/json',
    'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
    'message_id' => $job['id'],
]);
$channel->basic_publish($message, getenv('AMQP_EXCHANGE') ?: 'email', getenv('AMQP_ROUTING_KEY') ?: 'email.send', true);
$channel->wait_for_pending_acks_returns(5.0);
echo $job['id'], "\n";
$channel->close();
$connection->close();
