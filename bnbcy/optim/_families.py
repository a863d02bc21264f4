"""One table of optimizer families, from which every public optimizer class is generated.

bitsandbytes spells out 39 near-identical classes (``Adam``, ``Adam8bit``, ``PagedAdam32bit``,
...). Here each family is one :class:`Family` entry -- kernel name, state count, user-facing
parameters with their defaults, how they map onto :class:`Optimizer1State` /
:class:`Optimizer2State`, and what is validated -- and :func:`build` turns it into the
variants. Each generated class has a real ``__init__`` (compiled from its parameter list,
so ``inspect.signature`` and positional calls behave as bitsandbytes') and a NumPy-style
docstring.

Signatures are those of the bitsandbytes 0.49.1 documentation: bnb 0.50.2's plus
``percentile_clipping`` (working: gradient clipping at a percentile of the last 100
gradient norms) and ``block_wise`` (``True`` only; the per-tensor 8-bit state that
``False`` selected was removed in bnb 0.50) where 0.49.1 had them.
"""
from __future__ import annotations

import collections.abc
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch

from .optimizer import Optimizer1State, Optimizer2State

_REQUIRED = inspect.Parameter.empty
_VARIANTS = ("", "8bit", "32bit", "Paged", "Paged8bit", "Paged32bit")


@dataclass(frozen=True)
class Arg:
    """One user-facing constructor parameter."""
    name: str
    default: Any = _REQUIRED
    annotation: Any = _REQUIRED
    doc: str = ""
    type_doc: str = ""


@dataclass(frozen=True)
class Family:
    """Spec of one optimizer family (the variants differ only in bits and paging)."""
    name: str                       # class-name stem, e.g. "Adam"
    module: str                     # bnbcy.optim.<module>
    kernel: str                     # optimizer_name of the update kernels
    states: int                     # 1 or 2
    summary: str                    # first docstring line
    args: tuple                     # Args after ``params``, base-variant order
    to_base: dict                   # base-ctor kwarg -> user arg name, or callable(a) -> value
    variants: tuple = ("", "8bit", "32bit")
    fixed_optim_bits: str = "drop"  # fixed-bit variants: "drop" optim_bits, "keep" (must stay 32), "bits"
    paged_keeps_is_paged: bool = False
    ignored: tuple = ()             # args accepted for compatibility but without effect (warned)
    rejected_8bit: dict = field(default_factory=dict)  # arg -> allowed value for 8-bit variants
    checks: Optional[Callable] = None   # family-specific checks, called with (class name, args)
    params_annotation: Any = _REQUIRED
    notes: str = ""
    parents: dict = field(default_factory=dict)        # variant -> parent variant (bnb's hierarchy)


# --------------------------------------------------------------------------- shared arguments
def _lr(default, what="The learning rate."):
    return Arg("lr", default, doc=what, type_doc="float" if default is _REQUIRED else f"float, default {default!r}")


_OPTIM_BITS = Arg("optim_bits", 32, doc="Bits of the optimizer state: 32 or 8 (8-bit blockwise state; "
                  "parameters smaller than ``min_8bit_size`` keep 32-bit state).", type_doc="int, default 32")
_ARGS = Arg("args", None, doc="Object with ``optim_bits``, ``min_8bit_size``, ``max_unorm`` and "
            "``skip_zeros`` attributes used instead of the individual arguments.", type_doc="object, optional")
_MIN8 = Arg("min_8bit_size", 4096, doc="Parameters with fewer elements keep 32-bit state.",
            type_doc="int, default 4096")
_PC = Arg("percentile_clipping", 100, doc="Clip each gradient to this percentile of the norms of its last "
          "100 gradients (``gnorm_vec`` state); 100 disables clipping.", type_doc="int, default 100")
_BW = Arg("block_wise", True, doc="Quantize 8-bit state in independent blocks of 256 elements. Only ``True`` "
          "is supported (the per-tensor 8-bit state of ``False`` was removed in bitsandbytes 0.50); "
          "``False`` raises ``ValueError``.", type_doc="bool, default True")
_PAGED = Arg("is_paged", False, doc="Page ``state1``/``state2`` of parameters with at least 1e5 elements between "
             "device and host memory (CUDA managed memory; host memory on the CPU; see ``bnbcy.optim.paged``).",
             type_doc="bool, default False")
