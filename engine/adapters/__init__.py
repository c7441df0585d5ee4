"""The DSPy adapters a run writes prompts and reads answers with, chosen by name.

Modules: ``registry`` (the names, ``make_adapter``, the stop string each needs, ``check_fits``) and
``constrained`` (``ConstrainedChatAdapter``: ChatAdapter's layout enforced by vLLM's structured
outputs). The registry imports DSPy only when an adapter is made, so the CLI can list the names.
Does not know pools, programs or steps.
"""

from engine.adapters.registry import ADAPTERS, CHAT_STOP, check_fits, make_adapter, stop_for

__all__ = ["ADAPTERS", "CHAT_STOP", "check_fits", "make_adapter", "stop_for"]
