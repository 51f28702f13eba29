"""Search spaces: one declarative TOML file per kernel family (search_spaces/<family>.toml).

    family = "update_state"
    constraints = [                       # top level, before [fields]
        "tile_m % (16 * warps) == 0",     # over config fields AND problem-key fields
        "tile_k <= head_dim",
    ]
    [fields]                              # config field -> its choices
    tile_m = [64, 128]
    warps = [4, 8]

Field names exist once, in the family's pydantic Config: the file only names them, and
every choice is validated by that model's field type. Fields not listed take the model's
default. Constraint expressions are parsed once and evaluated by a small interpreter that
accepts only names, numbers/strings/booleans, arithmetic, comparisons, `in`, and/or/not
and `a if c else b` (no calls, attributes, subscripts), and refuses operations whose result
would be huge (integers past MAX_INT_BITS, repeats past MAX_REPEAT). A candidate config is valid when
every constraint holds, the Config model accepts it and (given an arch) the family's
check() accepts it.
"""
from __future__ import annotations

import ast
import itertools
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vidrial.core.errors import VidrialError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TOP_LEVEL_KEYS = ("family", "description", "constraints", "fields")


class SearchSpaceError(VidrialError, ValueError):
    """A search-space file that cannot be used: names the file, the entry and what is allowed."""


# ---- safe constraint expressions ---------------------------------------------------------
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_, ast.BitXor: operator.xor,
}
_CMPOPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_ALLOWED_TEXT = ("names, numbers, strings, True/False, + - * / // % ** << >> & | ^, comparisons, "
                 "`in` (tuple/list of literals), and/or/not, `a if cond else b`")


class ConstraintSyntaxError(SearchSpaceError):
    pass


@dataclass(frozen=True)
class Constraint:
    """One parsed constraint expression."""

    text: str
    tree: ast.Expression = field(repr=False, compare=False)
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str, where: str = "constraint") -> Constraint:
        if not isinstance(text, str) or not text.strip():
            raise ConstraintSyntaxError(f"{where}: expected a non-empty expression string, got {text!r}")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ConstraintSyntaxError(f"{where}: {text!r} is not a valid expression ({exc.msg})") from None
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                if not isinstance(node.ctx, ast.Load):
                    raise ConstraintSyntaxError(f"{where}: {text!r}: assignment is not allowed")
                names.add(node.id)
            elif isinstance(node, ast.Constant):
                if not isinstance(node.value, (int, float, str, bool)):
                    raise ConstraintSyntaxError(f"{where}: {text!r}: constant {node.value!r} is not allowed")
            elif isinstance(node, (ast.Tuple, ast.List)):
                if not all(isinstance(e, ast.Constant) or (isinstance(e, ast.UnaryOp) and isinstance(e.operand, ast.Constant))
                           for e in node.elts):
                    raise ConstraintSyntaxError(f"{where}: {text!r}: tuples/lists may hold literals only")
            elif isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.Compare, ast.IfExp, ast.Load)):
                pass
            elif isinstance(node, ast.BinOp):
                if type(node.op) not in _BINOPS:
                    raise ConstraintSyntaxError(f"{where}: {text!r}: operator {type(node.op).__name__} is not allowed")
            elif isinstance(node, ast.UnaryOp):
                if type(node.op) not in _UNARY:
                    raise ConstraintSyntaxError(f"{where}: {text!r}: operator {type(node.op).__name__} is not allowed")
            elif type(node) in _BINOPS or type(node) in _CMPOPS or type(node) in _UNARY:
                pass
            else:
                what = {ast.Call: "function calls", ast.Attribute: "attribute access", ast.Subscript: "subscripts",
                        ast.Lambda: "lambdas"}.get(type(node), type(node).__name__)
                raise ConstraintSyntaxError(f"{where}: {text!r}: {what} not allowed; allowed: {_ALLOWED_TEXT}")
        return cls(text=text.strip(), tree=tree, names=frozenset(names))

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        try:
            return bool(_eval(self.tree.body, env))
        except ZeroDivisionError:
            return False
        except (TypeError, ValueError, OverflowError) as exc:
            raise SearchSpaceError(f"constraint {self.text!r} cannot be evaluated for {dict(env)}: {exc}") from None


# Constraint values are sizes and byte counts (far below 2**64). Capping the exponent alone does
# not bound the work: nested powers ((9**64)**64)**64 grow the operands, and each step costs more
# (minutes at the fourth level). So ** * << are refused before they would make an integer wider than
# MAX_INT_BITS or a repeated string/tuple longer than MAX_REPEAT; each check is O(1).
MAX_INT_BITS = 1024
MAX_REPEAT = 4096


