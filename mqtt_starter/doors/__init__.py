"""The ways in: MQTT (mqtt.py, and the waits it keeps across restarts: mqtt_waits.py) and HTTP
(http.py: health, metrics, Butler's REST start, the status page; http_guard.py against hostile
clients; status_board.py and status_page.html for the page)."""
