"""Train sparse, deploy small: a trained sparse model as a smaller plain PyTorch model.

``export_dense(model, example_inputs)`` returns a ``torch.fx.GraphModule`` made of plain ``torch.nn``
modules and ``torch`` functions only (no layer, op or extension of this package), whose eval-mode outputs
equal the sparse model's (docs/DESIGN.md §2: a pruned row outputs exactly 0, its bias included):

- every pruned row of a ``SparseLinear``/``SparseConv2d`` is removed from the weight;
- a removed row's channel stays *absent* downstream while its value is known: through ReLU, GELU and other
  element-wise activations, dropout (eval), max/avg pooling, flatten/reshape that merges it with the
  trailing axes (each channel becomes its block of columns) and BatchNorm (eval, running statistics: the
  zero becomes the constant ``beta - mean * gamma / sqrt(var + eps)``);
- a Linear or Conv2d that reads an absent channel drops that input column/channel; a non-zero constant is
  folded into its bias (``W[:, j] * c`` summed over the kernel), which is exact for a Linear and for a
  Conv2d without padding; under zero padding the constant does not hold at the borders, so such a
  channel is put back (scattered into the input) and read;
- where a value must exist in full (a residual add with a live tensor, LayerNorm, the attention's head
  view, a model output, any op not listed) the present channels are scattered into a tensor holding the
  absent channels' constants (``torch.index_copy``): exact, and reported;
- a layer whose rows are all pruned keeps one zeroed row, so the tensor that carries the batch shape exists;
  a grouped Conv2d keeps all its rows (pruned ones zeroed) and reads its whole input, so its groups stay equal.

``export_dense_with_report`` also returns an ``ExportReport``: rows and input channels kept, parameters and
FLOPs before and after per layer, and every constant folded or channel put back for exactness.

Why a graph pass of our own and not Torch-Pruning (``torch-pruning==1.6.1``, evaluated on the models of
``spafl_kernels.zoo`` with half of every layer's rows pruned, after turning the sparse layers into
masked dense ``nn.Linear``/``nn.Conv2d``, since it does not know the ``threshold`` parameter and leaves the
modules sparse): its dependency graph removes a channel from every layer *coupled* to it, which is right
for importance pruning but not exact here. LeNet-5 and the MLP came out exact (error 4e-8) once the
output layer was left alone (it removes output logits otherwise); Conv4 was off by 0.45 (it drops the
BatchNorm channel, whose shift is not zero); ResNet-18 by 0.29 (a pruned row before a residual add
removes the live channel of the whole residual stream; 8 of 20 groups refused); the ViT failed (the
head view ``view(b, t, 3, heads, -1)`` breaks once ``to_qkv`` loses rows). Telling which of its
removals are exact would need the value analysis this pass does anyway, so this pass does it all.
"""

from __future__ import annotations

import copy
import inspect
import keyword
import math
import operator
import types
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .modules import SparseLayer

__all__ = ["ExportReport", "LayerExport", "export_dense", "export_dense_with_report", "standalone_source"]


