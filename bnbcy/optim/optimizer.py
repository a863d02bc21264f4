"""Optimizer machinery with bitsandbytes' names and formats (``bitsandbytes.optim.optimizer``;
NUMERICS.md §6.2, §6.7, §6.9, §7).

* :class:`GlobalOptimManager` -- singleton of per-parameter config overrides
  (``register_parameters``, ``override_config``, ``register_module_override``).
* :class:`Optimizer8bit` -- base class: config lookup, state allocation (one function,
  :meth:`Optimizer8bit.get_state_buffer`), input validation, ``step``, and the
  ``state_dict`` / ``load_state_dict`` pair with bitsandbytes' nested
  ``"__bnb_optimizer_quant_state__"`` wrapping.
* :class:`Optimizer2State` (Adam-like: ``state1``, ``state2``) and :class:`Optimizer1State`
  (SGD-like: ``state1``).

``step()`` validates every parameter that has a gradient *before* it allocates or changes
anything (through the one validation layer, :mod:`bnbcy.optim._validation`), then issues one multi-tensor kernel call per parameter group and state kind
(32-bit / 8-bit; params whose per-parameter hyper-parameters differ are split off into
their own call) with no host synchronisation per parameter.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections import abc as container_abcs
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Optional

import torch

from .. import backends
from .. import distributed as _dist
from . import _table, paged
from . import _validation as V

__all__ = ["GlobalOptimManager", "MockArgs", "Optimizer8bit", "Optimizer1State", "Optimizer2State"]


# Per-parameter state keys that are never dtype-cast on load (bitsandbytes' set).
_NON_CASTABLE = frozenset({"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2",
                           "gnorm_vec", "absmax1", "absmax2", "unorm_vec"})


def _F():
    """The optimizer-update functional API (imported lazily: it carries the kernels)."""
    from ..functional import optim_update
    return optim_update


class MockArgs:
    """Attribute bag for the ``args`` object bitsandbytes' optimizers keep in ``self.args``."""

    def __init__(self, initial_data):
        for key in initial_data:
            setattr(self, key, initial_data[key])


