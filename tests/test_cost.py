"""What each shipped model costs a device: multiply-adds from its ONNX graph, session memory, latency."""

import numpy as np
import torch

from prune2edge import cost, models, prune, quantize, store, summary
from prune2edge.runtime.bundle import read_manifest


def test_multiply_adds_from_the_graph_match_the_network_for_every_builtin(tmp_path):
    for arch, shape in (("small_cnn", (3, 16, 16)), ("resnet20", (3, 16, 16)), ("keras_cifar10_cnn", (1, 12, 12))):
        net = models.build(arch, (shape[1], shape[2], shape[0]), 7)
        path = tmp_path / f"{arch}.onnx"
        quantize.export_onnx(net, path, (shape[1], shape[2], shape[0]))
        # the graph's count against forward hooks on the torch network (prune.macs_of): two independent counts
        assert cost.macs(path) == prune.macs_of(net, torch.zeros(1, *shape)) > 0, arch


def test_the_manifest_and_summary_hold_each_members_cost_and_its_ratio_to_the_parent(demo_run):
    manifest = read_manifest(demo_run / "bundle")
    metrics = store.read_json(demo_run / "metrics.json")
    parent = metrics["cost"]["parent_int8"]
    assert parent["macs"] == cost.macs(demo_run / "baseline" / "fp32.onnx") and 0 < parent["memory_mb"] < 1024
    for e in manifest["members"]:
        c = metrics["cost"]["members"][e["id"]]
        assert e["macs"] == c["macs"] == cost.macs(store.model_dir(demo_run, e["id"]) / "fp32.onnx")
        assert c["vs_parent_int8"]["macs"] == 1.0  # unstructured sparsity: the zeros are still multiplied
        assert c["vs_parent_int8"]["latency_ms"] == e["latency_ms"] / manifest["latency"]["baseline_int8_ms"]
        assert 0 < e["memory_mb"] < 1024
    assert "cost per image vs the int8 parent" in summary.table(metrics)


def test_session_memory_grows_with_the_model(tmp_path):
    """A network with 16x the weights needs more session memory (measured in a fresh process each time)."""
    image = np.zeros((3, 8, 8), np.float32)
    mb = {}
    for width in (4, 64):
        net = models.build("small_cnn", (8, 8, 3), 10, width=width)
        path = tmp_path / f"w{width}.onnx"
        quantize.export_onnx(net, path, (8, 8, 3))
        mb[width] = cost.memory(path, image)
    assert mb[64]["session_mb"] > mb[4]["session_mb"] > 0 and mb[64]["process_mb"] > mb[64]["session_mb"]
