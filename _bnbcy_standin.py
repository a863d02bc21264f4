"""bnbcy standing in for ``bitsandbytes``: the import-system half, in the standard library only.

The wheel installs ``bnbcy-standin.pth``, whose one line imports this module at interpreter
start-up only when ``BNBCY_AS_BITSANDBYTES`` is set (an environment lookup otherwise). It is a
top-level module, not part of the ``bnbcy`` package, so that start-up imports neither torch nor
bnbcy: a script that sets ``OMP_NUM_THREADS`` or ``CUDA_VISIBLE_DEVICES`` before its imports
still gets them honoured, and processes that never import ``bitsandbytes`` pay nothing more.

:func:`install` puts :class:`StandinFinder` first on ``sys.meta_path``. From then on

* ``import bitsandbytes[.x.y]`` returns the module object ``bnbcy[.x.y]`` (the same objects, so
  ``isinstance`` checks of integrations hold);
* ``importlib.metadata.version("bitsandbytes")`` reads :data:`BITSANDBYTES_API` ``+bnbcy``
  version, and ``importlib.util.find_spec("bitsandbytes")`` answers;
* the first ``import bitsandbytes`` runs :func:`bnbcy._standin.activate` (torch-side set-up)
  and, when a real bitsandbytes is installed too, warns once that bnbcy shadows it.

``bnbcy.install_as_bitsandbytes()`` is the in-code way to the same state.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import warnings

ENV_VAR = "BNBCY_AS_BITSANDBYTES"
ALIAS = "bitsandbytes"
TARGET = "bnbcy"
_OFF = ("", "0", "false", "no", "off")

_shadow_warned = False


def requested(environ=None) -> bool:
    """Whether ``BNBCY_AS_BITSANDBYTES`` asks for the stand-in (anything but unset, empty, ``0``,
    ``false``, ``no``, ``off``)."""
    return (environ if environ is not None else os.environ).get(ENV_VAR, "").strip().lower() not in _OFF


def _target_name(fullname: str):
    """``bitsandbytes.x.y`` -> ``bnbcy.x.y``; None for names outside ``bitsandbytes``."""
    if fullname == ALIAS:
        return TARGET
    if fullname.startswith(ALIAS + "."):
        return TARGET + fullname[len(ALIAS):]
    return None


def _versions() -> tuple[str, str]:
    """``(bnbcy version, bitsandbytes API level)`` from ``bnbcy/_version.py``, read without
    importing bnbcy (so a metadata query stays cheap)."""
    spec = importlib.util.find_spec(TARGET)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("BNBCY_AS_BITSANDBYTES is set but the bnbcy package is not importable")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_version.py")
    ns: dict = {}
    with open(path, encoding="utf-8") as fh:
        exec(compile(fh.read(), path, "exec"), ns)
    return ns["__version__"], ns["BITSANDBYTES_API"]


def standin_version() -> str:
    """The PEP 440 version ``bitsandbytes`` reports under the stand-in, e.g. ``0.50.2+bnbcy0.1.0``:
    the bitsandbytes API level bnbcy implements, with bnbcy's own version as the local part."""
    own, api = _versions()
    return f"{api}+bnbcy{own}"


def real_bitsandbytes():
    """``(version, location)`` of a real bitsandbytes installed on ``sys.path``, or None."""
    spec = importlib.machinery.PathFinder.find_spec(ALIAS)
    if spec is None:
        return None
    try:
        version = next(d.version for d in importlib.metadata.MetadataPathFinder.find_distributions(
            importlib.metadata.DistributionFinder.Context(name=ALIAS)))
    except StopIteration:
        version = "(no metadata)"
    return version, spec.origin or list(spec.submodule_search_locations or ["?"])[0]


def _warn_shadowed() -> None:
    global _shadow_warned
    if _shadow_warned:
        return
    _shadow_warned = True
    real = real_bitsandbytes()
    if real is not None:
        warnings.warn(f"bnbcy {_versions()[0]} stands in for bitsandbytes ({ENV_VAR} / "
                      f"bnbcy.install_as_bitsandbytes()): the installed bitsandbytes {real[0]} at "
                      f"{real[1]} is not used", UserWarning, stacklevel=3)


class StandinDistribution(importlib.metadata.Distribution):
    """Metadata of the ``bitsandbytes`` distribution that bnbcy provides under the stand-in."""

    def read_text(self, filename):
        if filename in ("METADATA", "PKG-INFO"):
            return (f"Metadata-Version: 2.1\nName: {ALIAS}\nVersion: {standin_version()}\n"
                    f"Summary: bnbcy standing in for bitsandbytes ({ENV_VAR})\n")
        return None

    def locate_file(self, path):
        spec = importlib.util.find_spec(TARGET)
        return os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), str(path))


class _AliasLoader(importlib.abc.Loader):
    """Loads ``bitsandbytes.x`` by importing ``bnbcy.x`` and handing out that very module."""

    def __init__(self, target: str):
        self.target = target
        self.own_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        if spec.name == ALIAS:  # the package itself: set up the torch side, once
            importlib.import_module(TARGET + "._standin").activate()
            _warn_shadowed()
        return module

    def exec_module(self, module):
        # Already executed as bnbcy.x; the import system has overwritten ``__spec__`` with the
        # alias spec, which must not stick (bnbcy.x's own imports and find_spec rely on it).
        module.__spec__ = self.own_spec


class StandinFinder(importlib.abc.MetaPathFinder):
    """First entry of ``sys.meta_path`` under the stand-in: resolves ``bitsandbytes[.x]`` names
    to ``bnbcy[.x]`` and answers metadata queries for ``bitsandbytes``."""

    def find_spec(self, fullname, path=None, target=None):
        name = _target_name(fullname)
        if name is None:
            return None
        try:
            real = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            real = None
        if real is None:
            # Claim the name anyway: otherwise the path finder would load bnbcy's files a second
            # time under the bitsandbytes name.
            raise ModuleNotFoundError(f"No module named {fullname!r} (bnbcy, standing in for "
                                      f"bitsandbytes, has no {name!r})", name=fullname)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(name), origin=real.origin,
                                               is_package=real.submodule_search_locations is not None)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name is None or context.name.replace("-", "_").lower() == ALIAS:
            yield StandinDistribution()


def installed() -> bool:
    """Whether the stand-in finder is on ``sys.meta_path``."""
    return any(isinstance(f, StandinFinder) for f in sys.meta_path)


def install() -> None:
    """Put :class:`StandinFinder` first on ``sys.meta_path`` (idempotent).

    Raises
    ------
    RuntimeError
        When a real bitsandbytes has been imported already: modules holding it would mix the
        two libraries. Nothing is changed then.
    """
    current = sys.modules.get(ALIAS)
    if current is not None and getattr(current, "__name__", None) != TARGET:
        raise RuntimeError(f"bitsandbytes ({getattr(current, '__file__', '?')}) is imported already; "
                           f"turn the bnbcy stand-in on before anything imports bitsandbytes "
                           f"({ENV_VAR}=1 in the environment, or bnbcy.install_as_bitsandbytes() first)")
    if not installed():
        sys.meta_path.insert(0, StandinFinder())


def install_from_env() -> None:
    """The ``.pth`` start-up hook: :func:`install` when ``BNBCY_AS_BITSANDBYTES`` asks for it."""
    if requested():
        install()
