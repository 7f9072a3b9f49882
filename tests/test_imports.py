"""No module imports TransformerEngine or apex at import time: every module of the package,
the entry point and the tools import with both made unimportable (as on a machine without
them), and neither is loaded afterwards."""

import subprocess
import sys

from tests.helpers import REPO

PROBE = r'''
import importlib, importlib.abc, os, pkgutil, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformer_engine", "apex"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Absent())
sys.path[:0] = [".", "tools", "tools/checkpoint"]
import megatron
names = [m.name for m in pkgutil.walk_packages(megatron.__path__, "megatron.")]
names.append("pretrain_gpt")
for folder in ("tools", "tools/checkpoint"):
    names += [f[:-3] for f in sorted(os.listdir(folder)) if f.endswith(".py")]
for name in names:
    importlib.import_module(name)
loaded = [m for m in sys.modules if m.split(".")[0] in ("transformer_engine", "apex")]
assert not loaded, loaded
print(len(names), "modules")
'''


def test_every_module_imports_without_transformer_engine_and_apex():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[0]) > 50
