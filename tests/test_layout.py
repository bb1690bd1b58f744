"""The installed import names: everything is under ``dream3d``, so nothing shadows or is shadowed by
another PyPI package (``guidance`` is one), and the CLI's help costs no torch import."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_our_folders_are_subpackages_of_dream3d(tmp_path):
    out = _python("import dream3d.guidance.sds, dream3d.representations.nerf, dream3d.web.form as w; print(w.__file__)",
                  tmp_path)
    assert Path(out.strip()) == ROOT / "web" / "form.py"


def test_top_level_guidance_and_representations_are_not_ours(tmp_path):
    """Outside the source tree, ``import guidance`` finds PyPI's package or nothing, never our folder."""
    code = ("import importlib.util\n"
            "for name in ('guidance', 'representations', 'web'):\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    print(None if spec is None else spec.origin)\n")
    for origin in _python(code, tmp_path).split():
        assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), origin


def test_help_imports_no_torch(tmp_path):
    code = "import sys; sys.argv = ['dream3d', '--help']\nfrom dream3d.cli import main\ntry:\n    main()\n" \
           "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    assert _python(code, tmp_path).strip().splitlines()[-1] == "False"