def _describe(v: Any) -> str:
    return f"an integer of {abs(v).bit_length()} bits" if isinstance(v, int) and abs(v) >> 64 else repr(v)


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Raises ValueError when `left op right` would be too large to compute quickly."""
    if isinstance(left, int) and isinstance(right, int):
        width = abs(left).bit_length()
        if isinstance(op, ast.Pow):
            bits, symbol = width * max(right, 0), "**"
        elif isinstance(op, ast.Mult):
            bits, symbol = width + abs(right).bit_length(), "*"
        elif isinstance(op, ast.LShift):
            bits, symbol = width + max(right, 0), "<<"
        else:
            return
        if bits > MAX_INT_BITS:
            raise ValueError(f"{_describe(left)} {symbol} {_describe(right)} would have about {bits} bits "
                             f"(at most {MAX_INT_BITS})")
    elif isinstance(op, ast.Mult):
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                raise ValueError(f"{type(seq).__name__} of length {len(seq)} repeated {_describe(n)} times is "
                                 f"too long (at most {MAX_REPEAT} items)")


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        try:
            return env[node.id]
        except KeyError:
            raise SearchSpaceError(f"unknown name {node.id!r}; known: {', '.join(sorted(env))}") from None
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow) and (not isinstance(right, (int, float)) or abs(right) > 64):
            raise ValueError(f"exponent {right!r} too large (at most 64)")
        if isinstance(node.op, ast.LShift) and right > 64:
            raise ValueError(f"shift {right!r} too large (at most 64)")
        _check_size(node.op, left, right)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            result: Any = True
            for v in node.values:
                result = _eval(v, env)
                if not result:
                    return result
            return result
        result = False
        for v in node.values:
            result = _eval(v, env)
            if result:
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env) if _eval(node.test, env) else _eval(node.orelse, env)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_eval(e, env) for e in node.elts)
    raise SearchSpaceError(f"expression node {type(node).__name__} not allowed")  # parse() prevents this


# ---- the space ---------------------------------------------------------------------------
@dataclass
class SearchSpace:
    """Which fields of `family.Config` are searched, their choices and the constraints."""

    family: Any  # a KernelFamily
    fields: dict[str, list[Any]]
    constraints: list[Constraint]
    source: str = "<inline>"
    description: str = ""

    @property
    def config_cls(self) -> type:
        return self.family.Config

    @property
    def size(self) -> int:
        n = 1
        for choices in self.fields.values():
            n *= len(choices)
        return n

    def iter_values(self) -> Iterator[dict[str, Any]]:
        """Every combination of choices, in file order (the product space)."""
        names = list(self.fields)
        for combo in itertools.product(*(self.fields[n] for n in names)):
            yield dict(zip(names, combo))

    def make_config(self, key: Any, values: Mapping[str, Any], arch: str | None = None):
        """(config, None) when `values` is valid for `key`; (None, reason) otherwise."""
        env = {**key.model_dump(), **_defaults(self.config_cls), **values}
        for c in self.constraints:
            if not c.evaluate(env):
                return None, f"constraint {c.text!r} fails"
        try:
            config = self.config_cls.model_validate(dict(values))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "config"
            return None, f"{self.config_cls.__name__} rejects {where}: {first.get('msg')}"
        if arch is not None:
            try:
                self.family.check(key, config, arch)
            except (ValueError, VidrialError) as exc:
                return None, f"check: {exc}"
            except Exception as exc:  # a bug in check() must not end the study; report it
                return None, f"check() raised {type(exc).__name__}: {exc}"
        return config, None

    def valid_configs(self, key: Any, arch: str | None = None) -> list[Any]:
        """All valid configs for `key`, in a deterministic order (file order of choices)."""
        out = []
        for values in self.iter_values():
            config, _ = self.make_config(key, values, arch)
            if config is not None:
                out.append(config)
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Asks an Optuna trial for one value per searched field (the field's own name)."""
        return {name: trial.suggest_categorical(name, choices) for name, choices in self.fields.items()}

    def distributions(self) -> dict[str, Any]:
        import optuna

        return {name: optuna.distributions.CategoricalDistribution(choices) for name, choices in self.fields.items()}

    def params_of(self, config: Any) -> dict[str, Any]:
        """The searched fields' values of `config` (Optuna params)."""
        dumped = config.model_dump(mode="json")
        return {name: dumped[name] for name in self.fields}


def _defaults(config_cls: type) -> dict[str, Any]:
    out = {}
    for name, info in config_cls.model_fields.items():
        if not info.is_required():
            out[name] = info.get_default(call_default_factory=True)
    return out


def _field_problem(config_cls: type, name: str, value: Any) -> str | None:
    """Why the Config model rejects `value` for field `name` on its own (type and field
    validators); errors of other fields and of cross-field model validators are ignored,
    those are judged per combination."""
    try:
        config_cls.model_validate({**_defaults(config_cls), name: value})
    except ValidationError as exc:
        for err in exc.errors():
            if tuple(err.get("loc", ())) == (name,):
                return str(err.get("msg"))
    except (ValueError, VidrialError):
        return None  # a model-level rule: judged per combination
    return None


