#!/bin/sh
# Publish one email job to amqp-mailer from a shell script, with the worker's own binary.
# It reads the same configuration as the worker (--config FILE or AMQP_MAILER_* variables),
# waits for the broker's confirm, and prints the job id; exit status 65 means an invalid job.
set -eu
amqp-mailer publish \
  --to "ops@example.com" \
  --subject "Nightly backup finished" \
  --text "The backup finished at $(date -u +%H:%M) UTC." \
  --header "X-Source: backup.sh"