_AMSGRAD = Arg("amsgrad", False, doc="Accepted for compatibility; AMSGrad is not implemented (ignored with a "
               "warning; 8-bit variants raise for ``True``, as bitsandbytes).", type_doc="bool, default False")


def _betas(default, what):
    return Arg("betas", default, doc=what, type_doc=f"tuple of float, default {default!r}")


def _eps(default):
    return Arg("eps", default, doc="Term added to the denominator for numerical stability.",
               type_doc=f"float, default {default!r}")


def _wd(default, how):
    return Arg("weight_decay", default, doc=how, type_doc=f"float, default {default!r}")


def _momentum_checks(label):
    def check(cls_name, a):
        if a["momentum"] == 0:
            raise NotImplementedError(f"{label} without momentum is not supported!")
    return check


def _rmsprop_checks(cls_name, a):
    if a["alpha"] == 0:
        raise NotImplementedError("RMSprop with alpha==0.0 is not supported!")
    if a["centered"]:
        raise NotImplementedError("Centered RMSprop is not supported!")


def _adagrad_checks(cls_name, a):
    for key, label in (("lr", "learning rate"), ("weight_decay", "weight_decay value"), ("eps", "epsilon value")):
        if not 0.0 <= a[key]:
            raise ValueError(f"Invalid {label}: {a[key]}")
    if a["initial_accumulator_value"] != 0.0:
        raise ValueError("Initial accumulator value != 0.0 not supported!")
    if a["lr_decay"] != 0.0:
        raise ValueError("Lr Decay != 0.0 not supported!")


_ADAM_ARGS = lambda wd: (  # noqa: E731
    _lr(1e-3), _betas((0.9, 0.999), "Decay rates of the first and second moment."), _eps(1e-8),
    _wd(wd, "Decoupled (AdamW-style) weight decay, applied after the Adam step."), _AMSGRAD,
    _OPTIM_BITS, _ARGS, _MIN8, _PC, _BW, _PAGED)

_SGD_LIKE = lambda extra: (  # noqa: E731
    _lr(_REQUIRED),
    Arg("momentum", 0, doc="Momentum factor; 0 raises ``NotImplementedError`` (as bitsandbytes).",
        type_doc="float, default 0"),
    Arg("dampening", 0, doc="Accepted for compatibility; ignored by the momentum kernel (warned).",
        type_doc="float, default 0"),
    _wd(0, "L2 penalty added to the gradient."),
    Arg("nesterov", False, doc="Accepted for compatibility; Nesterov momentum is not implemented "
        "(ignored with a warning, as bitsandbytes ignores it).", type_doc="bool, default False"),
    _OPTIM_BITS, _ARGS, _MIN8, _PC) + extra

