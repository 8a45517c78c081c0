"""Run a bundle on a fleet of edge devices over MQTT: one node per member, an aggregator, clients.

Needs only numpy, onnxruntime, paho-mqtt and cryptography (no torch, no scikit-learn), so a node can run on a
small device. The broker is a real MQTT broker (Eclipse Mosquitto); nothing here is a broker.

    wire        topic names, payloads (encode, decode, validate), BadMessage
    mqtt        Broker (URL, login, TLS) and Link, one MQTT connection that survives reconnects
    node        Node: one bundle member; frames in, votes out
    aggregator  Aggregator: votes in, decisions out
    client      classify: frames out, decisions in
    local       a whole fleet on this machine: a private Mosquitto, one process per member, an aggregator
    trust       ed25519 keys (PEM) and signed messages
    release     publish a version over the broker (signed release + chunked members); signed operator commands
    slots       a deployed node's own directory: two versions side by side, written atomically
    deployed    DeployedNode: starts empty, fetches its member of each signed release, swaps between frames
    rollout     DeployedAggregator: a new version votes in shadow, then is promoted or rolled back
"""

from .aggregator import Aggregator
from .client import classify
from .deployed import DeployedNode
from .local import LocalFleet, Mosquitto, find_mosquitto, free_port
from .mqtt import Broker, Link, stop_on_signals
from .node import Node, member_on
from .rollout import DeployedAggregator
from .wire import BadMessage, Topics, decode_frame, dumps, encode_frame, frame_limit, parse, resend_after

__all__ = [
    "Aggregator",
    "BadMessage",
    "Broker",
    "DeployedAggregator",
    "DeployedNode",
    "Link",
    "LocalFleet",
    "Mosquitto",
    "Node",
    "Topics",
    "classify",
    "decode_frame",
    "dumps",
    "encode_frame",
    "find_mosquitto",
    "frame_limit",
    "free_port",
    "member_on",
    "parse",
    "resend_after",
    "stop_on_signals",
]
