"""The fleet's MQTT connection: where the broker is and how to log in (``Broker``), and one connection that
says clearly why it cannot connect and re-subscribes after every reconnect (``Link``)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ...errors import UserError

log = logging.getLogger(__name__)

QOS = 1
KEEPALIVE_S = 10  # the broker declares a silent node dead (and publishes its Last Will) after 1.5x this


@dataclass(frozen=True)
class Broker:
    """Where the broker is and how to log in (``mqtt://`` plain, ``mqtts://`` TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def parse(
        cls,
        url: str,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> Broker:
        hint = "use mqtt://HOST:PORT (or mqtts://HOST:PORT for TLS)"
        try:
            u = urlsplit(url)
            port = u.port
        except ValueError as e:
            raise UserError(f"bad broker URL {url!r} ({e}): {hint}") from None
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname or u.path not in ("", "/") or u.query:
            raise UserError(f"bad broker URL {url!r}: {hint}")
        for name, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path and not Path(path).is_file():
                raise UserError(f"{name}: no such file '{path}'")
        if tls_key and not tls_cert:
            raise UserError("--tls-key needs --tls-cert (the client certificate it belongs to)")
        tls = u.scheme == "mqtts" or bool(tls_ca or tls_cert)
        return cls(
            u.hostname,
            port or (8883 if tls else 1883),
            tls,
            username if username is not None else (unquote(u.username) if u.username else None),
            password if password is not None else (unquote(u.password) if u.password else None),
            tls_ca,
            tls_cert,
            tls_key,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def cli_args(self) -> tuple[list[str], dict[str, str]]:
        """Command-line options and environment (the password stays out of argv) that reach this broker."""
        args, env = ["--broker", self.url], {}
        if self.username is not None:
            args += ["--username", self.username]
        if self.password is not None:
            env["PRUNE2EDGE_MQTT_PASSWORD"] = self.password
        for opt, value in (("--tls-ca", self.ca), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            if value:
                args += [opt, value]
        return args, env


class Link:
    """One MQTT connection: connects or says clearly why not, then re-subscribes and re-announces itself
    (``birth``) after every reconnect; ``will`` is published by the broker if the process dies."""

    def __init__(
        self,
        broker: Broker,
        client_id: str,
        subscriptions: list[str],
        on_message,
        will: tuple[str, bytes] | None = None,
        birth=None,
        clean_session: bool = True,
        on_connect=None,
    ):
        self.broker, self.subscriptions, self.birth, self.on_message = broker, subscriptions, birth, on_message
        self.on_connect = on_connect  # called with reconnected=True/False after each successful connect
        self.client = c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311
        )
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls:
            try:
                c.tls_set(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key)
            except (OSError, ValueError) as e:
                raise UserError(
                    f"cannot set up TLS for {broker.url} ({e}); check --tls-ca/--tls-cert/--tls-key"
                ) from None
        if will:
            self.will(*will)
        c.reconnect_delay_set(min_delay=0.1, max_delay=1)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._dispatch
        self.connected = threading.Event()
        self.ever_connected = False
        self._refused: str | None = None
        self._closed: str | None = None  # the broker hung up before accepting us

    def will(self, topic: str, payload: bytes) -> None:
        """Set the message the broker publishes (retained) if this connection dies; before :meth:`start`."""
        self.client.will_set(topic, payload, qos=QOS, retain=True)

    def start(self, timeout_s: float = 10.0) -> Link:
        url = self.broker.url
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        except ssl.SSLError as e:
            raise UserError(
                f"TLS with the MQTT broker at {url} failed ({e.reason or e}); --tls-ca must be the CA that "
                "signed the broker's certificate, which must name the host in the URL"
            ) from None
        except OSError as e:
            raise UserError(
                f"cannot reach the MQTT broker at {url} ({e.strerror or e}); is it running? "
                "(`prune2edge fleet` starts a private one)"
            ) from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self.connected.wait(0.05):
            if self._refused or self._closed or time.monotonic() > deadline:
                self.client.loop_stop()
                self.client.disconnect()
                if self._refused:
                    hint = (
                        "; check --username/--password"
                        if "authori" in self._refused.lower() or "password" in self._refused.lower()
                        else ""
                    )
                    raise UserError(f"the MQTT broker at {url} refused the connection: {self._refused}{hint}")
                if self._closed:
                    hint = (
                        "does it want a client certificate (--tls-cert/--tls-key), or is the port not TLS?"
                        if self.broker.tls
                        else "is it a TLS port? then use mqtts://HOST:PORT and --tls-ca"
                    )
                    raise UserError(f"the MQTT broker at {url} closed the connection before accepting it; {hint}")
                raise UserError(
                    f"no answer from an MQTT broker at {url} within {timeout_s:.0f} s "
                    "(wrong port, or TLS on one side only?)"
                )
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=QOS, retain=retain)

    def stop(self, last_words: tuple[str, bytes] | None = None) -> None:
        """Say goodbye (retained, e.g. an ``offline`` status) if connected, then disconnect."""
        if last_words and self.connected.is_set():
            info = self.publish(*last_words, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            if self.ever_connected:  # at start, start() says it
                log.warning("broker %s refused the connection: %s", self.broker.url, reason_code)
            return
        if self.ever_connected:
            log.info("reconnected to %s", self.broker.url)
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small messages must not wait for Nagle's algorithm (+ delayed ACKs: ~40 ms per hop)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)
        if self.birth:
            client.publish(*self.birth(), qos=QOS, retain=True)
        reconnected, self.ever_connected = self.ever_connected, True
        self.connected.set()
        if self.on_connect:
            self.on_connect(reconnected)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.ever_connected and not self._refused:
            self._closed = str(reason_code)
        if self.connected.is_set() and reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting", self.broker.url, reason_code)
        self.connected.clear()

    def _dispatch(self, client, userdata, msg) -> None:
        try:
            self.on_message(msg.topic, msg.payload)
        except Exception:  # a bug in one handler must not kill the network thread
            log.exception("error handling a message on %s", msg.topic)


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so ``serve`` loops can shut down cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