FAMILIES = (
    Family("Adam", "adam", "adam", 2, "Adam with bitsandbytes' 32-bit or 8-bit blockwise state.",
           _ADAM_ARGS(0), {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"},
           variants=_VARIANTS, fixed_optim_bits="keep", paged_keeps_is_paged=True, ignored=("amsgrad",),
           rejected_8bit={"amsgrad": False},
           notes="Weight decay is decoupled (``torch.optim.AdamW`` semantics, applied after the step), "
                 "unlike ``torch.optim.Adam``."),
    Family("AdamW", "adamw", "adam", 2, "AdamW with bitsandbytes' 32-bit or 8-bit blockwise state.",
           _ADAM_ARGS(1e-2), {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"},
           variants=_VARIANTS, fixed_optim_bits="keep", paged_keeps_is_paged=False, ignored=("amsgrad",),
           rejected_8bit={"amsgrad": False}),
    Family("AdEMAMix", "ademamix", "ademamix", 2,
           "AdEMAMix (a fast and a slow EMA of the gradient) with 32-bit or 8-bit blockwise state.",
           (Arg("lr", 1e-3, float, "The learning rate.", "float, default 0.001"),
            Arg("betas", (0.9, 0.999, 0.9999), tuple[float, float, float],
                "Decay rates of the fast EMA, the second moment and the slow EMA.",
                "tuple of float, default (0.9, 0.999, 0.9999)"),
            Arg("alpha", 5.0, float, "Weight of the slow EMA in the update.", "float, default 5.0"),
            Arg("t_alpha", None, Optional[int], "Steps of the linear warm-up of ``alpha`` (None: no warm-up).",
                "int, optional"),
            Arg("t_beta3", None, Optional[int], "Steps of the warm-up of ``beta3`` (None: no warm-up).",
                "int, optional"),
            Arg("eps", 1e-8, float, "Term added to the denominator for numerical stability.",
                "float, default 1e-08"),
            Arg("weight_decay", 1e-2, float, "Decoupled weight decay, applied after the step.",
                "float, default 0.01"),
            Arg("optim_bits", 32, Literal[8, 32], _OPTIM_BITS.doc, "{8, 32}, default 32"),
            Arg("min_8bit_size", 4096, int, _MIN8.doc, "int, default 4096"),
            Arg("is_paged", False, bool, _PAGED.doc, "bool, default False")),
           {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay", "alpha": "alpha",
            "t_alpha": "t_alpha", "t_beta3": "t_beta3"},
           variants=_VARIANTS, params_annotation=collections.abc.Iterable[torch.nn.Parameter],
           parents={"8bit": "", "Paged": "", "Paged8bit": "8bit", "Paged32bit": "32bit"},
           notes="``state1`` holds both EMAs, shape ``[2, *p.shape]``."),
    Family("Lion", "lion", "lion", 1, "Lion (sign of an interpolated momentum) with 32-bit or 8-bit state.",
           (_lr(1e-4), _betas((0.9, 0.99), "Interpolation factor of the update and decay rate of the momentum."),
            _wd(0, "Decoupled weight decay, applied before the step."), _OPTIM_BITS, _ARGS, _MIN8, _PC, _BW,
            _PAGED),
           {"lr": "lr", "betas": "betas", "eps": lambda a: 0.0, "weight_decay": "weight_decay"},
           variants=_VARIANTS),
    Family("SGD", "sgd", "momentum", 1, "SGD with momentum and 32-bit or 8-bit blockwise state.",
           _SGD_LIKE((_BW,)),
           {"lr": "lr", "betas": lambda a: (a["momentum"], a["dampening"]), "eps": lambda a: 0.0,
            "weight_decay": "weight_decay"},
           ignored=("dampening", "nesterov"), checks=_momentum_checks("SGD"),
           notes="Plain heavy-ball momentum: ``buf = momentum * buf + g`` (``buf = g`` at the first step), "
                 "``p -= lr * buf``; equals ``torch.optim.SGD(momentum=m)``."),
    Family("LARS", "lars", "lars", 1, "LARS: momentum SGD with a layer-wise trust ratio (``max_unorm``).",
           _SGD_LIKE((Arg("max_unorm", 0.02, doc="Largest update norm relative to the parameter norm.",
                          type_doc="float, default 0.02"),)),
           {"lr": "lr", "betas": lambda a: (a["momentum"], a["dampening"]), "eps": lambda a: 0.0,
            "weight_decay": "weight_decay", "max_unorm": "max_unorm"},
           ignored=("dampening", "nesterov"), checks=_momentum_checks("LARS")),
    Family("LAMB", "lamb", "lamb", 2, "LAMB: Adam with a layer-wise trust ratio (``max_unorm``).",
           (_lr(1e-3),
            Arg("bias_correction", True, doc="Accepted for compatibility (bias correction is always on).",
                type_doc="bool, default True"),
            _betas((0.9, 0.999), "Decay rates of the first and second moment."), _eps(1e-8),
            _wd(0, "Decoupled weight decay, applied after the step."), _AMSGRAD,
            Arg("adam_w_mode", True, doc="Accepted for compatibility (decay is always decoupled).",
                type_doc="bool, default True"),
            _OPTIM_BITS, _ARGS, _MIN8, _PC,
            Arg("block_wise", False, doc="Accepted for compatibility: LAMB's documented default ``False`` "
                "(per-tensor 8-bit state, removed in bitsandbytes 0.50) is treated as ``True``; 8-bit LAMB "
                "state is block-wise.", type_doc="bool, default False"),
            Arg("max_unorm", 1.0, doc="Largest update norm relative to the parameter norm (the trust ratio).",
                type_doc="float, default 1.0")),
           {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay", "max_unorm": "max_unorm"},
           ignored=("bias_correction", "amsgrad", "adam_w_mode"),
           rejected_8bit={"amsgrad": False, "max_unorm": 1.0}),
    Family("RMSprop", "rmsprop", "rmsprop", 1, "RMSprop with 32-bit or 8-bit blockwise state.",
           (_lr(1e-2), Arg("alpha", 0.99, doc="Decay rate of the squared-gradient average (0 raises).",
                           type_doc="float, default 0.99"),
            _eps(1e-8), _wd(0, "L2 penalty added to the gradient."),
            Arg("momentum", 0, doc="Accepted for compatibility; ignored (warned).", type_doc="float, default 0"),
            Arg("centered", False, doc="Centered RMSprop is not supported (``True`` raises).",
                type_doc="bool, default False"),
            _OPTIM_BITS, _ARGS, _MIN8, _PC, _BW),
           {"lr": "lr", "betas": lambda a: (a["alpha"], a["momentum"]), "eps": "eps",
            "weight_decay": "weight_decay"},
           ignored=("momentum",), checks=_rmsprop_checks),
    Family("Adagrad", "adagrad", "adagrad", 1, "Adagrad with 32-bit or 8-bit blockwise state.",
           (_lr(1e-2), Arg("lr_decay", 0, doc="Must be 0 (``ValueError`` otherwise).", type_doc="float, default 0"),
            _wd(0, "L2 penalty added to the gradient."),
            Arg("initial_accumulator_value", 0, doc="Must be 0 (``ValueError`` otherwise).",
                type_doc="float, default 0"),
            _eps(1e-10), _OPTIM_BITS, _ARGS, _MIN8, _PC, _BW),
           {"lr": "lr", "betas": lambda a: (0.0, 0.0), "eps": "eps", "weight_decay": "weight_decay"},
           fixed_optim_bits="bits", checks=_adagrad_checks),
)


# --------------------------------------------------------------------------- generation
def class_name(fam: Family, variant: str) -> str:
    """bitsandbytes' class name of a variant: ``Paged`` is a prefix, the bits a suffix."""
    if variant.startswith("Paged"):
        return "Paged" + fam.name + variant[len("Paged"):]
    return fam.name + variant


def _bits_of(variant):
    return 8 if variant.endswith("8bit") else 32 if variant.endswith("32bit") else None


def variant_args(fam: Family, variant: str):
    """The user-facing Args of one variant (bitsandbytes' per-variant signature quirks)."""
    bits = _bits_of(variant)
    out = []
    for a in fam.args:
        if a.name == "optim_bits" and bits is not None:
            if fam.fixed_optim_bits == "drop":
                continue
            if fam.fixed_optim_bits == "bits":
                a = Arg(a.name, bits, a.annotation, f"Must be {bits} for this class.", f"int, default {bits}")
            elif bits == 8:
                a = Arg(a.name, a.default, a.annotation, "Accepted for compatibility; must stay 32 (the state "
                        "is always 8-bit).", a.type_doc)
        if a.name == "is_paged" and variant.startswith("Paged") and not fam.paged_keeps_is_paged:
            continue
        out.append(a)
    return tuple(out)


def _warn_ignored(cls_name, fam, a, sig_defaults):
    for name in fam.ignored:
        if name in a and a[name] != sig_defaults[name]:
            warnings.warn(f"{cls_name}: {name}={a[name]!r} has no effect (bitsandbytes' {fam.kernel} kernel "
                          f"does not implement it); it is ignored.", UserWarning, stacklevel=4)


def _construct(self, fam: Family, variant: str, a: dict):
    """Body shared by every generated ``__init__``: validate, map, call the base class."""
    label = class_name(fam, variant)
    bits = _bits_of(variant)
    sig_defaults = {x.name: x.default for x in variant_args(fam, variant)}
    if bits == 8:
        for name, allowed in fam.rejected_8bit.items():
            if name in a and a[name] != allowed:
                if name == "amsgrad":
                    raise ValueError(f"{label} does not support amsgrad=True")
                raise ValueError(f"{label} only supports {name}={allowed!r} (default value for compatibility)")
    if "optim_bits" in a:
        if bits == 8 and a["optim_bits"] != sig_defaults["optim_bits"]:
            raise ValueError(f"{label} only supports optim_bits={sig_defaults['optim_bits']} "
                             "(default value for compatibility)")
        if bits is None:
            bits = a["optim_bits"]
    if fam.checks is not None:
        fam.checks(label, a)
    block_wise = a.get("block_wise", True)
    if block_wise is not True:
        if block_wise is False and sig_defaults.get("block_wise") is False:
            block_wise = True          # LAMB's documented default; 8-bit state is block-wise since bnb 0.50
        else:
            raise ValueError(f"{label}: block_wise={block_wise!r} is not supported; per-tensor 8-bit optimizer "
                             "state was removed in bitsandbytes 0.50 and only block_wise=True exists")
    _warn_ignored(label, fam, a, sig_defaults)
    kw = {k: (v(a) if callable(v) else a[v]) for k, v in fam.to_base.items()}
    base = Optimizer2State if fam.states == 2 else Optimizer1State
    base.__init__(self, fam.kernel, a["params"], optim_bits=bits, args=a.get("args"),
                  min_8bit_size=a["min_8bit_size"], percentile_clipping=a.get("percentile_clipping", 100),
                  block_wise=block_wise, is_paged=True if variant.startswith("Paged") else a.get("is_paged", False),
                  **kw)


def _docstring(fam: Family, variant: str, args) -> str:
    bits = _bits_of(variant)
    what = {8: "8-bit blockwise state. ", 32: "32-bit state. "}.get(bits, "")
    paged = "Paged variant (state buffers of large parameters may be paged). " if variant.startswith("Paged") else ""
    lines = [fam.summary, "", (what + paged + "Drop-in for ``bitsandbytes.optim." + class_name(fam, variant)
                               + "``.").strip()]
    if fam.notes:
        lines += ["", fam.notes]
    lines += ["", "Parameters", "----------",
              "params : iterable", "    Parameters to optimize, or dicts defining parameter groups."]
    for x in args:
        lines += [f"{x.name} : {x.type_doc}", f"    {x.doc}"]
    return "\n".join(lines) + "\n"


def _make_init(fam: Family, variant: str, args):
    names = ["params"] + [x.name for x in args]
    parts, ns = ["self", "params"], {"_construct": _construct, "_fam": fam, "_variant": variant}
    for x in args:
        if x.default is _REQUIRED:
            parts.append(x.name)
        else:
            ns[f"_d_{x.name}"] = x.default
            parts.append(f"{x.name}=_d_{x.name}")
    src = (f"def __init__({', '.join(parts)}):\n"
           f"    _construct(self, _fam, _variant, {{{', '.join(f'{n!r}: {n}' for n in names)}}})\n")
    exec(compile(src, f"<bnbcy.optim.{fam.module}.{class_name(fam, variant)}.__init__>", "exec"), ns)
    init = ns["__init__"]
    ann = {x.name: x.annotation for x in args if x.annotation is not _REQUIRED}
    if fam.params_annotation is not _REQUIRED:
        ann = {"params": fam.params_annotation, **ann}
    init.__annotations__ = ann
    return init


def build(module_name: str, family_name: str) -> dict:
    """Generate the classes of one family for the module ``module_name``; returns name -> class."""
    fam = next(f for f in FAMILIES if f.name == family_name)
    default_base = Optimizer2State if fam.states == 2 else Optimizer1State
    out = {}
    for variant in fam.variants:           # parents come before children in _VARIANTS order
        cls_name = class_name(fam, variant)
        args = variant_args(fam, variant)
        parent = out[class_name(fam, fam.parents[variant])] if variant in fam.parents else default_base
        init = _make_init(fam, variant, args)
        init.__qualname__ = f"{cls_name}.__init__"
        init.__module__ = module_name
        doc = _docstring(fam, variant, args)
        init.__doc__ = doc
        cls = type(cls_name, (parent,), {"__init__": init, "__doc__": doc, "__module__": module_name,
                                         "_family": fam, "_variant": variant})
        cls.__qualname__ = cls_name
        out[cls_name] = cls
    return out