class GlobalOptimManager:
    """Process-wide registry of per-parameter optimizer config overrides.

    Obtain it with :meth:`get_instance` (the constructor raises). Overrides are keyed by
    ``id(parameter)`` and win over the optimizer's group settings in
    :meth:`Optimizer8bit.get_config`.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    def initialize(self):
        """Forget every registered parameter and override."""
        self.pid2config = {}
        self.index2config = {}
        self.optimizer = None
        self.uses_config_override = False
        self._module_overrides = []       # (weakref to module, attribute, config)

    @classmethod
    def get_instance(cls):
        """Return the singleton, creating it on first use."""
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params):
        """Map ``(group_index, param_index)`` of ``params`` to the configs already set by id.

        Parameters
        ----------
        params : iterable of torch.Tensor or of dict
            Parameters or parameter groups, in the order the optimizer will get them.
        """
        groups = list(params)
        if not groups:
            return
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gindex, group in enumerate(groups):
            plist = group["params"]
            plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
            for pindex, p in enumerate(plist):
                if id(p) in self.pid2config:
                    self.index2config[(gindex, pindex)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None):
        """Override optimizer hyper-parameters (``lr``, ``betas``, ``optim_bits``, ...) per parameter.

        Parameters
        ----------
        parameters : torch.Tensor or list of torch.Tensor
            The parameters the override applies to.
        key : str, optional
            The hyper-parameter to override.
        value : object, optional
            Its value.
        key_value_dict : dict, optional
            Several key/value pairs at once (not together with ``key``/``value``).
        """
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None and value is not None:
            if key_value_dict is not None:
                raise ValueError("pass either key/value or key_value_dict, not both")
            key_value_dict = {key: value}
        if key_value_dict is None:
            return
        for p in parameters:
            if id(p) in self.pid2config:
                self.pid2config[id(p)].update(key_value_dict)
            else:
                self.pid2config[id(p)] = dict(key_value_dict)

    def register_module_override(self, module, param_name, config):
        """Override the config of ``getattr(module, param_name)``; resolved at the first ``step()``.

        Parameters
        ----------
        module : torch.nn.Module
            Module owning the parameter.
        param_name : str
            Attribute name of the parameter (e.g. ``"weight"``).
        config : dict
            Overrides, e.g. ``{"optim_bits": 32}``.
        """
        self._module_overrides.append((weakref.ref(module), param_name, config))

    @property
    def module_weight_config_triple(self):
        """The ``(module, param_name, config)`` overrides whose module is still alive (the manager
        holds modules weakly: registering one does not keep it alive)."""
        live = [(ref(), name, cfg) for ref, name, cfg in self._module_overrides]
        self._module_overrides = [o for o, (m, _, _) in zip(self._module_overrides, live) if m is not None]
        return [t for t in live if t[0] is not None]


def _parse_betas(betas):
    """Betas as a tuple of floats; bitsandbytes also accepts the string ``"(b1, b2)"``."""
    if isinstance(betas, str):
        betas = [float(b) for b in betas.replace("(", "").replace(")", "").strip().split(",") if b.strip()]
    return tuple(betas)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of bitsandbytes-style optimizers with 32-bit or 8-bit blockwise state.

    Parameters
    ----------
    params : iterable
        Parameters to optimize, or dicts defining parameter groups.
    defaults : dict
        Default hyper-parameters of a group.
    optim_bits : int, default 32
        Bits of the optimizer state (32 or 8).
    is_paged : bool, default False
        Request paged (managed-memory) state buffers; see :meth:`get_state_buffer`.
    """

    _FSDP_WRAPPED_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
    # set by subclasses: how many moments the kernel keeps, the leading dim of state1
    _n_states = 1
    _min_betas = 1

    def __init__(self, params, defaults, optim_bits=32, is_paged=False):
        super().__init__(params, defaults)
        self.initialized = False
        self.name2qmap = {}
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = set(_NON_CASTABLE)
        self._forget_layouts()
        if optim_bits == 8:
            self.fill_qmap()

    # ------------------------------------------------------------------ set-up
    def fill_qmap(self):
        """Build the signed (``dynamic``) and unsigned (``udynamic``) 8-bit state maps."""
        from ..functional.maps import create_dynamic_map
        self.name2qmap["dynamic"] = create_dynamic_map(signed=True)
        self.name2qmap["udynamic"] = create_dynamic_map(signed=False)

    def add_param_group(self, param_group):
        """Add a parameter group; its hyper-parameters are validated before it is added."""
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        if "betas" in param_group:
            param_group["betas"] = _parse_betas(param_group["betas"])
            merged["betas"] = param_group["betas"]
        V.check_hyper(merged, self._min_betas)
        plist = param_group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        for p in plist:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        param_group["params"] = plist
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._forget_layouts()

    def _forget_layouts(self):
        """Drop what earlier steps found valid (a loaded state is checked in full at the next step)."""
        self._layouts = {}        # id(p) -> _validation.Layout
        self._configs = {}        # gindex -> the group config the layouts were checked with
        self._stamp = 0           # overlap checks passed so far
        self._views, self._hits = {}, {}

    # ------------------------------------------------------------------ configs
    def get_config(self, gindex, pindex, group):
        """Hyper-parameters of one parameter: group values, optimizer args, then overrides."""
        args = self.args
        config = {
            "betas": group["betas"], "eps": group["eps"], "weight_decay": group["weight_decay"],
            "lr": group["lr"], "alpha": group.get("alpha", 0.0), "t_alpha": group.get("t_alpha", None),
            "t_beta3": group.get("t_beta3", None),
            "optim_bits": args.optim_bits, "min_8bit_size": args.min_8bit_size,
            "max_unorm": getattr(args, "max_unorm", 0.0), "skip_zeros": getattr(args, "skip_zeros", False),
            "percentile_clipping": getattr(args, "percentile_clipping", 100),
            "block_wise": getattr(args, "block_wise", True),
        }
        if (gindex, pindex) in self.mng.index2config:
            config.update(self.mng.index2config[(gindex, pindex)])
        p = self.param_groups[gindex]["params"][pindex]
        if id(p) in self.mng.pid2config:
            config.update(self.mng.pid2config[id(p)])
        config["betas"] = _parse_betas(config["betas"])
        return config

    def check_overrides(self):
        """Resolve ``register_module_override`` entries against this optimizer's parameters."""
        for module, attr, config in self.mng.module_weight_config_triple:
            target = getattr(module, attr, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"module override: {type(module).__name__}.{attr} is not a tensor")
            for gindex, group in enumerate(self.param_groups):
                hit = next((i for i, p in enumerate(group["params"]) if p is target), None)
                if hit is not None:
                    self.mng.pid2config[id(target)] = config
                    self.mng.index2config[(gindex, hit)] = config
                    break

    def to_gpu(self):
        """Move non-paged state tensors of accelerator parameters to their parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type == "cpu" or p not in self.state:
                    continue
                st = self.state[p]
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and not getattr(v, "is_paged", False):
                        st[k] = v.to(p.device)

    # ------------------------------------------------------------------ state allocation
    def get_state_buffer(self, p, dtype=torch.float32, *, shape=None, pageable=True):
        """Allocate one zero-filled optimizer state tensor for parameter ``p``.

        Every state tensor (``state1``, ``state2``, ``absmax*``, ``unorm_vec``, ``gnorm_vec``)
        is allocated here, so a managed-memory (paged) backing plugs in at one place.

        Parameters
        ----------
        p : torch.Tensor
            The parameter (gives the device, and the shape unless ``shape`` is given).
        dtype : torch.dtype, default torch.float32
            Element type (float32 for 32-bit state, uint8 for 8-bit codes).
        shape : tuple of int, optional
            Shape of the buffer; ``p.shape`` if omitted.
        pageable : bool, default True
            Whether this buffer may be paged (only ``state1``/``state2`` are, as in bitsandbytes,
            and only for parameters of at least 1e5 elements).

        Returns
        -------
        torch.Tensor
            Zeros of ``shape`` and ``dtype`` on ``p.device``.
        """
        shape = tuple(p.shape) if shape is None else tuple(shape)
        if pageable and self.is_paged and paged.pageable(p):
            return paged.state_buffer(p, shape, dtype)     # managed memory on CUDA (optim/paged.py)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _qmap(self, name, device):
        """The shared ``dynamic``/``udynamic`` map on ``device`` (one tensor per device)."""
        if name not in self.name2qmap:
            self.fill_qmap()
        q = self.name2qmap[name]
        if q.device != device:
            q = self.name2qmap[name] = q.to(device)
        return q

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        """Create the state of ``p`` (first step with a gradient); NUMERICS.md §6.7."""
        config = self.get_config(gindex, pindex, group)
        bits = config["optim_bits"]
        if bits not in (8, 32):
            raise NotImplementedError(f"Amount of optimizer bits not supported: {bits}")
        eight = bits == 8 and _dist.uses_8bit_state(p, config["min_8bit_size"])
        state = self.state[p]
        p = _dist.local(p)                # distributed hook: state is per shard
        state["step"] = 0
        # the layout the step's validation checks (_validation.expected_state), in its key order
        maps = {"qmap1": "dynamic", "qmap2": "udynamic"}
        for key, (shape, dtype) in V.expected_state(p.shape, p.numel(), self._kernel, eight, config).items():
            if key in maps:
                state[key] = self._qmap(maps[key], p.device)
            else:                         # only the moments may be paged, as in bitsandbytes
                state[key] = self.get_state_buffer(p, dtype, shape=shape, pageable=key in ("state1", "state2"))

    def prefetch_state(self, p):
        """Prefetch paged state of ``p`` to its device on the current stream (see optim/paged.py)."""
        paged.prefetch_state(self, p)

    # ------------------------------------------------------------------ validation (_validation.py)
    @property
    def _kernel(self):
        """This optimizer's row of the kernel table (bnbcy/optim/_table.py)."""
        return _table.kernel(self.optimizer_name)

    def _validate_config(self, config, p, shared=False):
        """``shared``: ``config`` is the group's, already checked whole for another parameter."""
        if shared:
            V.check_config_for(config, p)
        else:
            V.check_config(config, p, self._min_betas)
        _dist.check_sharded_config(p, config)

    def _validate_param(self, p, device):
        V.check_param(type(self).__name__, p, device)

    def _validate_state(self, p, config, pv=None, known=None):
        """Check the existing state of ``p``; returns its step count and ``{key: (tensor, view)}``."""
        pv = V.view(_dist.local(p), "p") if pv is None else pv     # state is per shard
        return V.check_state(self.state[p], p, pv, self._kernel, config, known)

    def _plan(self):
        """Validate everything this step will touch, for every group; return the work.

        Nothing is allocated or modified here, so an exception leaves parameters, state tensors,
        step counters and the state dict as they were. Returns ``(gindex, group, items)`` per group
        with ``items`` a list of ``(pindex, p, config, hyper)``; ``hyper`` is the parameter's
        :class:`~bnbcy.optim._validation.Hyper` for its next step. The views of the checked
        tensors are kept in ``self._views`` (by ``id``) for the kernel calls.

        A parameter checked at an earlier step is not checked again while its
        :class:`~bnbcy.optim._validation.Layout` still holds (the same parameter, config and state
        objects with the same fingerprints): only a gradient that is not the one checked then is
        (:func:`~bnbcy.optim._validation.check_grad`), and the overlap check runs unless every
        parameter is a layout that took part in the last one with the same gradient. A layout
        that no longer holds is dropped.
        """
        plan, views, outputs, inputs = [], {}, [], []
        schedules = self._n_states == 2
        overridden = self.mng.index2config, self.mng.pid2config
        any_own = bool(overridden[0] or overridden[1])
        layouts, hits, checked, configs, seen = self._layouts, {}, [], {}, {}
        known = True                  # every parameter a layout of the last overlap check, same gradient
        for gindex, group in enumerate(self.param_groups):
            items = []
            device = None
            shared, whole, hypers = None, False, {}   # the config of the group's parameters without overrides
            for pindex, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                own = any_own and ((gindex, pindex) in overridden[0] or id(p) in overridden[1])
                if own:
                    config = self.get_config(gindex, pindex, group)
                elif shared is None:
                    shared = config = configs[gindex] = self._group_config(gindex, pindex, group)
                    whole = config is self._configs.get(gindex)       # kept: checked whole at an earlier step
                else:
                    config = shared
                e = layouts.get(id(p))
                step = -1
                if e is not None and not own and e.p is p:
                    step = e.step_if_current(config, self.state.get(p), seen, g)
                gv = None
                if step >= 0:
                    if device is not None and e.device != device:
                        self._validate_param(p, device)              # raises: two devices in a group
                    gfp = e.gfp
                    if not e.same_grad:                              # a gradient not checked yet
                        gfp = e.check_new_grad(type(self).__name__, g)
                        known = False
                    gv = V.view(g, "grad")
                    if not gv.contiguous:                            # made contiguous by the slow path
                        step = -1
                if step >= 0:
                    device = e.device
                    views[id(p)] = e.row[0]
                    views[id(g)] = gv
                    checked.append((e, gfp, gv, True))
                    hits[id(p)] = e
                    known = known and e.stamp == self._stamp
                else:
                    known = False
                    if e is not None:         # stale: let go of what it holds (old state, views)
                        del layouts[id(p)]
                    step = self._check_one(p, g, config, own, whole, device, views, outputs, inputs, checked)
                    device = p.device
                    whole = whole or (config is shared)
                if config is shared:          # its Hyper depends on the step only
                    hyper = hypers.get(step)
                    if hyper is None:
                        hyper = hypers[step] = V.hyper_at(config, step + 1, schedules)
                else:
                    hyper = V.hyper_at(config, step + 1, schedules)
                items.append((pindex, p, config, hyper))
            if items:
                V.check_not_capturing(backends.on_cuda(views[id(_dist.local(items[0][1]))]))
                plan.append((gindex, group, items))
        if not known:
            for e, _, gv, hit in checked:
                if hit:                       # the others' views are in outputs/inputs already
                    outputs.extend(e.outputs)
                    inputs.extend(e.inputs)
                    inputs.append(gv)
            V.check_views(outputs, inputs)
            self._stamp += 1
            for e, gfp, _, _ in checked:      # valid from now on, for these gradients
                e.gfp, e.stamp = gfp, self._stamp
                layouts[id(e.p)] = e
        self._configs = configs
        if len(layouts) > sum(len(g["params"]) for g in self.param_groups):   # parameters left the groups
            live = {id(p): p for g in self.param_groups for p in g["params"]}
            self._layouts = {k: e for k, e in layouts.items() if live.get(k) is e.p}
        self._views, self._hits = views, hits
        return plan

    def _group_config(self, gindex, pindex, group):
        """The resolved config of a group's parameters without overrides: the object kept from the
        last step while it compares equal (its parameters' layouts then hold), else a new one.
        A config holding tensors (an ``lr`` tensor) is new at every step: a tensor can change in
        place."""
        config = self.get_config(gindex, pindex, group)
        kept = self._configs.get(gindex)
        if kept is not None and V.plain_config(config) and config == kept:
            return kept
        return config

    def _check_one(self, p, g, config, own, whole, device, views, outputs, inputs, checked):
        """Check one parameter in full (no layout held); returns its state's step count. Its new
        :class:`~bnbcy.optim._validation.Layout` (if it may have one) joins ``checked``."""
        self._validate_param(p, device)
        self._validate_config(config, p, shared=whole and not own)
        lp, lg = _dist.local(p), _dist.local(g)
        pv = views[id(lp)] = V.view(lp, "p")
        views[id(lg)] = gv = V.view(lg, "grad")
        outputs.append(pv)
        inputs.append(gv)
        state = self.state.get(p)
        if not state:
            return 0
        step, tensors = self._validate_state(p, config, pv, views)
        for key, (t, v) in tensors.items():
            if key.startswith("qmap"):
                if id(t) not in views:          # one map tensor per device, shared
                    inputs.append(v)
            else:
                outputs.append(v)
            views[id(t)] = v
        if (not own and lp is p and pv.numel and pv.contiguous and gv.contiguous and not _dist.is_sharded(p)
                and V.plain_config(config)):
            layout = V.Layout(self._kernel, p, pv, p.device, config, state, tensors)
            checked.append((layout, V.fingerprint(g), gv, False))
        return step

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step, for every parameter or for none.

        Every parameter group is validated first (parameters, gradients, existing state,
        step counts, hyper-parameters and their schedules); only then are new states allocated,
        step counters advanced and the kernels run (one multi-tensor call per group and state
        kind). An invalid input raises before anything has changed.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (run with gradients enabled).

        Returns
        -------
        object
            The closure's return value, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True

        plan = self._plan()
        ratios = {}
        if self._may_scale_updates():           # distributed hook: collective, changes nothing
            ratios = _dist.global_trust_ratios(self, plan)
        created, hits = [], self._hits
        try:
            for gindex, group, items in plan:
                for pindex, p, _, _ in items:
                    if id(p) not in hits and len(self.state[p]) == 0:     # a layout has a state
                        created.append(p)
                        self.init_state(group, p, gindex, pindex)
        except BaseException:                    # e.g. out of memory: no new state stays behind
            for p in created:
                self.state.pop(p, None)
            raise
        prefetch = self.is_paged or type(self).prefetch_state is not Optimizer8bit.prefetch_state
        try:
            for gindex, group, items in plan:
                if prefetch:                     # (a no-op without paged state)
                    for _, p, _, _ in items:
                        self.prefetch_state(p)
                self._update_group(group, items, ratios)
        finally:
            self._views, self._hits = {}, {}
        return loss

    def _may_scale_updates(self):
        """Whether some parameter's config may have ``max_unorm > 0`` (the trust ratio): without
        one, :func:`bnbcy.distributed.global_trust_ratios` finds nothing to do on any rank (the
        configs are the same on every rank) and is not called."""
        def off(v):
            return type(v) in (int, float) and v <= 0.0
        configs = chain(self.mng.pid2config.values(), self.mng.index2config.values())
        return not off(getattr(self.args, "max_unorm", 0.0)) or not all(off(c.get("max_unorm", 0.0)) for c in configs)

    def _update_group(self, group, items, ratios=None):
        """Advance ``step`` and run the update kernels: one multi-tensor call per bucket.

        A bucket is (state kind, hyper-parameter record); with no per-parameter overrides that is
        one call per group and state kind. Steps travel as a list, so parameters whose step
        counts differ share a call (except under the AdEMAMix schedules, whose alpha and beta3
        depend on the step). ``percentile_clipping < 100`` needs a per-tensor ``gnorm_scale``,
        which the multi-tensor kernels take as one scalar: those parameters get a call each.
        Zero-size parameters only advance their step, as in torch.optim. ``ratios``: the
        per-shard ``max_unorm`` of sharded LAMB/LARS parameters
        (:func:`bnbcy.distributed.global_trust_ratios`).
        """
        buckets = {}
        hits = self._hits
        for _, p, config, hyper in items:
            pc = config["percentile_clipping"]
            e = hits.get(id(p))
            if e is not None:                 # a layout of this plan: not empty, not sharded, contiguous
                state = e.state
                state["step"] += 1
                key = (e.eight, hyper, pc, e.qid, id(p) if pc < 100 else None)
            else:
                state = self.state[p]
                state["step"] += 1
                if p.numel() == 0:
                    continue
                if _dist.local(p).numel() == 0:
                    continue
                if hyper.max_unorm > 0.0 and _dist.is_sharded(p):
                    # distributed hook: the shard's max_unorm that applies the global trust ratio
                    hyper = dataclasses.replace(hyper, max_unorm=ratios[id(p)])
                if not _dist.local(p).is_contiguous() or not _dist.local(p.grad).is_contiguous():
                    for t in (_dist.local(p), _dist.local(p.grad)):   # replaced: view them again
                        self._views.pop(id(t), None)
                    _dist.make_contiguous(p)
                eight = state["state1"].dtype == torch.uint8
                key = (eight, hyper, pc, id(state["qmap1"]) if eight else None, id(p) if pc < 100 else None)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = ([], [], [])
            bucket[0].append(p)
            bucket[1].append(state)
            bucket[2].append(e)
        for (eight, hyper, pc, _, _), (ps, states, layouts) in buckets.items():
            self._launch(eight, hyper, pc, ps, states, layouts)

    def _launch(self, eight, h, pc, ps, states=None, layouts=None):
        """One kernel call for the parameters ``ps`` (``states``: their ``self.state`` entries, or
        stand-ins for them, as the distributed trust-ratio pass uses; ``layouts``: their current
        :class:`~bnbcy.optim._validation.Layout`, None entries where a parameter has none);
        everything was validated by the plan (:meth:`_plan`), so the call is built with no second
        check."""
        F = _F()
        views = self._views
        st = [self.state[p] for p in ps] if states is None else states
        kernel = self._kernel
        if layouts is not None and None not in layouts:     # the common case: one row per layout
            gs = [p.grad for p in ps]
            gv = [views[id(g)] for g in gs]
            pv, s1v, s2v, a1v, a2v, q1s, q2s = map(list, zip(*[e.row for e in layouts]))
        else:
            layouts = layouts or [None] * len(ps)
            local = _dist.local                         # distributed hook: kernels see local shards
            gs = [p.grad if e is not None else local(p.grad) for p, e in zip(ps, layouts)]
            ps = [p if e is not None else local(p) for p, e in zip(ps, layouts)]
            gv = [views.get(id(g)) or V.view(g, "grad") for g in gs]
            rows = [e.row if e is not None else
                    (views.get(id(p)) or V.view(p, "p"), *V.state_views(kernel, eight, s, views))
                    for p, s, e in zip(ps, st, layouts)]
            pv, s1v, s2v, a1v, a2v, q1s, q2s = map(list, zip(*rows))
        sv, q1, q2 = [s1v, s2v, a1v, a2v], q1s[0], q2s[0]
        steps = [s["step"] for s in st]
        gnorm_scale = 1.0
        if pc < 100:                                    # one parameter per bucket here
            gnorm_scale = F.percentile_clipping(gs[0], st[0]["gnorm_vec"], steps[0], pc)[2]
        u = V.checked_update(self._kernel, eight, ps, gs, pv, gv, sv, q1, q2, st, steps, h, gnorm_scale)
        s1, s2, unorm = [s["state1"] for s in st], [s.get("state2") for s in st], u.unorm_vecs
        if not eight:
            F.optimizer_update_32bit_multi(
                self.optimizer_name, gs, ps, s1, h.beta1, h.eps, steps, h.lr, state2s=s2, beta2=h.beta2, beta3=h.beta3,
                alpha=h.alpha, weight_decay=h.weight_decay, gnorm_scale=gnorm_scale, unorm_vecs=unorm,
                max_unorm=h.max_unorm, skip_zeros=h.skip_zeros, _checked=u)
        else:
            F.optimizer_update_8bit_blockwise_multi(
                self.optimizer_name, gs, ps, s1, s2, h.beta1, h.beta2, h.beta3, h.alpha, h.eps, steps, h.lr,
                st[0]["qmap1"], st[0].get("qmap2"), [s["absmax1"] for s in st], [s.get("absmax2") for s in st],
                weight_decay=h.weight_decay, gnorm_scale=gnorm_scale, skip_zeros=h.skip_zeros, max_unorm=h.max_unorm,
                unorm_vecs=unorm, _checked=u)

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        """Update one parameter (bitsandbytes' per-parameter entry point)."""
        config = self.get_config(gindex, pindex, group)
        self._validate_param(p, None)
        self._validate_config(config, p)
        step = self._validate_state(p, config)[0] if self.state.get(p) else 0
        hyper = V.hyper_at(config, step + 1, self._n_states == 2)
        items = [(pindex, p, config, hyper)]
        ratios = _dist.global_trust_ratios(self, [(gindex, group, items)])    # distributed hook
        if len(self.state[p]) == 0:
            self.init_state(group, p, gindex, pindex)
        self._update_group(group, items, ratios)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Optimizer state with the quantization tensors nested under
        ``"__bnb_optimizer_quant_state__"`` per parameter (keeps FSDP from gathering them)."""
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        wrapped = {}
        for k, v in sd["state"].items():
            if isinstance(k, int) and k < len(params) and _dist.is_sharded(params[k]) and isinstance(v, dict):
                # distributed hook: the per-shard form FSDP / DCP gather and shard
                wrapped[k] = _dist.optimizer_state_to_sharded(params[k], v)
                continue
            if isinstance(v, dict):
                v = dict(v)
                quant = {kk: v.pop(kk) for kk in [kk for kk in v if kk in self.non_castable_tensor_keys]}
                if quant:
                    v[self._FSDP_WRAPPED_QUANT_STATE_KEY] = quant
            wrapped[k] = v
        sd["state"] = wrapped
        return sd

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load a state produced by :meth:`state_dict` (bnbcy's or bitsandbytes').

        Parameters
        ----------
        state_dict : dict
            The optimizer state.
        move_to_device : bool, default True
            Move the quantization tensors (``state1``, ``absmax1``, ...) to their parameter's
            device. They are never dtype-cast; other floating tensors take the parameter's dtype.
        """
        state_dict = deepcopy(state_dict)
        key = self._FSDP_WRAPPED_QUANT_STATE_KEY
        for v in state_dict["state"].values():
            if isinstance(v, dict) and key in v:
                v.update(v.pop(key))

        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        non_castable = self.non_castable_tensor_keys

        def cast(param, value):
            if isinstance(value, torch.Tensor):
                if param.is_floating_point() and value.dtype != torch.uint8:
                    value = value.to(param.dtype)
                return value
            if isinstance(value, dict):
                for k, v in value.items():
                    if k in non_castable:
                        if move_to_device and isinstance(v, torch.Tensor):
                            value[k] = v.to(param.device)
                    else:
                        value[k] = cast(param, v)
                return value
            if isinstance(value, container_abcs.Iterable) and not isinstance(value, str):
                return type(value)(cast(param, v) for v in value)
            return value

        state = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                state[id_map[k]] = cast(id_map[k], v)
            else:
                state[k] = v

        where = {id(p): (gi, pi, g) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}
        for p in list(state):                   # distributed hook: back to per-shard state
            if isinstance(p, torch.Tensor) and _dist.is_sharded(p) and isinstance(state[p], dict):
                state[p] = _dist.optimizer_state_from_sharded(p, state[p], self._qmap)
                gi, pi, g = where[id(p)]
                if "state1" in state[p] and self.get_config(gi, pi, g)["max_unorm"] > 0.0:
                    # the trust ratio's scratch norm, left out of the sharded form
                    state[p].setdefault("unorm_vec", torch.zeros(1, device=_dist.local(p).device))
        for p, st in state.items():             # share one qmap tensor per device again
            if isinstance(p, torch.Tensor) and isinstance(st, dict):
                for k, name in (("qmap1", "dynamic"), ("qmap2", "udynamic")):
                    q = st.get(k)
                    if isinstance(q, torch.Tensor) and q.device == p.device:
                        shared = self._qmap(name, p.device)
                        if q.shape == shared.shape and q.dtype == shared.dtype and torch.equal(q, shared):
                            st[k] = shared

        new_groups = []
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            new_groups.append(s)
        self.__setstate__({"state": state, "param_groups": new_groups})


