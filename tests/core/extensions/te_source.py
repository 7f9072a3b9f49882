"""Signatures read from TransformerEngine's Python source without importing it (its import
needs CUDA libraries): which keywords a class's constructor, a method or a function accepts,
following re-exports (``from .module import Linear``) and, where a constructor takes
``**kwargs``, its base class's constructor; dataclass recipes accept their fields."""

import ast
import os
from typing import List, Optional, Set, Tuple


class Signature:
    def __init__(self, params: List[str], var_keyword: bool, documented=()):
        self.params = params          # in order, without self
        self.var_keyword = var_keyword
        self.documented = set(documented)  # "name : type" entries of the docstring

    def accepts(self, keyword: str) -> bool:
        """A named parameter, or one that ``**kwargs`` takes and the docstring documents
        (TE's checkpoint pops its options from ``**kwargs``)."""
        return keyword in self.params or (self.var_keyword and keyword in self.documented)


class TESource:
    def __init__(self, root: str):
        self.root = root  # the directory holding transformer_engine/

    def _file(self, module: str) -> Optional[str]:
        base = os.path.join(self.root, *module.split("."))
        for path in (os.path.join(base, "__init__.py"), base + ".py"):
            if os.path.exists(path):
                return path
        return None

    def _tree(self, module: str):
        path = self._file(module)
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read(), path)

    def source_of(self, dotted: str) -> str:
        node, module = self.find(dotted)
        with open(self._file(module), encoding="utf-8") as f:
            return ast.get_source_segment(f.read(), node)

    def find(self, dotted: str, depth: int = 0) -> Tuple[ast.AST, str]:
        """The class or function definition ``package.module.Name`` is bound to."""
        module, name = dotted.rsplit(".", 1)
        if depth > 20:
            raise LookupError(dotted)
        tree = self._tree(module)
        if tree is None:
            raise LookupError(f"no module {module}")
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return node, module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":  # from .basic import *
                        try:
                            return self.find(f"{self._absolute(module, node)}.{name}", depth + 1)
                        except LookupError:
                            continue
                    if (alias.asname or alias.name) == name:
                        source = self._absolute(module, node)
                        try:
                            return self.find(f"{source}.{alias.name}", depth + 1)
                        except LookupError:
                            # ``from package import submodule``-style: keep looking
                            continue
        raise LookupError(f"{name} is not defined in {module}")

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        package = module if self._file(module).endswith("__init__.py") else \
            module.rsplit(".", 1)[0]
        parts = package.split(".")
        if node.level > 1:
            parts = parts[:-(node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _base(self, cls: ast.ClassDef, module: str) -> Optional[Tuple[ast.ClassDef, str]]:
        for base in cls.bases:
            name = base.id if isinstance(base, ast.Name) else \
                base.attr if isinstance(base, ast.Attribute) else None
            if name in (None, "object", "Enum", "torch", "Module") or \
                    (isinstance(base, ast.Attribute) and ast.unparse(base).startswith("torch.")):
                continue
            try:
                return self.find(f"{module}.{name}")
            except LookupError:
                continue
        return None

    def signature(self, dotted: str, method: str = "__init__") -> Signature:
        node, module = self.find(dotted)
        if isinstance(node, ast.FunctionDef):
            return _params(node)
        return self._class_signature(node, module, method)

    def _class_signature(self, cls: ast.ClassDef, module: str, method: str) -> Signature:
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == method:
                sig = _params(item)
                if sig.var_keyword and method == "__init__":
                    base = self._base(cls, module)
                    if base is not None:
                        inherited = self._class_signature(base[0], base[1], method)
                        sig = Signature(sig.params + [p for p in inherited.params
                                                      if p not in sig.params],
                                        inherited.var_keyword)
                return sig
        if method == "__init__" and _is_dataclass(cls):
            return Signature(self._fields(cls, module), False)
        base = self._base(cls, module)
        if base is None:
            raise LookupError(f"{cls.name} has no {method}")
        return self._class_signature(base[0], base[1], method)

    def _fields(self, cls: ast.ClassDef, module: str) -> List[str]:
        """A dataclass's fields, its dataclass bases' first."""
        base = self._base(cls, module)
        inherited = self._fields(*base) if base and _is_dataclass(base[0]) else []
        own = [t.target.id for t in cls.body
               if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)]
        return inherited + [f for f in own if f not in inherited]

    def enum_members(self, dotted: str) -> Set[str]:
        node, _ = self.find(dotted)
        return {t.id for item in node.body if isinstance(item, ast.Assign)
                for t in item.targets if isinstance(t, ast.Name)}


def _is_dataclass(cls: ast.ClassDef) -> bool:
    return any("dataclass" in ast.unparse(d) for d in cls.decorator_list)


def _params(fn: ast.FunctionDef) -> Signature:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    doc = ast.get_docstring(fn) or ""
    documented = [line.split(":")[0].strip() for line in doc.splitlines()
                  if " : " in line and line.split(":")[0].strip().isidentifier()]
    return Signature(names, args.kwarg is not None, documented)
