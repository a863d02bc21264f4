"""The one table of bnbcy's optimizer update kernels.

Every layer takes the optimizer names, their rule, state count and trust-ratio use from here:
``bnbcy.optim._validation`` (names, state layout), ``bnbcy.functional._optim_cuda``
(kernel names), the Cython layer (``_C.OPT_RULE_IDS``) and the C/CUDA rule enums, which
``tests/test_optim_table.py`` checks against :data:`RULE_IDS` (``pyx/include/bnbcy_cpu_optim.h``
``BNBCY_OPT_*``, ``cuda_src/optim.cu`` ``OPT_*``). Adding an optimizer: a row here, its rule in
``pyx/include/bnbcy_cpu_optim_rules.h`` (and ``optim.cu``), its family in ``_families.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

#: the update rules and their ids in the C (``BNBCY_OPT_<RULE>``) and CUDA (``OPT_<RULE>``) enums
RULE_IDS = {"adam": 0, "momentum": 1, "rmsprop": 2, "adagrad": 3, "lion": 4, "ademamix": 5}


@dataclass(frozen=True)
class Kernel:
    """One ``optimizer_name`` of the update functions."""
    name: str            # optimizer_name of bitsandbytes' functional API
    rule: str            # key of RULE_IDS: the update rule the kernels run
    states: int          # moments kept (state1, and state2 for 2)
    state1_lead: int     # leading dimension of state1 and absmax1 (ademamix: 2 EMAs), 0 for none
    trust_ratio: bool    # max_unorm scales the update by the trust ratio (its norm pass runs)

    @property
    def rule_id(self) -> int:
        return RULE_IDS[self.rule]


KERNELS = {k.name: k for k in (
    Kernel("adam", "adam", 2, 0, True),
    Kernel("lamb", "adam", 2, 0, True),
    Kernel("ademamix", "ademamix", 2, 2, False),
    Kernel("momentum", "momentum", 1, 0, True),
    Kernel("lars", "momentum", 1, 0, True),
    Kernel("rmsprop", "rmsprop", 1, 0, True),
    Kernel("adagrad", "adagrad", 1, 0, True),   # computes the norm; bnb's kernel never applies it
    Kernel("lion", "lion", 1, 0, False),
)}

#: every optimizer_name, in table order
OPTIMIZER_NAMES = tuple(KERNELS)


def kernel(name) -> Kernel:
    """The table row of ``name``; ``ValueError`` naming the choices for anything else."""
    row = KERNELS.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"Unsupported optimizer name {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return row
