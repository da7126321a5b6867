"""Teleport an ``nn.Module`` in place, for training-time use (the paper's headline).

``teleport(model, example_inputs)`` traces the module, runs the same symmetry analysis as
for ONNX files, draws cofactors and rescales the module's own parameters and buffers in
place (``W' = τ_t · W / τ_s``), so an optimizer created before the teleport keeps updating
the teleported tensors.  A :class:`Teleporter` traces and analyses once and teleports as
often as needed (a training loop); :class:`TorchTeleport` says what a teleport changed and
can ``undo()`` it.  BatchNorm is analysed in its training form: its input cofactors are
positive, ``γ' = γ·τ_out``, ``β' = β·τ_out``, running mean ``· τ_in`` and running var
``· τ_in²``, so both train and eval mode stay right; BatchNorm's ``ε``, which no cofactor
can scale, is corrected for (eval mode exact, train mode exact on batches like the example
inputs).

Layout (each module imports only those above it; none imports this package's ``__init__``):

* :mod:`~graphteleport.torch.tracing` — the trace (``torch.fx`` first, milliseconds; the
  exporter where FX cannot trace: :func:`graphteleport.frontends.torch.trace`, whose
  translators are frontends) and its analysis, :func:`analyze`;
* :mod:`~graphteleport.torch.absorb` — the in-place rewrite ``W ← W·S + O`` and its
  inverse, BatchNorm's ``ε`` correction;
* :mod:`~graphteleport.torch.result` — :class:`TorchTeleport`;
* :mod:`~graphteleport.torch.graphmodule` — insert mode's Muls in a ``torch.fx.GraphModule``;
* :mod:`~graphteleport.torch.insert` — insert mode's forward hooks, and the choice between
  hooks and the GraphModule;
* :mod:`~graphteleport.torch.orbit` — :func:`compose`, :func:`orbit_tangent`;
* :mod:`~graphteleport.torch.teleporter` — :func:`teleport`, :class:`Teleporter`;
* :mod:`~graphteleport.torch.orbitmap` — :class:`OrbitMap`, the orbit as a differentiable
  map ``u ↦ W(u)``;
* :mod:`~graphteleport.torch.optimize` — :func:`optimize`, teleports that raise an
  objective (gradient norm, sharpness) by gradient steps over ``log t``;
* :mod:`~graphteleport.torch.canonical` — :func:`canonicalize`, the canonical form;
* :mod:`~graphteleport.torch.equalizer` — :func:`equalize` (cofactors chosen for INT8
  quantization, :mod:`graphteleport.passes.equalize`).

The algebra is not here: every ``S = Π τ^e``, the reciprocals, BatchNorm's ``ε``
corrections and the orbit's derivatives are computed by :mod:`graphteleport.algebra`, from
the analysis' result (:class:`~graphteleport.analysis.AnalysisResult`); this package only
moves them into torch tensors.

``mode="insert"`` also makes non-equivariant activations compute ``τ_out · f(x / τ_in)``.
Where every such activation is a parameter-free leaf *module* called once per traced call,
the Muls are forward hooks with cofactor buffers (``graphteleport_in``/``graphteleport_out``,
``_k`` for a module's k-th call) on the user's own module, and ``result.model`` is that
module.  Elsewhere (activations called functionally, ``torch.sigmoid(x)`` in ``forward``; a
LayerNorm's input; GPT-2's attention) the Muls and their buffers go into a
``torch.fx.GraphModule`` sharing the module's tensors, returned as ``result.model`` — use it
in place of the module from then on.  Either way ``state_dict()`` carries the buffers and
round-trips exactly.

Example::

    from graphteleport.torch import teleport
    result = teleport(model, torch.randn(8, 784), mode="insert",
                      sampling="inter_landscape", cob_range=0.9, seed=0)
    result.free_cofactors, result.changed[:3]
"""

from graphteleport.torch.canonical import TorchCanonical, canonicalize
from graphteleport.torch.equalizer import equalize
from graphteleport.torch.optimize import Optimized, optimize
from graphteleport.torch.orbit import compose, orbit_tangent
from graphteleport.torch.orbitmap import OrbitMap
from graphteleport.torch.result import TorchTeleport
from graphteleport.torch.teleporter import Teleporter, teleport
from graphteleport.torch.tracing import analyze

__all__ = [
    "Optimized",
    "OrbitMap",
    "Teleporter",
    "TorchCanonical",
    "TorchTeleport",
    "analyze",
    "canonicalize",
    "compose",
    "equalize",
    "optimize",
    "orbit_tangent",
    "teleport",
]
