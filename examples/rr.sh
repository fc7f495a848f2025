#!/usr/bin/env bash
# Start Qlik Sense tasks from a shell with mosquitto_rr (MQTT 5 request/response).
# Usage: examples/rr.sh [host] [port]
set -euo pipefail
host="${1:-localhost}"
port="${2:-1883}"

# By tag; the reply comes back on the response topic given with -e.
mosquitto_rr -h "$host" -p "$port" -V 5 -W 10 \
    -t butler/start/tag/Nightly -e "rr/replies/$$" -m '{"requestId": "shell-1"}'

# A JSON request with several selectors, waiting for the end: two replies arrive on the
# response topic (accepted, then finished); mosquitto_rr shows the first, mosquitto_sub both.
mosquitto_sub -h "$host" -p "$port" -V 5 -t "rr/replies/$$/wait" -C 2 -W 600 &
sleep 0.5
mosquitto_pub -h "$host" -p "$port" -V 5 -q 1 -t butler/start \
    -D PUBLISH response-topic "rr/replies/$$/wait" \
    -D PUBLISH correlation-data "shell-2" \
    -m '{"requestId": "shell-2", "tags": ["Monthly"],
         "customProperties": [{"name": "taskGroup", "value": "tasks2"}], "wait": true}'
wait

# A tag with characters that are special in topics: percent-encode them (%2F is /).
mosquitto_rr -h "$host" -p "$port" -V 5 -W 10 \
    -t 'butler/start/tag/Sales%2FEMEA' -e "rr/replies/$$" -m ''
