"""ONNX frontend: a file from any exporter to the graph form the analysis reads.

The graph form is an onnx_ir model (weights memory-mapped when they live in external
data) plus one concrete shape per real input (:func:`resolve_input_shapes`).  Weights
may be initializers or ``Constant`` nodes; opsets 11 and newer.

Input shapes
------------
The analysis and the verification need one concrete size per input axis.  Fixed axes
keep the model's size; a dynamic (symbolic or unknown) axis is resolved in this order,
and the report says which rule gave each size:

1. ``--input-shape NAME=D0,D1,...`` (*overrides*), checked against the fixed sizes;
2. a symbol the model shares: every axis named ``S`` takes the size another rule gave
   ``S`` (an override of one input fixes that symbol for all; an integer input's
   sequence fixes a float input's ``[batch, S, C]``);
3. axis 0 — the batch — is 1; a dynamic axis of an integer input (token ids, masks)
   is :data:`DEFAULT_SEQUENCE`;
4. a declared hint: a ``metadata_props`` entry ``NAME_shape`` (or ``input_shape`` in a
   single-input model) such as ``"1,3,48,320"`` or ``"48x320"`` (the open axes only);
5. the :data:`LADDER`: all still-open axes take the same size, smallest first, until
   onnxruntime (graph optimisations off) runs the model; the first size that runs is
   taken and the sizes that failed are reported with onnxruntime's reason.

Rules 4 and 5 need a *probe* (:func:`ort_probe`); without one (:func:`input_specs`) an
open axis is an :class:`InputError` naming the input and axis.  No size runs: an
InputError naming the input and axes, suggesting ``--input-shape``.

The probe is the acceptance test: the analysis raises for no size at which onnxruntime
runs the model (a shape it cannot infer pins neurons, it is not an error), so the
analysis is not repeated per ladder step.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphteleport.errors import InputError
from graphteleport.interrupts import import_held
from graphteleport.io import external_data_files, initializer_nbytes, load_model, save_model_atomic

__all__ = [
    "DEFAULT_SEQUENCE",
    "LADDER",
    "InputSpec",
    "OnnxGraph",
    "Probe",
    "ResolvedInputs",
    "index_ranges",
    "input_specs",
    "load",
    "ort_probe",
    "resolve_input_shapes",
]

logger = logging.getLogger(__name__)

#: The sequence length given to a dynamic axis of an integer input (token ids, masks).
DEFAULT_SEQUENCE = 16

#: Sizes tried, in order, for the dynamic axes no other rule sizes, every open axis at
#: once (at most 11 runs).  Multiples of 32: a net whose total stride is 2^k, k <= 5
#: (ImageNet backbones, FPN and U-Net detectors), runs at each; 32 is the smallest, so
#: the probe, the analysis and the verification stay cheap.  96, 160, 224 and 320 add the
#: factors 3, 5, 7 and 10 a Reshape into fixed groups may need; 64 to 512 cover total
#: strides up to 512.
LADDER = (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)

#: Runs the model once on the given feeds; raises on failure (any exception: the
#: reason is reported), or :class:`InputError` when the model cannot be run at all.
Probe = Callable[[Mapping[str, np.ndarray]], None]

#: In-memory models up to this size are handed to onnxruntime as bytes, larger via a file.
_MAX_BYTES_MODEL = 1 << 30

#: A declared hint larger than this is ignored (a typo must not allocate gigabytes).
_MAX_HINT = 1 << 16

#: A symbolic dim shares its size only if it is a name (has a letter), not ``?`` or ``-1``.
_NAMED = re.compile(r"[A-Za-z_]")

Dim = int | str | None  # a declared dim: fixed size, symbol, or unknown


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """One real graph input (not an initializer) and the shape to feed it.

    Attributes:
        name: the graph input's name.
        dtype: its numpy dtype (``ml_dtypes`` types for bfloat16 and float8).
        shape: the concrete shape random feeds get; ``-1`` only for a dynamic
            dimension left open by ``allow_dynamic=True``.
        fixed: per axis, True where the model itself fixes the size (an ``.npz``
            array must match those axes; the others may be any size).
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fixed: tuple[bool, ...]


