"""The aggregator of a deployed fleet: it takes its versions from signed releases, votes a new version in shadow
beside the serving one, promotes it or rolls it back with the reason, and counts only the votes that come from
the device a version assigns the member to (docs/fleet.md, Deploy and Rollout states)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError
from .aggregator import Aggregator, Plan, _Frame
from .mqtt import Broker
from .release import open_release
from .slots import Slots
from .trust import load_trusted, unseal
from .wire import DEFAULT_TIMEOUT_MS, BadMessage, Topics, dumps, parse

log = logging.getLogger(__name__)

SHADOW_FRAMES = 200  # frames compared before a version in shadow is judged
MIN_AGREEMENT = 0.9  # share of those frames on which it must decide as the serving version does


@dataclass
class Tally:
    """How a version in shadow compares with the serving one, frame by frame."""

    frames: int = 0  # frames both decided (or sent to review)
    agree: int = 0  # of those, frames with the same outcome
    silent: int = 0  # frames the shadow version could not decide (too few of its votes came)
    labelled: int = 0  # frames with a true label
    serving_right: int = 0
    shadow_right: int = 0

    def add(self, served: dict, shadowed: dict, label: int | None) -> None:
        if shadowed["status"] == "undecided" or served["status"] == "undecided":
            self.silent += shadowed["status"] == "undecided"
            return
        self.frames += 1
        self.agree += served["class"] == shadowed["class"]
        if label is not None:
            self.labelled += 1
            self.serving_right += served["class"] == label
            self.shadow_right += shadowed["class"] == label

    def verdict(self, frames: int, min_agreement: float) -> tuple[bool, str] | None:
        """(promote?, why) once ``frames`` frames are compared (or as many went undecided in shadow), else None."""
        if self.silent >= frames:
            return False, f"its votes did not decide {self.silent} frames (nodes without its member?)"
        if self.frames < frames:
            return None
        agreement = self.agree / self.frames
        why = f"agreement {agreement:.3f} with the serving version on {self.frames} frames"
        if agreement < min_agreement:
            return False, f"{why} is below {min_agreement}"
        if self.labelled and self.shadow_right < self.serving_right:
            return False, (
                f"accuracy {self.shadow_right / self.labelled:.4f} on {self.labelled} labelled frames is below the "
                f"serving version's {self.serving_right / self.labelled:.4f}"
            )
        acc = f", accuracy {self.shadow_right / self.labelled:.4f}" if self.labelled else ""
        return True, why + acc


class DeployedAggregator(Aggregator):
    """An aggregator that starts with no bundle and serves the versions the fleet's signed releases bring."""

    def __init__(
        self,
        broker: Broker,
        fleet: str,
        trust: list[Path | str],
        store: Path | str,
        quorum: int | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        abstain_below: float | None = None,
        shadow_frames: int = SHADOW_FRAMES,
        min_agreement: float = MIN_AGREEMENT,
    ):
        if shadow_frames < 1 or not 0 <= min_agreement <= 1:
            raise UserError("--shadow-frames must be at least 1 and --min-agreement between 0 and 1")
        t = Topics(fleet)
        self._setup(broker, fleet, timeout_ms, [t.device_votes(), t.release, t.control])
        self.trusted = load_trusted(trust)
        self.store = Slots(store, self.trusted)
        self.quorum_arg, self.abstain_arg = quorum, abstain_below
        self.shadow_frames, self.min_agreement = shadow_frames, min_agreement
        self.nodes: dict[str, dict] = {}  # device -> its last status
        self.tally = Tally()
        self.switching: tuple[Plan, str, str] | None = None  # a switch waiting for the nodes to run its version
        self.shadowing: OrderedDict[str, tuple[_Frame, dict]] = OrderedDict()  # decided, waiting for shadow votes
        self.state: dict = {"state": "empty", "serving": None, "shadow": None, "previous": None, "run": []}
        self._restore()

    # -- versions

    def _plan(self, body: dict, slot: Path) -> Plan:
        return Plan.of(
            body["manifest"], slot, self.quorum_arg, self.abstain_arg, body["version"], body.get("assign", {})
        )

    def _restore(self) -> None:
        """Pick up the versions and the rollout state this aggregator kept before it stopped."""
        kept = self.store.read()
        saved = self.store.state.get("rollout") or {}
        for key in ("serving", "shadow", "previous", "target"):
            if saved.get(key) in kept:
                body, slot = kept[saved[key]]
                self.plans[body["version"]] = self._plan(body, slot)
        self.plan, self.shadow = self.plans.get(saved.get("serving")), self.plans.get(saved.get("shadow"))
        if self.plan:
            self.state = saved
        if self.plan and saved.get("state") == "switching" and saved.get("target") in self.plans:
            self.switching = self.plans[saved["target"]], "switched", saved.get("reason", "")

    def info(self) -> dict:
        """The base's, plus the version served and the devices whose nodes serve it (they report by device)."""
        p = self.plan
        return super().info() | ({"version": p.version, "devices": sorted(p.devices)} if p else {})

    def _on_release(self, payload: bytes) -> None:
        body = open_release(self.trusted, payload, self.topics.fleet)
        version = body["version"]
        if version in self.plans or version == self.state.get("rejected"):
            return
        if not self.store.allows(version):
            raise BadMessage(
                f"release {version} refused: a downgrade (the fleet has run version {self.store.state['highest']})"
            )
        try:
            plan = self._plan(body, self.store.write(body, payload))
        except (UserError, KeyError, TypeError) as e:
            raise BadMessage(f"release {version} refused: {e}") from None
        self.store.ran(version)
        self.plans[version] = plan
        if self.plan is None:
            self._switch(plan, "serving", "the fleet's first version")
        else:
            self._start_shadow(plan)

    def _start_shadow(self, plan: Plan) -> None:
        if self.shadow:
            self.plans.pop(self.shadow.version, None)
        self.shadow, self.tally = plan, Tally()
        self._set_state(
            "shadow",
            f"version {plan.version} votes in shadow",
            shadow=plan.version,
            run=[self.plan.version, plan.version],
        )

    def _switch(self, plan: Plan, event: str, reason: str) -> None:
        """Serve ``plan`` from the next frame on, once every online node it assigns a member runs it (until then the
        state is ``switching``: the nodes load it and vote with both); the serving version becomes the previous."""
        if self.plan and plan is not self.plan and not self._ready(plan):
            self.switching = plan, event, reason
            run = [self.plan.version, plan.version]
            self._set_state("switching", f"to version {plan.version} ({reason})", target=plan.version, run=run)
            return
        self.switching = None
        previous = self.plan.version if self.plan and self.plan is not plan else self.state.get("previous")
        self.plan, self.shadow = plan, None
        self.plans = {v: p for v, p in self.plans.items() if v in (plan.version, previous)}
        run = [plan.version]
        self._set_state(event, reason, serving=plan.version, shadow=None, previous=previous, target=None, run=run)
        self.link.publish(self.topics.aggregator, self.status("online"), retain=True)
        self._relive()

    def _ready(self, plan: Plan) -> bool:
        """Whether every online node that ``plan`` assigns a member votes with it."""
        return all(
            plan.version in msg.get("running", [])
            for device, msg in self.nodes.items()
            if msg.get("state") == "online" and device in plan.devices
        )

    def _reject(self, reason: str) -> None:
        version = self.shadow.version
        self.plans.pop(version, None)
        self.shadow = None
        self._set_state("rolled back", reason, shadow=None, run=[self.plan.version], rejected=version)

    def _set_state(self, event: str, reason: str, **changes) -> None:
        self.shadowing.clear()  # frames compared with a version no longer in shadow
        self.state |= changes | {"state": event, "reason": reason, "at": time.time(), "tally": asdict(self.tally)}
        self.state["highest"] = self.store.state["highest"]
        self.store.state["rollout"] = self.state
        self.store.save()
        for v in {int(p.name[1:]) for p in self.store.root.glob("v*")} - set(self.plans):
            self.store.remove(v)
        log.info("rollout: %s (%s); serving %s, shadow %s", event, reason, self.state["serving"], self.state["shadow"])
        self.link.publish(self.topics.rollout, dumps(self.state), retain=True)

    # -- operators' signed commands

    def _on_control(self, payload: bytes) -> None:
        body = unseal(self.trusted, payload)
        kind, version = body.get("kind"), body.get("version")
        if body.get("fleet") != self.topics.fleet or body.get("nonce") in self.store.state.get("commands", []):
            return  # another fleet's, or one applied before (the command is retained)
        self.store.state["commands"] = [*self.store.state.get("commands", [])[-99:], body.get("nonce")]
        self.store.save()
        if kind == "promote" and self.shadow and version == self.shadow.version:
            self._switch(self.shadow, "promoted", "promoted by a signed command")
        elif kind == "rollback" and self.shadow and version == self.plan.version:
            self._reject(f"version {self.shadow.version} rolled back by a signed command")
        elif kind == "rollback" and version == self.state.get("previous") and version in self.plans:
            self.store.allow_rollback(version)
            self._switch(self.plans[version], "rolled back", f"back to version {version} by a signed command")
        else:
            raise BadMessage(
                f"{kind} of version {version} refused: the fleet serves {self.state['serving']} (shadow "
                f"{self.state['shadow']}, previous {self.state['previous']})"
            )

    # -- messages

    def _dispatch(self, topic: str, payload: bytes) -> None:
        t = self.topics
        try:
            if topic == t.release:
                self._on_release(payload)
            elif topic == t.control:
                self._on_control(payload)
            else:
                super()._dispatch(topic, payload)
        except BadMessage as e:
            log.warning("%s", e)
            self.link.publish(t.errors, dumps({"source": "aggregator", "error": str(e), "at": time.time()}))

    def _check_vote(self, plan: Plan, topic: str, msg: dict, fid: str) -> tuple:
        """As the base class, and the vote must come on the topic of the device ``plan`` gives its member: the
        broker's ACL lets each device write only its own topic (docs/fleet.md, Trust)."""
        device = topic.rsplit("/", 1)[1]
        if plan.devices.get(device) != msg.get("member"):
            raise BadMessage(
                f"vote for member {msg.get('member')!r} from device '{device}', which version {plan.version} "
                f"assigns {plan.devices.get(device)!r}: refused",
                fid,
            )
        return super()._check_vote(plan, topic, msg, fid)

    def _on_status(self, device: str, payload: bytes) -> None:
        try:
            msg = parse(payload, 64 * 1024) if payload else {"state": "offline"}
        except BadMessage:
            return
        known = self.nodes.get(device)
        if msg.get("state") != "online" and known and msg.get("bdseq") not in (None, known.get("bdseq")):
            return  # the Last Will of an earlier run of that node
        self.nodes[device] = msg
        self._relive()
        if self.switching and self._ready(self.switching[0]):
            self._switch(*self.switching)

    def _relive(self) -> None:
        """Live members: those whose device is online and runs the serving version's model of them."""
        p, live = self.plan, {}
        for device, msg in self.nodes.items() if p else ():
            member = p.devices.get(device)
            model = (msg.get("models") or {}).get(str(p.version)) or {}
            if msg.get("state") == "online" and member and model.get("sha256") == p.sha256[member]:
                live[member] = f"{device}:{msg.get('bdseq')}"
        for member in set(self.live) - set(live):
            self._offline(member)
        for member in set(live) - set(self.live):
            self._online(member, live[member])

    def decided(self, frame: _Frame, result: dict) -> None:
        """Compare the decision with the shadow version's on the same frame, once the shadow votes of the nodes that
        run it are in (or at the frame's timeout); judge the shadow version when due."""
        if self.shadow is None or frame.plan is not self.plan:
            return
        frame.deadline = time.monotonic() + self.timeout_s  # now: how long its shadow votes are waited for
        self.shadowing[result["frame"]] = frame, result
        self._compare_if_ready(result["frame"])

    def late_vote(self, fid: str, plan: Plan, member: str, proba: np.ndarray) -> bool:
        if fid not in self.shadowing or plan is not self.shadow or member in self.shadowing[fid][0].shadow:
            return False
        self.shadowing[fid][0].shadow[member] = proba
        self._compare_if_ready(fid)
        return True

    def tick(self, now: float) -> None:
        while self.shadowing and next(iter(self.shadowing.values()))[0].deadline <= now:
            self._compare(next(iter(self.shadowing)))

    def _compare_if_ready(self, fid: str) -> None:
        p = self.shadow
        running = {
            p.devices[d]
            for d, msg in self.nodes.items()
            if msg.get("state") == "online" and d in p.devices and p.version in msg.get("running", [])
        }
        if running and running <= set(self.shadowing[fid][0].shadow):
            self._compare(fid)

    def _compare(self, fid: str) -> None:
        frame, result = self.shadowing.pop(fid)
        if self.shadow is None:
            return
        self.tally.add(result, self.shadow.outcome(frame.shadow, self.timeout_s), frame.label)
        verdict = self.tally.verdict(self.shadow_frames, self.min_agreement)
        if verdict and verdict[0]:
            self._switch(self.shadow, "promoted", verdict[1])
        elif verdict:
            self._reject(f"version {self.shadow.version}: {verdict[1]}")