def parse_search_space(data: Mapping[str, Any], family: Any, source: str = "<inline>") -> SearchSpace:
    """Validates a loaded TOML document against `family`'s Config and Key models."""
    config_cls, key_cls = family.Config, family.Key
    config_fields = list(config_cls.model_fields)
    key_fields = list(key_cls.model_fields)

    unknown_top = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown_top:
        raise SearchSpaceError(f"{source}: unknown top-level entr{'y' if len(unknown_top) == 1 else 'ies'} "
                               f"{', '.join(map(repr, unknown_top))}; allowed: {', '.join(TOP_LEVEL_KEYS)} "
                               "(note: `constraints = [...]` must come before the [fields] table)")
    declared = data.get("family")
    if declared is None:
        raise SearchSpaceError(f"{source}: missing `family = \"{family.name}\"`")
    if declared != family.name:
        raise SearchSpaceError(f"{source}: family = {declared!r}, but this file is loaded for family {family.name!r}")
    raw_fields = data.get("fields")
    if not isinstance(raw_fields, Mapping) or not raw_fields:
        raise SearchSpaceError(f"{source}: needs a non-empty [fields] table mapping fields of "
                               f"{config_cls.__name__} to lists of choices; fields are: {', '.join(config_fields)}")
    fields: dict[str, list[Any]] = {}
    for name, choices in raw_fields.items():
        if name not in config_cls.model_fields:
            hint = (f" (TOML put `{name}` inside [fields]: write top-level entries before the [fields] table)"
                    if name in TOP_LEVEL_KEYS else "")
            raise SearchSpaceError(f"{source}: fields.{name}: {name!r} is not a field of {config_cls.__name__}; "
                                   f"fields are: {', '.join(config_fields)}{hint}")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{source}: fields.{name}: expected a non-empty list of choices, got {choices!r}")
        validated = []
        for choice in choices:
            if isinstance(choice, (dict, list)):
                raise SearchSpaceError(f"{source}: fields.{name}: choice {choice!r}: choices must be "
                                       "numbers, strings or booleans")
            problem = _field_problem(config_cls, name, choice)
            if problem:
                raise SearchSpaceError(f"{source}: fields.{name}: choice {choice!r} is not allowed by "
                                       f"{config_cls.__name__}.{name}: {problem}")
            value = choice
            if value in validated:
                raise SearchSpaceError(f"{source}: fields.{name}: choice {choice!r} is listed twice")
            validated.append(choice)
        fields[name] = validated
    missing = [n for n, info in config_cls.model_fields.items() if info.is_required() and n not in fields]
    if missing:
        raise SearchSpaceError(f"{source}: {config_cls.__name__} field(s) {', '.join(missing)} have no default; "
                               "list them under [fields]")
    raw_constraints = data.get("constraints", [])
    if not isinstance(raw_constraints, list):
        raise SearchSpaceError(f"{source}: constraints: expected a list of expression strings, got {raw_constraints!r}")
    known = set(config_fields) | set(key_fields)
    clash = sorted(set(config_fields) & set(key_fields))
    constraints = []
    for i, text in enumerate(raw_constraints):
        c = Constraint.parse(text, where=f"{source}: constraints[{i}]")
        unknown = sorted(c.names - known)
        if unknown:
            raise SearchSpaceError(
                f"{source}: constraints[{i}] {text!r}: unknown name(s) {', '.join(unknown)}; allowed: config fields "
                f"({', '.join(config_fields)}) and key fields ({', '.join(key_fields)})"
                + (f"; note {', '.join(clash)} is in both (the config's value wins)" if clash else ""))
        constraints.append(c)
    return SearchSpace(family=family, fields=fields, constraints=constraints, source=source,
                       description=str(data.get("description", "")))


def search_space_path(family_name: str) -> Path:
    from vidrial.core.paths import data_dir

    return data_dir("search_spaces") / f"{family_name}.toml"


def load_search_space(family: Any, path: str | Path | None = None) -> SearchSpace:
    """The search space of `family`: from `path`, else the family's own `SEARCH_SPACE_TOML`
    text (test families), else search_spaces/<family.name>.toml. `family` may be a
    KernelFamily, a registered name or a 'module:attr' reference."""
    if isinstance(family, str):
        from vidrial.tuning.worker import resolve_family

        family = resolve_family(family)
    if path is None and getattr(family, "SEARCH_SPACE_TOML", None):
        text, source = family.SEARCH_SPACE_TOML, f"<{family.name}.SEARCH_SPACE_TOML>"
    else:
        p = Path(path) if path is not None else search_space_path(family.name)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SearchSpaceError(f"no search space for kernel family {family.name!r}: {p} does not exist") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SearchSpaceError(f"{source}: not valid TOML ({exc})") from None
    return parse_search_space(data, family, source)


__all__ = ["SearchSpace", "SearchSpaceError", "Constraint", "ConstraintSyntaxError", "load_search_space",
           "parse_search_space", "search_space_path"]
