"""What ``transformers``' mask function is made of, which `ring_attention.hf` reads to tell the masks it applies
itself (the causal or bidirectional pattern, the packed-sequence restriction that documents replace) from those it
must refuse (an overlay such as image tokens attending both ways).

In eager mode the mask function's closures are Python objects. Under ``torch.compile`` a function made inside the
trace has none that Python can read, but Dynamo holds their contents: `mask_parts` reads them through Dynamo's
``comptime`` hook. That is an internal interface of Dynamo; when it cannot be read the mask is refused (`UNREAD`),
never guessed.
"""

from __future__ import annotations

import torch
from torch._dynamo.comptime import comptime
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function


def mask_parts(mask_function) -> tuple[set[str], list[torch.Tensor]]:
    """What transformers' mask function is made of: ``"pattern"`` (causal or bidirectional, which the operator applies
    itself), ``"packed"`` (its packed-sequence restriction, whose ``[B, N]`` sequence indices come second: the
    documents do it), ``"overlay"`` (anything else, e.g. image tokens attending both ways). Read from the closures of
    its combinators; a combinator unknown to this function counts as an overlay, so a changed transformers refuses
    rather than errs. Under ``torch.compile`` the closures are read as Dynamo holds them (`_traced_mask_parts`);
    when that fails the parts are ``{"unread"}``."""
    if torch.compiler.is_compiling():
        return _traced_mask_parts(mask_function)
    return _parts(mask_function, _open, torch.is_tensor, callable)


def _parts(function, open_function, is_tensor, is_callable) -> tuple[set[str], list]:
    """`mask_parts` of ``function``, opened by ``open_function`` into (the function if it exists outside a trace, its
    qualified name, its closures' contents with tuples laid flat)."""
    real, name, contents = open_function(function)
    if real is not None and real in (causal_mask_function, bidirectional_mask_function):
        return {"pattern"}, []
    if name.startswith("packed_sequence_mask_function."):
        return {"packed"}, [c for c in contents if is_tensor(c)]
    if name.startswith(("and_masks.", "remap_positions_for_packed_sequence.")):
        inner = [_parts(c, open_function, is_tensor, is_callable) for c in contents if is_callable(c)]
        if inner:
            return set().union(*(parts for parts, _ in inner)), [t for _, tensors in inner for t in tensors]
    return {"overlay"}, []


def _open(function) -> tuple:
    cells = [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]
    return function, getattr(function, "__qualname__", ""), [x for c in cells for x in (c if isinstance(c, tuple)
                                                                                         else (c,))]


UNREAD = ("under torch.compile, ring dilated attention could not read how transformers' mask function is made (with "
          f"torch {torch.__version__}), so it cannot tell whether the mask adds to the causal pattern: run the model "
          "without torch.compile")


def _traced_mask_parts(mask_function) -> tuple[set[str], list[torch.Tensor]]:
    """`mask_parts` while Dynamo traces: a function made inside the trace has no closures Python can read, but Dynamo
    holds their contents. `_read_traced_mask` reads them at trace time and sets ``read`` below; if it cannot (another
    torch), ``read`` stays None and the mask is refused (`UNREAD`)."""
    read = None
    comptime(_read_traced_mask)
    if read is None:
        return {"unread"}, []
    names, *packed = read
    return set(names.split(",")), packed


def _read_traced_mask(context) -> None:
    """Run by Dynamo inside `_traced_mask_parts`'s frame (``comptime``): `_parts` of its ``mask_function`` from
    Dynamo's variables, stored in the frame's ``read`` as the names joined by commas, then the packed-sequence
    indices (tensors of the graph). This reads Dynamo's internals, which have no stable API: anything unexpected
    leaves ``read`` unset."""
    try:
        from torch._dynamo.variables import ConstantVariable, TensorVariable, TupleVariable

        tracer = context._i_will_not_complain_if_bc_breaks_InstructionTranslator()
        function = context.get_local("mask_function")._i_will_not_complain_if_bc_breaks_VariableTracker()

        def open_traced(variable):
            variable = variable.realize()
            real = getattr(variable, "fn", None)  # a function made before the trace, as causal_mask_function
            if real is not None or getattr(variable, "closure", None) is None:
                return real, getattr(real, "__qualname__", ""), []
            contents = [tracer.output.side_effects.load_cell(cell) for cell in variable.closure.items]
            flat = [x for c in contents for x in (c.items if isinstance(c, TupleVariable) else (c,))]
            return None, variable.get_code().co_qualname, flat

        def is_callable(variable):
            kind = variable.python_type()
            return any("__call__" in vars(k) for k in kind.__mro__)

        parts, packed = _parts(function, open_traced, lambda v: isinstance(v.realize(), TensorVariable), is_callable)
        tracer.symbolic_locals["read"] = TupleVariable([ConstantVariable.create(",".join(sorted(parts))), *packed])
    except Exception:  # noqa: BLE001 - see the docstring: `_traced_mask_parts` then refuses the mask
        return
