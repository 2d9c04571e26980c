"""A user device's table (``[[partitions.NAME.devices]]``) or ``--device`` option read into
a DeviceSpec: its class found and checked, its parameters checked against its constructor.

Everything a user can get wrong fails here, while the system file is read and before any
fd is opened, as one ConfigError naming the file and the key (shown here on two lines)::

    sensor.toml: partitions.demo.devices[0].class: no module named "sensr"
        (class = "sensr:TempSensor")
    sensor.toml: partitions.demo.devices[0].class: TempSensor has no REGION
        (a Ports, Mmio or Pci: where its registers sit)
    sensor.toml: partitions.demo.devices[0].celsius: expected an integer
        (TempSensor's parameter celsius: int), got a string "hot"

A class is named "package.module:Class" (imported as Python imports: installed packages,
PYTHONPATH) or "FILE.py:Class" (a file, relative to the system file's directory or, for
``--device``, the working directory; loaded once per process under a name of its own).
Loading a module runs its code: a system file that names a device is trusted like the
code it names (docs/devices.md). Overlaps with the machine's fixed devices and between
devices are pure checks on the spec (config/validate.py, resources.claim_device).

What does not live here: the public API a device is written against (__init__.py), the
device in a running machine (attach.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from corevisor.config.parse import NAME_RE, parse_path, type_name
from corevisor.errors import ConfigError, quote, show
from corevisor.spec import DeviceSpace, DeviceSpec
from corevisor.userdev import Irq, Mmio, Pci, Ports, Trigger

__all__ = ["RESERVED_KEYS", "device_from_table", "device_from_option", "load_class"]

# The keys of a device's table that are corevisor's; every other key is a parameter.
RESERVED_KEYS = ("class", "name", "base", "gsi")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_DOTTED_RE = re.compile(_DOTTED)
_SCALARS = (bool, int, float, str)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# ---------------------------------------------------------------------- the class


def load_class(text: str, where: str, base: Path | None = None) -> tuple[str, type]:
    """The class "module:Class" or "FILE.py:Class" names, and the canonical form of the
    name (a file's path made absolute): what a spec keeps, so it means the same later."""
    module_text, sep, class_path = text.rpartition(":")
    if not sep or not module_text or _DOTTED_RE.fullmatch(class_path) is None:
        raise ConfigError(
            f'{where}: {quote(text)} is not "package.module:Class" or "FILE.py:Class"'
        )
    if module_text.endswith(".py") or "/" in module_text:
        path = parse_path(module_text, where, base).absolute()
        module = _module_from_file(path, where, module_text)
        canonical = f"{path}:{class_path}"
    else:
        if _DOTTED_RE.fullmatch(module_text) is None:
            raise ConfigError(f"{where}: {quote(module_text)} is not a module name")
        module = _import(module_text, where, text)
        canonical = text
    obj: Any = module
    for part in class_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            classes = sorted(n for n, v in vars(module).items()
                             if isinstance(v, type) and v.__module__ == module.__name__)
            known = f" (it has: {', '.join(classes)})" if classes else ""
            raise ConfigError(f"{where}: {show(module_text)} has no {show(class_path)}{known}")
    if not isinstance(obj, type):
        raise ConfigError(f"{where}: {show(class_path)} is a {type(obj).__name__}, not a class")
    return canonical, obj


def _import(name: str, where: str, text: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"{where}: no module named {quote(e.name)} (class = {quote(text)})"
            ) from None
        raise ConfigError(f"{where}: importing {show(name)} failed: {_why(e)}") from None
    except (Exception, SystemExit) as e:  # the module's own code failed
        raise ConfigError(f"{where}: importing {show(name)} failed: {_why(e)}") from None


def _module_from_file(path: Path, where: str, shown: str) -> types.ModuleType:
    """The module in path, loaded once per process (one file, one module object). Once
    loaded it is not looked for again: a jailed run (sandbox/jail.py) builds its
    machines where the file is not, from the module the system file's reading loaded."""
    import stat

    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"corevisor_userdev_{stem}_{digest}"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    try:
        st = path.stat()
    except OSError as e:
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            raise ConfigError(f"{where}: {show(shown)} does not exist") from None
        raise ConfigError(f"{where}: cannot use {show(shown)}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {show(shown)} is not a regular file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: {show(shown)} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as import does (dataclasses need it)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise ConfigError(f"{where}: loading {show(shown)} failed: {_why(e)}") from None
    return module


def _why(e: BaseException) -> str:
    """An exception as one line: its type, message and where it was raised."""
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def declared(cls: type, where: str) -> tuple[Ports | Mmio | Pci, Irq | None]:
    """What the class declares (REGION, IRQ), after checking it is a device class."""
    name = cls.__name__
    region = getattr(cls, "REGION", None)
    if not isinstance(region, Ports | Mmio | Pci):
        what = "has no REGION" if region is None else f"has REGION = {show(repr(region))}"
        raise ConfigError(
            f"{where}: {name} {what} (a Ports, Mmio or Pci: where its registers sit)"
        )
    irq = getattr(cls, "IRQ", None)
    if irq is not None and not isinstance(irq, Irq):
        raise ConfigError(f"{where}: {name}.IRQ is {show(repr(irq))}, not an Irq (or None)")
    pci = isinstance(region, Pci)
    if pci and irq is not None:
        raise ConfigError(
            f"{where}: {name} is a PCI function and declares an IRQ: its line is its slot's "
            "INTx or MSI (Pci(..., interrupt=True)): drop the IRQ"
        )
    for method in ("read", "write"):
        if not callable(getattr(cls, method, None)):
            answers = ("read(bar, offset, size) -> bytes and write(bar, offset, data)" if pci
                       else "read(offset, size) -> bytes and write(offset, data)")
            raise ConfigError(f"{where}: {name} has no {method}() method (a device answers "
                              f"{answers})")
    has_save, has_restore = (callable(getattr(cls, m, None)) for m in ("save", "restore"))
    if has_save != has_restore:
        have, lack = ("save", "restore") if has_save else ("restore", "save")
        raise ConfigError(f"{where}: {name} has {have}() but no {lack}() (give both or neither)")
    return region, irq


# ---------------------------------------------------------------------- the constructor


def _signature(cls: type, where: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """The constructor's keyword parameters after the host, and whether it takes **kw."""
    name = cls.__name__
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read the signature of {name}'s constructor") from None
    params = list(sig.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise ConfigError(
            f"{where}: {name}'s constructor takes no host (def __init__(self, host, ...))"
        )
    keywords: dict[str, inspect.Parameter] = {}
    var_keyword = False
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is p.empty:
            raise ConfigError(f"{where}: {name}'s parameter {p.name} is positional-only")
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            if p.name in RESERVED_KEYS:
                raise ConfigError(
                    f"{where}: {name}'s parameter {p.name} has the name of a devices key "
                    f"({', '.join(RESERVED_KEYS)}): rename it"
                )
            keywords[p.name] = p
    return keywords, var_keyword


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's annotations, resolved; none if they cannot be (then unchecked)."""
    try:
        return typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: no checks
        return {}


def _kinds(hint: Any) -> tuple[type, ...] | None:
    """The plain types a hint accepts (int, float, str, bool, tuple); None: unchecked."""
    if hint is None or hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        kinds: list[type] = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            inner = _kinds(arg)
            if inner is None:
                return None
            kinds.extend(inner)
        return tuple(kinds)
    if origin in (tuple, list) or hint in (tuple, list):
        return (tuple,)
    if hint in _SCALARS:
        return (hint,)
    return None


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               tuple: "an array"}


def _fits(value: Any, kinds: tuple[type, ...]) -> Any:
    """value as the parameter takes it (an int for a float parameter becomes a float), or
    a ValueError."""
    for kind in kinds:
        if kind is bool and type(value) is bool:
            return value
        if kind is int and type(value) is int:
            return value
        if kind is float and type(value) in (int, float):
            return float(value)
        if kind is str and type(value) is str:
            return value
        if kind is tuple and type(value) is tuple:
            return value
    raise ValueError(" or ".join(_KIND_NAMES[k] for k in kinds))


def _check_parameters(
    cls: type,
    values: dict[str, Any],
    where: str,
    key_where: typing.Callable[[str], str],
    class_where: str,
) -> tuple[tuple[str, Any], ...]:
    """values checked against the constructor: known, complete, of the annotated types.
    where names the table (a key unknown or missing), class_where the class."""
    keywords, var_keyword = _signature(cls, class_where)
    hints = _hints(cls)
    name = cls.__name__
    for key in values:
        if key not in keywords and not var_keyword:
            takes = ", ".join(keywords) or "no parameters"
            raise ConfigError(
                f"{where}: unknown key {quote(key)} ({name} takes {takes}; and "
                f"{', '.join(RESERVED_KEYS)})"
            )
    for key, p in keywords.items():
        if p.default is p.empty and key not in values:
            raise ConfigError(
                f"{where}: missing key {quote(key)} (a parameter of {name} without a default)"
            )
    out = []
    for key, value in values.items():
        kinds = _kinds(hints.get(key))
        if kinds:
            try:
                value = _fits(value, kinds)
            except ValueError as e:
                shown = getattr(hints[key], "__name__", None) or str(hints[key])
                raise ConfigError(
                    f"{key_where(key)}: expected {e} ({name}'s parameter {key}: {shown}), "
                    f"got {_kind_of(value)} {quote(value)}"
                ) from None
        out.append((key, value))
    return tuple(out)


def _kind_of(value: Any) -> str:
    return "an array" if type(value) is tuple else type_name(value)


# ---------------------------------------------------------------------- the spec


def _spec(
    canonical: str,
    cls: type,
    declaration: tuple[Ports | Mmio | Pci, Irq | None],
    params: tuple[tuple[str, Any], ...],
    own: dict[str, object],
    key_where: typing.Callable[[str], str],
) -> DeviceSpec:
    """The spec of a checked class: own holds the table's name, base and gsi (each
    optional), key_where names a key in messages."""
    region, irq = declaration
    name = _name(own["name"], key_where("name")) if "name" in own else _default_name(cls)
    if isinstance(region, Pci):
        return _pci_spec(canonical, cls, region, name, params, own, key_where)
    space = DeviceSpace.PORT if isinstance(region, Ports) else DeviceSpace.MMIO
    base = _address(own["base"], key_where("base")) if "base" in own else region.base
    gsi = _address(own["gsi"], key_where("gsi")) if "gsi" in own else None
    try:
        type(region)(base, region.size)
    except ValueError as e:
        raise ConfigError(f"{key_where('base')}: {e}") from None
    if gsi is not None and irq is None:
        raise ConfigError(
            f"{key_where('gsi')}: {cls.__name__} declares no IRQ (give the class one)"
        )
    return DeviceSpec(
        cls=canonical,
        name=name,
        space=space,
        base=base,
        size=region.size,
        gsi=gsi if gsi is not None else (irq.gsi if irq is not None else None),
        level=irq is not None and irq.trigger is Trigger.LEVEL,
        params=params,
    )


def _pci_spec(
    canonical: str,
    cls: type,
    region: Pci,
    name: str,
    params: tuple[tuple[str, Any], ...],
    own: dict[str, object],
    key_where: typing.Callable[[str], str],
) -> DeviceSpec:
    """A PCI function's spec: no base, no gsi (the platform places its BARs, its line is
    its slot's INTx)."""
    for key, why in (("base", "its BARs are placed by the PCI platform or the firmware"),
                     ("gsi", "its line is its slot's INTx")):
        if key in own:
            raise ConfigError(f"{key_where(key)}: {cls.__name__} is a PCI function: {why}")
    return DeviceSpec(cls=canonical, name=name, space=DeviceSpace.PCI, base=0, size=0,
                      gsi=None, level=region.interrupt, params=params)


def _default_name(cls: type) -> str:
    name = re.sub(r"[^a-z0-9_-]", "", cls.__name__.lower())[:32]
    return name if NAME_RE.fullmatch(name) else "device"


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise ConfigError(f"{where}: bad device name {quote(value)} (use {NAME_RE.pattern})")
    return value


def _address(value: object, where: str) -> int:
    if type(value) is not int or value < 0:
        raise ConfigError(
            f"{where}: expected a non-negative integer, got {type_name(value)} {quote(value)}"
        )
    return value


def _plain(value: object, where: str) -> Any:
    """A document value as a parameter: a scalar, or an array of them (as a tuple)."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            if type(item) not in _SCALARS:
                raise ConfigError(
                    f"{where}[{i}]: expected a string, number or boolean, got {type_name(item)}"
                )
            items.append(item)
        return tuple(items)
    raise ConfigError(
        f"{where}: {type_name(value)} is not a device parameter (use a string, number, "
        "boolean or an array of them)"
    )


def device_from_table(table: object, where: str, base: Path | None) -> DeviceSpec:
    """One [[partitions.NAME.devices]] table (or JSON object) -> a checked DeviceSpec.
    where: "FILE: partitions.NAME.devices[i]"; base: the file's directory."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type_name(table)}")
    if "class" not in table:
        raise ConfigError(f'{where}: missing key "class" ("package.module:Class" or '
                          '"FILE.py:Class")')
    text = table["class"]
    if not isinstance(text, str):
        raise ConfigError(f"{where}.class: expected a string, got {type_name(text)}")
    canonical, cls = load_class(text, f"{where}.class", base)
    declaration = declared(cls, f"{where}.class")
    values = {k: _plain(v, f"{where}.{k}") for k, v in table.items() if k not in RESERVED_KEYS}
    params = _check_parameters(
        cls, values, where, lambda key: f"{where}.{key}", f"{where}.class"
    )
    own = {k: table[k] for k in RESERVED_KEYS[1:] if k in table}
    return _spec(canonical, cls, declaration, params, own, lambda key: f"{where}.{key}")


def device_from_option(text: str, where: str = "--device") -> DeviceSpec:
    """`--device CLASS[,KEY=VALUE...]` -> a checked DeviceSpec; a FILE.py is relative to
    the working directory. Values are read as the constructor's annotation says (an int
    as 42 or 0x2a, a bool as true/false); unannotated ones as a number if they are one."""
    class_text, *pairs = text.split(",")
    canonical, cls = load_class(class_text, where)
    declaration = declared(cls, where)
    keywords, _ = _signature(cls, where)
    hints = _hints(cls)
    own: dict[str, str] = {}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: {quote(pair)} is not KEY=VALUE")
        if key in own or key in values:
            raise ConfigError(f"{where}: {quote(key)} is given twice")
        if key in RESERVED_KEYS:
            own[key] = value
        else:
            kinds = _kinds(hints.get(key)) if key in keywords else None
            values[key] = _from_text(value, kinds, f"{where}: {key}")
    if "class" in own:
        raise ConfigError(f"{where}: the class comes first, not as class=")
    params = _check_parameters(cls, values, where, lambda key: f"{where}: {key}", where)
    parsed: dict[str, object] = {
        k: v if k == "name" else _int_text(v, f"{where}: {k}") for k, v in own.items()
    }
    return _spec(canonical, cls, declaration, params, parsed, lambda key: f"{where}: {key}")


def _int_text(text: str, where: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"{where}: {quote(text)} is not an integer (42 or 0x2a)") from None
    return _address(value, where)


def _from_text(text: str, kinds: tuple[type, ...] | None, where: str) -> Any:
    """A --device value as the parameter's annotation reads it (unannotated: a number if
    it is one, else the text)."""
    order = kinds if kinds is not None else (int, float, str)
    for kind in sorted(order, key=(bool, int, float, str, tuple).index):
        if kind is bool and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if kind is int:
            try:
                return int(text, 0)
            except ValueError:
                continue
        if kind is float:
            try:
                return float(text)
            except ValueError:
                continue
        if kind is str:
            return text
    wanted = " or ".join(_KIND_NAMES[k] for k in order)
    raise ConfigError(f"{where}: expected {wanted}, got {quote(text)}")