def _make_args(args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping, block_wise):
    if args is not None:
        return args
    return MockArgs({"optim_bits": optim_bits, "min_8bit_size": min_8bit_size, "max_unorm": max_unorm,
                     "skip_zeros": skip_zeros, "percentile_clipping": percentile_clipping,
                     "block_wise": block_wise})


def _check_ctor(lr, eps, betas, weight_decay, nbetas):
    V.check_hyper({"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay}, nbetas)


class Optimizer2State(Optimizer8bit):
    """Base class of 2-state optimizers (Adam, AdamW, LAMB, AdEMAMix).

    Parameters
    ----------
    optimizer_name : str
        Kernel name (``"adam"``, ``"lamb"``, ``"ademamix"``).
    params : iterable
        Parameters to optimize, or dicts defining parameter groups.
    lr : float, default 1e-3
        Learning rate.
    betas : tuple of float, default (0.9, 0.999)
        Decay rates of the moments (a third value is AdEMAMix's slow-EMA beta3).
    eps : float, default 1e-8
        Term added to the denominator.
    weight_decay : float, default 0.0
        Decoupled weight decay.
    optim_bits : int, default 32
        Bits of the optimizer state (32 or 8).
    args : object, optional
        Object with ``optim_bits``, ``min_8bit_size``, ``max_unorm``, ``skip_zeros`` attributes that
        replaces the individual arguments.
    min_8bit_size : int, default 4096
        Parameters with fewer elements keep 32-bit state.
    percentile_clipping : int, default 100
        Clip the gradient at this percentile of the last 100 gradient norms (100 = off).
    block_wise : bool, default True
        Block-wise 8-bit state; ``False`` (removed in bitsandbytes 0.50) raises for 8-bit state.
    max_unorm : float, default 0.0
        Maximum update norm relative to the parameter norm (LAMB trust ratio; 0 = off).
    skip_zeros : bool, default False
        Leave elements with a zero gradient untouched.
    is_paged : bool, default False
        Paged state buffers.
    alpha : float, default 0.0
        AdEMAMix slow-EMA mixing coefficient.
    t_alpha : int, optional
        AdEMAMix alpha warm-up steps.
    t_beta3 : int, optional
        AdEMAMix beta3 warm-up steps.
    """

    _n_states = 2
    _min_betas = 2

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 max_unorm=0.0, skip_zeros=False, is_paged=False, alpha=0.0, t_alpha: Optional[int] = None,
                 t_beta3: Optional[int] = None):
        betas = _parse_betas(betas)
        if optimizer_name == "ademamix":
            self._min_betas = 3
        _check_ctor(lr, eps, betas, weight_decay, self._min_betas)
        V.check_percentile_clipping(percentile_clipping)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha,
                        t_beta3=t_beta3)
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping,
                               block_wise)
        self.optimizer_name = optimizer_name


