"""The dependency set: no GPL codec and no MLflow server in the required set, the DICOM transfer syntaxes
still decoded without pylibjpeg-libjpeg (GDCM, OpenJPEG, JPEG-LS, RLE), and `import medseg` /
`medseg --help` free of MLflow, pandas and torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.dicom_cases import SYNTAXES
from tests.helpers import REPO

NO_LIBJPEG = REPO / "tests" / "no_libjpeg"  # a sitecustomize that hides pylibjpeg-libjpeg


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_required_set_is_lean_and_licensed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = _names(project["dependencies"])
    assert "pylibjpeg-libjpeg" not in required  # GPL-3.0: opt-in only
    assert "mlflow" not in required  # the server and UI are the `server` extra
    assert {"mlflow-skinny", "sqlalchemy", "alembic", "simpleitk", "python-gdcm"} <= required
    assert _names(project["optional-dependencies"]["jpeg-gpl"]) == {"pylibjpeg-libjpeg"}
    assert "mlflow" in _names(project["optional-dependencies"]["server"])


def _without_libjpeg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{NO_LIBJPEG}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_jpeg_syntaxes_have_a_decoder_without_libjpeg():
    code = (
        "from pydicom.pixels.decoders.base import get_decoder\n"
        "from pydicom import uid\n"
        "for ts in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1):\n"
        "    plugins = get_decoder(ts).available_plugins\n"
        "    assert 'pylibjpeg' not in plugins and 'gdcm' in plugins, (ts.name, plugins)\n"
        "try:\n"
        "    import libjpeg\n"
        "except ImportError:\n"
        "    print('hidden')\n"
    )
    proc = _without_libjpeg("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hidden"


def test_dicom_codec_tests_pass_without_libjpeg():
    proc = _without_libjpeg(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_dicom_reader.py",
        "-k",
        "transfer_syntaxes",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(SYNTAXES)} passed" in proc.stdout


def _python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter that imports medseg from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_import_and_help_load_no_tracking_or_torch():
    code = (
        "import sys\n"
        "import medseg, medseg.cli\n"
        "medseg.cli.build_parser().format_help()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'pandas', 'torch', 'monai', 'sqlalchemy'}))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_inference_start_up_leaves_out_monais_unused_extras_and_only_while_monai_loads():
    """`medseg infer` imports MONAI without MLflow, pyplot, pandas, ... (about 2 s of every run); the
    packages import normally afterwards, for medseg's own MLflow tracking and pictures."""
    code = (
        "import sys\n"
        "from medseg.startup import MONAI_OPTIONAL_UNUSED_BY_INFERENCE, import_monai_lean\n"
        "import_monai_lean()\n"
        "import medseg.batch, medseg.predict, medseg.backends\n"
        "print(sorted(m for m in MONAI_OPTIONAL_UNUSED_BY_INFERENCE if m in sys.modules))\n"
        "import mlflow, matplotlib.figure\n"
        "print(mlflow.__name__, 'monai' in sys.modules)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "mlflow True"]
