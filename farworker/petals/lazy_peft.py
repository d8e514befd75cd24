"""Keeps petals' LoRA module (and bitsandbytes with it) unimported until something really uses it.

petals 2.2's ``TransformerBackend.__init__`` runs ``import petals.utils.peft`` for every server backend, only to call
its ``using_adapter(name)`` around each forward/inference step. That module imports bitsandbytes at its top, and
bitsandbytes 0.50 imports torch._dynamo and torch._inductor: about 2.7 s of CPU on every worker start (measured,
benchmarks/RESULTS.md "Worker start cost"), for a worker that serves no adapter. bitsandbytes' quantization does not
need it: petals' ``quantize_module`` imports bitsandbytes on its own when int8/nf4 is asked for.

``install()`` puts a stand-in module under that name. Its ``using_adapter`` is a no-op while the real module was
never loaded: the real one only sets a class attribute that the LoRA layers read, and LoRA layers exist only once
the real module made them (``create_lora_adapter``). Any other name (``load_peft``, ``create_lora_adapter``, ...)
loads the real module on first use and hands it out, and from then on ``using_adapter`` is the real one too, so
adapters keep working.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

PEFT_MODULE = "petals.utils.peft"


class LazyPeft(types.ModuleType):
    """Stands in for ``petals.utils.peft`` in sys.modules until an attribute other than using_adapter is read."""

    def __init__(self):
        super().__init__(PEFT_MODULE, __doc__)
        self._real: types.ModuleType | None = None

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def using_adapter(self, active_adapter):
        if self._real is not None:
            return self._real.using_adapter(active_adapter)
        return contextlib.nullcontext()  # no LoRA layer exists to read the active adapter

    def _load(self) -> types.ModuleType:
        if self._real is None:
            if sys.modules.get(PEFT_MODULE) is self:
                del sys.modules[PEFT_MODULE]  # so the import machinery runs the real module
            try:
                self._real = importlib.import_module(PEFT_MODULE)
            except BaseException:
                sys.modules.setdefault(PEFT_MODULE, self)
                raise
        return self._real

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):  # copy/pickle/inspect probes: not a use of the module
            raise AttributeError(name)
        return getattr(self._load(), name)


def install() -> None:
    """Put the stand-in in place, unless petals' LoRA module is already imported (then there is nothing to save).
    Call after compat.import_petals() and before petals builds its server backends."""
    if PEFT_MODULE not in sys.modules:
        sys.modules[PEFT_MODULE] = LazyPeft()
