"""A device driven by paho-mqtt (PyPI), for tests/mqtt_clients.rs.

Usage: paho_device.py HOST PORT DEVICE TOKEN MODE [N] [BASE_TS_MS]

Prints one JSON object per line on stdout, then exits 0; anything unexpected exits 1.
Modes:
  device            subscribe to the own command topic, publish N QoS 1 readings
                    (metric "v" = i at ts = BASE_TS_MS + i), print {"ready": ...},
                    wait for one command and print {"command": payload}, disconnect.
  foreign_subscribe subscribe to another device's command topic: the gateway closes
                    the connection; print {"disconnected": true}.
  wildcard          the same with the filter "devices/+/commands".
  retained          publish a retained QoS 1 message: closed; {"disconnected": true}.
  bad_password      connect with a wrong password: print {"connack": reason}.
"""

import json
import sys
import threading

import paho.mqtt.client as mqtt

host, port, device, token, mode = sys.argv[1:6]
n = int(sys.argv[6]) if len(sys.argv) > 6 else 0
base = int(sys.argv[7]) if len(sys.argv) > 7 else 0
TIMEOUT = 15

connected = threading.Event()
subscribed = threading.Event()
disconnected = threading.Event()
command = threading.Event()
state = {}


def say(obj):
    print(json.dumps(obj), flush=True)


def on_connect(client, userdata, flags, reason_code, properties):
    state["connack"] = str(reason_code)
    state["failed"] = reason_code.is_failure
    connected.set()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    state["suback"] = [rc.value for rc in reason_codes]
    subscribed.set()


def on_message(client, userdata, message):
    state["command"] = message.payload.decode()
    state["command_topic"] = message.topic
    command.set()


def on_disconnect(client, userdata, flags, reason_code, properties):
    disconnected.set()


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=device,
    protocol=mqtt.MQTTv311,
    clean_session=True,
)
password = token if mode != "bad_password" else token + "-wrong"
client.username_pw_set(device, password)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.on_disconnect = on_disconnect
# Never reconnect on its own: every refusal must stay visible.
client.reconnect_delay_set(min_delay=60, max_delay=60)
client.connect(host, int(port), keepalive=30)
client.loop_start()
if not connected.wait(TIMEOUT):
    sys.exit("no CONNACK")

if mode == "bad_password":
    say({"connack": state["connack"], "failed": state["failed"]})
    client.loop_stop()
    sys.exit(0)
if state["failed"]:
    sys.exit("refused: " + state["connack"])

if mode == "device":
    client.subscribe(f"devices/{device}/commands", qos=1)
    if not subscribed.wait(TIMEOUT):
        sys.exit("no SUBACK")
    for i in range(n):
        body = json.dumps({"ts": base + i, "values": {"v": i}})
        info = client.publish(f"devices/{device}/telemetry", body, qos=1)
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            sys.exit(f"publish {i} not acknowledged")
    say({"ready": True, "suback": state["suback"], "published": n})
    if not command.wait(TIMEOUT):
        sys.exit("no command")
    say({"command": state["command"], "topic": state["command_topic"]})
    client.disconnect()
elif mode in ("foreign_subscribe", "wildcard"):
    flt = "devices/other/commands" if mode == "foreign_subscribe" else "devices/+/commands"
    client.subscribe(flt, qos=1)
    if not disconnected.wait(TIMEOUT):
        sys.exit("still connected")
    say({"disconnected": True, "suback": "suback" in state})
elif mode == "retained":
    client.publish(f"devices/{device}/telemetry", '{"v": 1}', qos=1, retain=True)
    if not disconnected.wait(TIMEOUT):
        sys.exit("still connected")
    say({"disconnected": True})
else:
    sys.exit("unknown mode " + mode)
client.loop_stop()