@dataclass
class ResolvedInputs:
    """Concrete specs of a model's real inputs and how each dynamic size was found.

    Attributes:
        specs: one :class:`InputSpec` per real input, in graph order.
        declared: per input, its declared dims (int, symbol or None; None: no rank).
        sources: per input, ``{axis: how its size was found}`` for its dynamic axes
            (e.g. ``"batch axis: 1"``, ``"ladder: 64 (32 failed: Reshape node 'r': ...)"``).
        brief: the same, short, for the terminal (``"ladder 64, after 32 failed"``).
        seconds: wall time of the resolution (onnxruntime probes included).
    """

    specs: list[InputSpec]
    declared: dict[str, tuple[Dim, ...] | None]
    sources: dict[str, dict[int, str]] = field(default_factory=dict)
    brief: dict[str, dict[int, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{input: shape}`` (``-1`` where left open for user feeds)."""
        return {s.name: s.shape for s in self.specs}

    def to_report(
        self, shapes: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """JSON-ready ``{input: {"shape", "declared", "axes", "source", "brief"}}``.

        *shapes* are the shapes actually fed (an ``.npz`` sizes the axes left open,
        reported as ``"--inputs"``).  ``axes`` maps each dynamic axis (as a string) to
        how its size was found; ``source`` joins them on one line (``"declared"`` for
        a static input) and ``brief`` groups them for the terminal, e.g.
        ``"axis 0: batch 1; axes 2,3: ladder 64, after 32 failed"``.
        """
        out: dict[str, dict[str, Any]] = {}
        for spec in self.specs:
            shape = [int(d) for d in (shapes or {}).get(spec.name, spec.shape)]
            axes = {a: s for a, s in sorted(self.sources.get(spec.name, {}).items())}
            brief = dict(self.brief.get(spec.name, {}))
            for axis, size in enumerate(spec.shape):
                if size < 0 or size != shape[axis]:
                    axes[axis] = brief[axis] = "--inputs"
            declared = self.declared.get(spec.name)
            out[spec.name] = {
                "shape": shape,
                "declared": list(declared) if declared is not None else None,
                "axes": {str(a): s for a, s in axes.items()},
                "source": "; ".join(f"axis {a}: {s}" for a, s in axes.items()) or "declared",
                "brief": _group_axes({a: brief.get(a, s) for a, s in axes.items()}),
            }
        return out


def _group_axes(notes: Mapping[int, str]) -> str:
    """``axis 0: batch 1; axes 2,3: ladder 64``: axes with the same note together."""
    groups: dict[str, list[str]] = {}
    for axis, note in sorted(notes.items()):
        groups.setdefault(note, []).append(str(axis))
    return "; ".join(
        f"{'axes' if len(a) > 1 else 'axis'} {','.join(a)}: {n}" for n, a in groups.items()
    )


def input_specs(
    model: ir.Model | str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    allow_dynamic: bool = False,
) -> list[InputSpec]:
    """Concrete specs of the model's real inputs, in graph order, without running it.

    :func:`resolve_input_shapes` with no probe: overrides, shared symbols, batch 1 and
    integer sequences resolve dynamic axes; any other dynamic axis raises
    :class:`InputError` naming the input and the axis, unless *allow_dynamic* leaves
    it as ``-1`` (for feeds that come from an ``.npz`` file).
    """
    return resolve_input_shapes(model, input_shapes, allow_dynamic=allow_dynamic).specs


def index_ranges(model: ir.Model) -> dict[str, int]:
    """``{input: rows}`` for integer inputs that index a table (token ids read by a
    ``Gather`` of a constant table): random feeds for them stay below the table's rows."""
    out: dict[str, int] = {}
    for v in model.graph.inputs:
        for use in v.uses():
            node = use.node
            if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
                table = node.inputs[0].const_value
                if table is not None and table.shape:
                    out[v.name or ""] = int(table.shape.numpy()[0])
    return out


def resolve_input_shapes(
    model: ir.Model | str | os.PathLike[str],
    overrides: Mapping[str, Sequence[int]] | None = None,
    *,
    allow_dynamic: bool = False,
    probe: Probe | None = None,
) -> ResolvedInputs:
    """Concrete shapes for the model's real inputs (graph inputs that are not
    initializers), resolving each dynamic axis as the module docstring says.

    *overrides* (``{name: [d0, d1, ...]}``) must name real inputs, have the input's
    rank and agree with the sizes the model fixes.  *allow_dynamic* leaves the axes
    rules 1-3 do not size as ``-1`` (the feeds come from an ``.npz``).  *probe* runs
    the model (:func:`ort_probe`); without it an axis rules 1-3 do not size raises
    :class:`InputError`.  With it, the declared hints are taken if the model runs at
    them, else the first :data:`LADDER` size at which it runs; none: InputError.
    """
    t0 = time.perf_counter()
    m = model if isinstance(model, ir.Model) else load_model(model)
    inputs = [v for v in m.graph.inputs if v.name not in m.graph.initializers]
    given = dict(overrides or {})
    _check_override_names(given, [str(v.name) for v in inputs])
    state = _Resolution(
        {str(v.name): _declared_dims(v) for v in inputs},
        {str(v.name): _input_dtype(v) for v in inputs},
    )
    state.apply_overrides(given)
    state.apply_defaults(sequences=not allow_dynamic)
    if state.open() and not allow_dynamic:
        if probe is None:
            raise state.open_axis_error()
        state.search(probe, _metadata_hints(m, state))
    specs = [state.spec(str(v.name), allow_dynamic) for v in inputs]
    return ResolvedInputs(
        specs, state.declared, state.sources, state.brief, time.perf_counter() - t0
    )


# --------------------------------------------------------------------------- the rules

Axis = tuple[str, int]  # (input name, axis)
#: A candidate for the open axes: per axis, its size and the rule that proposes it.
Candidate = dict[Axis, tuple[int, str]]


@dataclass
class _Resolution:
    """The sizes found so far, per input and axis, and the size of each shared symbol."""

    declared: dict[str, tuple[Dim, ...] | None]
    dtypes: dict[str, np.dtype[Any]]
    sizes: dict[str, dict[int, int]] = field(default_factory=dict)
    sources: dict[str, dict[int, str]] = field(default_factory=dict)
    brief: dict[str, dict[int, str]] = field(default_factory=dict)
    symbols: dict[str, tuple[int, str]] = field(default_factory=dict)  # symbol: (size, whose)
    overridden: set[str] = field(default_factory=set)

    def apply_overrides(self, overrides: Mapping[str, Sequence[int]]) -> None:
        """Rule 1: the user's sizes; their symbols size every other axis of that name."""
        for name, override in overrides.items():
            declared = self.declared[name]
            shape = _check_override(name, override, declared)
            self.overridden.add(name)
            self.sizes[name] = dict(enumerate(shape))
            for axis, size in enumerate(shape):
                dim = declared[axis] if declared is not None else None
                if not isinstance(dim, int):
                    self._note(name, axis, f"--input-shape: {size}", "--input-shape")
                if isinstance(dim, str) and _NAMED.search(dim):
                    self.symbols.setdefault(dim, (size, f"--input-shape {name}"))

    def apply_defaults(self, sequences: bool = True) -> None:
        """Rules 2-3 in three passes — batch axes, integer inputs' axes (unless not
        *sequences*: user feeds size them), then the rest by symbol only — so that a
        symbol an integer input sizes (its sequence) sizes the same symbol of a float
        input too, whatever their order in the graph."""
        for name, declared in self.declared.items():
            if declared is None and name not in self.overridden:
                raise InputError(
                    f"input '{name}' has unknown rank; pass --input-shape {name}=D0,D1,... "
                    "with its concrete sizes"
                )
        for name, axis in self.open():
            if axis == 0 and not self._by_symbol(name, axis):
                self.set(name, axis, 1, "batch axis: 1", "batch 1")
        for name, axis in self.open():
            if sequences and self.dtypes[name].kind in "iu" and not self._by_symbol(name, axis):
                size = DEFAULT_SEQUENCE
                self.set(name, axis, size, f"integer input: {size}", f"sequence {size}")
        for name, axis in self.open():
            self._by_symbol(name, axis)

    def _by_symbol(self, name: str, axis: int) -> bool:
        """Rule 2: size an axis whose symbol is sized already; True if it was."""
        symbol = self._symbol((name, axis))
        if symbol is None or symbol not in self.symbols:
            return False
        size, whose = self.symbols[symbol]
        self.set(name, axis, size, f"symbol '{symbol}': {size} (as {whose})", f"'{symbol}' {size}")
        return True

    def open(self) -> list[Axis]:
        """Dynamic axes no rule has sized yet, in graph order."""
        return [
            (name, axis)
            for name, declared in self.declared.items()
            if name not in self.overridden and declared is not None
            for axis, dim in enumerate(declared)
            if not isinstance(dim, int) and axis not in self.sizes.get(name, {})
        ]

    def set(self, name: str, axis: int, size: int, source: str, brief: str) -> None:
        """Record a size; the first size of a symbol sizes it for every input."""
        self.sizes.setdefault(name, {})[axis] = size
        self._note(name, axis, source, brief)
        symbol = self._symbol((name, axis))
        if symbol is not None:
            self.symbols.setdefault(symbol, (size, f"'{name}' axis {axis}"))

    def _note(self, name: str, axis: int, source: str, brief: str) -> None:
        self.sources.setdefault(name, {})[axis] = source
        self.brief.setdefault(name, {})[axis] = brief

    def _symbol(self, key: Axis) -> str | None:
        """The axis's symbol if it names one; placeholders such as ``?`` (Paddle2ONNX
        writes it for every unknown axis) name none and are not shared."""
        dim = (self.declared[key[0]] or ())[key[1]]
        return dim if isinstance(dim, str) and _NAMED.search(dim) else None

    def spec(self, name: str, allow_dynamic: bool) -> InputSpec:
        """The :class:`InputSpec` of one input (``-1`` where left open)."""
        declared = self.declared[name]
        sizes = self.sizes.get(name, {})
        if declared is None:  # unknown rank: an override gave every size
            shape = tuple(sizes[a] for a in range(len(sizes)))
            return InputSpec(name, self.dtypes[name], shape, (False,) * len(shape))
        shape = tuple(d if isinstance(d, int) else sizes.get(a, -1) for a, d in enumerate(declared))
        assert allow_dynamic or -1 not in shape, f"input '{name}' left open: {shape}"
        return InputSpec(
            name, self.dtypes[name], shape, tuple(isinstance(d, int) for d in declared)
        )

    def open_axis_error(self) -> InputError:
        """The error for the first open axis when there is no probe to size it."""
        name, axis = self.open()[0]
        declared = self.declared[name] or ()
        dim = declared[axis]
        symbol = f" ('{dim}')" if dim else ""
        return InputError(
            f"input '{name}' {_format_dims(declared)} has dynamic dimension {axis}{symbol}; "
            f"pass --input-shape {name}={self._example(name)} with concrete sizes"
        )

    def _example(self, name: str) -> str:
        """``1,3,D2,D3``: the sizes known for *name*, ``Dk`` for the open ones."""
        sizes = self.sizes.get(name, {})
        return ",".join(
            str(d) if isinstance(d, int) else str(sizes[i]) if i in sizes else f"D{i}"
            for i, d in enumerate(self.declared[name] or ())
        )

    # -- rules 4 and 5 --------------------------------------------------------------
    def search(self, probe: Probe, hints: Mapping[Axis, tuple[int, str]]) -> None:
        """Size the open axes by the first candidate at which *probe* runs the model.

        Candidates: the declared *hints* (open axes they leave out at the ladder's
        first size), then one per :data:`LADDER` size with every open axis at that
        size.  Axes sharing a symbol always get one size.  InputError if none runs.
        """
        ladder: list[Candidate] = [
            {key: (size, "ladder") for key in self.open()} for size in LADDER
        ]
        first = {**hints, **{k: v for k, v in ladder[0].items() if k not in hints}}
        candidates = [first, *ladder] if hints else ladder
        failures: list[str] = []
        for candidate in candidates:
            candidate = self._same_per_symbol(candidate)
            why = self._try(probe, candidate)
            if why is None:
                self._accept(candidate, failures)
                return
            failures.append(f"{_format_sizes(candidate)} failed: {why}")
            logger.debug("input shapes: %s", failures[-1])
        raise self._no_size_error(failures)

    def _same_per_symbol(self, candidate: Candidate) -> Candidate:
        """*candidate* with every axis of a symbol at the size of its first axis."""
        first: dict[str, tuple[int, str]] = {}
        out: Candidate = {}
        for key, value in candidate.items():
            symbol = self._symbol(key)
            out[key] = first.setdefault(symbol, value) if symbol else value
        return out

    def _try(self, probe: Probe, candidate: Candidate) -> str | None:
        """Run *probe* at *candidate*: None if it ran, else onnxruntime's reason, short."""
        sizes = {name: dict(s) for name, s in self.sizes.items()}
        for (name, axis), (size, _) in candidate.items():
            sizes.setdefault(name, {})[axis] = size
        feeds = {
            name: _probe_array(self.dtypes[name], self._shape(name, sizes.get(name, {})))
            for name in self.declared
        }
        try:
            probe(feeds)
        except InputError as e:  # the model cannot run at all: no size would help
            name, axis = self.open()[0]
            raise InputError(
                f"input '{name}' has dynamic dimension {axis} and {e}; "
                f"pass --input-shape {name}={self._example(name)} with concrete sizes"
            ) from e
        except Exception as e:  # onnxruntime's own exception types: this size failed
            return _ort_reason(e)
        return None

    def _shape(self, name: str, sizes: Mapping[int, int]) -> tuple[int, ...]:
        declared = self.declared[name]
        if declared is None:
            return tuple(sizes[a] for a in range(len(sizes)))
        return tuple(d if isinstance(d, int) else sizes[a] for a, d in enumerate(declared))

    def _accept(self, candidate: Candidate, failures: list[str]) -> None:
        """Record the sizes that ran, with the tries that failed before them."""
        tried = "; ".join(failures[:3]) + ("; ..." if len(failures) > 3 else "")
        before = [f.split(" failed: ", 1)[0] for f in failures]
        before = before if len(before) <= 3 else [f"{len(before)} sizes"]
        for (name, axis), (size, rule) in candidate.items():
            source = f"{rule}: {size}" + (f" ({tried})" if failures else "")
            brief = f"{rule} {size}" + (f", after {', '.join(before)} failed" if failures else "")
            self.set(name, axis, size, source, brief)

    def _no_size_error(self, failures: list[str]) -> InputError:
        """One line: which axes, what was tried, the first reason, the fix."""
        open_axes = self.open()
        name = open_axes[0][0]
        where = ", ".join(f"{n}[{a}]" for n, a in open_axes)
        first = failures[-len(LADDER)].replace(" failed: ", ": ", 1)
        return InputError(
            f"input '{name}' {_format_dims(self.declared[name] or ())}: the model runs at no "
            f"size tried for dynamic dimension{'s' if len(open_axes) > 1 else ''} {where} "
            f"(tried {', '.join(map(str, LADDER))}; at {first}); "
            f"pass --input-shape {name}={self._example(name)} with concrete sizes"
        )


def _format_sizes(candidate: Candidate) -> str:
    """``32`` when every axis takes the same size, else ``x[2]=48, x[3]=320``."""
    values = {size for size, _ in candidate.values()}
    if len(values) == 1:
        return str(values.pop())
    return ", ".join(f"{n}[{a}]={size}" for (n, a), (size, _) in candidate.items())


# --------------------------------------------------------------------------- hints


def _metadata_hints(model: ir.Model, state: _Resolution) -> dict[Axis, tuple[int, str]]:
    """Declared sizes for open axes from ``metadata_props`` (rule 4).

    A key ``NAME_shape`` (any case), or ``input_shape`` when one input has open axes,
    whose value holds either the input's full shape (its fixed sizes must match) or
    one size per open axis of that input: ``"1,3,48,320"``, ``"[48, 320]"``, ``"48x320"``.
    """
    open_by_input: dict[str, list[int]] = {}
    for name, axis in state.open():
        open_by_input.setdefault(name, []).append(axis)
    props = {k.lower(): (k, v) for k, v in model.metadata_props.items()}
    hints: dict[Axis, tuple[int, str]] = {}
    for name, axes in open_by_input.items():
        keys = [f"{name.lower()}_shape"] + (["input_shape"] if len(open_by_input) == 1 else [])
        for key in keys:
            original, text = props.get(key, (key, ""))
            sizes = _parse_hint(text, state.declared[name] or (), axes)
            if sizes is not None:
                rule = f"metadata_props['{original}']"
                hints.update({(name, a): (sizes[a], rule) for a in axes})
                break
    return hints


def _parse_hint(text: str, declared: Sequence[Dim], axes: Sequence[int]) -> dict[int, int] | None:
    """``{axis: size}`` for *axes* from a hint's text, or None if it does not fit."""
    values = [int(v) for v in re.findall(r"-?\d+", text)]
    if len(values) == len(declared) and all(
        not isinstance(d, int) or d == v for d, v in zip(declared, values)
    ):
        picked = {a: values[a] for a in axes}
    elif len(values) == len(axes):
        picked = dict(zip(axes, values))
    else:
        return None
    return picked if all(0 < v <= _MAX_HINT for v in picked.values()) else None


# --------------------------------------------------------------------------- probing


def ort_probe(source: ir.Model | str | os.PathLike[str] | bytes) -> Probe:
    """A :data:`Probe` running *source* in onnxruntime: CPU, graph optimisations off.

    The session is created once, at the first call, and reused for every size.  A
    model onnxruntime cannot load raises :class:`InputError` (no size would help); a
    run that fails raises onnxruntime's exception, which the resolver reports.
    """
    state: dict[str, Any] = {}

    def probe(feeds: Mapping[str, np.ndarray]) -> None:
        import_held("onnxruntime")
        import onnxruntime as ort

        if "session" not in state:
            state["session"] = _probe_session(source, state)
        options = ort.RunOptions()
        options.log_severity_level = 4  # a failing size is expected: keep stderr quiet
        state["session"].run(None, dict(feeds), options)

    return probe


def _probe_session(source: ir.Model | str | os.PathLike[str] | bytes, keep: dict[str, Any]) -> Any:
    """An onnxruntime CPU session for *source*, graph optimisations off."""
    import_held("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(
            _session_source(source, keep), options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own, unexported exception types
        raise InputError(f"onnxruntime cannot load the model: {_ort_reason(e)}") from e


def _session_source(
    source: ir.Model | str | os.PathLike[str] | bytes, keep: dict[str, Any]
) -> str | bytes:
    """What onnxruntime loads: a path, or bytes; an in-memory model with external or
    large weights goes through a temporary file, kept alive in *keep*."""
    if isinstance(source, bytes):
        return source
    if not isinstance(source, ir.Model):
        return os.fspath(source)
    if not external_data_files(source) and initializer_nbytes(source) <= _MAX_BYTES_MODEL:
        data: bytes = ir.to_proto(source).SerializeToString()
        return data
    keep["tmp"] = tmp = tempfile.TemporaryDirectory(prefix="graphteleport-probe-")
    path = os.path.join(tmp.name, "model.onnx")
    save_model_atomic(source, path, external_data=True)
    return path


def _probe_array(dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A feed of *shape*: N(0, 1) floats (seeded), zeros for integers (valid ids in any
    table) and bools, empty strings."""
    if dtype.kind in "fc" or (dtype.kind == "V" and dtype.itemsize <= 2):
        return np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if dtype.kind in "OUS":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=dtype)


def _ort_reason(e: BaseException) -> str:
    """onnxruntime's error on one short line: the failing node and the message's
    last clause, without source paths and prefixes."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    message = re.split(r"Status Message: (?:\S+:\d+ .*? was false\. )?", text)[-1]
    if node:
        message = f"{node.group(1)} node '{node.group(2)}': {message}"
    return message if len(message) <= 160 else message[:157] + "..."


# --------------------------------------------------------------------------- declared dims


def _check_override_names(overrides: Mapping[str, Sequence[int]], names: Sequence[str]) -> None:
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InputError(
            f"--input-shape names {_quoted(unknown)}, which {'is' if len(unknown) == 1 else 'are'}"
            f" not a model input; the inputs are: {_quoted(names)}"
        )


def _input_dtype(value: ir.Value) -> np.dtype[Any]:
    """The numpy dtype of a tensor input, or InputError for other input types."""
    if not isinstance(value.type, ir.TensorType) or value.dtype is None:
        raise InputError(
            f"input '{value.name}' has type {value.type}; only tensor inputs can be verified"
        )
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError) as e:
        raise InputError(f"input '{value.name}' has dtype {value.dtype.name}, unsupported") from e


def _declared_dims(value: ir.Value) -> tuple[Dim, ...] | None:
    """Declared dims: an int if fixed, the symbol (str) or None if dynamic; None if no rank."""
    if value.shape is None:
        return None
    dims: list[Dim] = []
    for d in value.shape.dims:
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        else:
            dims.append(d.value if isinstance(d, ir.SymbolicDim) else None)
    return tuple(dims)


def _check_override(
    name: str, override: Sequence[int], declared: tuple[Dim, ...] | None
) -> tuple[int, ...]:
    """Validate an --input-shape override against the declared dims; return it as a tuple."""
    shape = tuple(override)
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise InputError(f"--input-shape {name}: sizes must be non-negative integers, got {shape}")
    if declared is None:
        return tuple(int(d) for d in shape)
    if len(shape) != len(declared):
        raise InputError(
            f"--input-shape {name} gives {len(shape)} sizes but the input has rank "
            f"{len(declared)} {_format_dims(declared)}"
        )
    for axis, (want, got) in enumerate(zip(declared, shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise InputError(
                f"--input-shape {name}: dimension {axis} is fixed at {want} by the model "
                f"{_format_dims(declared)}, got {got}"
            )
    return tuple(int(d) for d in shape)


def _format_dims(declared: Sequence[Dim]) -> str:
    """``[batch,128,?]``-style rendering of declared dims."""
    return "[" + ",".join("?" if d is None else str(d) for d in declared) + "]"


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


# --------------------------------------------------------------------------- loading


@dataclass
class OnnxGraph:
    """A loaded model, the concrete input shapes to analyse it at, and how they were found."""

    model: ir.Model
    input_shapes: dict[str, tuple[int, ...]]
    inputs: ResolvedInputs | None = None


def load(
    path: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> OnnxGraph:
    """Load ``path`` and resolve its input shapes, probing the file in onnxruntime
    where a dynamic axis needs a size (InputError with one clear line if it cannot
    be used)."""
    model = load_model(path)
    resolved = resolve_input_shapes(model, input_shapes, probe=ort_probe(path))
    return OnnxGraph(model, resolved.shapes, resolved)
