"""The int8 ONNX models prune2edge writes: standard ONNX in QDQ form. Needs only numpy and onnx.

Each int8 weight is an int8 initializer read by a ``DequantizeLinear`` (per output channel, symmetric); each
activation passes through ``QuantizeLinear`` / ``DequantizeLinear`` (uint8); the convolutions, pooling and dense
layers between them are plain ONNX operators. Every operator is of the default ONNX domain, so ONNX Runtime (which
fuses each pattern into its int8 kernels), OpenVINO and the ONNX reference evaluator all run the same file.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx

OPSET = 21  # per-channel DequantizeLinear needs >= 13; the ONNX reference evaluator runs it from 19
STANDARD_DOMAINS = ("", "ai.onnx")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FORMAT = "onnx-qdq"


class Layer(NamedTuple):
    """A Conv or Gemm node with the DequantizeLinear nodes of its int8 weight and (if any) its int32 bias."""

    node: onnx.NodeProto
    weight: onnx.NodeProto
    bias: onnx.NodeProto | None


def _int8_initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}


def layers(model: onnx.ModelProto) -> list[Layer]:
    """The Conv and Gemm nodes whose weight is an int8 initializer behind a DequantizeLinear, in graph order."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    int8 = _int8_initializers(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in made_by:
            continue
        weight = made_by[node.input[1]]
        if weight.op_type == "DequantizeLinear" and weight.input[0] in int8:
            bias = made_by.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            out.append(Layer(node, weight, bias))
    return out


def int8_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The int8 weight initializers of the model's Conv and Gemm layers, in file order."""
    names = {layer.weight.input[0] for layer in layers(model)}
    return [t for t in model.graph.initializer if t.name in names and t.raw_data]


def full_integer(model: onnx.ModelProto) -> bool:
    """Whether every operator but QuantizeLinear / DequantizeLinear reads its tensors from DequantizeLinear (or
    constants) and hands them to QuantizeLinear, and some weight is int8: what a runtime runs in integer kernels."""
    nodes = model.graph.node
    dequantised = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    dequantised |= {t.name for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT}
    quantised = {n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    compute = [n for n in nodes if n.op_type not in QDQ_OPS]
    return bool(layers(model)) and all(
        all(i in dequantised for i in n.input if i) and all(o in quantised for o in n.output) for n in compute
    )


def describe(model: onnx.ModelProto) -> dict:
    """What a device needs to run the model: its format, opset of the default domain and operator domains."""
    return {
        "format": FORMAT,
        "opset": next(o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS),
        "domains": sorted({n.domain or "ai.onnx" for n in model.graph.node}),
    }
