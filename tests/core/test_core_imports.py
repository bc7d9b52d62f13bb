import subprocess
import sys


def test_core_imports_numpy_and_nothing_else_third_party():
    code = (
        "import sys, itscale.core, itscale.testing.enumerable;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'pydantic', 'scipy', 'torch', 'transformers', 'httpx'});"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"itscale.core pulled in: {out}"