class Optimizer1State(Optimizer8bit):
    """Base class of 1-state optimizers (SGD, LARS, RMSprop, Adagrad, Lion).

    Parameters
    ----------
    optimizer_name : str
        Kernel name (``"momentum"``, ``"lars"``, ``"rmsprop"``, ``"adagrad"``, ``"lion"``).
    params : iterable
        Parameters to optimize, or dicts defining parameter groups.
    lr : float, default 1e-3
        Learning rate.
    betas : tuple of float, default (0.9, 0.0)
        Kernel betas (momentum / RMSprop alpha / Lion's two betas).
    eps : float, default 1e-8
        Term added to the denominator.
    weight_decay : float, default 0.0
        Weight decay (L2 added to the gradient; decoupled for Lion).
    optim_bits : int, default 32
        Bits of the optimizer state (32 or 8).
    args : object, optional
        Object replacing ``optim_bits``, ``min_8bit_size``, ``max_unorm``, ``skip_zeros``.
    min_8bit_size : int, default 4096
        Parameters with fewer elements keep 32-bit state.
    percentile_clipping : int, default 100
        Clip the gradient at this percentile of the last 100 gradient norms (100 = off).
    block_wise : bool, default True
        Block-wise 8-bit state; ``False`` (removed in bitsandbytes 0.50) raises for 8-bit state.
    max_unorm : float, default 0.0
        Maximum update norm relative to the parameter norm (LARS; 0 = off).
    skip_zeros : bool, default False
        Leave elements with a zero gradient untouched.
    is_paged : bool, default False
        Paged state buffers.
    """

    _n_states = 1
    _min_betas = 1

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.0), eps=1e-8, weight_decay=0.0,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 max_unorm=0.0, skip_zeros=False, is_paged=False):
        betas = _parse_betas(betas)
        _check_ctor(lr, eps, betas, weight_decay, 1)
        V.check_percentile_clipping(percentile_clipping)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping,
                               block_wise)
        self.optimizer_name = optimizer_name