@dataclass
class LayerExport:
    """What the export did to one Linear/Conv2d (FLOPs per sample of the example inputs)."""

    name: str
    kind: str
    rows: int
    rows_kept: int
    inputs: int
    inputs_kept: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    """Per layer rows/inputs kept, parameters and FLOPs before and after; ``kept`` lists everything kept
    for exactness (channels put back, constants folded). ``str()`` is a table, ``to_dict()`` JSON-able."""

    layers: list[LayerExport]
    kept: list[str]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """The table in Markdown, then the notes."""
        head = ["layer", "kind", "rows kept", "inputs kept", "params before", "params after",
                "FLOPs before", "FLOPs after"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in self.layers:
            lines.append(f"| {x.name} | {x.kind} | {x.rows_kept}/{x.rows} | {x.inputs_kept}/{x.inputs} | "
                         f"{x.params_before} | {x.params_after} | {x.flops_before} | {x.flops_after} |")
        lines.append(f"| **total** (all parameters; Linear/Conv2d FLOPs) | | | | {self.params_before} | "
                     f"{self.params_after} | {self.flops_before} | {self.flops_after} |")
        notes = [f"- {x.name}: {note}" for x in self.layers for note in x.notes] + [f"- {k}" for k in self.kept]
        return "\n".join(lines + ([""] + notes if notes else []))

    def __str__(self) -> str:
        head = ["layer", "kind", "rows", "inputs", "params", "FLOPs/sample"]
        rows = [head] + [[x.name, x.kind, f"{x.rows_kept}/{x.rows}", f"{x.inputs_kept}/{x.inputs}",
                          f"{x.params_before} -> {x.params_after}", f"{x.flops_before} -> {x.flops_after}"]
                         for x in self.layers]
        params = f"{self.params_before} -> {self.params_after} ({self.params_after / max(self.params_before, 1):.3f}x)"
        flops = f"{self.flops_before} -> {self.flops_after} ({self.flops_after / max(self.flops_before, 1):.3f}x)"
        rows.append(["total", "", "", "", params, flops])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        notes = [f"  {x.name}: {note}" for x in self.layers for note in x.notes] + [f"  {k}" for k in self.kept]
        return "\n".join(text + (["kept for exactness:"] + notes if notes else []))


@dataclass
class _Layout:
    """A tensor whose channel axis ``dim`` (``size`` channels) holds only the channels ``kept`` (sorted
    ``[k]`` long); every other channel ``j`` is the constant ``fill[j]`` (``[size]``) everywhere."""

    dim: int
    size: int
    kept: torch.Tensor
    fill: torch.Tensor

    def absent(self) -> torch.Tensor:
        present = torch.zeros(self.size, dtype=torch.bool)
        present[self.kept] = True
        return (~present).nonzero().flatten()


class _Tracer(fx.Tracer):
    """Symbolic trace with every sparse layer as a leaf (their forward calls this package's ops)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SparseLayer) or super().is_leaf_module(m, qualname)


_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
                        nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, torch.tanh, torch.sigmoid,
                          F.dropout, F.hardtanh}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_FLATTEN = ({torch.flatten, torch.reshape}, {"flatten", "view", "reshape"})
_ADD = ({operator.add, torch.add}, {"add"})
_SCALAR_OPS = {operator.add: operator.add, operator.mul: operator.mul, operator.truediv: operator.truediv,
               operator.sub: operator.sub}


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _conv_padded(m: nn.Conv2d) -> bool:
    return isinstance(m.padding, str) and m.padding != "valid" or any(p != 0 for p in (
        m.padding if not isinstance(m.padding, str) else (0,)))


class _Exporter:
    def __init__(self, model: nn.Module, example_inputs: tuple):
        self.model = model
        self.gm = fx.GraphModule(model, _Tracer().trace(model), class_name=type(model).__name__)
        ShapeProp(self.gm).propagate(*example_inputs)
        self.batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.new: dict[fx.Node, fx.Node] = {}
        self.layout: dict[fx.Node, _Layout] = {}
        self.scattered: dict[tuple, fx.Node] = {}
        self.names: set[str] = set()
        self.layers: list[LayerExport] = []
        self.kept: list[str] = []

    # -- helpers --------------------------------------------------------------------------------

    def _name(self, base: str) -> str:
        base = base.replace(".", "_") or "model"
        if not base.isidentifier() or keyword.iskeyword(base):  # "0" of an nn.Sequential: not a Python name
            base = f"m_{base}"
        name, i = base, 1
        while name in self.names or hasattr(nn.Module, name):
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def _buffer(self, base: str, value: torch.Tensor) -> fx.Node:
        name = self._name(base)
        self.root.register_buffer(name, value.to(self.device))
        return self.graph.get_attr(name)

    def _shape(self, node) -> tuple | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _scatter(self, node: fx.Node, target: torch.Tensor | None = None, why: str = "") -> fx.Node:
        """The new-graph value of ``node`` with the channels ``target`` present (default: all), absent ones
        scattered in from their constants."""
        lay = self.layout.get(node)
        if lay is None:
            return self.new[node]
        target = torch.arange(lay.size) if target is None else target
        if torch.equal(target, lay.kept):
            return self.new[node]
        key = (node, tuple(target.tolist()))
        if key not in self.scattered:
            ndim = len(self._shape(node))
            fill = lay.fill[target].to(self.dtype).view([-1 if i == lay.dim else 1 for i in range(ndim)])
            pos = torch.searchsorted(target, lay.kept)
            shape = self.graph.call_function(getattr, (self.new[node], "shape"))
            sizes = [-1 if i == lay.dim else self.graph.call_function(operator.getitem, (shape, i))
                     for i in range(ndim)]
            base = self.graph.call_method("expand", (self._buffer(f"{node.name}_fill", fill), *sizes))
            self.scattered[key] = self.graph.call_function(
                torch.index_copy, (base, lay.dim, self._buffer(f"{node.name}_index", pos), self.new[node]))
            nonzero = int((lay.fill[lay.absent()] != 0).sum())
            self.kept.append(f"{node.name}: {len(target) - len(lay.kept)} absent channels of {lay.size} put back "
                             f"({nonzero} non-zero constants) for {why}")
        return self.scattered[key]

    def _full(self, why: str):
        return lambda n: self._scatter(n, why=why) if n in self.layout else self.new[n]

    def _copy(self, node: fx.Node, why: str = "") -> fx.Node:
        """``node`` as it was, its inputs scattered to full size (``why``: the reason reported)."""
        why = why or f"{getattr(node.target, '__name__', node.target)} ({node.name})"
        args = fx.map_arg(node.args, self._full(why))
        kwargs = fx.map_arg(node.kwargs, self._full(why))
        if node.op == "call_module":
            name = self._name(node.target)
            self.root.add_module(name, copy.deepcopy(self.gm.get_submodule(node.target)))
            return self.graph.call_module(name, args, kwargs)
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.gm)
            name = self._name(node.target)
            if isinstance(value, nn.Parameter):
                self.root.register_parameter(name, nn.Parameter(value.detach().clone(), value.requires_grad))
            elif isinstance(value, torch.Tensor):
                self.root.register_buffer(name, value.detach().clone())
            else:
                setattr(self.root, name, copy.deepcopy(value))
            return self.graph.get_attr(name)
        if node.op == "call_method":
            return self.graph.call_method(node.target, args, kwargs)
        return self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)

    # -- the pass -------------------------------------------------------------------------------

    def run(self) -> tuple[fx.GraphModule, ExportReport]:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.new[node] = self.graph.placeholder(node.target, default_value=(
                    node.args[0] if node.args else inspect.Signature.empty))
            elif node.op == "output":
                self.graph.output(fx.map_arg(node.args[0], self._full("the model's output")))
            else:
                self.new[node] = self._node(node)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name="ExportedModel")
        before = sum(p.numel() for name, p in self.model.named_parameters() if not name.endswith("threshold"))
        report = ExportReport(self.layers, self.kept, before, sum(p.numel() for p in gm.parameters()),
                              sum(x.flops_before for x in self.layers), sum(x.flops_after for x in self.layers))
        return gm, report

    def _node(self, node: fx.Node) -> fx.Node:
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        lay = self.layout.get(first)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and type(module) in (nn.Linear, nn.Conv2d) or isinstance(
                module, SparseLayer):
            return self._layer(node, module)
        if lay is None and not self._is_add(node):
            return self._copy(node)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(node, module, lay)
        if self._is_elementwise(node, module):
            return self._passthrough(node, lay, self._fill_fn(node, module))
        if (isinstance(module, _POOL_MODULES) or node.op == "call_function" and node.target in _POOL_FUNCTIONS) \
                and lay.dim == 1 and len(self._shape(first)) == 4 and self._pool_exact(node, module, lay):
            return self._passthrough(node, lay, None)
        if self._is_flatten(node, module, first, lay):
            return self._flatten(node, first, lay)
        if self._is_add(node):
            return self._add(node)
        if node.op in ("call_function", "call_method") and node.target in _SCALAR_OPS and len(node.args) == 2 \
                and isinstance(node.args[1], (int, float)):
            fn, scalar = _SCALAR_OPS[node.target], node.args[1]
            return self._passthrough(node, lay, lambda fill: fn(fill, scalar))
        return self._copy(node, f"{type(module).__name__} {node.target}" if module is not None else "")

    # -- Linear / Conv2d ------------------------------------------------------------------------

    def _layer(self, node: fx.Node, module: nn.Module) -> fx.Node:
        x = node.args[0]
        conv = isinstance(module, nn.Conv2d)
        weight = module.weight.detach()
        n_rows, n_in = weight.shape[0], weight.shape[1]
        rows = module.mask().bool() if isinstance(module, SparseLayer) else torch.ones(n_rows, dtype=torch.bool)
        kept_rows = rows.nonzero().flatten().cpu()
        notes = []
        zero_row = len(kept_rows) == 0
        grouped = conv and module.groups != 1
        zeroed = ~rows.cpu() if grouped else torch.zeros(n_rows, dtype=torch.bool)
        if grouped:  # every group must keep as many rows and inputs as the others: rows stay, zeroed
            kept_rows, zero_row = torch.arange(n_rows), False
            if bool(zeroed.any()):
                notes.append(f"grouped conv: {int(zeroed.sum())} pruned rows kept as zeros (groups stay equal)")
        if zero_row:
            kept_rows = torch.zeros(1, dtype=torch.long)
            notes.append("every row pruned: one zeroed row kept to carry the output's shape")
        ndim = len(self._shape(x))
        cdim = 1 if conv else ndim - 1
        lay = self.layout.get(x)
        folded = torch.zeros(n_rows, dtype=torch.float64)
        if lay is not None and (lay.dim != cdim or grouped):
            why = f"{node.target} ({'grouped conv' if grouped else 'channel axis not its input axis'})"
            xin, cols = self._scatter(x, why=why), torch.arange(n_in)
        elif lay is None:
            xin, cols = self.new[x], torch.arange(n_in)
        else:
            absent = lay.absent()
            fills = lay.fill[absent].double()
            need = absent[fills != 0] if conv and _conv_padded(module) else absent[:0]
            fold = absent[~torch.isin(absent, need)]
            cols = torch.sort(torch.cat([lay.kept, need])).values
            if len(cols) == 0:  # a Linear/Conv2d needs one input column: read the first absent channel
                cols, fold = fold[:1], fold[1:]
            w64 = weight.double().cpu()
            per_channel = w64[:, fold].sum(dim=(2, 3)) if conv else w64[:, fold]  # [rows, absent]
            folded = (per_channel * lay.fill[fold].double()).sum(1)
            if bool((lay.fill[fold] != 0).any()):
                notes.append(f"constants of {int((lay.fill[fold] != 0).sum())} absent input channels folded into "
                             "the bias")
            xin = self._scatter(x, cols, f"{node.target} (padding)") if len(need) or not torch.equal(
                cols, lay.kept) else self.new[x]
        bias = torch.zeros(n_rows, dtype=torch.float64) if module.bias is None else module.bias.detach().double().cpu()
        new_bias = (bias + folded).masked_fill(zeroed, 0.0)[kept_rows]
        has_bias = module.bias is not None or bool((new_bias != 0).any())
        if conv:
            new = nn.Conv2d(len(cols) * module.groups, len(kept_rows), module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, has_bias, device=self.device,
                            dtype=self.dtype)
        else:
            new = nn.Linear(len(cols), len(kept_rows), has_bias, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            w = weight[kept_rows.to(weight.device)][:, cols.to(weight.device)]
            w = w.masked_fill(zeroed[kept_rows].to(w.device).view(-1, *[1] * (w.dim() - 1)), 0.0)
            new.weight.copy_(torch.zeros_like(w) if zero_row else w)
            if has_bias:
                new.bias.copy_(torch.zeros_like(new_bias) if zero_row else new_bias)
        name = self._name(node.target)
        self.root.add_module(name, new)
        out = self.graph.call_module(name, (xin,))
        out_shape = self._shape(node)
        positions = math.prod(out_shape) // n_rows // self.batch if n_rows else 0
        before = sum(p.numel() for pname, p in module.named_parameters() if pname != "threshold")
        self.layers.append(LayerExport(
            node.target, type(module).__name__, n_rows, 0 if zero_row else len(kept_rows), n_in, len(cols), before,
            sum(p.numel() for p in new.parameters()), 2 * positions * weight[0].numel() * n_rows,
            2 * positions * new.weight[0].numel() * new.weight.shape[0], notes))
        if len(kept_rows) < n_rows:
            self.layout[node] = _Layout(cdim, n_rows, kept_rows, torch.zeros(n_rows, dtype=self.dtype))
        return out

    # -- ops a layout goes through --------------------------------------------------------------

    def _batchnorm(self, node: fx.Node, module, lay: _Layout) -> fx.Node:
        if lay.dim != 1 or module.training or module.running_mean is None:
            return self._copy(node, f"{node.target} (batch statistics)")
        kept = lay.kept.to(module.running_mean.device)
        new = type(module)(len(kept), module.eps, module.momentum, module.affine, True,
                           device=self.device, dtype=self.dtype).eval()
        with torch.no_grad():
            new.running_mean.copy_(module.running_mean[kept])
            new.running_var.copy_(module.running_var[kept])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                new.weight.copy_(module.weight[kept])
                new.bias.copy_(module.bias[kept])
            fill = F.batch_norm(lay.fill.to(module.running_mean).view(1, -1), module.running_mean, module.running_var,
                                module.weight, module.bias, False, 0.0, module.eps).view(-1).cpu()
        name = self._name(node.target)
        self.root.add_module(name, new)
        self.layout[node] = _Layout(lay.dim, lay.size, lay.kept, fill)
        return self.graph.call_module(name, (self.new[node.args[0]],))

    def _is_elementwise(self, node: fx.Node, module) -> bool:
        if module is not None:
            return isinstance(module, _ELEMENTWISE_MODULES)
        if node.op == "call_method":
            return node.target in _ELEMENTWISE_METHODS
        if node.op != "call_function" or node.target not in _ELEMENTWISE_FUNCTIONS:
            return False
        extra = list(node.args[1:]) + list(node.kwargs.values())
        if any(isinstance(a, fx.Node) for a in extra):
            return False
        return node.target is not F.dropout or not _arg(node, 2, "training", True)

    def _fill_fn(self, node: fx.Node, module):
        if module is not None:
            return lambda fill: module(fill)
        if node.op == "call_method":
            return lambda fill: getattr(fill, node.target)()
        return lambda fill: node.target(fill, *node.args[1:], **{k: v for k, v in node.kwargs.items()
                                                                  if k != "inplace"})

    def _pool_exact(self, node: fx.Node, module, lay: _Layout) -> bool:
        """A constant channel stays that constant (avg pooling that counts zero padding would break it)."""
        avg = isinstance(module, nn.AvgPool2d) or node.target is F.avg_pool2d
        if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and module.return_indices:
            return False
        if node.op == "call_function" and node.target in (F.max_pool2d, F.adaptive_max_pool2d) and any(
                v is True for v in list(node.args[1:]) + list(node.kwargs.values())):
            return False  # return_indices
        if not avg:
            return True
        padding = module.padding if module is not None else _arg(node, 3, "padding", 0)
        include = module.count_include_pad if module is not None else _arg(node, 5, "count_include_pad", True)
        padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
        return not (padded and include and bool((lay.fill[lay.absent()] != 0).any()))

    def _passthrough(self, node: fx.Node, lay: _Layout, fill_fn) -> fx.Node:
        with torch.no_grad():
            fill = lay.fill if fill_fn is None else fill_fn(lay.fill.to(self.dtype)).cpu()
        self.layout[node] = _Layout(lay.dim, lay.size, lay.kept, fill)
        return self._copy_keep_layout(node)

    def _copy_keep_layout(self, node: fx.Node) -> fx.Node:
        """``node`` on its inputs as they are (the op works channel by channel)."""
        args = fx.map_arg(node.args, lambda n: self.new[n])
        kwargs = fx.map_arg(node.kwargs, lambda n: self.new[n])
        if node.op == "call_module":
            name = self._name(node.target)
            self.root.add_module(name, copy.deepcopy(self.gm.get_submodule(node.target)))
            return self.graph.call_module(name, args, kwargs)
        return self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)

    def _is_flatten(self, node: fx.Node, module, first: fx.Node, lay: _Layout) -> bool:
        """A reshape that keeps the axes before the channel axis and merges it with all after it."""
        functions, methods = _FLATTEN
        if not (isinstance(module, nn.Flatten) or node.op == "call_function" and node.target in functions
                or node.op == "call_method" and node.target in methods):
            return False
        shape_in, shape_out = self._shape(first), self._shape(node)
        d = lay.dim
        return (shape_in is not None and shape_out is not None and len(shape_out) == d + 1
                and shape_out[:d] == shape_in[:d] and shape_out[d] == math.prod(shape_in[d:]))

    def _flatten(self, node: fx.Node, first: fx.Node, lay: _Layout) -> fx.Node:
        block = math.prod(self._shape(first)[lay.dim + 1:])
        kept = (lay.kept[:, None] * block + torch.arange(block)).flatten()
        self.layout[node] = _Layout(lay.dim, lay.size * block, kept, lay.fill.repeat_interleave(block))
        return self.graph.call_method("flatten", (self.new[first], lay.dim))

    def _is_add(self, node: fx.Node) -> bool:
        functions, methods = _ADD
        if not (node.op == "call_function" and node.target in functions or node.op == "call_method"
                and node.target in methods) or len(node.args) != 2 or node.kwargs:
            return False
        a, b = node.args
        return all(isinstance(v, fx.Node) and self._shape(v) == self._shape(node) for v in (a, b))

    def _add(self, node: fx.Node) -> fx.Node:
        a, b = node.args
        la, lb = self.layout.get(a), self.layout.get(b)
        if la is None or lb is None or la.dim != lb.dim or la.size != lb.size:
            return self._copy(node, f"add ({node.name}) with a full tensor")
        union = torch.unique(torch.cat([la.kept, lb.kept]))
        args = (self._scatter(a, union, f"add ({node.name})"), self._scatter(b, union, f"add ({node.name})"))
        out = self.graph.create_node(node.op, node.target, args, {}, name=node.name)
        if len(union) < la.size:
            self.layout[node] = _Layout(la.dim, la.size, union, la.fill + lb.fill)
        return out


def export_dense_with_report(model: nn.Module, example_inputs, *, check: bool = True) -> tuple[fx.GraphModule,
                                                                                               ExportReport]:
    """``export_dense``, plus the ``ExportReport`` of what it did."""
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    source = copy.deepcopy(model).eval()
    try:
        exporter = _Exporter(source, example_inputs)
    except (fx.proxy.TraceError, TypeError, NotImplementedError) as error:
        raise ValueError(f"export_dense: torch.fx cannot trace {type(model).__name__} ({error}); the model's forward "
                         "must not branch on tensor values") from None
    exported, report = exporter.run()
    exported.eval()
    if check:
        _check(source, exported, example_inputs)
    return exported, report


def export_dense(model: nn.Module, example_inputs, *, check: bool = True) -> fx.GraphModule:
    """A plain PyTorch model (``torch.fx.GraphModule`` of ``torch.nn`` modules and ``torch`` functions) whose
    eval-mode outputs equal ``model``'s, every pruned row removed (module docstring). ``example_inputs``: one
    tensor or a tuple, e.g. ``[B, C, H, W]`` images; the export holds for inputs of the same shape but any
    batch size. ``check``: run both on the example inputs and raise if they differ beyond float error."""
    return export_dense_with_report(model, example_inputs, check=check)[0]


@torch.no_grad()
def _check(source: nn.Module, exported: nn.Module, example_inputs: tuple) -> None:
    """The export against ``source`` run in float64 on the masked-dense ``reference`` backend (the oracle)."""
    oracle = copy.deepcopy(source).double()
    for module in oracle.modules():
        if isinstance(module, SparseLayer):
            module.backend = "reference"
    want = oracle(*(x.double() if x.is_floating_point() else x for x in example_inputs))
    got = exported(*example_inputs)
    for w, g in zip(*(t if isinstance(t, (tuple, list)) else (t,) for t in (want, got))):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        error = float((g.double() - w).abs().max()) if w.numel() else 0.0
        if g.shape != w.shape or error > 1e-3 * scale:
            raise RuntimeError(f"export_dense: the exported model differs from the sparse model by {error:.3g} "
                               f"(shape {tuple(g.shape)} vs {tuple(w.shape)}); please report this model")


_STANDALONE_MODULES = {nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
                       nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                       nn.Flatten, nn.Softmax}


def _constructor(module: nn.Module) -> str:
    m = module
    if type(m) is nn.Linear:
        return f"nn.Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})"
    if type(m) is nn.Conv2d:
        return (f"nn.Conv2d({m.in_channels}, {m.out_channels}, {m.kernel_size}, stride={m.stride}, "
                f"padding={m.padding!r}, dilation={m.dilation}, groups={m.groups}, bias={m.bias is not None}, "
                f"padding_mode={m.padding_mode!r})")
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return (f"nn.{type(m).__name__}({m.num_features}, eps={m.eps!r}, momentum={m.momentum!r}, "
                f"affine={m.affine}, track_running_stats={m.track_running_stats})")
    if type(m) is nn.LayerNorm:
        return (f"nn.LayerNorm({tuple(m.normalized_shape)}, eps={m.eps!r}, "
                f"elementwise_affine={m.elementwise_affine}, bias={m.bias is not None})")
    if type(m) in _STANDALONE_MODULES:
        return f"nn.{m!r}"
    raise ValueError(f"standalone_source: no plain definition for {type(m).__name__}; save the torch.export "
                     "program instead")


def standalone_source(exported: fx.GraphModule, class_name: str = "ExportedModel") -> str:
    """Python source that defines ``class_name``, an ``nn.Module`` with ``exported``'s architecture, needing only
    ``torch``; ``class_name().load_state_dict(exported.state_dict())`` then gives ``exported``'s outputs."""
    code = exported.graph.python_code("self")
    imports = {"torch": "import torch", "operator": "import operator", "math": "import math"}
    lines = ['"""A model exported by spafl-kernels (export_dense): plain PyTorch, needs torch only."""', "",
             *sorted({imports[name] for name in code.globals if name in imports}), "from torch import nn", ""]
    unknown = sorted(name for name, value in code.globals.items()
                     if name not in imports and not isinstance(value, (type(None), bool, int, float, str)))
    for name in unknown:
        value = code.globals[name]
        module = getattr(value, "__module__", "") or ""
        if module == "builtins":
            continue
        if isinstance(value, types.ModuleType) and value.__name__.startswith("torch"):
            lines.insert(4, f"import {value.__name__} as {name}")
            continue
        if not module.startswith("torch") and name not in ("inf", "nan", "device"):
            raise ValueError(f"standalone_source: the graph calls {name} from {module or 'unknown'}")
        if name in ("inf", "nan"):
            lines.insert(4, f"from math import {name}")
        elif name == "device":
            lines.insert(4, "from torch import device")
        else:
            lines.insert(4, f"from {module} import {value.__name__} as {name}")
    lines += [f"class {class_name}(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    for name, module in exported.named_children():
        lines.append(f"        self.{name} = {_constructor(module)}")
    for name, p in exported.named_parameters(recurse=False):
        lines.append(f"        self.{name} = nn.Parameter(torch.empty({list(p.shape)}, dtype={p.dtype}))")
    for name, b in exported.named_buffers(recurse=False):
        lines.append(f"        self.register_buffer({name!r}, torch.empty({list(b.shape)}, dtype={b.dtype}))")
    lines.append("")
    lines += ["    " + line for line in code.src.strip("\n").splitlines()]
    return "\n".join(lines).replace("\n    \n", "\n\n") + "\n"
