"""The edge runtime: what a device runs, and all that the core install ships besides the command line. A bundle
(:mod:`.bundle`: the manifest and its members, checked by sha256), the vote (:mod:`.vote`), the input steps every
frame takes (:mod:`.preprocess`), the runtimes a member runs on (:mod:`.runtimes`) and their latency
(:mod:`.latency`), and the fleet over MQTT (:mod:`.fleet`: nodes, the aggregator, the client, signed versions).
It imports numpy, onnxruntime, paho-mqtt, cryptography and Pillow, never a training library
(tests/test_house.py checks)."""
